"""Dropout follows T5X (flaxformer): masks broadcast along the length dimension.

Attention weights [b, heads, q, k] share one keep mask across query positions
(`broadcast_dropout=True`) and the MLP's hidden units one mask across positions
(`broadcast_dims=(-2,)`), so identical positions stay identical under dropout; a per-element mask
would break that, which is what these tests detect.
"""

import jax
import jax.numpy as jnp
import numpy as np

from prompt_jax.models import t5

CONFIG = t5.preset("tiny", dropout_rate=0.5)


def _identical_rows(batch=2, length=5, seed=0):
  row = jax.random.normal(jax.random.key(seed), (batch, 1, CONFIG.emb_dim))
  return jnp.broadcast_to(row, (batch, length, CONFIG.emb_dim))


def _apply(module, rng, *args, **kwargs):
  params = module.init({"params": jax.random.key(1), "dropout": rng}, *args, **kwargs)
  return lambda r, **kw: module.apply(params, *args, **{**kwargs, **kw}, rngs={"dropout": r})


def test_attention_dropout_mask_is_shared_by_every_query_position():
  attention = t5.MultiHeadDotProductAttention(CONFIG)
  queries = _identical_rows()
  keys = jax.random.normal(jax.random.key(2), (2, 7, CONFIG.emb_dim))
  run = _apply(attention, jax.random.key(3), queries, keys, None, enable_dropout=True)
  dropped = np.asarray(run(jax.random.key(4)))
  clean = np.asarray(run(jax.random.key(4), enable_dropout=False))
  assert not np.allclose(dropped, clean, atol=1e-3)  # dropout did something
  np.testing.assert_allclose(dropped, np.broadcast_to(dropped[:, :1], dropped.shape), atol=1e-5)
  # Reproducible for a seed, different for another.
  np.testing.assert_array_equal(dropped, np.asarray(run(jax.random.key(4))))
  assert not np.allclose(dropped, np.asarray(run(jax.random.key(5))), atol=1e-3)


def test_mlp_dropout_mask_is_shared_by_every_position():
  mlp = t5.MlpBlock(CONFIG)
  x = _identical_rows()
  run = _apply(mlp, jax.random.key(3), x, enable_dropout=True)
  dropped = np.asarray(run(jax.random.key(6)))
  clean = np.asarray(run(jax.random.key(6), enable_dropout=False))
  assert not np.allclose(dropped, clean, atol=1e-3)
  np.testing.assert_allclose(dropped, np.broadcast_to(dropped[:, :1], dropped.shape), atol=1e-5)
  # Examples of a batch get their own masks.
  assert not np.allclose(dropped[0], dropped[1], atol=1e-3)


def test_dropout_keeps_the_expected_activation():
  """Inverted dropout: the mean over many masks approaches the no-dropout output."""
  mlp = t5.MlpBlock(CONFIG)
  x = _identical_rows(batch=1, length=1)
  run = _apply(mlp, jax.random.key(3), x, enable_dropout=True)
  clean = np.asarray(run(jax.random.key(0), enable_dropout=False))
  runs = jax.jit(jax.vmap(lambda r: run(r)))(jax.random.split(jax.random.key(7), 4000))
  mean = np.asarray(runs).mean(axis=0)
  # Per unit the mean's standard error is ~ |contribution| / sqrt(4000); compare in aggregate.
  assert np.abs(mean - clean).mean() < 0.05 * np.abs(clean).mean() + 1e-6
