"""Nothing lost, nothing poisoned: non-finite updates, the MODEL_DIR lock, corrupt checkpoints,
SIGTERM, an interrupted final evaluation, lost exports, durable events, resume mismatches."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import jax
import numpy as np
import pytest

from prompt_jax.data import pipeline, synthetic  # noqa: F401  (registers demo tasks)
from prompt_jax.models import t5
from prompt_jax.models.encoder_decoder import EncoderDecoderModel
from prompt_jax.partitioning import Partitioner
from prompt_jax.programs import PromptPrograms
from prompt_jax.prompts import initializers
from prompt_jax.prompts.base import InputPrompt
from prompt_jax.prompts.plain import Prompt
from prompt_jax.storage import checkpoints, metric_writer, run_dir
from prompt_jax.training import guards, trainer
from tests.cli_harness import DEMO_GIN, assert_one_line_error, run_cli, snapshot
from tests.conftest import REPO_ROOT

LENGTHS = {"inputs": 64, "targets": 16}
DEMO_CHECKPOINT = "builtin:demo_t5_tiny.npz"


def _model(prompt_length=4, dropout_rate=0.0):
  config = t5.preset("tiny")
  config = dataclasses.replace(config, dropout_rate=dropout_rate)
  return EncoderDecoderModel(t5.Transformer(config, InputPrompt(
      Prompt(prompt_length, initializers.uniform()))))


def _data(batch_size=8, split="train", shuffle=True):
  return pipeline.DatasetConfig("demo_sentiment", LENGTHS, split=split, batch_size=batch_size,
                                shuffle=shuffle)


def _train(model_dir, steps, model=None, **kwargs):
  kwargs.setdefault("initial_checkpoint_path", DEMO_CHECKPOINT)
  kwargs.setdefault("checkpoint_every_steps", 2)
  return trainer.train(model=model or _model(), model_dir=str(model_dir), train_steps=steps,
                       train_dataset_cfg=_data(), log_every_steps=1, **kwargs)


def _prompt(model_dir, step):
  return np.load(os.path.join(model_dir, "prompts", f"prompt_{step}.npy"))


# ------------------------------------------------------------------------ non-finite updates


def test_an_update_that_overflows_the_prompt_is_never_saved(tmp_path):
  """lr 1e39: the loss before the update is finite, the updated prompt is not."""
  with pytest.raises(guards.TrainingDivergedError,
                     match=r"at step 1: loss .*updated prompt non-finite.*checkpoint: none"):
    _train(tmp_path, 1, optimizer=trainer.adafactor(learning_rate=1e39),
           checkpoint_every_steps=1)
  assert not (tmp_path / "checkpoints").exists() or not os.listdir(tmp_path / "checkpoints")
  assert not (tmp_path / "prompts").exists()
  assert not (tmp_path / "summary.json").exists()


def test_divergence_after_good_steps_names_the_last_good_checkpoint(tmp_path):
  _train(tmp_path, 2, checkpoint_every_steps=1)
  good = _prompt(tmp_path, 2)
  with pytest.raises(guards.TrainingDivergedError, match=r"at step 3: .*step 2 in"):
    _train(tmp_path, 4, optimizer=trainer.adafactor(learning_rate=1e39),
           allow_config_change=True,
           checkpoint_every_steps=1)
  assert sorted(os.listdir(tmp_path / "prompts")) == ["prompt_1.npy", "prompt_2.npy"]
  np.testing.assert_array_equal(_prompt(tmp_path, 2), good)
  manager = checkpoints.PromptCheckpointManager(str(tmp_path), 1)
  assert manager.all_steps() == [1, 2]


def test_the_manager_refuses_to_save_a_non_finite_state(tmp_path):
  manager = checkpoints.PromptCheckpointManager(str(tmp_path), 1)
  with pytest.raises(ValueError, match="refusing to save a non-finite state at step 3"):
    manager.save(3, {"prompt": jax.numpy.array([1.0, np.inf])}, {}, force=True)
  assert manager.all_steps() == []


def test_cli_exits_non_zero_on_divergence(tmp_path, capsys):
  result = run_cli(["train", f"--gin_file={DEMO_GIN}", f"--gin.MODEL_DIR='{tmp_path}'",
                    "--gin.LEARNING_RATE=1e39", "--gin.TRAIN_STEPS=1",
                    "--gin.trainer.train.eval_at_start=False"], capsys)
  assert_one_line_error(result, ["training diverged at step 1"])
  assert not (tmp_path / "prompts").exists()


# ----------------------------------------------------------------------------------- the lock


HOLD_LOCK = textwrap.dedent("""
    import sys, time
    from prompt_jax.storage import run_dir
    lock = run_dir.RunLock(sys.argv[1]).acquire()
    print('locked', flush=True)
    time.sleep(120)
