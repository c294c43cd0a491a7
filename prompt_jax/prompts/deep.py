"""Deep (per-layer) prompts for the T5 encoder, P-tuning-v2 style.

Layer 0 sees the input-level prompt that the child generator `prompt` places in the embedded
input (exactly as `InputPrompt` does). Before every encoder layer l listed in `layers`, the hidden
states at the prompt positions are *replaced* by a layer-specific prompt P_l [p, d]:

    h_l[:, pos] = P_l                      for l in layers
    h_l[:, pos] = layer_{l-1}(h_{l-1})[:, pos]   otherwise (the prompt propagates)

where `pos` are the prompt positions (`prompt_positions(...)`, [b, p]). The frozen layers
compute exactly as without prompts; only their inputs at the prompt positions change.

Parameters (all under `encoder/prompt/`, so the default trainable pattern selects them):

    prompt/prompt       [p, d]   the input prompt (layer 0), from the child generator
    layers_{l}          [p, d]   the prompt inserted before encoder layer l, for l in `layers`

Trainable parameters: p * d * (1 + len(layers)) for a plain input prompt.
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from prompt_jax.prompts import initializers
from prompt_jax.prompts.base import InputPrompt, PromptFeatures

Array = jax.Array


def replace_at_positions(hidden: Array, values: Array, positions: Array) -> Array:
  """hidden [b, l, d] with rows `positions` [b, p] set to `values` [b, p, d]."""
  return jax.vmap(lambda h, v, pos: h.at[pos].set(v.astype(h.dtype)))(hidden, values, positions)


def replace_if_active(layer_values, hidden: Array, positions: Array) -> Array:
  """One scanned layer's deep prompt: (values [b, p, d], active []) -> hidden [b, l, d] with
  the values at `positions` [b, p] when active, else unchanged."""
  values, active = layer_values
  return jnp.where(active, replace_at_positions(hidden, values, positions), hidden)


def gather_positions(hidden: Array, positions: Array) -> Array:
  """hidden [b, l, d], positions [b, p] -> [b, p, d]."""
  return jnp.take_along_axis(hidden, positions[..., None], axis=1)


def check_layers(name: str, layers: Optional[Sequence[int]]) -> None:
  """Layer lists must hold distinct integers >= 1 (layer 0's prompt is the input prompt)."""
  if layers is None:
    return
  layers = list(layers)
  for layer in layers:
    if not isinstance(layer, int) or isinstance(layer, bool) or layer < 1:
      raise ValueError(f"{name} must hold encoder layer indices >= 1 (layer 0's prompt is the "
                       f"input prompt), got {layer!r} in {layers}")
  if len(set(layers)) != len(layers):
    raise ValueError(f"{name} has repeated layers: {layers}")


# The input-level part of the deep hooks (layer-0 prompt, mask, prompt positions) is exactly
# `InputPrompt`; DeepPrompt and SelectivePrompt add `layer_inputs` and `export`.
InputLevelHook = InputPrompt


class DeepPrompt(InputLevelHook):
  """Input prompt plus a free prompt replacing the prompt states before each layer in `layers`.

  Attributes:
    prompt: the input-level generator (e.g. `plain.Prompt`); its length is the prompt length.
    layers: encoder layers (>= 1) that get their own prompt, e.g. [1, 2, 3]; from gin.
    placement: 'prefix', 'prefix_after_bos' or 'suffix'.
    layer_init_fn: initialiser of the layer prompts (it receives no embedding table: the
      hidden states of deep layers do not live in the embedding space).
  """

  layers: Sequence[int] = ()
  layer_init_fn: Callable = initializers.uniform()

  def __post_init__(self):
    check_layers("DeepPrompt.layers", self.layers)
    object.__setattr__(self, "layers", tuple(self.layers))
    super().__post_init__()

  @nn.compact
  def layer_prompt(self, layer: int, embed: int) -> Array:
    """Layer `layer`'s prompt parameter `layers_{layer}`, [p, embed]."""
    return self.param(
        f"layers_{layer}",
        nn.with_logical_partitioning(
            lambda rng, shape: self.layer_init_fn(rng, shape, None), ("prompt", "prompt_embed")),
        (self.length, embed))

  def layer_inputs(self, layer: int, hidden: Array, input_tokens: Array,
                   prompt_features: Optional[PromptFeatures] = None) -> Array:
    """Before encoder layer `layer`: hidden [b, l', d] -> hidden with the layer's prompt."""
    del prompt_features  # one set of layer prompts for every example
    if layer not in self.layers:
      return hidden
    layer_prompt = self.layer_prompt(layer, hidden.shape[-1])
    values = jnp.broadcast_to(layer_prompt, (hidden.shape[0],) + layer_prompt.shape)
    return replace_at_positions(hidden, values, self.positions(input_tokens))

  def scan_layer_inputs(self, num_layers: int, hidden: Array, input_tokens: Array,
                        prompt_features: Optional[PromptFeatures] = None):
    """Scanned layers (models/t5.py): every layer's prompt stacked, values [layers, b, p, d]
    (zeros where a layer has none) with `active` [layers], the positions [b, p] as context,
    and the pure update that `layer_inputs` is per layer. The parameters keep their per-layer
    names (`layers_{l}`), so prompt checkpoints are the same scanned or not."""
    del prompt_features
    if not self.layers:
      return None
    positions = self.positions(input_tokens)
    batch, embed = hidden.shape[0], hidden.shape[-1]
    no_prompt = jnp.zeros(positions.shape + (embed,), hidden.dtype)
    values = [jnp.broadcast_to(self.layer_prompt(layer, embed).astype(hidden.dtype),
                               (batch,) + no_prompt.shape[1:])
              if layer in self.layers else no_prompt for layer in range(num_layers)]
    active = jnp.array([layer in self.layers for layer in range(num_layers)])
    return (jnp.stack(values), active), positions, replace_if_active

  def export(self, embedding_table: Array) -> Optional[Array]:
    """A single [p, d] input prompt only when no layer has its own prompt; None otherwise."""
    if self.layers:
      return None
    tokens = jnp.ones((1, 1), jnp.int32)
    embedded = jnp.zeros((1, 1, embedding_table.shape[-1]), embedding_table.dtype)
    return self.prompt(tokens, embedded, embedding_table)[0]
