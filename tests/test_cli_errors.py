"""`prompt-jax` on bad input: one `error:` line naming the bad value, no traceback, the run
directory untouched, all before a model is built. And `--help`/`--version`: complete, instant."""

from __future__ import annotations

import ast
import importlib.metadata
import os
import subprocess
import sys
import time

import pytest

from prompt_jax import cli
from tests.cli_harness import DEMO_GIN, assert_one_line_error, run_cli, snapshot
from tests.conftest import GIN_CONFIGS, REPO_ROOT

MD = "--gin.MODEL_DIR='{run}'"
DEMO = f"--gin_file={DEMO_GIN}"
MULTITASK = ["--inputs={tmp}/in.jsonl", "--output={tmp}/out.jsonl", "--prompt=a={tmp}/a.npy",
             "--checkpoint=builtin:demo_t5_tiny.npz"]

# (case id, argv with {run} = the watched run directory and {tmp} = a scratch directory,
#  substrings stderr's last line must contain)
BAD_INPUTS = [
    ("unknown-command", ["trian"], ["'trian'", "did you mean train"]),
    ("flag-before-command", ["--gin_file=x.gin"], ["--gin_file=x.gin", "expected a command"]),
    ("no-gin-file", ["train", MD], ["no --gin_file given"]),
    ("missing-gin-file", ["train", "--gin_file=no_such_config.gin", MD],
     ["'no_such_config.gin' not found", "searched", str(GIN_CONFIGS)]),
    ("missing-include", ["train", "--gin_file={tmp}/includes_missing.gin", MD],
     ["'runs/no_such_run.gin'", "includes_missing.gin line 2", "searched"]),
    ("syntax-error-in-file", ["train", "--gin_file={tmp}/syntax_error.gin", MD],
     ["syntax_error.gin line 3", "TRAIN_STEPS = = 3"]),
    ("unclosed-bracket-in-file", ["train", "--gin_file={tmp}/unclosed.gin", MD],
     ["unclosed.gin line", "unclosed bracket"]),
    ("unquoted-model-dir", ["train", DEMO, "--gin.MODEL_DIR={run}"],
     ["MODEL_DIR = {run}", "--gin.MODEL_DIR=\"'{run}'\""]),
    ("unquoted-task-name", ["train", DEMO, MD, "--gin.MIXTURE_OR_TASK_NAME=demo_sentiment"],
     ["demo_sentiment", "--gin.MIXTURE_OR_TASK_NAME=\"'demo_sentiment'\""]),
    ("misspelt-macro", ["train", DEMO, MD, "--gin.TRAIN_STEPZ=3"],
     ["TRAIN_STEPZ", "did you mean TRAIN_STEPS?"]),
    ("misspelt-macro-in-bindings", ["train", DEMO, MD, "--gin_bindings=BATCH_SIZ = 8"],
     ["BATCH_SIZ = 8", "did you mean BATCH_SIZE?"]),
    ("train-steps-string", ["train", DEMO, MD, "--gin.TRAIN_STEPS='abc'"],
     ["TRAIN_STEPS must be an integer >= 1", "'abc'"]),
    ("train-steps-float", ["train", DEMO, MD, "--gin.TRAIN_STEPS=2.5"], ["TRAIN_STEPS", "2.5"]),
    ("learning-rate-string", ["train", DEMO, MD, "--gin.LEARNING_RATE='fast'"],
     ["LEARNING_RATE must be a number > 0", "'fast'"]),
    ("batch-size-zero", ["train", DEMO, MD, "--gin.BATCH_SIZE=0"], ["BATCH_SIZE", "got 0"]),
    ("batch-size-negative", ["train", DEMO, MD, "--gin_bindings=BATCH_SIZE = -8"],
     ["BATCH_SIZE", "-8"]),
    ("eval-batch-size-bool", ["train", DEMO, MD, "--gin.EVAL_BATCH_SIZE=True"],
     ["EVAL_BATCH_SIZE", "True"]),
    ("dropout-rate-above-one", ["train", DEMO, MD, "--gin.DROPOUT_RATE=1.5"],
     ["DROPOUT_RATE must be a number in [0, 1)", "1.5"]),
    ("seed-float", ["train", DEMO, MD, "--gin.SEED=1.0"], ["SEED must be an integer", "1.0"]),
    ("prompt-length-string", ["train", DEMO, MD, "--gin.PROMPT_LENGTH='10'"],
     ["PROMPT_LENGTH", "'10'"]),
    ("num-partitions-zero", ["train", DEMO, MD, "--gin.NUM_PARTITIONS=0"],
     ["NUM_PARTITIONS", "0"]),
    ("eval-period-negative", ["train", DEMO, MD, "--gin.EVAL_PERIOD=-1"], ["EVAL_PERIOD", "-1"]),
    ("checkpoint-path-number", ["train", DEMO, MD, "--gin.INITIAL_CHECKPOINT_PATH=3"],
     ["INITIAL_CHECKPOINT_PATH must be a string or None", "got 3"]),
    ("checkpoint-period-in-file", ["train", "--gin_file={tmp}/bad_period.gin", MD],
     ["CHECKPOINT_PERIOD", "'often'", "bad_period.gin line 2"]),
    ("train-given-spt-config", ["train", "--gin_file=runs/spt.gin", MD],
     ["spt_training.train_spt", "run `prompt-jax spt` with the same flags"]),
    ("train-given-train-fn-binding", ["train", DEMO, MD, "--gin.TRAIN_FN=@spt_training.train_spt"],
     ["TRAIN_FN", "binding 'TRAIN_FN = @spt_training.train_spt'",
      "run `prompt-jax spt` with the same flags without that binding"]),
    ("train-given-train-fn-in-file", ["train", "--gin_file={tmp}/old_spt.gin", MD],
     ["TRAIN_FN", "old_spt.gin line 2", "run `prompt-jax spt` with the same flags"]),
    ("spt-given-plain-config", ["spt", DEMO, MD],
     ["does not configure spt_training.train_spt", "runs/spt.gin"]),
    ("spt-model-dir-unset", ["spt", "--gin_file=runs/spt_demo.gin"], ["MODEL_DIR is not set"]),
    ("spt-misspelt-macro", ["spt", "--gin_file=runs/spt_demo.gin", MD, "--gin.SPT_NUM_LAYER=2"],
     ["SPT_NUM_LAYER", "did you mean SPT_NUM_LAYERS?"]),
    ("model-dir-unset", ["train", DEMO], ["MODEL_DIR is not set", "--gin.MODEL_DIR="]),
    ("model-dir-none", ["train", DEMO, "--gin.MODEL_DIR=None"], ["MODEL_DIR is not set"]),
    ("required-macro-unset", ["eval", DEMO, "--gin_file=runs/eval.gin", MD],
     ["MIXTURE_OR_TASK_NAME is required", "%gin.REQUIRED", "eval.gin line"]),
    ("gin-flag-without-value", ["train", DEMO, MD, "--gin.TRAIN_STEPS"],
     ["'--gin.TRAIN_STEPS' needs a value"]),
    ("unknown-flag", ["train", DEMO, MD, "--train_steps=3"], ["'--train_steps=3'"]),
    ("binding-syntax-error", ["train", DEMO, MD, "--gin_bindings=TRAIN_STEPS = = 3"],
     ["TRAIN_STEPS = = 3"]),
    ("bad-verbosity", ["train", DEMO, MD, "--verbosity=loud"], ["--verbosity", "'loud'"]),
    ("unknown-configurable", ["train", DEMO, MD, "--gin.trainer.trian.log_every_steps=1"],
     ["trainer.trian"]),
    ("plan-bad-mesh", ["plan", DEMO, "--mesh=4by2"], ["--mesh must be DATAxMODEL", "'4by2'"]),
    ("plan-no-mesh", ["plan", DEMO], ["--mesh"]),
    ("plan-bad-chip", ["plan", DEMO, "--mesh=1x1", "--chip=v9"], ["--chip", "'v9'"]),
    ("plan-misspelt-macro", ["plan", DEMO, "--mesh=1x1", "--gin.BATCH_SIZES=8"],
     ["BATCH_SIZES", "BATCH_SIZE"]),
    ("sweep-bad-mode", ["sweep", "--gin_file=sweeps/tiny_demo.gin", "--mode=fast"],
     ["--mode", "'fast'"]),
    ("sweep-negative-max-cells", ["sweep", "--gin_file=sweeps/tiny_demo.gin", "--max_cells=-1"],
     ["--max_cells", "'-1'"]),
    ("sweep-unknown-parameter", ["sweep", "--gin_file=sweeps/tiny_demo.gin",
                                 "--sweep_dir={tmp}/sweep", "--gin.sweep.SweepConfig.sizez={}"],
     ["sizez", "SweepConfig"]),
    ("convert-no-action", ["convert"], ["hf-to-orbax"]),
    ("convert-bad-format", ["convert", "prompt", "{tmp}/a.npy", "{tmp}/out", "--to", "onnx"],
     ["'onnx'"]),
    ("export-no-gin-file", ["export-prompt", "--model_dir={run}"],
     ["no config.gin", "--gin_file"]),
    ("infer-no-arguments", ["infer"], ["--gin_file", "--inputs"]),
    ("infer-mixed-forms", ["infer", DEMO, "--inputs={tmp}/in.jsonl"],
     ["--inputs is a multi-task serving flag", "--gin.INPUTS_PATH"]),
    ("infer-missing-checkpoint", ["infer", *MULTITASK[:3]], ["prompt-jax infer", "--checkpoint"]),
    ("infer-prompt-without-task", ["infer", *MULTITASK[:2], "--prompt={tmp}/a.npy",
                                   MULTITASK[3]], ["TASK=PATH", "a.npy"]),
    ("infer-inputs-missing", ["infer", "--inputs={tmp}/no_such.jsonl", *MULTITASK[1:]],
     ["--inputs", "no_such.jsonl", "does not exist"]),
    ("infer-multitask-batch-size-zero", ["infer-multitask", *MULTITASK, "--batch_size=0"],
     ["--batch_size", "'0'"]),
]