""")


def test_a_second_run_on_a_locked_model_dir_refuses_at_start(tmp_path):
  holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(tmp_path)], cwd=REPO_ROOT,
                            stdout=subprocess.PIPE, text=True)
  try:
    assert holder.stdout.readline().strip() == "locked"
    before = snapshot(tmp_path)
    with pytest.raises(ValueError, match=rf"in use by process {holder.pid} on host"):
      _train(tmp_path, 2)
    assert snapshot(tmp_path) == before  # refused before any work
  finally:
    holder.kill()
    holder.wait()
  # The holder died without releasing: its lock is stale and is taken over.
  assert (tmp_path / run_dir.LOCK_NAME).exists()
  summary = _train(tmp_path, 2)
  assert summary["step"] == 2
  assert not (tmp_path / run_dir.LOCK_NAME).exists()


def test_lock_is_released_and_a_created_dir_removed_when_the_run_is_refused(tmp_path):
  model_dir = tmp_path / "new_run"
  with pytest.raises((ValueError, FileNotFoundError), match="/no/such/checkpoint.npz"):
    _train(model_dir, 2, initial_checkpoint_path="/no/such/checkpoint.npz")
  assert not model_dir.exists()


@pytest.mark.parametrize("make,message", [
    (lambda d: d.write_text("x"), "is a file, not a directory"),
    (lambda d: (d.mkdir(), (d / "train").write_text("x")), "holds a file 'train'"),
    (lambda d: (d.mkdir(), (d / "checkpoints").write_text("x")), "holds a file 'checkpoints'"),
])
def test_unusable_model_dirs_are_named(tmp_path, make, message):
  model_dir = tmp_path / "run"
  make(model_dir)
  before = snapshot(model_dir)
  with pytest.raises(ValueError, match=message):
    run_dir.check_model_dir(str(model_dir))
  with pytest.raises(ValueError, match=message):
    _train(model_dir, 2)
  assert snapshot(model_dir) == before


# ------------------------------------------------------------------- corrupt latest checkpoint


def _corrupt_truncate(step_dir):
  """Truncate every data file of the state item."""
  for root, _, files in os.walk(step_dir / "state"):
    for name in files:
      path = os.path.join(root, name)
      if os.path.getsize(path) > 16:
        with open(path, "r+b") as f:
          f.truncate(8)


def _corrupt_manifest(step_dir):
  for root, _, files in os.walk(step_dir / "state"):
    for name in files:
      if name.startswith("manifest") or name == "_METADATA":
        os.remove(os.path.join(root, name))


@pytest.mark.parametrize("corrupt", [_corrupt_truncate, _corrupt_manifest])
def test_a_corrupt_latest_checkpoint_falls_back_to_the_previous_one(tmp_path, corrupt, capsys):
  straight, broken = tmp_path / "straight", tmp_path / "broken"
  _train(straight, 6)
  _train(broken, 4)
  corrupt(broken / "checkpoints" / "4")
  capsys.readouterr()
  summary = _train(broken, 6)
  out = capsys.readouterr().out
  assert "checkpoint step 4" in out and "does not restore" in out, out
  assert "at step 2" in out  # resumed from the older step
  assert summary["step"] == 6
  np.testing.assert_array_equal(_prompt(broken, 6), _prompt(straight, 6))
  # The bad one is kept, out of the way.
  assert (broken / "unusable_checkpoints" / "4").is_dir()


def test_a_non_finite_checkpoint_is_skipped(tmp_path, capsys):
  _train(tmp_path, 2, checkpoint_every_steps=1)
  pt = PromptPrograms.for_training(_model(), trainer.adafactor(), Partitioner(), 64, 16, 8)
  manager = checkpoints.PromptCheckpointManager(str(tmp_path), 1)
  state, meta = manager.restore(2, pt.abstract_state())
  poisoned = state.replace(step=state.step + 1, prompt_params=jax.tree_util.tree_map(
      lambda x: x * np.nan, state.prompt_params))
  manager.manager.save(3, args=checkpoints.ocp.args.Composite(  # bypasses the finite check
      state=checkpoints.ocp.args.StandardSave(poisoned),
      meta=checkpoints.ocp.args.JsonSave(dict(meta, data_position=3))), force=True)
  manager.manager.wait_until_finished()
  capsys.readouterr()
  summary = _train(tmp_path, 4, checkpoint_every_steps=1)
  assert "NaN or infinite" in capsys.readouterr().out
  assert summary["step"] == 4
  assert np.all(np.isfinite(_prompt(tmp_path, 4)))


# --------------------------------------------------------------------------------- preemption


def _cli_script(model_dir, steps):
  return ["-c", "import sys; from prompt_jax import cli; sys.exit(cli.main(sys.argv[1:]))",
          "train", f"--gin_file={DEMO_GIN}", f"--gin.MODEL_DIR='{model_dir}'",
          f"--gin.TRAIN_STEPS={steps}", "--gin.CHECKPOINT_PERIOD=100",
          "--gin.trainer.train.eval_dataset_cfg=None", "--gin.trainer.train.log_every_steps=1"]


def test_sigterm_saves_the_current_step_and_the_rerun_continues_bit_identically(tmp_path):
  steps = 14
  straight, stopped = tmp_path / "straight", tmp_path / "stopped"
  proc = subprocess.Popen([sys.executable, *_cli_script(stopped, steps)], cwd=REPO_ROOT,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  deadline = time.time() + 300
  while time.time() < deadline and proc.poll() is None:
    logged = metric_writer.read_scalars(str(stopped / "train")).get("loss", [])
    if len(logged) >= 3:
      break
    time.sleep(0.2)
  assert proc.poll() is None, proc.communicate()
  proc.send_signal(signal.SIGTERM)
  _, err = proc.communicate(timeout=300)
  assert proc.returncode == 75, err[-3000:]
  last = err.strip().splitlines()[-1]
  assert last.startswith("stopped by SIGTERM after step"), err[-3000:]
  assert "Traceback" not in err
  saved = checkpoints.PromptCheckpointManager(str(stopped), 1).all_steps()
  assert len(saved) == 1 and 3 <= saved[0] < steps, saved
  # Same command again: continues from the saved step to the end.
  again = subprocess.run([sys.executable, *_cli_script(stopped, steps)], cwd=REPO_ROOT,
                         capture_output=True, text=True, timeout=600)
  assert again.returncode == 0, again.stderr[-3000:]
  assert f"at step {saved[0]}" in again.stdout
  # Uninterrupted, in a process of its own like the others: bit-identity holds for one device
  # count, and each `prompt-jax` process takes the machine's (`--host_devices`, one per core).
  uninterrupted = subprocess.run([sys.executable, *_cli_script(straight, steps)], cwd=REPO_ROOT,
                                 capture_output=True, text=True, timeout=600)
  assert uninterrupted.returncode == 0, uninterrupted.stderr[-3000:]
  np.testing.assert_array_equal(_prompt(stopped, steps), _prompt(straight, steps))


# ------------------------------------------------------------- final evaluation and summaries


class _CheapEvaluator:
  """The mean eval loss of the first eval batch (stands in for seqio decoding, to be quick): an
  evaluator class of the user's own, as `evaluation.make_evaluator` accepts."""

  def __init__(self, dataset_cfg, *, max_decode_length, decoding=None, log_dir=None):
    del max_decode_length, decoding, log_dir
    self.dataset_cfg = dataset_cfg

  def __call__(self, pt, prompt_params, frozen_params, step):
    del step
    batch = next(pipeline.iterate_batches(self.dataset_cfg))
    return {"eval_loss": float(pt.eval_step(prompt_params, frozen_params, batch)["loss"])}


