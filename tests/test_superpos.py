"""SuperPos-Prompt: shapes, parameter counts, initialisation from the frozen embedding, the
superposition itself, folding for serving, gradient flow, and the frozen model's dropout switch."""

from __future__ import annotations

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from prompt_jax import params as params_lib
from prompt_jax.data import pipeline, synthetic  # noqa: F401  (registers demo tasks)
from prompt_jax.models import t5
from prompt_jax.models.encoder_decoder import EncoderDecoderModel
from prompt_jax.partitioning import Partitioner
from prompt_jax.programs import PromptPrograms
from prompt_jax.prompts import superpos
from prompt_jax.prompts.base import InputPrompt
from prompt_jax.prompts.plain import Prompt
from prompt_jax.prompts.superpos import SuperPosPrompt
from prompt_jax.storage import prompt_files
from prompt_jax.training import optimizers

TABLE = np.random.default_rng(0).normal(size=(300, 8)).astype(np.float32)
DEMO_CHECKPOINT = "builtin:demo_t5_tiny.npz"


def _init(generator, table=TABLE, batch=2):
  tokens = jnp.ones((batch, 3), jnp.int32)
  embedded = jnp.zeros((batch, 3, table.shape[1]))
  return generator.init(jax.random.key(0), tokens, embedded, jnp.asarray(table))["params"]


def _apply(generator, params, table=TABLE, batch=2):
  tokens = jnp.ones((batch, 3), jnp.int32)
  embedded = jnp.zeros((batch, 3, table.shape[1]))
  return np.asarray(generator.apply({"params": params}, tokens, embedded, jnp.asarray(table)))


@pytest.mark.parametrize("length,m,shared", [(3, 5, False), (7, 16, False), (3, 5, True)])
def test_shapes_parameter_counts_and_axes(length, m, shared):
  boxed = _init(SuperPosPrompt(length, m, population_size=100, shared_embeddings=shared))
  params = params_lib.unbox(boxed)
  d = TABLE.shape[1]
  want_e = (m, d) if shared else (length, m, d)
  assert params["embeddings"].shape == want_e
  assert params["coefficients"].shape == (length, m)
  expected = (m * d if shared else length * m * d) + length * m
  assert params_lib.count(params) == expected
  assert boxed["coefficients"].names == ("prompt", "superpos_basis")
  assert boxed["embeddings"].names[-2:] == ("superpos_basis", "prompt_embed")
  # every axis has a rule, and the parameters are replicated
  shardings = Partitioner().shardings_for(boxed)
  for sharding in jax.tree_util.tree_leaves(shardings):
    assert sharding.is_fully_replicated
  assert _apply(SuperPosPrompt(length, m, population_size=100, shared_embeddings=shared),
                params).shape == (2, length, d)


def test_embeddings_are_distinct_rows_of_the_frozen_table_within_the_population():
  params = params_lib.unbox(_init(SuperPosPrompt(4, 20, population_size=50)))
  embeddings = np.asarray(params["embeddings"])
  id_sets = []
  for token_rows in embeddings:
    ids = [int(np.where(np.all(TABLE == row, axis=1))[0][0]) for row in token_rows]
    assert max(ids) < 50
    assert len(set(ids)) == 20  # without replacement within a token
    id_sets.append(tuple(ids))
  assert len(set(id_sets)) == 4  # each token gets its own sample


