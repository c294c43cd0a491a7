"""Deep (per-layer) prompts: layer prompts replace exactly the prompt states, nothing else."""

from __future__ import annotations

import gin
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax.linen import unbox

from prompt_jax.models import t5
from prompt_jax.params import DEFAULT_TRAINABLE_PATTERN, split_params
from prompt_jax.prompts import deep, initializers
from prompt_jax.prompts.base import InputPrompt, export_prompt, prompt_positions
from prompt_jax.prompts.plain import Prompt
from tests.conftest import GIN_CONFIGS

CONFIG = t5.preset("tiny", num_encoder_layers=4, num_decoder_layers=1)
P = 3


def _tokens(seed=0, batch=2, length=9):
  """Random byte tokens with per-example padding (so suffix positions differ per row)."""
  rng = np.random.default_rng(seed)
  tokens = rng.integers(3, 259, size=(batch, length))
  for row, n in enumerate(rng.integers(3, length, size=batch)):
    tokens[row, n:] = 0
  tokens[:, 0] = np.maximum(tokens[:, 0], 3)
  return jnp.asarray(tokens, jnp.int32)


def _capture(module, params, tokens):
  """(logits, {layer_inputs outputs}, {encoder layer outputs})."""
  logits, state = module.apply(
      {"params": params}, tokens, tokens[:, :4], tokens[:, :4], enable_dropout=False,
      capture_intermediates=lambda m, name: name in ("layer_inputs", "__call__"))
  enc = state["intermediates"]["encoder"]
  layer_inputs = enc["prompt"]["layer_inputs"]
  layer_outputs = {i: enc[f"layers_{i}"]["__call__"][0] for i in range(CONFIG.num_encoder_layers)}
  return logits, layer_inputs, layer_outputs


def _init(module, tokens, seed=0):
  return unbox(module.init(jax.random.key(seed), tokens, tokens[:, :4], tokens[:, :4],
                           enable_dropout=False)["params"])


def test_no_layer_prompts_equals_plain_prompt_tuning_exactly():
  tokens = _tokens()
  plain = t5.Transformer(CONFIG, InputPrompt(Prompt(P, initializers.uniform())))
  deep_module = t5.Transformer(CONFIG, deep.DeepPrompt(Prompt(P, initializers.uniform())))
  params = _init(plain, tokens)
  np.testing.assert_array_equal(
      np.asarray(plain.apply({"params": params}, tokens, tokens[:, :4], tokens[:, :4],
                             enable_dropout=False)),
      np.asarray(deep_module.apply({"params": params}, tokens, tokens[:, :4], tokens[:, :4],
                                   enable_dropout=False)))


@pytest.mark.parametrize("placement", ["prefix", "prefix_after_bos", "suffix"])
def test_layer_prompts_replace_only_the_prompt_positions(placement):
  tokens = _tokens(1)
  layers = (1, 3)
  module = t5.Transformer(CONFIG, deep.DeepPrompt(Prompt(P, initializers.uniform()), layers=layers,
                                                  placement=placement))
  params = _init(module, tokens)
  _, inputs, outputs = _capture(module, params, tokens)
  positions = np.asarray(prompt_positions(tokens, P, placement))
  for layer in range(1, CONFIG.num_encoder_layers):
    hidden = np.asarray(inputs[layer])
    below = np.asarray(outputs[layer - 1])  # what propagates from layer - 1
    is_prompt = np.zeros(hidden.shape[:2], bool)
    for b in range(hidden.shape[0]):
      is_prompt[b, positions[b]] = True
      expected_prompt = (np.asarray(params["encoder"]["prompt"][f"layers_{layer}"])
                         if layer in layers else below[b, positions[b]])
      np.testing.assert_array_equal(hidden[b, positions[b]], expected_prompt)
    np.testing.assert_array_equal(hidden[~is_prompt], below[~is_prompt])
  # The layer prompts change the output (they are used), and only prompt params are added.
  assert set(params["encoder"]["prompt"]) == {"prompt", "layers_1", "layers_3"}
  trainable, _ = split_params(params, DEFAULT_TRAINABLE_PATTERN)
  assert sum(x.size for x in jax.tree_util.tree_leaves(trainable)) == P * 64 * (1 + len(layers))


def test_layer_prompt_gradient_reaches_only_its_layer_prompt():
  tokens = _tokens(2)
  module = t5.Transformer(CONFIG, deep.DeepPrompt(Prompt(P, initializers.uniform()), layers=(2,)))
  params = _init(module, tokens)

  def loss(prompt_params):
    full = dict(params, encoder=dict(params["encoder"], prompt=prompt_params))
    return jnp.sum(module.apply({"params": full}, tokens, tokens[:, :4], tokens[:, :4],
                                enable_dropout=False) ** 2)

  grads = jax.grad(loss)(params["encoder"]["prompt"])
  assert np.abs(np.asarray(grads["layers_2"])).sum() > 0
  # Layer 2 overwrites the prompt states, so the input prompt influences the output only through
  # the text states it attended to in layers 0-1: still a non-zero gradient.
  assert np.abs(np.asarray(grads["prompt"]["prompt"])).sum() > 0


def test_deep_prompt_export_and_errors():
  tokens = _tokens()
  module = t5.Transformer(CONFIG, deep.DeepPrompt(Prompt(P, initializers.uniform()), layers=(1,)))
  params = _init(module, tokens)
  assert export_prompt(module.prompt, params) is None
  with pytest.raises(ValueError, match=r"layer indices >= 1.*got 0"):
    deep.DeepPrompt(Prompt(P), layers=(0, 1))
  with pytest.raises(ValueError, match="repeated layers"):
    deep.DeepPrompt(Prompt(P), layers=(1, 1))
  with pytest.raises(ValueError, match="placement must be one of"):
    deep.DeepPrompt(Prompt(P), layers=(1,), placement="middle")


def test_deep_gin_builds_the_hook():
  gin.clear_config()
  try:
    gin.add_config_file_search_path(str(GIN_CONFIGS))
    gin.parse_config_files_and_bindings(
        [str(GIN_CONFIGS / "models" / "t5_1_1_tiny.gin"),
         str(GIN_CONFIGS / "prompts" / "deep.gin")],
        ["DEEP_PROMPT_LAYERS = [1]", "PROMPT_LENGTH = 5"], finalize_config=False)
    module = gin.get_configurable(t5.Transformer)()
  finally:
    gin.clear_config()
  assert isinstance(module.prompt, deep.DeepPrompt)
  assert module.prompt.layers == (1,) and module.prompt.length == 5
  params = jax.eval_shape(lambda: module.init(jax.random.key(0), _tokens(), _tokens()[:, :4],
                                              _tokens()[:, :4], enable_dropout=False))["params"]
  assert unbox(params)["encoder"]["prompt"]["layers_1"].shape == (5, 64)