@pytest.fixture
def scratch(tmp_path):
  """A watched run directory with a file in it, and the gin/data files the cases name."""
  run = tmp_path / "run"
  run.mkdir()
  (run / "keep.txt").write_text("a run's files must survive a bad command\n")
  (tmp_path / "includes_missing.gin").write_text(
      "# a comment\ninclude 'runs/no_such_run.gin'\n")
  (tmp_path / "syntax_error.gin").write_text(
      f"include '{DEMO_GIN}'\n\nTRAIN_STEPS = = 3\n")
  (tmp_path / "unclosed.gin").write_text(f"include '{DEMO_GIN}'\nTRAIN_STEPS = (3\n")
  (tmp_path / "bad_period.gin").write_text(f"include '{DEMO_GIN}'\nCHECKPOINT_PERIOD = 'often'\n")
  (tmp_path / "old_spt.gin").write_text(  # a run file from before `prompt-jax spt`
      f"include '{DEMO_GIN}'\nTRAIN_FN = @spt_training.train_spt\n")
  (tmp_path / "in.jsonl").write_text('{"task": "a", "inputs": "x"}\n')
  (tmp_path / "a.npy").write_bytes(b"")
  return run, tmp_path


@pytest.mark.parametrize("argv,names", [(argv, names) for _, argv, names in BAD_INPUTS],
                         ids=[case for case, _, _ in BAD_INPUTS])
