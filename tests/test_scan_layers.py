"""Scanned layers (`T5Config.scan_layers`): the same numbers as the per-layer model.

Every test builds the per-layer model, initialises it, stacks its parameters with
`layer_stack.stack_layers` and runs the scanned model on them: logits, loss, the prompt's
gradient, decodes and loaded checkpoints must agree.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax.linen import unbox

from prompt_jax import params as params_lib
from prompt_jax.models import decoding, layer_stack, t5
from prompt_jax.models.encoder_decoder import EncoderDecoderModel
from prompt_jax.prompts import (
  bank,
  deep,
  initializers,
  multitask_prompts,
  p_tuning,
  residual,
  spt,
  superpos,
)
from prompt_jax.prompts.base import InputPrompt, export_prompt
from prompt_jax.prompts.plain import Prompt
from prompt_jax.storage import frozen_models
from tests.conftest import shared_fixture

CONFIG = t5.preset("tiny", num_encoder_layers=4, num_decoder_layers=2, dropout_rate=0.0)
P = 3
TOL = dict(atol=1e-6, rtol=1e-6)


def _batch(seed=0, batch=3, length=9, targets=4):
  rng = np.random.default_rng(seed)
  tokens = rng.integers(3, 259, size=(batch, length))
  for row, n in enumerate(rng.integers(3, length, size=batch)):
    tokens[row, n:] = 0
  target = rng.integers(3, 259, size=(batch, targets))
  target[:, -1] = 1
  target[0, -2:] = 0
  inputs = np.concatenate([np.zeros((batch, 1), int), target[:, :-1]], axis=1) * (target > 0)
  return {"encoder_input_tokens": jnp.asarray(tokens, jnp.int32),
          "decoder_input_tokens": jnp.asarray(inputs, jnp.int32),
          "decoder_target_tokens": jnp.asarray(target, jnp.int32),
          "decoder_loss_weights": jnp.asarray(target > 0, jnp.int32),
          "prompt_ids": jnp.asarray(np.arange(batch) % 2, jnp.int32)}


def _plain(placement="prefix"):
  return InputPrompt(Prompt(P, initializers.uniform()), placement)


HOOKS = {
    "none": lambda: None,
    "plain prefix": _plain,
    "plain prefix_after_bos": functools.partial(_plain, "prefix_after_bos"),
    "plain suffix": functools.partial(_plain, "suffix"),
    "superpos": lambda: InputPrompt(superpos.SuperPosPrompt(P, num_embeddings=16,
                                                            population_size=200)),
    "residual": lambda: InputPrompt(residual.ResidualPrompt(P, bottleneck=8)),
    "p-tuning": lambda: InputPrompt(p_tuning.PTuningPrompt(P, hidden_size=16)),
    "bank": lambda: bank.PromptBank(num_prompts=2, length=P),
    "shared+task": lambda: multitask_prompts.SharedTaskPrompt(num_tasks=2, length=P + 1,
                                                              shared_length=2),
    "deep prompts": lambda: deep.DeepPrompt(Prompt(P, initializers.uniform()), layers=(1, 3)),
    "deep prompts suffix": lambda: deep.DeepPrompt(Prompt(P, initializers.uniform()),
                                                   placement="suffix", layers=(2,)),
    "spt search": lambda: spt.SelectivePrompt(Prompt(P, initializers.uniform()), bottleneck=8,
                                              gate_init=0.3),
    "spt hard": lambda: spt.SelectivePrompt(Prompt(P, initializers.uniform()), layers=(2, 3),
                                            bottleneck=8, hard=True),
}


def _models(hook_fn, **config):
  cfg = CONFIG.replace(**config)
  make = lambda c: EncoderDecoderModel(t5.Transformer(c, hook_fn()))
  return make(cfg), make(cfg.replace(scan_layers=True))


def _features(model, batch):
  return {k: v for k, v in batch.items()
          if not k.startswith("prompt") or k in model.prompt_feature_names}


def _params(model, batch, seed=0):
  return unbox(model.init(jax.random.key(seed), _features(model, batch)))


@pytest.mark.parametrize("hook", sorted(HOOKS))
def test_scanned_logits_loss_and_prompt_gradient_equal_per_layer(hook):
  per_layer, scanned = _models(HOOKS[hook])
  batch = _batch()
  params = _params(per_layer, batch)
  stacked = layer_stack.stack_layers(params)
  features = _features(per_layer, batch)
  np.testing.assert_allclose(np.asarray(jax.jit(scanned.logits)(stacked, features)),
                             np.asarray(jax.jit(per_layer.logits)(params, features)), **TOL)
  if hook == "none":
    return

  def loss(model, params):
    prompt, frozen = params_lib.split_params(params)
    fn = lambda prompt: model.loss_fn(params_lib.merge_params(prompt, frozen), features, None)[0]
    return jax.jit(jax.value_and_grad(fn))(prompt)

  value, grad = loss(per_layer, params)
  scan_value, scan_grad = loss(scanned, stacked)
  np.testing.assert_allclose(float(scan_value), float(value), **TOL)
  flat, scan_flat = params_lib._flat(grad), params_lib._flat(scan_grad)
  assert sorted(scan_flat) == sorted(flat)  # the prompt's names do not change under scan
  assert max(float(jnp.max(jnp.abs(g))) for g in flat.values()) > 0
  for name, g in flat.items():
    np.testing.assert_allclose(np.asarray(scan_flat[name]), np.asarray(g), err_msg=name, **TOL)


@pytest.mark.parametrize("hook", ["plain prefix", "deep prompts", "spt search"])
def test_scanned_init_is_the_stacked_per_layer_tree(hook):
  per_layer, scanned = _models(HOOKS[hook])
  batch = _batch()
  want = jax.tree_util.tree_map(lambda x: x.shape, layer_stack.stack_layers(
      _params(per_layer, batch)))
  boxed = scanned.init_abstract(_features(scanned, batch))
  got = jax.tree_util.tree_map(lambda x: x.shape, unbox(boxed))
  assert got == want
  names = boxed["encoder"]["layers"]["attention"]["query"]["kernel"].names
  assert names == ("layers", "embed", "joined_kv")
  # Layers get their own random initialisation.
  kernel = unbox(boxed)["encoder"]["layers"]["mlp"]["wo"]["kernel"]
  assert kernel.shape[0] == CONFIG.num_encoder_layers
  values = _params(scanned, batch)["encoder"]["layers"]["mlp"]["wo"]["kernel"]
  assert not np.allclose(values[0], values[1])


@pytest.mark.parametrize("policy", ["full", "dots_saveable"])
def test_remat_per_scanned_layer_keeps_the_gradient(policy):
  per_layer, _ = _models(HOOKS["deep prompts"])
  _, scanned = _models(HOOKS["deep prompts"], remat_policy=policy)
  batch = _batch(seed=1)
  params = _params(per_layer, batch)
  prompt, frozen = params_lib.split_params(params)
  stacked_frozen = layer_stack.stack_layers(frozen)
  features = _features(per_layer, batch)
  grad = jax.jit(jax.grad(lambda p: per_layer.loss_fn(params_lib.merge_params(p, frozen), features,
                                              None)[0]))(prompt)
  scan_grad = jax.jit(jax.grad(lambda p: scanned.loss_fn(
      params_lib.merge_params(p, stacked_frozen), features, None)[0]))(prompt)
  for name, g in params_lib._flat(grad).items():
    np.testing.assert_allclose(np.asarray(params_lib._flat(scan_grad)[name]), np.asarray(g),
                               err_msg=name, **TOL)


def test_dropout_under_scan_differs_per_layer_and_is_reproducible():
  _, scanned = _models(HOOKS["plain prefix"], dropout_rate=0.3)
  batch = _batch()
  params = _params(scanned, batch)
  features = _features(scanned, batch)
  a = scanned.logits(params, features, jax.random.key(1))
  b = scanned.logits(params, features, jax.random.key(1))
  c = scanned.logits(params, features, jax.random.key(2))
  np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert not np.allclose(np.asarray(a), np.asarray(c))
  assert np.all(np.isfinite(np.asarray(a)))


@pytest.mark.parametrize("decode", [decoding.Greedy(), decoding.BeamSearch(num_decodes=3,
                                                                            alpha=0.6)])
def test_scanned_decoding_equals_per_layer(decode):
  per_layer, scanned = _models(HOOKS["plain prefix"])
  batch = _batch(seed=2)
  params = _params(per_layer, batch)
  stacked = layer_stack.stack_layers(params)
  features = _features(per_layer, batch)
  tokens, scores = decode(per_layer, params, features, 6)
  scan_tokens, scan_scores = decode(scanned, stacked, features, 6)
  np.testing.assert_array_equal(np.asarray(scan_tokens), np.asarray(tokens))
  np.testing.assert_allclose(np.asarray(scan_scores), np.asarray(scores), atol=1e-5, rtol=1e-6)


def test_stack_and_unstack_are_inverse_and_refuse_gaps():
  per_layer, _ = _models(HOOKS["none"])
  params = _params(per_layer, _batch())
  back = layer_stack.unstack_layers(layer_stack.stack_layers(params))
  jax.tree_util.tree_map(np.testing.assert_array_equal, back, params)
  gappy = {"encoder": {"layers_0": params["encoder"]["layers_0"],
                       "layers_2": params["encoder"]["layers_2"]}}
  with pytest.raises(ValueError, match=r"layers_0 \.\. layers_1, got \['layers_0', 'layers_2'\]"):
    layer_stack.stack_layers(gappy)


def test_a_hook_without_scan_support_is_refused_in_one_line():
  class LegacyHook(InputPrompt):
    scan_layer_inputs = None

  _, scanned = _models(lambda: LegacyHook(Prompt(P, initializers.uniform())))
  with pytest.raises(ValueError, match="LegacyHook has none"):
    _params(scanned, _batch())


def _load_both(path, config):
  """The checkpoint loaded into the per-layer and (stacked) into the scanned model."""
  per_layer = EncoderDecoderModel(t5.Transformer(config))
  scanned = EncoderDecoderModel(t5.Transformer(config.replace(scan_layers=True)))
  batch = per_layer.dummy_batch(2, 8, 4)
  abstract = lambda m: jax.tree_util.tree_map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), unbox(m.init_abstract(batch)))
  return (per_layer, frozen_models.load_frozen_params(path, config, abstract(per_layer)),
          scanned, frozen_models.load_frozen_params(path, config.replace(scan_layers=True),
                                                  abstract(scanned)))


def _check_same_outputs(per_layer, params, scanned, stacked, vocab):
  assert "layers" in stacked["encoder"] and "layers_0" not in stacked["encoder"]
  jax.tree_util.tree_map(np.testing.assert_array_equal, layer_stack.unstack_layers(stacked),
                         params)
  rng = np.random.default_rng(0)
  tokens = jnp.asarray(rng.integers(2, vocab, size=(2, 8)), jnp.int32)
  targets = jnp.asarray(rng.integers(2, vocab, size=(2, 4)), jnp.int32)
  batch = {"encoder_input_tokens": tokens, "decoder_target_tokens": targets,
           "decoder_input_tokens": jnp.pad(targets[:, :-1], ((0, 0), (1, 0)))}
  np.testing.assert_allclose(np.asarray(scanned.logits(stacked, batch)),
                             np.asarray(per_layer.logits(params, batch)), atol=2e-5, rtol=1e-5)


def test_t5x_legacy_fixture_loads_into_the_scanned_model():
  path = shared_fixture("t5x_t5_1_1_tiny_legacy/checkpoint_3")
  # prompt_tuning/configs/test/t5_1_1_tiny.gin: T5 1.1 base with these overrides.
  config = t5.preset("t5_1_1_base", emb_dim=4, num_heads=2, head_dim=2, mlp_dim=8,
                     num_encoder_layers=2, num_decoder_layers=2,
                     relative_attention_num_buckets=4, relative_attention_max_distance=8)
  _check_same_outputs(*_load_both(str(path), config), config.vocab_size)


def test_hf_fixture_loads_into_the_scanned_model():
  from prompt_jax.interop import hf
  path = shared_fixture("hf_t5_tiny_v1_1")
  config, _ = hf.load_t5(str(path))
  _check_same_outputs(*_load_both(str(path), config), config.vocab_size)


def test_orbax_per_layer_checkpoint_loads_stacked(tmp_path):
  per_layer, _ = _models(HOOKS["none"])
  params = _params(per_layer, _batch())
  path = str(tmp_path / "frozen")
  frozen_models.save_params_orbax(params, path)
  per_layer_model, loaded, scanned, stacked = _load_both(path, CONFIG)
  _check_same_outputs(per_layer_model, loaded, scanned, stacked, CONFIG.vocab_size)
  # ... and a stacked Orbax checkpoint loads stacked as it is.
  stacked_path = str(tmp_path / "stacked")
  frozen_models.save_params_orbax(stacked, stacked_path)
  _, _, _, again = _load_both(stacked_path, CONFIG)
  jax.tree_util.tree_map(np.testing.assert_array_equal, again, stacked)



@pytest.mark.parametrize("hook", ["plain prefix", "bank", "deep prompts"])
def test_prompt_exports_are_the_same_scanned_or_not(hook):
  per_layer, scanned = _models(HOOKS[hook])
  params = _params(per_layer, _batch())
  exported = export_prompt(per_layer.module.prompt, params)
  scan_exported = export_prompt(scanned.module.prompt, layer_stack.stack_layers(params))
  if exported is None:  # deep prompts with layer prompts have no single prompt
    assert scan_exported is None
  else:
    np.testing.assert_array_equal(np.asarray(scan_exported), np.asarray(exported))