def test_a_run_cut_short_in_its_final_evaluation_finishes_on_rerun(tmp_path, capsys):
  kwargs = {"eval_dataset_cfg": _data(split="validation", shuffle=False),
            "evaluator": _CheapEvaluator}
  first = _train(tmp_path, 2, **kwargs)
  assert json.loads((tmp_path / "eval_untrained.json").read_text()) == first["eval_untrained"]
  # Killed during the final evaluation: everything but summary.json is there.
  (tmp_path / "summary.json").unlink()
  capsys.readouterr()
  again = _train(tmp_path, 2, **kwargs)
  out = capsys.readouterr().out
  assert "eval (trained prompt, step 2)" in out and "untrained prompt, step 0" not in out
  assert again["eval_untrained"] == first["eval_untrained"]  # kept from the first run
  assert again["eval_trained"] == pytest.approx(first["eval_trained"])
  assert again["train"]["loss"] == pytest.approx(first["train"]["loss"])
  assert json.loads((tmp_path / "summary.json").read_text())["eval_trained"] == pytest.approx(
      first["eval_trained"])
  # Complete now: a third run does nothing and says so.
  third = _train(tmp_path, 2, **kwargs)
  assert "is complete" in capsys.readouterr().out
  assert third["eval_trained"] == pytest.approx(first["eval_trained"])


