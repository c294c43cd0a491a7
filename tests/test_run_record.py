"""The run directory is the record: a wrong command on a run loses nothing, and eval, infer and
export-prompt need only MODEL_DIR.

Every case runs `prompt-jax` in-process on a copy of a short demo run (4 steps, checkpoints at
2 and 4). A wrong command must end in one `error:` line and leave the run byte-identical (no
checkpoint moved to unusable_checkpoints/, no file rewritten); the right command must then
resume at step 4, not 0. The commands that serve a run must reproduce the run's own final
evaluation exactly from MODEL_DIR alone.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from prompt_jax.storage import frozen_models, metric_writer, run_dir
from tests.cli_harness import assert_one_line_error, run_cli, snapshot

SHORT = ["--gin.TRAIN_STEPS=4", "--gin.CHECKPOINT_PERIOD=2", "--gin.EVAL_PERIOD=2",
         "--gin.EVAL_BATCH_SIZE=100"]
TRAINED: dict[str, Path] = {}  # gin file -> a finished run, trained once per module


def _model_dir_flag(path) -> str:
  return f"--gin.MODEL_DIR={str(path)!r}"


def trained_copy(gin_file: str, tmp_path: Path, capsys, command: str = "train",
                 extra: tuple[str, ...] = ()) -> Path:
  """A fresh copy of the finished 4-step run of `gin_file` (trained once per module)."""
  key = f"{command} {gin_file} {' '.join(extra)}"
  if key not in TRAINED:
    original = tmp_path.parent / f"trained_{len(TRAINED)}"
    result = run_cli([command, f"--gin_file={gin_file}", _model_dir_flag(original), *SHORT,
                      *extra], capsys)
    assert result.code == 0, result.err
    TRAINED[key] = original
  copy = tmp_path / "run"
  shutil.copytree(TRAINED[key], copy)
  return copy


def _summary(model_dir: Path) -> dict:
  return json.loads((model_dir / run_dir.SUMMARY_FILE).read_text())


WRONG_COMMANDS = [
    ("another method", ["--gin_file=prompts/residual.gin"], "ResidualPrompt"),
    ("another length", ["--gin.PROMPT_LENGTH=20"], "prompt.prompt.length=20"),
    ("another optimizer", ["--gin.trainer.train.optimizer=@optimizers.adamw()"],
     "optimizer.hyperparameters.name='adamw'"),
    ("another task", ["--gin.MIXTURE_OR_TASK_NAME='demo_topic'"], "data.task='demo_topic'"),
    ("another frozen checkpoint", ["--gin.INITIAL_CHECKPOINT_PATH=None"],
     "frozen_checkpoint.path=None"),
    ("another model size", ["--gin.t5.T5Config.mlp_dim=256"], "model.mlp_dim=256"),
    ("another seed", ["--gin.SEED=1"], "seed=1"),
    ("another learning rate", ["--gin.LEARNING_RATE=1e30"], "learning_rate=1e+30"),
]


@pytest.mark.parametrize("case", WRONG_COMMANDS, ids=[c[0] for c in WRONG_COMMANDS])
def test_a_wrong_command_on_a_run_loses_nothing(case, tmp_path, capsys):
  _, flags, named = case
  model_dir = trained_copy("runs/demo.gin", tmp_path, capsys)
  before = snapshot(model_dir)
  result = run_cli(["train", "--gin_file=runs/demo.gin", _model_dir_flag(model_dir), *SHORT,
                    "--gin.TRAIN_STEPS=6", *flags], capsys)
  assert_one_line_error(result, ["holds a run with", named, "nothing was changed"])
  assert snapshot(model_dir) == before  # nothing moved to unusable_checkpoints/, nothing written
  again = run_cli(["train", "--gin_file=runs/demo.gin", _model_dir_flag(model_dir), *SHORT,
                   "--gin.TRAIN_STEPS=6"], capsys)
  assert again.code == 0, again.err
  assert "at step 4" in again.out and _summary(model_dir)["step"] == 6


def test_single_task_and_multi_task_runs_refuse_each_other(tmp_path, capsys):
  single = trained_copy("runs/demo.gin", tmp_path / "a", capsys)
  multi = trained_copy("runs/multitask_demo.gin", tmp_path / "b", capsys, command="multitask")
  for command, gin_file, model_dir in (("multitask", "runs/multitask_demo.gin", single),
                                       ("train", "runs/demo.gin", multi)):
    before = snapshot(model_dir)
    result = run_cli([command, f"--gin_file={gin_file}", _model_dir_flag(model_dir), *SHORT,
                      "--gin.TRAIN_STEPS=6"], capsys)
    assert_one_line_error(result, ["holds a run with", "nothing was changed"])
    assert snapshot(model_dir) == before  # a multi-task command writes no tasks.json here


@pytest.mark.parametrize("gin_file", ["runs/demo.gin", "runs/superpos_demo.gin"])
def test_eval_infer_and_export_need_only_model_dir(gin_file, tmp_path, capsys):
  model_dir = trained_copy(gin_file, tmp_path, capsys)
  summary = _summary(model_dir)
  result = run_cli(["eval", f"--model_dir={model_dir}", "--gin.OUTPUT_DIR="
                    f"{str(tmp_path / 'eval')!r}"], capsys)
  assert result.code == 0, result.err
  scores = metric_writer.read_metrics(str(tmp_path / "eval"))
  assert {r["name"]: r["value"] for r in scores} == summary["eval_trained"]  # exactly

  output = tmp_path / "predictions.jsonl"
  result = run_cli(["infer", f"--model_dir={model_dir}", f"--gin.OUTPUT_PATH={str(output)!r}",
                    "--gin.MAX_DECODE_LENGTH=16", "--gin.INPUT_LENGTH=64"], capsys)
  assert result.code == 0, result.err
  lines = [json.loads(line) for line in output.read_text().splitlines()]
  accuracy = 100 * np.mean([r["prediction"] == r["targets"] for r in lines])
  assert accuracy == pytest.approx(summary["eval_trained"]["accuracy"])  # the run's own task

  result = run_cli(["export-prompt", f"--model_dir={model_dir}", "--format=npy",
                    f"--output={tmp_path / 'prompt.npy'}"], capsys)
  assert result.code == 0, result.err
  np.testing.assert_array_equal(np.load(tmp_path / "prompt.npy"),  # the loop's own export
                                np.load(run_dir.prompt_export_path(str(model_dir), 4)))


REGIMES = [
    ("train", "runs/ensemble_demo.gin", ()),
    ("multitask", "runs/multitask_demo.gin", ()),
    ("spt", "runs/spt_demo.gin", ("--gin.SPT_SEARCH_STEPS=4",)),
    ("train", "runs/superpos_demo.gin", ("--gin_file=prompts/p_tuning.gin",)),
]


@pytest.mark.parametrize("regime", REGIMES, ids=["ensemble", "multitask", "spt", "p_tuning"])
def test_every_regime_evaluates_from_model_dir_as_its_run_did(regime, tmp_path, capsys):
  """Ensembles and multi-task runs with their own evaluator, SPT from its re-trained phase."""
  command, gin_file, extra = regime
  model_dir = trained_copy(gin_file, tmp_path, capsys, command=command, extra=extra)
  result = run_cli(["eval", f"--model_dir={model_dir}",
                    f"--gin.OUTPUT_DIR={str(tmp_path / 'eval')!r}"], capsys)
  assert result.code == 0, result.err
  scores = {r["name"]: r["value"] for r in metric_writer.read_metrics(str(tmp_path / "eval"))}
  assert scores == _summary(model_dir)["eval_trained"]  # every metric, exactly


def test_serving_a_run_never_scores_a_random_frozen_model(tmp_path, capsys):
  # runs/eval.gin resets INITIAL_CHECKPOINT_PATH to None after the training file: the run's
  # recorded checkpoint is used, not a random model.
  model_dir = trained_copy("runs/superpos_demo.gin", tmp_path, capsys)
  result = run_cli(["eval", "--gin_file=runs/superpos_demo.gin", "--gin_file=runs/eval.gin",
                    _model_dir_flag(model_dir), "--gin.MIXTURE_OR_TASK_NAME='demo_sentiment'",
                    "--gin.TASK_FEATURE_LENGTHS={'inputs': 64, 'targets': 16}",
                    "--gin.EVAL_BATCH_SIZE=100"], capsys)
  assert result.code == 0, result.err
  trained = _summary(model_dir)["eval_trained"]["accuracy"]
  assert f"accuracy  {trained:8.2f}" in result.out
  # A run trained on a random frozen model: serving it needs an explicit request.
  random_run = trained_copy("runs/demo.gin", tmp_path / "r", capsys,
                            extra=("--gin.INITIAL_CHECKPOINT_PATH=None",))
  result = run_cli(["eval", f"--model_dir={random_run}"], capsys)
  assert_one_line_error(result, ["no frozen checkpoint", "RANDOM_FROZEN_MODEL"])
  result = run_cli(["eval", f"--model_dir={random_run}", "--gin.RANDOM_FROZEN_MODEL=True"],
                   capsys)
  assert result.code == 0, result.err


def test_config_and_metrics_are_recorded_without_duplicates_across_resumes(tmp_path, capsys):
  model_dir = trained_copy("runs/demo.gin", tmp_path, capsys)
  record = run_dir.read_record(str(model_dir))
  assert record["prompt"]["prompt"]["length"] == 10 and record["seed"] == 0
  assert record["data"]["task"] == "demo_sentiment"
  assert "PROMPT_LENGTH = 10" in (model_dir / run_dir.CONFIG_FILE).read_text()
  result = run_cli(["train", "--gin_file=runs/demo.gin", _model_dir_flag(model_dir), *SHORT,
                    "--gin.TRAIN_STEPS=6"], capsys)
  assert result.code == 0, result.err
  records = metric_writer.read_metrics(str(model_dir))
  keys = [(r["split"], r["name"], r["step"]) for r in records]
  assert len(keys) == len(set(keys))  # a resumed run logs no step twice
  train_steps = sorted({step for split, name, step in keys if (split, name) == ("train", "loss")})
  assert train_steps[0] == 1 and train_steps[-1] == 6  # the curve starts at the first step
  assert (model_dir / run_dir.CURVES_FILE).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  # The TRAIN_STEPS change was allowed; the config it replaced is kept beside it.
  assert "TRAIN_STEPS = 4" in (model_dir / "config_until_step4.gin").read_text()
  assert "TRAIN_STEPS = 6" in (model_dir / run_dir.CONFIG_FILE).read_text()


# ------------------------------------------------------- a hostile user's run-directory cases


def test_serving_outputs_never_replace_a_file_unasked(tmp_path, capsys):
  model_dir = trained_copy("runs/demo.gin", tmp_path, capsys)
  inputs = tmp_path / "in.jsonl"
  inputs.write_text('{"inputs": "the soup was bland"}\n')
  before = snapshot(model_dir)
  record = model_dir / run_dir.RECORD_FILE
  result = run_cli(["infer", f"--model_dir={model_dir}", f"--gin.INPUTS_PATH={str(inputs)!r}",
                    f"--gin.OUTPUT_PATH={str(record)!r}"], capsys)
  assert_one_line_error(result, [str(record), "already exists", "OVERWRITE"])
  result = run_cli(["curves", str(model_dir), f"--output={record}"], capsys)
  assert_one_line_error(result, [str(record), "already exists", "--overwrite"])
  assert snapshot(model_dir) == before
  output = tmp_path / "out.jsonl"
  output.write_text("old\n")
  result = run_cli(["infer", f"--model_dir={model_dir}", f"--gin.INPUTS_PATH={str(inputs)!r}",
                    f"--gin.OUTPUT_PATH={str(output)!r}", "--gin.OVERWRITE=True"], capsys)
  assert result.code == 0, result.err
  assert json.loads(output.read_text())["prediction"] == "negative"


def test_the_record_survives_a_lost_or_damaged_run_json(tmp_path, capsys):
  model_dir = trained_copy("runs/demo.gin", tmp_path, capsys)
  flags = ["train", "--gin_file=runs/demo.gin", _model_dir_flag(model_dir), *SHORT,
           "--gin.TRAIN_STEPS=6"]
  record = model_dir / run_dir.RECORD_FILE
  original = record.read_text()
  record.write_text("[1, 2]")
  before = snapshot(model_dir)
  assert_one_line_error(run_cli(flags, capsys), ["damaged run.json", "checkpoint"])
  assert snapshot(model_dir) == before
  record.unlink()  # lost: every checkpoint keeps a copy, which still refuses another lr
  before = snapshot(model_dir)
  assert_one_line_error(run_cli([*flags, "--gin.LEARNING_RATE=0.1"], capsys),
                        ["learning_rate=0.3", "learning_rate=0.1"])
  assert snapshot(model_dir) == before
  result = run_cli(flags, capsys)  # the run's own command resumes and restores run.json
  assert result.code == 0 and "at step 4" in result.out, result.err
  assert json.loads(record.read_text()) == json.loads(original)


def test_a_foreign_prompt_or_a_nested_run_leaves_the_run_alone(tmp_path, capsys):
  model_dir = trained_copy("runs/demo.gin", tmp_path, capsys)
  bank = tmp_path / "bank.npy"
  np.save(bank, np.zeros((2, 10, 64), np.float32))
  before = snapshot(model_dir)
  result = run_cli(["eval", f"--model_dir={model_dir}", f"--gin.PROMPT_PATH='{bank}#1'"], capsys)
  assert result.code == 0, result.err
  assert snapshot(model_dir) == before  # its score is not logged as the run's step 0
  nested = model_dir / run_dir.CHECKPOINTS_DIR / "new"
  result = run_cli(["train", "--gin_file=runs/demo.gin", _model_dir_flag(nested), *SHORT],
                   capsys)
  assert_one_line_error(result, [str(nested), "inside the run directory"])
  assert snapshot(model_dir) == before


def test_serving_a_runs_prompt_checks_its_placement_and_frozen_model(tmp_path, capsys):
  model_dir = trained_copy("runs/demo.gin", tmp_path, capsys,
                           extra=("--gin.PROMPT_PLACEMENT='suffix'",))
  requests = tmp_path / "requests.jsonl"
  requests.write_text('{"task": "s", "inputs": "the soup was bland"}\n')
  serve = ["infer", f"--inputs={requests}", f"--output={tmp_path / 'answers.jsonl'}",
           f"--prompt=s={model_dir}"]
  assert_one_line_error(run_cli([*serve, "--checkpoint=builtin:demo_t5_tiny.npz"], capsys),
                        ["placement 'suffix'", "--placement=suffix"])
  other = tmp_path / "other.npz"
  params = frozen_models.load_params_npz(frozen_models.resolve_path("builtin:demo_t5_tiny.npz"))
  params["decoder"]["decoder_norm"]["scale"] = params["decoder"]["decoder_norm"]["scale"] * 1.01
  frozen_models.save_params_npz(params, str(other))
  assert_one_line_error(run_cli([*serve, f"--checkpoint={other}", "--placement=suffix"],
                                capsys), ["builtin:demo_t5_tiny.npz", "another file"])
  result = run_cli([*serve, "--checkpoint=builtin:demo_t5_tiny.npz", "--placement=suffix"],
                   capsys)
  assert result.code == 0, result.err


def test_another_task_allowed_on_resume_drops_the_old_tasks_baseline(tmp_path, capsys):
  model_dir = trained_copy("runs/demo.gin", tmp_path, capsys)
  result = run_cli(["train", "--gin_file=runs/demo.gin", _model_dir_flag(model_dir), *SHORT,
                    "--gin.TRAIN_STEPS=6", "--gin.MIXTURE_OR_TASK_NAME='demo_topic'",
                    "--gin.trainer.train.allow_config_change=True"], capsys)
  assert result.code == 0, result.err
  summary = _summary(model_dir)
  assert "eval_untrained" not in summary and summary["eval_trained"]
  changes = run_dir.read_record(str(model_dir))["changes"]
  assert {"name": "data.task", "from": "demo_sentiment", "to": "demo_topic"} in \
      changes[0]["changed"]