def test_prompt_is_the_superposition_of_the_embeddings():
  generator = SuperPosPrompt(4, 6, population_size=100)
  params = params_lib.unbox(_init(generator))
  params = dict(params, coefficients=jnp.asarray(
      np.random.default_rng(1).normal(size=(4, 6)), jnp.float32))
  out = _apply(generator, params)
  e, c = np.asarray(params["embeddings"], np.float64), np.asarray(params["coefficients"],
                                                                    np.float64)
  expected = np.stack([c[i] @ e[i] for i in range(4)])
  np.testing.assert_allclose(out[0], expected, rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(out[0], out[1])

  soft = SuperPosPrompt(4, 6, population_size=100, softmax=True)
  weights = np.exp(c) / np.exp(c).sum(-1, keepdims=True)
  np.testing.assert_allclose(_apply(soft, params)[0],
                             np.stack([weights[i] @ e[i] for i in range(4)]), rtol=1e-5,
                             atol=1e-5)

  shared = SuperPosPrompt(4, 6, population_size=100, shared_embeddings=True)
  shared_params = dict(params, embeddings=params["embeddings"][0])
  np.testing.assert_allclose(_apply(shared, shared_params)[0], c @ e[0], rtol=1e-5, atol=1e-5)


def test_initial_tokens_have_the_scale_of_one_embedding_row():
  params = params_lib.unbox(_init(SuperPosPrompt(64, 128, population_size=300)))
  out = _apply(SuperPosPrompt(64, 128, population_size=300), params)[0]
  ratio = out.std() / TABLE.std()
  assert 0.8 < ratio < 1.25, ratio


def test_bad_settings_are_rejected_naming_the_field():
  with pytest.raises(ValueError, match="SuperPosPrompt.length must be a positive integer, got 0"):
    SuperPosPrompt(0)
  with pytest.raises(ValueError, match="num_embeddings=128 exceeds the 50 token ids"):
    _init(SuperPosPrompt(2, 128, population_size=50))


def _model(generator, dropout_rate=0.0):
  return EncoderDecoderModel(t5.Transformer(t5.preset("tiny", dropout_rate=dropout_rate),
                                            InputPrompt(generator)))


def _batch(batch_size=8):
  cfg = pipeline.DatasetConfig("demo_sentiment", {"inputs": 64, "targets": 16},
                               batch_size=batch_size, shuffle=False)
  return next(pipeline.iterate_batches(cfg))


@pytest.fixture(scope="module")
def setup():
  """A SuperPos prompt (L=4, m=16) on the demo's frozen model, dropout off; compiled once."""
  model = _model(SuperPosPrompt(4, 16, population_size=259))
  pt = PromptPrograms.for_training(model, optimizers.adamw(
      0.01, weight_decay_pattern=superpos.WEIGHT_DECAY_PATTERN), Partitioner(), 64, 16, 8)
  return model, pt, pt.load_frozen_params(DEMO_CHECKPOINT)


def test_folded_prompt_serves_with_a_plain_prompt_and_identical_logits(setup, tmp_path):
  model, pt, frozen = setup
  prompt_params = pt.init_state(frozen, jax.random.key(3)).prompt_params
  folded = pt.export_prompt(prompt_params, frozen)
  assert folded.shape == (4, 64)
  params = params_lib.merge_params(prompt_params, frozen)
  batch = {k: jnp.asarray(v) for k, v in _batch().items()}
  # the folded prompt is what the module feeds the encoder
  generator_out = model.module.apply(
      {"params": params}, batch["encoder_input_tokens"],
      method=lambda m, tokens: m.encoder.prompt.prompt(
          tokens, m.token_embedder(tokens), m.token_embedder.embedding))
  np.testing.assert_array_equal(np.asarray(generator_out)[3], folded)
  # a plain Prompt initialised from the exported .npy gives the same logits
  np.save(tmp_path / "p.npy", folded)
  plain = EncoderDecoderModel(t5.Transformer(
      t5.preset("tiny"), InputPrompt(Prompt(4, prompt_files.from_array(str(tmp_path / "p.npy"))))))
  plain_params = params_lib.unbox(jax.jit(plain.init_missing)(jax.random.key(0), frozen, batch))
  np.testing.assert_array_equal(
      np.asarray(plain_params["encoder"]["prompt"]["prompt"]["prompt"]), folded)
  np.testing.assert_allclose(np.asarray(jax.jit(plain.logits)(plain_params, batch)),
                             np.asarray(jax.jit(model.logits)(params, batch)), rtol=0, atol=1e-5)


def _flat(tree):
  return flax.traverse_util.flatten_dict(flax.core.unfreeze(tree), sep="/")


def test_gradients_reach_embeddings_and_coefficients_and_nothing_frozen(setup):
  model, pt, frozen = setup
  frozen_before = jax.tree_util.tree_map(np.array, frozen)
  state = pt.init_state(frozen, jax.random.key(0))
  before = jax.tree_util.tree_map(np.array, state.prompt_params)
  batch = _batch()

  def loss(prompt_params):
    params = params_lib.merge_params(prompt_params, frozen)
    return model.loss_fn(params, {k: jnp.asarray(v) for k, v in batch.items()}, None)[0]

  grads = _flat(jax.jit(jax.grad(loss))(state.prompt_params))
  assert set(grads) == {"encoder/prompt/prompt/coefficients", "encoder/prompt/prompt/embeddings"}
  for name, g in grads.items():
    assert np.all(np.isfinite(g)) and np.linalg.norm(g) > 1e-6, name

  for _ in range(3):
    state, _ = pt.train_step(state, frozen, batch, jax.random.key(1))
  for path, leaf in _flat(frozen_before).items():
    np.testing.assert_array_equal(leaf, np.asarray(_flat(frozen)[path]), err_msg=path)
  after = _flat(state.prompt_params)
  for path, leaf in _flat(before).items():
    assert not np.allclose(leaf, np.asarray(after[path])), f"{path} did not train"


def test_dropout_switch_applies_in_training_only(setup):
  """DROPOUT_RATE feeds T5Config.dropout_rate: with 0.1 a training step's loss depends on the
  dropout rng and differs from the evaluation loss; with 0.0 it equals the evaluation loss."""
  batch = _batch()
  _, pt_off, frozen = setup
  model = _model(SuperPosPrompt(4, 16, population_size=259), dropout_rate=0.1)
  pt_on = PromptPrograms.for_training(model, optimizers.adamw(), Partitioner(), 64, 16, 8)
  results = {}
  for rate, pt in ((0.0, pt_off), (0.1, pt_on)):
    state = pt.init_state(frozen, jax.random.key(0))
    eval_loss = float(pt.eval_step(state.prompt_params, frozen, batch)["loss"])
    train_losses = []
    for seed in (1, 2):
      # the train step donates its state: give each call its own copy
      copy = jax.tree_util.tree_map(jnp.copy, state)
      train_losses.append(float(pt.train_step(copy, frozen, batch, jax.random.key(seed))[1]
                                ["loss"]))
    results[rate] = (eval_loss, train_losses)
  eval_loss, (a, b) = results[0.0]
  assert a == pytest.approx(eval_loss, abs=1e-6) and b == pytest.approx(eval_loss, abs=1e-6)
  eval_loss_dropout, (a, b) = results[0.1]
  assert eval_loss_dropout == pytest.approx(eval_loss, abs=1e-6)  # eval never drops out
  assert abs(a - b) > 1e-4 and abs(a - eval_loss) > 1e-4