def test_a_resumed_run_keeps_the_untrained_evaluation(tmp_path):
  kwargs = {"eval_dataset_cfg": _data(split="validation", shuffle=False),
            "evaluator": _CheapEvaluator}
  first = _train(tmp_path, 2, **kwargs)
  resumed = _train(tmp_path, 4, **kwargs)
  assert resumed["eval_untrained"] == first["eval_untrained"]
  scalars = metric_writer.read_scalars(str(tmp_path / "eval"))
  assert [s for s, _ in scalars["eval_loss"]] == [0, 2, 4]


def test_missing_exports_are_recreated_on_resume(tmp_path):
  _train(tmp_path, 4)
  original = _prompt(tmp_path, 4)
  (tmp_path / "prompts" / "prompt_4.npy").unlink()
  _train(tmp_path, 6)
  np.testing.assert_array_equal(_prompt(tmp_path, 4), original)
  assert (tmp_path / "prompts" / "prompt_6.npy").exists()


KILL_AFTER_WRITE = textwrap.dedent("""
    import os, signal, sys
    from prompt_jax.storage.metric_writer import MetricWriter
    writer = MetricWriter(sys.argv[1], 'eval', enabled=True)
    writer.write(0, {'accuracy': 31.75})
    writer.write(100, {'accuracy': 100.0})
    os.kill(os.getpid(), signal.SIGKILL)
""")


def test_metrics_written_before_a_kill_are_on_disk(tmp_path):
  proc = subprocess.run([sys.executable, "-c", KILL_AFTER_WRITE, str(tmp_path)], cwd=REPO_ROOT,
                        capture_output=True, timeout=120)
  assert proc.returncode == -signal.SIGKILL
  scalars = metric_writer.read_scalars(str(tmp_path / "eval"))
  assert scalars["accuracy"] == [(0, pytest.approx(31.75)), (100, pytest.approx(100.0))]


# ------------------------------------------------------------------------- resume mismatches


def test_resuming_with_another_prompt_length_names_both_lengths(tmp_path):
  _train(tmp_path, 2)
  before = snapshot(tmp_path)
  with pytest.raises(run_dir.RunMismatchError, match=r"holds a run with prompt.prompt.length=4"
                     r".*; this command configures prompt.prompt.length=6"):
    _train(tmp_path, 4, model=_model(prompt_length=6))
  assert snapshot(tmp_path) == before
  # A run written before records existed (no run.json): the checkpoint's own shapes refuse it.
  os.remove(tmp_path / run_dir.RECORD_FILE)
  before = snapshot(tmp_path)
  with pytest.raises(ValueError, match=r"of shape \(4, 64\), the configured run expects "
                                       r"\(6, 64\)"):
    _train(tmp_path, 4, model=_model(prompt_length=6))
  assert snapshot(tmp_path) == before


def test_resuming_from_another_frozen_checkpoint_or_config_is_refused(tmp_path):
  _train(tmp_path, 2)
  before = snapshot(tmp_path)
  with pytest.raises(run_dir.RunMismatchError,
                     match="frozen_checkpoint.path='builtin:demo_t5_tiny.npz'.*; this command "
                           "configures .*frozen_checkpoint.path=None"):
    _train(tmp_path, 4, initial_checkpoint_path=None)
  with pytest.raises(run_dir.RunMismatchError, match="model.dropout_rate=0.0; this command "
                                                     "configures model.dropout_rate=0.1"):
    _train(tmp_path, 4, model=_model(dropout_rate=0.1))
  assert snapshot(tmp_path) == before
  assert _train(tmp_path, 4, model=_model(dropout_rate=0.1),
                allow_config_change=True)["step"] == 4
  changes = run_dir.read_record(str(tmp_path))["changes"]  # the record keeps what changed
  assert changes == [{"step": 2, "changed": [
      {"name": "model.dropout_rate", "from": 0.0, "to": 0.1}]}]
