"""AdamW with path-masked weight decay (checked against a NumPy AdamW), its gin bindings, and
SPT's weights optimizer split by parameter path."""

from __future__ import annotations

import gin
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from prompt_jax.prompts import superpos
from prompt_jax.training import optimizers
from tests.conftest import GIN_CONFIGS


def _superpos_tree(seed=0):
  rng = np.random.default_rng(seed)
  return {"encoder": {"prompt": {"prompt": {
      "coefficients": jnp.asarray(rng.normal(size=(3, 5)), jnp.float32),
      "embeddings": jnp.asarray(rng.normal(size=(3, 5, 4)), jnp.float32)}}}}


def _leaves(tree):
  node = tree["encoder"]["prompt"]["prompt"]
  return np.asarray(node["coefficients"]), np.asarray(node["embeddings"])


def test_with_zero_gradient_only_the_coefficients_move():
  params = _superpos_tree()
  lr, wd = 0.1, 0.5
  opt = optimizers.adamw(lr, wd, weight_decay_pattern=superpos.WEIGHT_DECAY_PATTERN)
  state = opt.init(params)
  zeros = jax.tree_util.tree_map(jnp.zeros_like, params)
  current = params
  for _ in range(3):
    updates, state = opt.update(zeros, state, current)
    current = optax.apply_updates(current, updates)
  c0, e0 = _leaves(params)
  c3, e3 = _leaves(current)
  np.testing.assert_array_equal(e3, e0)
  np.testing.assert_allclose(c3, c0 * (1 - lr * wd) ** 3, rtol=1e-6)


def _numpy_adamw(params, grads_seq, lr, wd, decay, b1=0.9, b2=0.999, eps=1e-8):
  p = {k: v.astype(np.float64) for k, v in params.items()}
  m = {k: np.zeros_like(v) for k, v in p.items()}
  v = {k: np.zeros_like(x) for k, x in p.items()}
  for t, grads in enumerate(grads_seq, start=1):
    for k in p:
      m[k] = b1 * m[k] + (1 - b1) * grads[k]
      v[k] = b2 * v[k] + (1 - b2) * grads[k] ** 2
      step = (m[k] / (1 - b1 ** t)) / (np.sqrt(v[k] / (1 - b2 ** t)) + eps)
      p[k] = p[k] - lr * (step + (wd * p[k] if decay[k] else 0.0))
  return p


