"""`prompt-jax train` end to end on the demo, and one-line errors for bad input."""

from __future__ import annotations

import json
import subprocess
import sys

import gin
import pytest

from prompt_jax import cli
from tests.conftest import GIN_CONFIGS, REPO_ROOT

DEMO = str(GIN_CONFIGS / "runs" / "demo.gin")


def _run(args):
  gin.clear_config()
  return cli.main(args)


def test_demo_prompt_learns_the_task(tmp_path, capsys):
  code = _run(["train", f"--gin_file={DEMO}", f"--gin.MODEL_DIR='{tmp_path}'",
               "--gin.TRAIN_STEPS=60", "--gin.EVAL_PERIOD=0", "--gin.CHECKPOINT_PERIOD=30"])
  assert code == 0
  summary = json.loads((tmp_path / "summary.json").read_text())
  before = summary["eval_untrained"]["accuracy"]
  after = summary["eval_trained"]["accuracy"]
  assert after >= 90.0 and after - before >= 40.0, (before, after)
  out = capsys.readouterr().out
  assert "untrained prompt" in out and "trained prompt" in out
  assert (tmp_path / "prompts" / "prompt_60.npy").exists()
  assert list((tmp_path / "train").glob("events.out.tfevents.*"))


@pytest.mark.parametrize("extra,message", [
    ([], "error: MODEL_DIR is not set"),
    (["--gin.MODEL_DIR='/tmp/x'", "--gin.trainer.train.no_such_arg=1"],
     "error: Configurable 'trainer.train' doesn't have a parameter named 'no_such_arg'"),
    (["--gin.MODEL_DIR='/tmp/x'", "--gin.MIXTURE_OR_TASK_NAME='demo_sentimnt'"],
     "error: unknown seqio task or mixture 'demo_sentimnt'; closest: demo_sentiment"),
])
def test_bad_input_gives_one_line_errors(extra, message, capsys):
  code = _run(["train", f"--gin_file={DEMO}", *extra])
  err = capsys.readouterr().err.strip()
  assert code == 1
  assert err.startswith(message), err
  assert len(err.splitlines()) == 1, err


def test_wrong_shape_prompt_file_names_the_file(tmp_path, capsys):
  import numpy as np
  bad = tmp_path / "prompt.npy"
  np.save(bad, np.zeros((7, 32), np.float32))
  code = _run(["train", f"--gin_file={GIN_CONFIGS}/models/t5_1_1_tiny.gin",
               f"--gin_file={GIN_CONFIGS}/prompts/from_file.gin",
               f"--gin_file={GIN_CONFIGS}/runs/prompt_finetune.gin",
               f"--gin.PROMPT_FILE='{bad}'", "--gin.PROMPT_LENGTH=7",
               f"--gin.MODEL_DIR='{tmp_path / 'run'}'",
               "--gin.MIXTURE_OR_TASK_NAME='demo_sentiment'",
               "--gin.TASK_MODULE='prompt_jax.data.synthetic'",
               "--gin.TASK_FEATURE_LENGTHS={'inputs': 64, 'targets': 16}",
               "--gin.INITIAL_CHECKPOINT_PATH='builtin:demo_t5_tiny.npz'"])
  err = capsys.readouterr().err.strip()
  assert code == 1
  assert f"prompt file '{bad}' has shape (7, 32), expected (7, 64)" in err, err


def test_console_script_help():
  proc = subprocess.run([sys.executable, "-m", "prompt_jax.cli", "--help"], cwd=REPO_ROOT,
                        capture_output=True, text=True, timeout=120)
  assert proc.returncode == 0 and "train" in proc.stdout


def test_infer_without_gin_flags_serves_several_tasks(capsys):
  """`prompt-jax infer --inputs=... --prompt=task=path` is multi-task serving; with gin flags it
  is single-task inference."""
  with pytest.raises(SystemExit) as exit_info:
    cli.main(["infer", "--help"])
  assert exit_info.value.code == 0
  assert "--prompt" in capsys.readouterr().out
