"""`prompt-jax export-prompt`: a trained SuperPos run folds into a plain prompt, written as .npy
and as a PEFT adapter, that serves with the same logits."""

from __future__ import annotations

import os

import gin
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from prompt_jax import cli, gin_utils
from prompt_jax import params as params_lib
from prompt_jax.data import pipeline, synthetic  # noqa: F401  (registers demo tasks)
from prompt_jax.models import t5
from prompt_jax.models.encoder_decoder import EncoderDecoderModel
from prompt_jax.prompts import superpos
from prompt_jax.prompts.base import InputPrompt
from prompt_jax.prompts.plain import Prompt
from prompt_jax.prompts.superpos import SuperPosPrompt
from prompt_jax.serving import prompt_export
from prompt_jax.storage import prompt_files
from prompt_jax.training import optimizers, trainer

DEMO_CHECKPOINT = "builtin:demo_t5_tiny.npz"
LENGTHS = {"inputs": 64, "targets": 16}
GIN_FLAGS = ["--gin_file=models/t5_1_1_tiny.gin", "--gin_file=prompts/superpos.gin",
             "--gin.PROMPT_LENGTH=4", "--gin.SUPERPOS_NUM_EMBEDDINGS=16",
             "--gin.superpos.SuperPosPrompt.population_size=259"]


def _model():
  return EncoderDecoderModel(t5.Transformer(
      t5.preset("tiny"), InputPrompt(SuperPosPrompt(4, 16, population_size=259))))


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
  """A 3-step SuperPos run on the demo model, checkpointed at steps 2 and 3."""
  model_dir = tmp_path_factory.mktemp("superpos_run")
  trainer.train(model=_model(), model_dir=str(model_dir), train_steps=3,
                train_dataset_cfg=pipeline.DatasetConfig("demo_sentiment", LENGTHS, batch_size=8),
                initial_checkpoint_path=DEMO_CHECKPOINT,
                optimizer=optimizers.adamw(
                    0.05, weight_decay_pattern=superpos.WEIGHT_DECAY_PATTERN),
                checkpoint_every_steps=2, log_every_steps=1)
  return model_dir


@pytest.fixture(autouse=True)
def _clean_gin():
  gin.clear_config()
  yield
  gin.clear_config()


def test_cli_writes_npy_and_peft_that_serve_with_identical_logits(run_dir, tmp_path):
  out, peft_dir = tmp_path / "prompt.npy", tmp_path / "peft"
  code = cli.main(["export-prompt", *GIN_FLAGS, f"--model_dir={run_dir}", f"--output={out}",
                   f"--peft_dir={peft_dir}", "--base_model_name_or_path=demo/t5-tiny"])
  assert code == 0
  exported = np.load(out)
  assert exported.shape == (4, 64) and exported.dtype == np.float32
  # the trainer's own export of the final checkpoint is the same fold
  np.testing.assert_array_equal(exported, np.load(run_dir / "prompts" / "prompt_3.npy"))

  # it is E_i p'_i of the restored parameters, computed here with NumPy
  prompt_params, meta, step = prompt_export.load_trained_prompt(str(run_dir))
  assert step == 3 and meta["initial_checkpoint_path"] == DEMO_CHECKPOINT
  node = prompt_params["encoder"]["prompt"]["prompt"]
  expected = np.einsum("lm,lmd->ld", node["coefficients"].astype(np.float64),
                       node["embeddings"].astype(np.float64))
  np.testing.assert_allclose(exported, expected, rtol=1e-5, atol=1e-6)

  from prompt_jax.interop import peft
  np.testing.assert_array_equal(peft.load_prompt(str(peft_dir)), exported)

  # serving: the SuperPos model and a plain Prompt loaded from the .npy give the same logits
  model = _model()
  plain = EncoderDecoderModel(t5.Transformer(
      t5.preset("tiny"), InputPrompt(Prompt(4, prompt_files.from_array(str(out))))))
  from prompt_jax.storage import (
    frozen_models,  # pylint: disable=g-import-not-at-top
  )
  frozen = frozen_models.load_frozen_params(DEMO_CHECKPOINT, model.config)
  cfg = pipeline.DatasetConfig("demo_sentiment", LENGTHS, batch_size=4, split="validation",
                               shuffle=False)
  batch = {k: jnp.asarray(v) for k, v in next(pipeline.iterate_batches(cfg)).items()}
  plain_params = params_lib.unbox(jax.jit(plain.init_missing)(jax.random.key(0), frozen, batch))
  superpos_params = params_lib.merge_params(prompt_params, frozen)
  np.testing.assert_allclose(np.asarray(jax.jit(plain.logits)(plain_params, batch)),
                             np.asarray(jax.jit(model.logits)(superpos_params, batch)),
                             rtol=0, atol=1e-5)


