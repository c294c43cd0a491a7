"""`prompt-jax sweep`: a 2x2 grid on the tiny demo model, end to end, resumed, collected; each
cell in its own process, failures recorded."""

import csv
import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from prompt_jax import cli
from prompt_jax.tools import sweep, sweep_plots

# sweeps/tiny_demo.gin: tiny model x 1 method x {random, class_label} x prompt lengths {2, 10}.
CELL_BINDINGS = ["--cell_binding=TRAIN_STEPS = 2",
                 "--cell_binding=trainer.train.log_every_steps = 1",
                 "--cell_binding=trainer.train.eval_at_start = False"]


def _read_csv(path):
  with open(path) as f:
    return list(csv.DictReader(f))


@pytest.fixture
def compilation_cache(tmp_path, monkeypatch):
  """Cells with equal shapes reuse compiled steps: every cell's process shares one XLA cache
  (the test session's when conftest set one, else this test's)."""
  if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", str(tmp_path / "xla_cache"))
  monkeypatch.setenv("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
  monkeypatch.setenv("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")


def test_expand_orders_files_and_bindings(tmp_path):
  cfg = sweep.SweepConfig(
      name="t", sweep_dir=str(tmp_path), base_gin_files=["runs/base.gin"],
      sizes={"s": {"gin_files": ["models/s.gin"], "bindings": ["A = 1"]}},
      methods={"m": {"gin_files": ["prompts/m.gin"]}},
      initializers={"i": {"gin_files": ["init.gin"], "bindings": ["B = 2"]}},
      prompt_lengths=[5, 20], learning_rates=[0.3], seeds=[0, 1], bindings=["C = 3"])
  cells = sweep.expand(cfg)
  assert [c.name for c in cells] == ["s-m-i-len5-lr0.3-seed0", "s-m-i-len5-lr0.3-seed1",
                                     "s-m-i-len20-lr0.3-seed0", "s-m-i-len20-lr0.3-seed1"]
  last = cells[-1]
  assert last.gin_files == ("models/s.gin", "prompts/m.gin", "init.gin", "runs/base.gin")
  model_dir = os.path.join(str(tmp_path), last.name)
  assert last.bindings == ("C = 3", "A = 1", "B = 2", "PROMPT_LENGTH = 20",
                           "LEARNING_RATE = 0.3", "SEED = 1", f"MODEL_DIR = {model_dir!r}")
  excluded = dataclasses.replace(cfg, exclude=[{"prompt_length": 5, "seed": 1}])
  assert [c.name for c in sweep.expand(excluded)] == [
      "s-m-i-len5-lr0.3-seed0", "s-m-i-len20-lr0.3-seed0", "s-m-i-len20-lr0.3-seed1"]
  with pytest.raises(ValueError, match="SweepConfig.seeds must not be empty"):
    sweep.SweepConfig(name="t", sweep_dir="x", base_gin_files=[], sizes=cfg.sizes,
                      methods=cfg.methods, initializers=cfg.initializers, seeds=[])


def test_commands_mode_writes_one_line_per_cell(tmp_path):
  argv = ["--gin_file=sweeps/lester_scale.gin", f"--sweep_dir={tmp_path}", "--mode=commands"]
  assert cli.main(["sweep", *argv]) == 0
  lines = (tmp_path / "commands.sh").read_text().splitlines()
  jobs = [line for line in lines if "prompt-jax train" in line]
  assert len(jobs) == 5 * (5 * 3 - 1)  # sizes x (lengths x inits - excluded class_label len 1)
  assert all("gcloud compute tpus tpu-vm ssh" in j for j in jobs)
  assert any("models/t5_1_1_lm_adapted_xxl.gin" in j and "PROMPT_LENGTH = 150" in j
             for j in jobs)
  rows = _read_csv(tmp_path / "results.csv")
  assert len(rows) == 70 and {r["status"] for r in rows} == {"pending"}
  assert {r["parameters"] for r in rows if r["size"] == "xxl"} == {"11135332352"}


@pytest.mark.slow  # four training runs in subprocesses: ~100 s idle
def test_tiny_2x2_sweep_runs_resumes_and_collects(tmp_path, compilation_cache):
  argv = ["--gin_file=sweeps/tiny_demo.gin", f"--sweep_dir={tmp_path}", "--stop_on_error",
          *CELL_BINDINGS]
  assert cli.main(["sweep", *argv]) == 0
  rows = _read_csv(tmp_path / "results.csv")
  assert len(rows) == 4
  configured = {(r["initializer"], int(r["prompt_length"])) for r in rows}
  assert configured == {("random", 2), ("random", 10), ("class_label", 2), ("class_label", 10)}
  for r in rows:
    assert r["status"] == "finished" and r["size"] == "tiny" and r["method"] == "prompt_tuning"
    assert float(r["learning_rate"]) == 0.3 and int(r["seed"]) == 0 and int(r["steps"]) == 2
    assert int(r["parameters"]) == 246_784  # the tiny T5 1.1, counted from its config
    summary = json.loads((tmp_path / r["cell"] / "summary.json").read_text())
    assert float(r["score"]) == pytest.approx(summary["eval_trained"]["accuracy"])
    assert 0.0 <= float(r["score"]) <= 100.0
  for png in ("score_vs_parameters.png", "score_vs_prompt_length.png",
              "score_vs_initializer.png"):
    assert (tmp_path / png).stat().st_size > 1000

  # Delete one cell: only that cell runs again.
  deleted = rows[2]["cell"]
  shutil.rmtree(tmp_path / deleted)
  mtimes = {r["cell"]: os.path.getmtime(tmp_path / r["cell"] / "summary.json")
            for r in rows if r["cell"] != deleted}
  assert cli.main(["sweep", *argv]) == 0
  rows_again = _read_csv(tmp_path / "results.csv")
  assert [r["cell"] for r in rows_again] == [r["cell"] for r in rows]
  assert all(r["status"] == "finished" for r in rows_again)
  assert (tmp_path / deleted / "summary.json").exists()
  for cell, mtime in mtimes.items():
    assert os.path.getmtime(tmp_path / cell / "summary.json") == mtime


# Two cells bind the same macros differently (TRAIN_STEPS through their method, PROMPT_LENGTH
# through the grid); no eval, and the size's parameter count given, to keep it short.
ISOLATION_SWEEP = """
from __gin__ import dynamic_registration
from prompt_jax.tools import sweep

include 'sweeps/tiny_demo.gin'

sweep.SweepConfig.sizes = {
    'tiny': {'gin_files': ['models/t5_1_1_tiny.gin'], 'parameters': 246784,
             'bindings': ["INITIAL_CHECKPOINT_PATH = 'builtin:demo_t5_tiny.npz'"]}}
sweep.SweepConfig.methods = {
    'one_step': {'gin_files': ['prompts/uniform.gin'], 'bindings': ['TRAIN_STEPS = 1']},
    'three_steps': {'gin_files': ['prompts/uniform.gin'], 'bindings': ['TRAIN_STEPS = 3']}}
sweep.SweepConfig.initializers = {'random': {'gin_files': ['sweeps/initializers/random.gin']}}
sweep.SweepConfig.exclude = [{'method': 'one_step', 'prompt_length': 10},
                             {'method': 'three_steps', 'prompt_length': 2}]
"""


def test_each_local_cell_sees_its_own_bindings(tmp_path, compilation_cache):
  (tmp_path / "isolation.gin").write_text(ISOLATION_SWEEP)
  sweep_dir = tmp_path / "sweep"
  argv = [f"--gin_file={tmp_path / 'isolation.gin'}", f"--sweep_dir={sweep_dir}",
          "--stop_on_error", "--cell_binding=trainer.train.eval_dataset_cfg = None",
          "--cell_binding=trainer.train.log_every_steps = 1"]
  assert cli.main(["sweep", *argv]) == 0
  rows = {r["method"]: r for r in _read_csv(sweep_dir / "results.csv")}
  assert sorted(rows) == ["one_step", "three_steps"]
  for method, steps, length in (("one_step", 1, 2), ("three_steps", 3, 10)):
    cell_dir = sweep_dir / rows[method]["cell"]
    assert rows[method]["status"] == "finished" and int(rows[method]["steps"]) == steps
    assert json.loads((cell_dir / "summary.json").read_text())["step"] == steps
    assert np.load(cell_dir / "prompts" / f"prompt_{steps}.npy").shape == (length, 64)
    info = json.loads((cell_dir / "sweep_cell.json").read_text())
    assert info["values"]["prompt_length"] == length and info["parameters"] == 246_784
    assert info["bindings"][-5:-3] == [f"TRAIN_STEPS = {steps}", f"PROMPT_LENGTH = {length}"]


def test_failed_cells_report_exit_code_and_last_stderr_line(tmp_path, capsys):
  """A cell whose process fails is recorded and the sweep goes on; --stop_on_error stops."""
  argv = ["--gin_file=sweeps/tiny_demo.gin", f"--sweep_dir={tmp_path}",
          "--select=initializer=random", "--cell_binding=TRAIN_STEPS = 0"]
  assert cli.main(["sweep", *argv]) == 1
  rows = _read_csv(tmp_path / "results.csv")
  assert [r["status"] for r in rows] == ["failed", "failed"]
  message = "TRAIN_STEPS must be an integer >= 1, got 0"
  for r in rows:
    error = json.loads((tmp_path / r["cell"] / "sweep_error.json").read_text())
    assert error["exit_code"] == 1 and error["error"].startswith(f"error: {message}")
    assert error["command"][1:4] == ["-m", "prompt_jax.cli", "train"]
  err = capsys.readouterr().err
  assert err.count(f"exited with code 1: {message}") == 2 and "the sweep goes on" in err

  assert cli.main(["sweep", *argv, "--stop_on_error"]) == 1
  err = capsys.readouterr().err
  assert f"error: cell {rows[0]['cell']} exited with code 1: {message}" in err
  assert rows[1]["cell"] not in err  # stopped before the second cell


@pytest.mark.parametrize("count, label", [(1_083_136, "1.1M"), (20_949_504, "21M"),
                                          (247_424, "247k"), (11_135_332_352, "11B"), (12, "12")])
def test_parameter_tick_labels(count, label):
  assert sweep_plots.parameter_label(count) == label


# One cell of sweeps/tiny_demo.gin, no eval: the signal and binding tests below.
ONE_CELL = ["--gin_file=sweeps/tiny_demo.gin", "--select=initializer=random",
            "--select=prompt_length=2", "--cell_binding=trainer.train.log_every_steps = 1",
            "--cell_binding=trainer.train.eval_at_start = False",
            "--cell_binding=trainer.train.eval_dataset_cfg = None"]


def _train_steps(cell_dir):
  """{step: time} of the cell's logged training steps (MODEL_DIR/metrics.jsonl)."""
  lines = (cell_dir / "metrics.jsonl").read_text().splitlines() if (
      cell_dir / "metrics.jsonl").exists() else []
  records = [json.loads(line) for line in lines if line.strip()]
  return {r["step"]: r["time"] for r in records if r["split"] == "train" and r["name"] == "loss"}


@pytest.mark.slow  # three training processes: ~60 s idle
def test_sigterm_to_the_sweep_saves_the_running_cell_and_the_rerun_resumes_it(
    tmp_path, compilation_cache, capfd):
  argv = [*ONE_CELL, f"--sweep_dir={tmp_path}", "--cell_binding=TRAIN_STEPS = 150"]
  cell_dir = tmp_path / "tiny-prompt_tuning-random-len2-lr0.3-seed0"
  proc = subprocess.Popen([sys.executable, "-m", "prompt_jax.cli", "sweep", *argv],
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          env=sweep.child_env(), cwd=os.getcwd())
  try:
    deadline = time.monotonic() + 240
    while not _train_steps(cell_dir) and proc.poll() is None and time.monotonic() < deadline:
      time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)  # the sweep's process only, as `kill <pid>` sends it
    _, err = proc.communicate(timeout=120)
  finally:
    if proc.poll() is None:
      proc.kill()
  err = err.decode()
  assert proc.returncode == 75, err[-3000:]
  last = [line for line in err.splitlines() if line.strip()][-1]
  assert last.startswith("sweep stopped by SIGTERM: cell tiny-prompt_tuning-random-len2")
  assert last.endswith("rerun the same sweep command to continue")
  saved = sorted(int(p.name) for p in (cell_dir / "checkpoints").iterdir() if p.name.isdigit())
  assert saved and 1 <= saved[-1] < 150, saved  # saved where it stopped
  assert not (cell_dir / "sweep_error.json").exists()  # nothing recorded as failed
  assert json.loads((cell_dir / "sweep_cell.json").read_text())["status"] == "running"
  before = _train_steps(cell_dir)
  stopped = saved[-1]

  # The same command continues the cell from its checkpoint: steps up to the saved one are not
  # trained again (their log lines are the first run's), the rest are.
  assert cli.main(["sweep", *argv]) == 0
  after = _train_steps(cell_dir)
  assert sorted(after) == list(range(1, 151))
  assert all(after[s] == before[s] for s in range(1, stopped + 1))
  assert f"at step {stopped}" in capfd.readouterr().out
  summary = json.loads((cell_dir / "summary.json").read_text())
  assert summary["step"] == 150
  assert json.loads((cell_dir / "sweep_cell.json").read_text())["status"] == "finished"

  # More steps: the finished cell is run again (not reused) and continues its training run.
  more = [*argv, "--cell_binding=TRAIN_STEPS = 152"]
  assert cli.main(["sweep", *more]) == 0
  assert "'TRAIN_STEPS = 150' -> 'TRAIN_STEPS = 152'" in capfd.readouterr().out
  after_more = _train_steps(cell_dir)
  assert sorted(after_more) == list(range(1, 153)) and after_more[150] == after[150]
  assert json.loads((cell_dir / "summary.json").read_text())["step"] == 152

  # A cell directory without a sweep record (made before records existed) whose run record
  # (run.json) contradicts the cell: the cell fails with the training run's one line.
  (cell_dir / "sweep_cell.json").unlink()
  (cell_dir / "summary.json").unlink()
  assert cli.main(["sweep", *more, "--cell_binding=BATCH_SIZE = 16"]) == 1
  err = capfd.readouterr().err
  error = json.loads((cell_dir / "sweep_error.json").read_text())["error"]
  assert error.startswith("error: MODEL_DIR") and "data.batch_size=32" in error
  assert "Traceback" not in err and f"exited with code 1: {error[len('error: '):]}" in err
  assert _read_csv(tmp_path / "results.csv")[0]["status"] == "failed"


