"""Guards against a hostile user: finite runs that run away stop like NaN ones, rotation keeps
the best checkpoint, and a gin value that a later file overrides is refused before any work."""

from __future__ import annotations

import dataclasses

import pytest
import seqio

from prompt_jax import gin_utils
from prompt_jax.data import mixtures, pipeline, synthetic  # synthetic registers demo tasks
from prompt_jax.models import t5
from prompt_jax.models.encoder_decoder import EncoderDecoderModel
from prompt_jax.prompts import initializers
from prompt_jax.prompts.base import InputPrompt
from prompt_jax.prompts.plain import Prompt
from prompt_jax.storage import checkpoints, metric_writer
from prompt_jax.training import guards, trainer
from tests.cli_harness import assert_one_line_error, run_cli, snapshot

LENGTHS = {"inputs": 64, "targets": 16}
DEMO_CHECKPOINT = "builtin:demo_t5_tiny.npz"


def _model():
  config = dataclasses.replace(t5.preset("tiny"), dropout_rate=0.0)
  return EncoderDecoderModel(t5.Transformer(config, InputPrompt(
      Prompt(4, initializers.uniform()))))


def _data(split="train", batch_size=8, shuffle=True):
  return pipeline.DatasetConfig("demo_sentiment", LENGTHS, split=split, batch_size=batch_size,
                                shuffle=shuffle)


def _train(model_dir, steps, **kwargs):
  kwargs.setdefault("initial_checkpoint_path", DEMO_CHECKPOINT)
  return trainer.train(model=_model(), model_dir=str(model_dir), train_steps=steps,
                       train_dataset_cfg=_data(), **kwargs)


# ------------------------------------------------------------------------------- divergence


def test_the_loss_guard_fires_on_a_window_of_high_losses_only():
  guard = guards.DivergenceGuard(loss_factor=10.0, param_factor=None, window=3)
  assert [guard.check(loss, None) for loss in (1.0, 12.0, 12.0)] == [None, None, None]
  assert "above 10 x the untrained loss 1" in guard.check(12.0, None)  # mean(12, 12, 12)
  spiky = guards.DivergenceGuard(loss_factor=10.0, param_factor=None, window=3)
  assert [spiky.check(loss, None) for loss in (1.0, 25.0, 1.0, 2.0, 25.0, 1.0)] == [None] * 6


def test_a_finite_runaway_stops_like_nan_and_leaves_the_good_checkpoints(tmp_path):
  """lr 1e30 keeps the loss near the untrained one but puts the prompt at ~1e29 (finite). (A
  resume with another learning rate must be allowed: the run record refuses it otherwise.)"""
  _train(tmp_path, 4, checkpoint_every_steps=2, log_every_steps=1)
  before = snapshot(tmp_path)
  with pytest.raises(guards.TrainingDivergedError,
                     match=r"at step 5: the trainable parameters reached .* stopped without "
                           r"saving it. Last good checkpoint: step 4"):
    _train(tmp_path, 8, checkpoint_every_steps=2, log_every_steps=1,
           optimizer=trainer.adafactor(learning_rate=1e30), allow_config_change=True)
  after = snapshot(tmp_path)
  assert {k: v for k, v in after.items() if "metrics.jsonl" not in k} == {
      k: v for k, v in before.items() if "metrics.jsonl" not in k}  # no checkpoint lost
  # Switched off, the same run trains on (and is saved): the guard is what stopped it.
  summary = _train(tmp_path, 6, checkpoint_every_steps=2, log_every_steps=1,
                   optimizer=trainer.adafactor(learning_rate=1e30),
                   divergence_param_factor=None, allow_config_change=True)
  assert summary["step"] == 6


# ------------------------------------------------------------------------------- rotation


def test_rotation_keeps_the_best_checkpoint_besides_the_newest(tmp_path):
  summary = _train(tmp_path, 12, checkpoint_every_steps=2, keep_checkpoints=2,
                   eval_every_steps=2, log_every_steps=2,
                   eval_dataset_cfg=_data("validation", 100, False))
  # Every checkpoint step was evaluated; metrics.jsonl keeps all scores, deleted steps' too.
  accuracy = {r["step"]: r["value"] for r in metric_writer.read_metrics(str(tmp_path))
              if r["split"] == "eval" and r["name"] == "accuracy" and r["step"] > 0}
  best_step = min(step for step, value in accuracy.items() if value == max(accuracy.values()))
  manager = checkpoints.PromptCheckpointManager(str(tmp_path), 1)
  kept = manager.all_steps()
  manager.close()
  assert sorted(kept) == sorted({best_step, 10, 12})
  assert summary["best_checkpoint"] == {"step": best_step, "metric": "accuracy",
                                        "value": accuracy[best_step]}


def test_best_metric_prefers_a_mixture_average_and_minimises_losses():
  assert checkpoints.best_metric({"b": 1.0, "a": 2.0}) == ("a", True)
  assert checkpoints.best_metric({"t1/accuracy": 1.0, "mixture_average": 2.0}) == (
      "mixture_average", True)
  assert checkpoints.best_metric({"loss": 1.0}) == ("loss", False)
  assert checkpoints.best_metric({}) is None


