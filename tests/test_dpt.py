"""DPT (prompt = A @ B): shapes and axes, the encoder input against NumPy, only A and B train,
the folded prompt serves exactly, the gin file, and the demo trained to >= 95% accuracy."""

from __future__ import annotations

import json

import flax
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
from prompt_jax.partitioning import Partitioner
from prompt_jax.programs import PromptPrograms
from prompt_jax.prompts.base import InputPrompt
from prompt_jax.prompts.dpt import DPTPrompt
from prompt_jax.training import optimizers
from tests.conftest import GIN_CONFIGS

TABLE = np.random.default_rng(0).normal(size=(300, 16)).astype(np.float32)
DEMO_CHECKPOINT = "builtin:demo_t5_tiny.npz"
PREFIX = "encoder/prompt/prompt/"
MODEL_GIN = [str(GIN_CONFIGS / "models" / "t5_1_1_tiny.gin"),
             str(GIN_CONFIGS / "prompts" / "dpt.gin")]


def _args(batch=2):
  return (jnp.ones((batch, 3), jnp.int32), jnp.zeros((batch, 3, TABLE.shape[1])),
          jnp.asarray(TABLE))


def _flat(tree):
  return flax.traverse_util.flatten_dict(flax.core.unfreeze(tree), sep="/")


def _batch(batch_size=8):
  cfg = pipeline.DatasetConfig("demo_sentiment", {"inputs": 64, "targets": 16},
                               batch_size=batch_size, shuffle=False)
  return {k: jnp.asarray(v) for k, v in next(pipeline.iterate_batches(cfg)).items()}


@pytest.mark.parametrize("length,rank", [(5, 2), (100, 10)])
def test_shapes_parameter_counts_axes_and_init(length, rank):
  generator = DPTPrompt(length, rank)
  boxed = jax.jit(generator.init)(jax.random.key(0), *_args())["params"]
  d = TABLE.shape[1]
  params = params_lib.unbox(boxed)
  assert params_lib.shapes(params) == {"a": (length, rank), "b": (rank, d)}
  assert params_lib.count(params) == length * rank + rank * d
  assert {k: v.names for k, v in _flat(boxed).items()} == {
      "a": ("prompt", "prompt_rank"), "b": ("prompt_rank", "prompt_embed")}
  for sharding in jax.tree_util.tree_leaves(Partitioner().shardings_for(boxed)):
    assert sharding.is_fully_replicated
  for leaf in jax.tree_util.tree_leaves(params):  # the authors' U[-0.5, 0.5]
    assert -0.5 <= float(leaf.min()) and float(leaf.max()) < 0.5 and float(leaf.std()) > 0.2


@pytest.mark.parametrize("kwargs,message", [
    ({"length": 0}, r"PROMPT_LENGTH \(DPTPrompt.length\) must be an integer >= 1, got 0"),
    ({"rank": 0}, "DPTPrompt.rank must be an integer >= 1, got 0"),
    ({"rank": 2.5}, "DPTPrompt.rank must be an integer >= 1, got 2.5"),
    ({"init_limit": 0.0}, "DPTPrompt.init_limit must be a number > 0, got 0.0"),
])
def test_bad_settings_are_rejected_naming_the_value(kwargs, message):
  with pytest.raises(ValueError, match=message):
    DPTPrompt(**kwargs)


@pytest.fixture(scope="module")
def trained():
  """DPT (L=6, r=2) on the demo's frozen model, two AdamW steps: (model, programs, state before,
  state after, frozen before, frozen after)."""
  model = EncoderDecoderModel(t5.Transformer(t5.preset("tiny"), InputPrompt(DPTPrompt(6, 2))))
  pt = PromptPrograms.for_training(model, optimizers.adamw(0.3, clipping_threshold=1.0),
                                   Partitioner(), 64, 16, 8)
  frozen = pt.load_frozen_params(DEMO_CHECKPOINT)
  frozen_before = jax.tree_util.tree_map(np.array, frozen)
  state = pt.init_state(frozen, jax.random.key(0))
  before = jax.tree_util.tree_map(np.array, state)
  for _ in range(2):
    state, metrics = pt.train_step(state, frozen, _batch(), jax.random.key(1))
    assert np.isfinite(float(metrics["grad_norm"])) and float(metrics["grad_norm"]) > 0
  return model, pt, before, state, frozen_before, frozen


def test_only_a_and_b_train(trained):
  """A and B are the only trainable parameters and the only optimizer state, and both move (an
  Adam step with a zero gradient would move them by the weight decay only, ~1e-6); the frozen
  parameters are bit-identical after the steps."""
  _, pt, before, state, frozen_before, frozen = trained
  assert not any("prompt" in k for k in _flat(pt.abstract_frozen))
  assert set(_flat(state.prompt_params)) == {PREFIX + "a", PREFIX + "b"}
  opt_shapes = {tuple(x.shape) for x in jax.tree_util.tree_leaves(state.opt_state)}
  assert opt_shapes <= {(6, 2), (2, 64), ()}, opt_shapes  # Adam moments of A and B, counts
  for path, leaf in _flat(before.prompt_params).items():
    assert np.abs(leaf - np.asarray(_flat(state.prompt_params)[path])).max() > 1e-3, path
  for path, leaf in _flat(frozen_before).items():
    np.testing.assert_array_equal(leaf, np.asarray(_flat(frozen)[path]), err_msg=path)