def test_bad_input_is_one_line_naming_the_value(argv, names, scratch, capsys):
  run, tmp = scratch

  def fill(text):
    return text.replace("{run}", str(run)).replace("{tmp}", str(tmp))

  before = snapshot(run)
  start = time.perf_counter()
  result = run_cli([fill(a) for a in argv], capsys)
  assert_one_line_error(result, [fill(n) for n in names], watched=run, before=before)
  assert not (run / "checkpoints").exists() and not (tmp / "out.jsonl").exists()
  # Static gin checks import nothing; the first gin parse imports the modules (~10 s once).
  assert time.perf_counter() - start < 120


@pytest.mark.parametrize("argv,start", [
    (["train", f"--gin_file={DEMO_GIN}", "--gin.TRAIN_STEPZ=3"],
     "error: gin binding 'TRAIN_STEPZ = 3'"),
    (["train", f"--gin_file={GIN_CONFIGS / 'runs' / 'spt.gin'}"],
     "error: the gin config configures spt_training.train_spt"),
    (["spt", f"--gin_file={DEMO_GIN}"], "error: the gin config does not configure"),
], ids=["misspelt-macro", "train-given-spt-config", "spt-given-plain-config"])
def test_static_gin_errors_come_before_any_heavy_import(argv, start):
  argv = [*argv, "--gin.MODEL_DIR='/nonexistent'"]
  code = ("import sys; from prompt_jax import cli; "
          f"code = cli.main({argv!r}); "
          "print(code, sorted(m for m in ('jax', 'tensorflow', 'seqio', 'flax', 'orbax', "
          "'prompt_jax.training.trainer', 'prompt_jax.training.spt_training') "
          "if m in sys.modules))")
  proc = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True,
                        text=True, timeout=120)
  assert proc.stdout.split() == ["1", "[]"], (proc.stdout, proc.stderr)
  assert proc.stderr.strip().startswith(start), proc.stderr
  assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr


def test_only_spt_and_multitask_configs_among_the_shipped_runs_are_refused_by_train():
  """`prompt-jax train`'s command check on every runs/*.gin: it refuses exactly the files that
  configure spt_training.train_spt or multitask_training.train_multitask, each naming the
  command to run, and that command accepts them."""
  from prompt_jax import gin_utils
  refused = {}
  for path in sorted((GIN_CONFIGS / "runs").glob("*.gin")):
    config = gin_utils.read_config([str(path)])
    try:
      gin_utils.check_command(config, "train", elsewhere=dict(cli.GIN_COMMANDS["train"].elsewhere))
    except ValueError as e:
      command = path.name.split("_")[0].split(".")[0]  # spt[_demo].gin, multitask[_demo].gin
      assert f"run `prompt-jax {command}` with the same flags" in str(e), e
      refused[path.name] = command
      gin_utils.check_command(config, command, required=cli.GIN_COMMANDS[command].required)
  assert refused == {"multitask.gin": "multitask", "multitask_demo.gin": "multitask",
                     "spt.gin": "spt", "spt_demo.gin": "spt"}


# ------------------------------------------------------------------------- --help, --version

GIN_COMMANDS = ["train", "spt", "multitask", "pretrain", "eval", "infer", "sweep", "plan",
                "export-prompt"]


@pytest.mark.parametrize("command", list(cli.COMMANDS))
def test_help_of_every_command(command, capsys):
  result = run_cli([command, "--help"], capsys)
  assert result.code == 0, result.err
  out = result.out
  assert out.startswith(f"usage: prompt-jax {command} "), out[:200]
  assert "example:\n  prompt-jax " in out
  assert cli.DESCRIPTIONS[command].splitlines()[0] in out
  if command in GIN_COMMANDS:
    assert "--gin.NAME=VALUE" in out.split("\n\n")[0]  # in the usage line
    assert "--gin_file FILE" in out and "--gin.MODEL_DIR=\"'/tmp/run'\"" in out
  if command in ("infer", "infer-multitask"):
    assert "--prompt TASK=PATH" in out and "--checkpoint CHECKPOINT" in out
  # every flag has help text
  parser = cli.build_parser(command)
  for action in parser._actions:  # pylint: disable=protected-access
    assert action.help, (command, action.option_strings)


def test_infer_help_describes_both_forms(capsys):
  out = run_cli(["infer", "--help"], capsys).out
  usage = out.split("\n\n")[0]
  assert "prompt-jax infer --gin_file=FILE" in usage
  assert "or: prompt-jax infer --inputs=IN.jsonl --output=OUT.jsonl --prompt=TASK=PATH" in usage
  assert "single task (gin)" in out and "multi-task serving (no gin flags)" in out


@pytest.mark.parametrize("action", ["hf-to-orbax", "t5x-to-orbax", "prompt"])
def test_convert_actions_have_help(action, capsys):
  result = run_cli(["convert", action, "--help"], capsys)
  assert result.code == 0
  assert result.out.startswith(f"usage: prompt-jax convert {action} ")
  assert "example:\n  prompt-jax convert " + action in result.out


def test_top_level_help_lists_every_command(capsys):
  result = run_cli(["--help"], capsys)
  assert result.code == 0 and result.out.startswith("usage: prompt-jax ")
  for command, summary in cli.COMMANDS.items():
    assert command in result.out and summary.split()[0] in result.out
  assert "--version" in result.out and "--gin.NAME=VALUE" in result.out