def test_earlier_step_and_default_paths(run_dir):
  code = cli.main(["export-prompt", *GIN_FLAGS, f"--model_dir={run_dir}", "--step=2",
                   "--format=npy"])
  assert code == 0
  path = run_dir / "export" / "prompt_2.npy"
  np.testing.assert_array_equal(np.load(path), np.load(run_dir / "prompts" / "prompt_2.npy"))
  assert not np.array_equal(np.load(path), np.load(run_dir / "prompts" / "prompt_3.npy"))
  assert not os.path.exists(run_dir / "export" / "peft_2")


def test_main_takes_the_built_model_and_parses_no_gin(run_dir, tmp_path):
  """`prompt_export.main` folds with the model it is handed, without gin flags; gin's registry is
  left as it was."""
  before = gin.config_str()
  out = tmp_path / "direct.npy"
  assert prompt_export.main(_model(), str(run_dir), output=str(out), fmt="npy") == 0
  np.testing.assert_array_equal(np.load(out), np.load(run_dir / "prompts" / "prompt_3.npy"))
  assert gin.config_str() == before
  with pytest.raises(ValueError, match="no run directory: pass --model_dir"):
    prompt_export.main(_model(), None)


def test_missing_step_and_missing_run_are_errors(run_dir, tmp_path):
  with pytest.raises(ValueError, match=r"--step=7 is not saved in .*saved steps are \[2, 3\]"):
    prompt_export.export_prompt(_model(), str(run_dir), step=7)
  with pytest.raises(ValueError, match="no checkpoint in"):
    prompt_export.export_prompt(_model(), str(tmp_path))


def test_superpos_run_file_uses_adamw_and_turns_dropout_off():
  """gin: models + prompts/superpos.gin + runs/superpos_finetune.gin."""
  model, _ = gin_utils.model_from_gin([
      "models/t5_1_1_lm_adapted_small.gin", "prompts/superpos.gin",
      "runs/superpos_finetune.gin"])
  generator = model.module.prompt.prompt
  assert isinstance(generator, SuperPosPrompt)
  assert (generator.length, generator.num_embeddings, generator.softmax) == (10, 128, False)
  assert model.config.dropout_rate == 0.0
  optimizer = gin.query_parameter("prompt_jax.training.trainer.train.optimizer")
  assert str(optimizer) == "%PROMPT_OPTIMIZER"
  assert gin.query_parameter("%PROMPT_OPTIMIZER").configurable.wrapped is optimizers.adamw
  assert gin.query_parameter("%PROMPT_OPTIMIZER_LEARNING_RATE") == 0.01


def test_superpos_demo_gin_and_residual_override():
  model, _ = gin_utils.model_from_gin(["runs/superpos_demo.gin"])
  generator = model.module.prompt.prompt
  assert isinstance(generator, SuperPosPrompt) and generator.population_size == 259
  assert gin.query_parameter("%INITIAL_CHECKPOINT_PATH") == DEMO_CHECKPOINT
  gin.clear_config()
  from prompt_jax.prompts.residual import ResidualPrompt
  model, _ = gin_utils.model_from_gin(["runs/superpos_demo.gin", "prompts/residual.gin"])
  assert isinstance(model.module.prompt.prompt, ResidualPrompt)
  assert gin.query_parameter("%PROMPT_OPTIMIZER_LEARNING_RATE") == 0.3
  assert model.config.dropout_rate == 0.0
