"""Greedy decoding that caches the cross-attention keys/values once gives the tokens (and the
cache holds the keys/values) that recomputing everything at every step gives."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from prompt_jax.models import t5
from prompt_jax.models.encoder_decoder import EncoderDecoderModel
from prompt_jax.prompts import initializers
from prompt_jax.prompts.base import InputPrompt
from prompt_jax.prompts.plain import Prompt


def test_predict_with_cached_cross_attention_matches_full_recompute():
  model = EncoderDecoderModel(t5.Transformer(
      t5.preset("tiny"), InputPrompt(Prompt(3, initializers.uniform()))), eos_id=-1)
  tokens = np.array(jax.random.randint(jax.random.key(1), (3, 9), 3, 300), np.int32)
  tokens[0, 6:] = 0
  params = nn.unbox(model.init(jax.random.key(0), model.dummy_batch(3, 9, 7)))
  steps = 7
  got = np.asarray(jax.jit(model.predict_batch, static_argnums=2)(
      params, {"encoder_input_tokens": tokens}, steps))
  # Reference: teacher-forced logits of the whole prefix at every step, no cache at all.
  prefix = np.zeros((3, 1), np.int32)
  logits_fn = jax.jit(lambda d: model.module.apply({"params": params}, tokens, d,
                                                   jnp.ones_like(d), enable_dropout=False))
  for _ in range(steps):
    nxt = np.argmax(np.asarray(logits_fn(prefix))[:, -1], axis=-1).astype(np.int32)
    prefix = np.concatenate([prefix, nxt[:, None]], axis=1)
  np.testing.assert_array_equal(got, prefix[:, 1:])
  assert len(np.unique(got)) > 3  # a real decode, not a constant


def test_cross_attention_cache_holds_the_encoded_keys():
  module = t5.Transformer(t5.preset("tiny"))
  tokens = jnp.asarray(np.random.default_rng(0).integers(3, 300, (2, 5)), jnp.int32)
  dec = jnp.ones((2, 4), jnp.int32)
  params = nn.unbox(module.init(jax.random.key(0), tokens, dec, dec, enable_dropout=False))
  params = params["params"]
  cache = jax.tree_util.tree_map(jnp.zeros_like, module.init(
      jax.random.key(0), tokens, dec, dec, decode=True, enable_dropout=False)["cache"])
  encoded = module.apply({"params": params}, tokens, enable_dropout=False, method=module.encode)
  _, variables = module.apply({"params": params, "cache": cache}, encoded, tokens, dec[:, :1],
                              dec[:, :1], enable_dropout=False, decode=True,
                              max_decode_length=4, mutable=["cache"], method=module.decode)
  layer = variables["cache"]["decoder"]["layers_1"]["encoder_decoder_attention"]
  kernel = params["decoder"]["layers_1"]["encoder_decoder_attention"]["key"]["kernel"]
  # The cached keys are the key projection of the encoder output, keys-last
  # ([b, heads, head_dim, l]), and the cached bias is the encoder mask's, per key [b, 1, 1, l].
  encoded_normed = np.asarray(encoded)
  want = (encoded_normed @ np.asarray(kernel)).reshape(2, 5, 4, 16).transpose(0, 2, 3, 1)
  np.testing.assert_allclose(np.asarray(layer["cached_cross_key"]), want, atol=1e-5)
  np.testing.assert_array_equal(np.asarray(layer["cached_cross_bias"]), np.zeros((2, 1, 1, 5)))
  padded = tokens.at[1, 3:].set(0)
  _, variables = module.apply({"params": params, "cache": cache}, encoded, padded, dec[:, :1],
                              dec[:, :1], enable_dropout=False, decode=True,
                              max_decode_length=4, mutable=["cache"], method=module.decode)
  bias = np.asarray(variables["cache"]["decoder"]["layers_0"]["encoder_decoder_attention"][
      "cached_cross_bias"])[:, 0, 0]
  assert (bias[0] == 0).all() and (bias[1, :3] == 0).all() and (bias[1, 3:] < -1e9).all()


def test_beams_attend_to_one_cross_cache_row_per_example():
  """Reading the cross cache with n query rows per cached row (example-major) gives the logits
  of a cache repeated to every row."""
  module = t5.Transformer(t5.preset("tiny"))
  tokens = jnp.asarray(np.random.default_rng(1).integers(3, 300, (2, 6)), jnp.int32)
  tokens = tokens.at[0, 4:].set(0)
  dec = jnp.ones((2, 3), jnp.int32)
  params = nn.unbox(module.init(jax.random.key(0), tokens, dec, dec, enable_dropout=False))
  params = params["params"]
  cache = jax.tree_util.tree_map(jnp.zeros_like, module.init(
      jax.random.key(0), tokens, dec, dec, decode=True, enable_dropout=False)["cache"])
  encoded = module.apply({"params": params}, tokens, enable_dropout=False, method=module.encode)
  step = lambda cache, token, enc, toks, reuse: module.apply(
      {"params": params, "cache": cache}, enc, toks, token, token, enable_dropout=False,
      decode=True, max_decode_length=3, reuse_cross_cache=reuse, mutable=["cache"],
      method=module.decode)
  _, variables = step(cache, dec[:, :1], encoded, tokens, False)
  n = 3
  per_row = lambda path, x: x if x.ndim == 0 else jnp.repeat(x, n, axis=0)
  is_cross = lambda path: "cross" in str(path[-1])
  folded = jax.tree_util.tree_map_with_path(
      lambda path, x: x if is_cross(path) else per_row(path, x), variables["cache"])
  repeated = jax.tree_util.tree_map_with_path(per_row, variables["cache"])
  token = jnp.arange(2 * n, dtype=jnp.int32)[:, None] + 5
  toks = jnp.repeat(tokens, n, axis=0)
  got, _ = step(folded, token, encoded, toks, True)
  want, _ = step(repeated, token, jnp.repeat(encoded, n, axis=0), toks, True)
  assert got.shape == (2 * n, 1, module.config.vocab_size)
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5, rtol=1e-5)