# -------------------------------------------------------------------------- gin overrides


def test_a_flag_that_a_later_file_overrides_is_refused_naming_both_files(tmp_path, capsys):
  run = tmp_path / "run"
  result = run_cli(["train", "--gin_file=prompts/from_file.gin", "--gin_file=runs/demo.gin",
                    f"--gin.PROMPT_FILE={str(tmp_path / 'p.npy')!r}",
                    f"--gin.MODEL_DIR={str(run)!r}"], capsys)
  assert_one_line_error(result, ["PROMPT_FILE", "prompts/from_file.gin line",
                                 "prompts/uniform.gin line", "wins"])
  assert snapshot(run) == {}
  # In the documented order the file that reads PROMPT_FILE comes last: accepted statically.
  gin_utils.check(["runs/demo.gin", "prompts/from_file.gin"],
                  ["PROMPT_FILE = 'p.npy'", "PROMPT_LENGTH = 10", "MODEL_DIR = '/tmp/x'"],
                  roots=["trainer.train"])


# ------------------------------------------------------------------------------ mixtures


def test_a_training_mixture_with_an_untrainable_task_is_refused_before_any_work(
    tmp_path, capsys):
  for name, tasks in (("guard_rate0_mixture", [("demo_sentiment", 1.0), ("demo_topic", 0.0)]),
                      ("guard_eval_only_mixture", [("demo_sentiment", 1.0),
                                                   ("demo_sentiment_rank", 1.0)])):
    if name not in seqio.MixtureRegistry.names():
      seqio.MixtureRegistry.add(name, tasks)
  cfg = lambda name: pipeline.DatasetConfig(name, LENGTHS, split="train", batch_size=8)  # noqa: E731
  with pytest.raises(ValueError, match="'demo_topic' has rate 0.0 in mixture"):
    mixtures.check_trainable_mixture(cfg("guard_rate0_mixture"))
  with pytest.raises(ValueError, match="'demo_sentiment_rank' .* has no 'train' split"):
    mixtures.check_trainable_mixture(cfg("guard_eval_only_mixture"))
  mixtures.check_trainable_mixture(cfg(synthetic.MULTITASK_MIXTURE))  # the demo's is fine
  run = tmp_path / "run"
  result = run_cli(["multitask", "--gin_file=runs/multitask_demo.gin",
                    "--gin.MIXTURE_OR_TASK_NAME='guard_rate0_mixture'", "--gin.NUM_TASKS=2",
                    f"--gin.MODEL_DIR={str(run)!r}"], capsys)
  assert_one_line_error(result, ["demo_topic", "rate 0.0"])
  assert snapshot(run) == {}


def test_a_full_disk_is_one_line_and_leaves_the_last_checkpoint_newest(tmp_path, capsys,
                                                                       monkeypatch):
  """The file system refuses the save of step 4 (ENOSPC, injected at Orbax's save)."""
  import errno  # pylint: disable=g-import-not-at-top

  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  run = tmp_path / "run"
  flags = ["train", "--gin_file=runs/demo.gin", f"--gin.MODEL_DIR={str(run)!r}",
           "--gin.CHECKPOINT_PERIOD=2", "--gin.EVAL_PERIOD=0"]
  assert run_cli([*flags, "--gin.TRAIN_STEPS=2"], capsys).code == 0
  original = ocp.CheckpointManager.save

  def save(self, step, *args, **kwargs):
    if step == 4:
      raise OSError(errno.ENOSPC, "No space left on device", str(run / "checkpoints"))
    return original(self, step, *args, **kwargs)

  monkeypatch.setattr(ocp.CheckpointManager, "save", save)
  result = run_cli([*flags, "--gin.TRAIN_STEPS=4"], capsys)
  assert_one_line_error(result, ["No space left on device", str(run / "checkpoints")])
  manager = checkpoints.PromptCheckpointManager(str(run), 1)
  assert manager.all_steps() == [2]  # nothing half-written became the newest checkpoint
  manager.close()


def test_the_spot_recipe_reads_its_prompt_file_and_refuses_a_nan_one(tmp_path, capsys):
  """docs/multitask.md's SPoT order (the run file, then prompts/from_file.gin): the file is read,
  so a prompt of NaN is one line, not a run from a random prompt."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  source = tmp_path / "source.npy"
  np.save(source, np.full((10, 64), np.nan, np.float32))
  run = tmp_path / "run"
  result = run_cli(["train", "--gin_file=runs/demo.gin", "--gin_file=prompts/from_file.gin",
                    f"--gin.PROMPT_FILE={str(source)!r}", "--gin.PROMPT_LENGTH=10",
                    f"--gin.MODEL_DIR={str(run)!r}"], capsys)
  assert_one_line_error(result, [str(source), "non-finite"])
  assert snapshot(run) == {}