def test_matches_a_numpy_adamw_with_the_decay_mask():
  params = _superpos_tree()
  rng = np.random.default_rng(1)
  grads_seq = [{"coefficients": rng.normal(size=(3, 5)), "embeddings": rng.normal(size=(3, 5, 4))}
               for _ in range(4)]
  opt = optimizers.adamw(0.05, 0.2, weight_decay_pattern=superpos.WEIGHT_DECAY_PATTERN)
  state, current = opt.init(params), params
  for grads in grads_seq:
    tree = {"encoder": {"prompt": {"prompt": {k: jnp.asarray(v, jnp.float32)
                                              for k, v in grads.items()}}}}
    updates, state = opt.update(tree, state, current)
    current = optax.apply_updates(current, updates)
  c, e = _leaves(params)
  expected = _numpy_adamw({"coefficients": c, "embeddings": e}, grads_seq, 0.05, 0.2,
                          {"coefficients": True, "embeddings": False})
  got_c, got_e = _leaves(current)
  # float32 vs float64: agreement to 1e-5; a wrong mask would be off by lr * wd * |p| ~ 1e-2
  np.testing.assert_allclose(got_c, expected["coefficients"], rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(got_e, expected["embeddings"], rtol=1e-5, atol=1e-5)


def test_clipping_scales_the_gradient_before_adam():
  params = _superpos_tree()
  grads = jax.tree_util.tree_map(lambda x: jnp.full_like(x, 10.0), params)
  norm = float(optax.global_norm(grads))
  clipped = optimizers.adamw(0.1, 0.0, clipping_threshold=1.0, eps=1.0)
  plain = optimizers.adamw(0.1, 0.0, eps=1.0)
  scaled = jax.tree_util.tree_map(lambda g: g / norm, grads)
  u_clipped, _ = clipped.update(grads, clipped.init(params), params)
  u_plain, _ = plain.update(scaled, plain.init(params), params)
  for a, b in zip(jax.tree_util.tree_leaves(u_clipped), jax.tree_util.tree_leaves(u_plain)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6)


def test_a_pattern_that_matches_nothing_is_an_error():
  opt = optimizers.adamw(weight_decay_pattern="coeficients")
  with pytest.raises(ValueError, match="weight_decay_pattern 'coeficients' matches no trainable "
                                       "parameter.*encoder/prompt/prompt/coefficients"):
    opt.init(_superpos_tree())
  with pytest.raises(ValueError, match="is not a valid regex"):
    optimizers.adamw(weight_decay_pattern="(")
  with pytest.raises(ValueError, match="adamw learning_rate must be > 0, got 0"):
    optimizers.adamw(learning_rate=0)


@pytest.mark.parametrize("prompt_file,lr,decays_embeddings", [("superpos", 0.01, False),
                                                              ("residual", 0.3, True)])
def test_gin_prompt_files_bind_the_papers_adamw(prompt_file, lr, decays_embeddings):
  gin.clear_config()
  try:
    gin.add_config_file_search_path(str(GIN_CONFIGS))
    gin.parse_config_files_and_bindings([str(GIN_CONFIGS / "prompts" / f"{prompt_file}.gin")],
                                        [], finalize_config=False)
    opt = gin.get_configurable(optimizers.adamw)()
  finally:
    gin.clear_config()
  if prompt_file == "superpos":  # the gin file binds the method's own pattern, not a copy
    assert optimizers.description(opt)["weight_decay_pattern"] == superpos.WEIGHT_DECAY_PATTERN
  params = _superpos_tree()
  zeros = jax.tree_util.tree_map(jnp.zeros_like, params)
  updates, _ = opt.update(zeros, opt.init(params), params)
  c, e = _leaves(params)
  u_c, u_e = _leaves(updates)
  # with a zero gradient the update is exactly the decoupled decay -lr * 1e-5 * param
  np.testing.assert_allclose(u_c, -lr * 1e-5 * c, rtol=1e-5)
  np.testing.assert_allclose(u_e, -lr * 1e-5 * e if decays_embeddings else 0.0 * e, rtol=1e-5)


def _spt_weights(with_generator=True):
  tree = {"prompt": {"prompt": jnp.ones((2, 4))}}
  if with_generator:
    tree["layers_1"] = {"generator": {"down": {"kernel": jnp.ones((4, 3)), "bias": jnp.ones(3)}}}
  return {"encoder": {"prompt": tree}}


def test_spt_optimizer_gives_the_generators_adam_and_the_prompt_adafactor():
  lr_prompt, lr_gen = 0.3, 3e-3
  opt = optimizers.spt_optimizer(lr_prompt, lr_gen)
  params = _spt_weights()
  state = opt.init(params)
  assert sorted(state.inner_states) == ["generator", "prompt"]  # checkpointed state's keys
  grads = jax.tree_util.tree_map(jnp.ones_like, params)
  updates, _ = opt.update(grads, state, params)
  adam, _ = optax.adam(lr_gen).update(grads, optax.adam(lr_gen).init(params), params)
  factor = optimizers.adafactor(lr_prompt)
  ada, _ = factor.update(grads, factor.init(params), params)
  layer, prompt = (updates["encoder"]["prompt"][k] for k in ("layers_1", "prompt"))
  jax.tree_util.tree_map(np.testing.assert_allclose, layer,
                         adam["encoder"]["prompt"]["layers_1"])
  np.testing.assert_allclose(prompt["prompt"], ada["encoder"]["prompt"]["prompt"]["prompt"])
  # SPT's re-training with K = 0 kept layers: no generator at all is fine.
  no_generator = _spt_weights(with_generator=False)
  ones = jax.tree_util.tree_map(jnp.ones_like, no_generator)
  updates, _ = opt.update(ones, opt.init(no_generator), no_generator)
  ada, _ = factor.update(ones, factor.init(no_generator), no_generator)
  np.testing.assert_allclose(updates["encoder"]["prompt"]["prompt"]["prompt"],
                             ada["encoder"]["prompt"]["prompt"]["prompt"])


def test_split_by_path_refuses_a_bad_regex():
  with pytest.raises(ValueError, match="split_by_path pattern '\\(' is not a valid regex"):
    optimizers.split_by_path("(", optax.adam(0.1), optax.adam(0.1))