def test_version(capsys):
  result = run_cli(["--version"], capsys)
  assert result.code == 0
  assert result.out.strip() == f"prompt-jax {importlib.metadata.version('prompt-jax')}"


HEAVY = ("jax", "jaxlib", "tensorflow", "seqio", "flax", "orbax", "optax", "numpy", "gin",
         "prompt_jax.training.trainer", "prompt_jax.models", "prompt_jax.gin_utils")


@pytest.mark.parametrize("argv", [["--help"], ["--version"]] + [[c, "--help"]
                                                                for c in cli.COMMANDS])
def test_help_imports_nothing_heavy_and_logs_nothing(argv):
  """`-X importtime` lists every module imported; stderr holds nothing else (no TensorFlow
  start-up lines)."""
  start = time.perf_counter()
  proc = subprocess.run([sys.executable, "-X", "importtime", "-m", "prompt_jax.cli", *argv],
                        cwd=REPO_ROOT, capture_output=True, text=True, timeout=60)
  seconds = time.perf_counter() - start
  assert proc.returncode == 0, proc.stderr[-2000:]
  lines = proc.stderr.splitlines()
  assert all(line.startswith("import time:") for line in lines), [
      line for line in lines if not line.startswith("import time:")]
  modules = {line.rsplit("|", 1)[-1].strip() for line in lines[1:]}
  heavy = sorted(m for m in modules if any(m == h or m.startswith(h + ".") for h in HEAVY))
  assert not heavy, heavy
  assert seconds < 10, seconds  # ~0.2 s; generous for a loaded machine, far below 14 s


def test_train_help_wall_time():
  start = time.perf_counter()
  proc = subprocess.run([sys.executable, "-m", "prompt_jax.cli", "train", "--help"],
                        cwd=REPO_ROOT, capture_output=True, text=True, timeout=60)
  seconds = time.perf_counter() - start
  assert proc.returncode == 0 and proc.stderr == ""
  assert seconds < 5, seconds


# ------------------------------------------------------------------------------ quiet start-up


@pytest.mark.parametrize("verbosity", ["warning", "info"])
def test_start_up_is_quiet_unless_asked(verbosity, tmp_path):
  """TensorFlow's C++ start-up lines and gin's 'Path not found' misses are hidden; with
  --verbosity=info TensorFlow's show. (`plan` imports TensorFlow, JAX and parses gin.)"""
  env = {k: v for k, v in os.environ.items() if k not in ("TF_CPP_MIN_LOG_LEVEL", "XLA_FLAGS")}
  proc = subprocess.run(
      [sys.executable, "-m", "prompt_jax.cli", "plan", "--gin_file=runs/demo.gin", "--mesh=1x1",
       "--gin.trainer.train.no_such_arg=1", f"--verbosity={verbosity}"],
      cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 1
  lines = proc.stderr.strip().splitlines()
  assert lines[-1].startswith("error: Configurable 'trainer.train' doesn't have a parameter "
                              "named 'no_such_arg'"), proc.stderr
  if verbosity == "warning":
    assert len(lines) == 1, proc.stderr
  else:
    assert any("absl::InitializeLog" in line or "oneDNN" in line for line in lines), proc.stderr
  assert "Path not found" not in proc.stderr


# ----------------------------------------------------------------------- the parsers' sources


def test_cli_constants_match_the_library():
  from prompt_jax.prompts import base
  from prompt_jax.tools import convert, topology
  assert cli.PROMPT_FORMATS == convert.PROMPT_FORMATS
  assert sorted(cli.CHIPS) == sorted(topology.CHIPS)
  assert cli.PLACEMENTS == base.PLACEMENTS


def test_no_library_module_imports_the_cli():
  importers = []
  for path in sorted((REPO_ROOT / "prompt_jax").rglob("*.py")):
    if path.name == "cli.py" and path.parent.name == "prompt_jax":
      continue
    for node in ast.walk(ast.parse(path.read_text())):
      if isinstance(node, ast.ImportFrom) and node.module == "prompt_jax" and any(
          a.name == "cli" for a in node.names):
        importers.append(str(path))
      elif isinstance(node, (ast.Import, ast.ImportFrom)) and "prompt_jax.cli" in (
          [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module]):
        importers.append(str(path))
  assert not importers