def test_a_cell_trained_with_other_bindings_is_refused_never_reused(tmp_path, capsys,
                                                                    monkeypatch):
  launched = []
  monkeypatch.setattr(sweep, "run_cell", lambda cell, *a, **k: launched.append(cell.name) or 1.0)
  argv = [*ONE_CELL, f"--sweep_dir={tmp_path}", "--cell_binding=TRAIN_STEPS = 5"]
  assert cli.main(["sweep", *argv]) == 0  # "trains" the cell (recorded, nothing run)
  assert len(launched) == 1
  cell_dir = tmp_path / launched[0]
  record = json.loads((cell_dir / "sweep_cell.json").read_text())
  assert record["status"] == "finished" and "TRAIN_STEPS = 5" in record["bindings"]
  assert record["gin_files"][-1] == "runs/prompt_finetune.gin"
  (cell_dir / "summary.json").write_text(json.dumps({"step": 5}))
  (cell_dir / "checkpoints").mkdir()

  assert cli.main(["sweep", *argv]) == 0  # the same settings: reused
  assert len(launched) == 1
  assert _read_csv(tmp_path / "results.csv")[0]["status"] == "finished"

  changed = [*argv, "--cell_binding=DROPOUT_RATE = 0.1", "--cell_binding=TRAIN_STEPS = 8"]
  capsys.readouterr()
  assert cli.main(["sweep", *changed]) == 1
  assert len(launched) == 1  # neither reused nor run
  err = capsys.readouterr().err
  assert (f"cell {launched[0]} was trained with other settings ('DROPOUT_RATE = 0.0' -> "
          "'DROPOUT_RATE = 0.1'); it is neither reused nor resumed: remove") in err
  row = _read_csv(tmp_path / "results.csv")[0]
  assert row["status"] == "changed" and row["score"] == ""
  assert cli.main(["sweep", *changed, "--stop_on_error"]) == 1
  assert "error: cell " in capsys.readouterr().err
  assert cli.main(["sweep", *changed, "--mode=commands"]) == 1
  assert "# refused: cell" in (tmp_path / "commands.sh").read_text()

  # Only TRAIN_STEPS changed: the cell runs again (its training run continues or refuses).
  assert cli.main(["sweep", *argv, "--cell_binding=TRAIN_STEPS = 8"]) == 0
  assert len(launched) == 2
  assert "'TRAIN_STEPS = 5' -> 'TRAIN_STEPS = 8'" in capsys.readouterr().out