def test_encoder_input_is_the_numpy_product_before_the_tokens_and_the_export(trained):
  """The embedded input the real encoder receives from the hook = [A @ B ; E[tokens]] (NumPy,
  float64); the exported prompt is exactly its first L rows, so it serves as a plain prompt."""
  model, pt, _, state, _, frozen = trained
  params = params_lib.merge_params(state.prompt_params, frozen)
  tokens = _batch()["encoder_input_tokens"]
  _, captured = jax.jit(lambda p, x: model.module.apply(
      {"params": p}, x, method=model.module.encode, enable_dropout=False,
      capture_intermediates=True, mutable=["intermediates"]))(params, tokens)
  embedded, mask = captured["intermediates"]["encoder"]["prompt"]["__call__"][0]
  p = {k: np.asarray(v, np.float64) for k, v in _flat(params).items()}
  prompt = p[PREFIX + "a"] @ p[PREFIX + "b"]
  batch, length = tokens.shape
  expected = np.concatenate([np.broadcast_to(prompt, (batch, 6, 64)),
                             p["token_embedder/embedding"][np.asarray(tokens)]], axis=1)
  assert embedded.shape == (batch, 6 + length, 64) and embedded.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(embedded), expected, rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(
      np.asarray(mask), np.concatenate([np.ones((batch, 6), bool), tokens > 0], axis=1))

  folded = pt.export_prompt(state.prompt_params, frozen)
  assert folded.shape == (6, 64) and folded.dtype == np.float32
  np.testing.assert_allclose(folded, prompt, rtol=1e-5, atol=1e-5)
  for row in np.asarray(embedded):  # what a plain Prompt holding `folded` feeds the encoder
    np.testing.assert_allclose(row[:6], folded, rtol=0, atol=1e-6)


def test_gin_file_builds_the_authors_defaults():
  gin.clear_config()
  try:
    model, _ = gin_utils.model_from_gin(MODEL_GIN)
    optimizer = gin.query_parameter("%PROMPT_OPTIMIZER").scoped_configurable_fn()
  finally:
    gin.clear_config()
  generator = model.module.prompt.prompt
  assert isinstance(model.module.prompt, InputPrompt) and model.module.prompt.placement == "prefix"
  assert (type(generator), generator.length, generator.rank, generator.init_limit) == (
      DPTPrompt, 100, 10, 0.5)
  shapes = params_lib.unbox(model.init_abstract(model.dummy_batch(1, 8, 4)))
  trainable, _ = params_lib.split_params(shapes)
  assert params_lib.shapes(trainable) == {PREFIX + "a": (100, 10), PREFIX + "b": (10, 64)}
  settings = optimizers.description(optimizer)
  assert {k: settings[k] for k in ("name", "learning_rate", "weight_decay",
                                   "clipping_threshold")} == {
      "name": "adamw", "learning_rate": 0.3, "weight_decay": 1e-5, "clipping_threshold": 1.0}
  # a full training configuration reads every macro it needs (the CLI's static check)
  gin_utils.check([*MODEL_GIN, str(GIN_CONFIGS / "runs" / "superpos_finetune.gin")],
                  ["MODEL_DIR = '/tmp/unused'", "MIXTURE_OR_TASK_NAME = 'demo_sentiment'"],
                  roots=["trainer.train"])


def test_demo_reaches_95_percent_validation_accuracy(tmp_path):
  """runs/demo.gin with prompts/dpt.gin (L=10, rank 2: 148 parameters instead of 640) and its
  AdamW: >= 95% greedy-decoded accuracy on demo_sentiment's validation split."""
  gin.clear_config()
  try:
    code = cli.main([
        "train", f"--gin_file={GIN_CONFIGS}/runs/demo.gin",
        f"--gin_file={GIN_CONFIGS}/prompts/dpt.gin", "--gin.PROMPT_LENGTH=10",
        "--gin.DPT_RANK=2", "--gin.trainer.train.optimizer=%PROMPT_OPTIMIZER",
        f"--gin.MODEL_DIR='{tmp_path}'", "--gin.TRAIN_STEPS=60", "--gin.EVAL_PERIOD=0",
        "--gin.CHECKPOINT_PERIOD=60"])
  finally:
    gin.clear_config()
  assert code == 0
  summary = json.loads((tmp_path / "summary.json").read_text())
  before, after = summary["eval_untrained"]["accuracy"], summary["eval_trained"]["accuracy"]
  print(f"DPT demo: validation accuracy {before:.2f} -> {after:.2f} after 60 steps")
  assert after >= 95.0, (before, after)
  assert np.load(tmp_path / "prompts" / "prompt_60.npy").shape == (10, 64)
