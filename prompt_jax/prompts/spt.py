"""Selective Prompt Tuning (SPT; Zhu & Tan, EMNLP 2023, arXiv 2310.20127) for the T5 encoder.

Layer 0 sees the input prompt of the child generator `prompt` (as `InputPrompt`). Before every
candidate encoder layer l >= 1, a gate a_l mixes the prompt hidden states propagated from below
with a newly generated prompt for that layer:

    prop_l = h_l[:, pos]                                   [b, p, d]  (output of layer l-1)
    x_l    = mean of h_l over the real text positions      [b, d]     (prompt, padding excluded)
    new_l  = reshape(W_up,l relu(W_down,l x_l + b_down,l) + b_up,l, [p, d])   [b, p, d]
    h_l[:, pos] <- a_l * new_l + (1 - a_l) * prop_l

The generator is Late-Prompt-Tuning style (down-projection d -> r, r = `bottleneck` = 256 by
default, ReLU, up-projection r -> p * d), one per candidate layer, so new prompts depend on the
input. The frozen layers compute exactly as without prompts.

Gate relaxation (search phase): a_l = sigmoid(g_l) with an unconstrained logit g_l initialised
at `gate_init` = 0, i.e. a_l = 1/2: both branches equally weighted, DARTS's uniform start.
Because h = prop + a_l (new - prop), dL/dg_l = a_l (1 - a_l) <dL/dh, new_l - prop_l>: largest
while the gate is undecided, vanishing as it commits, and never clipped at 0 or 1.

Hard decision (after search, `select_layers`): keep the K layers with the largest a_l (ties
broken by the lower layer index), drop the other gates and generators, and re-train with
`hard=True`, where a_l = 1 at the kept layers (new prompt inserted) and the prompt propagates
everywhere else (a_l = 0). K = 0 is plain prompt tuning.

Parameters (all under `encoder/prompt/`):

    prompt/prompt                          [p, d]       input prompt (layer 0)
    layers_{l}/gate                        []           g_l (search phase only)
    layers_{l}/generator/down/{kernel,bias}  [d, r], [r]
    layers_{l}/generator/up/{kernel,bias}    [r, p*d], [p*d]
"""

from __future__ import annotations

import functools
import re
from typing import Mapping, Optional, Sequence

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp

from prompt_jax.prompts import base, deep

Array = jax.Array

# Parameter paths relative to the trainable tree, for the optimizers: the gate logits G
# (`encoder/prompt/layers_3/gate`; `optimizers.gate_adam`) and the generators' weights
# (`encoder/prompt/layers_3/generator/down/kernel`; Adam in `optimizers.spt_optimizer`, the input
# prompt gets Adafactor).
GATE_PATTERN = r"(^|/)gate$"
GENERATOR_PATTERN = r"(^|/)generator(/|$)"
GATE_PATH = re.compile(r"(^|/)layers_(\d+)/gate$")


def _param(module: nn.Module, name: str, init, shape, axes):
  return module.param(name, nn.with_logical_partitioning(init, axes), shape, jnp.float32)


class Linear(nn.Module):
  """x [..., in] -> [..., features] with a bias; kernel and bias carry logical axes."""

  features: int
  kernel_axes: tuple[str, str]

  @nn.compact
  def __call__(self, x: Array) -> Array:
    kernel = _param(self, "kernel", nn.initializers.lecun_normal(), (x.shape[-1], self.features),
                    self.kernel_axes)
    bias = _param(self, "bias", nn.initializers.zeros, (self.features,), self.kernel_axes[1:])
    return x.astype(jnp.float32) @ kernel + bias


class PromptGenerator(nn.Module):
  """pooled [b, d] -> prompt [b, length, d] through a ReLU bottleneck of width `bottleneck`."""

  length: int
  bottleneck: int = 256

  @nn.compact
  def __call__(self, pooled: Array) -> Array:
    embed = pooled.shape[-1]
    hidden = nn.relu(Linear(self.bottleneck, ("prompt_embed", "prompt_mlp"), name="down")(pooled))
    out = Linear(self.length * embed, ("prompt_mlp", "prompt_embed"), name="up")(hidden)
    return out.reshape(pooled.shape[0], self.length, embed)


class GatedLayerPrompt(nn.Module):
  """One layer's gate and generator: (prop [b, p, d], pooled [b, d]) -> prompt states."""

  length: int
  bottleneck: int = 256
  gate_init: float = 0.0
  hard: bool = False

  @nn.compact
  def __call__(self, propagated: Array, pooled: Array) -> Array:
    new = PromptGenerator(self.length, self.bottleneck, name="generator")(pooled)
    new = new.astype(propagated.dtype)
    if self.hard:
      return new
    logit = _param(self, "gate", nn.initializers.constant(self.gate_init), (), ())
    gate = jax.nn.sigmoid(logit).astype(propagated.dtype)
    return gate * new + (1 - gate) * propagated


class SelectivePrompt(deep.InputLevelHook):
  """The SPT encoder hook: input prompt plus gated, generated prompts at candidate layers.

  Attributes:
    prompt: the input-level generator (e.g. `plain.Prompt`); its length is the prompt length p.
    layers: candidate layers (>= 1). None: every encoder layer >= 1 (search phase default).
    bottleneck: generator width r (paper: 256).
    gate_init: initial gate logit g_l (0 -> a_l = 0.5).
    hard: after selection: a_l = 1 at `layers`, no gate parameters (re-train phase).
    placement: 'prefix', 'prefix_after_bos' or 'suffix'.
  """

  layers: Optional[Sequence[int]] = None
  bottleneck: int = 256
  gate_init: float = 0.0
  hard: bool = False

  def __post_init__(self):
    deep.check_layers("SelectivePrompt.layers", self.layers)
    if self.layers is not None:
      object.__setattr__(self, "layers", tuple(self.layers))
    elif self.hard:
      raise ValueError("SelectivePrompt(hard=True) needs the selected layers, got layers=None")
    if not isinstance(self.bottleneck, int) or self.bottleneck < 1:
      raise ValueError(f"SelectivePrompt.bottleneck must be a positive integer, "
                       f"got {self.bottleneck!r}")
    super().__post_init__()

  def is_candidate(self, layer: int) -> bool:
    return layer >= 1 if self.layers is None else layer in self.layers

  @nn.compact
  def layer_inputs(self, layer: int, hidden: Array, input_tokens: Array,
                   prompt_features: Optional[base.PromptFeatures] = None) -> Array:
    """Before encoder layer `layer`: mix the propagated prompt states with a generated prompt."""
    del prompt_features  # the generated prompts depend on the hidden states only
    if not self.is_candidate(layer):
      return hidden
    positions = self.positions(input_tokens)  # [b, p]
    pooled = pool_text_states(hidden, self.input_mask(input_tokens), positions)
    propagated = deep.gather_positions(hidden, positions)  # [b, p, d]
    mixed = GatedLayerPrompt(self.length, self.bottleneck, self.gate_init, self.hard,
                             name=f"layers_{layer}")(propagated, pooled)
    return deep.replace_at_positions(hidden, mixed, positions)

  def scan_layer_inputs(self, num_layers: int, hidden: Array, input_tokens: Array,
                        prompt_features: Optional[base.PromptFeatures] = None):
    """Scanned layers (models/t5.py): the candidate layers' gate and generator parameters
    stacked [layers, ...] (zeros where a layer is no candidate) with `active` [layers], the
    prompt positions and input mask as context, and the pure per-layer update. The parameters
    stay `layers_{l}/...`, so checkpoints and gate selection are the same scanned or not."""
    del prompt_features
    candidates = [layer for layer in range(num_layers) if self.is_candidate(layer)]
    if not candidates:
      return None
    zeros = jnp.zeros_like(hidden)
    for layer in candidates:  # creates the parameters at init; XLA drops the unused result
      self.layer_inputs(layer, zeros, input_tokens)
    params = nn.meta.unbox(self.variables["params"])
    per_layer = {layer: params[f"layers_{layer}"] for layer in candidates}
    none = jax.tree_util.tree_map(jnp.zeros_like, per_layer[candidates[0]])
    stacked = jax.tree_util.tree_map(
        lambda *xs: jnp.stack(xs), *[per_layer.get(layer, none) for layer in range(num_layers)])
    active = jnp.array([layer in per_layer for layer in range(num_layers)])
    gated = GatedLayerPrompt(self.length, self.bottleneck, self.gate_init, self.hard, parent=None)
    context = (self.positions(input_tokens), self.input_mask(input_tokens))
    return (stacked, active), context, functools.partial(gated_update, gated)

  def export(self, embedding_table: Array) -> None:
    """Generated prompts depend on the input: there is no single prompt to export."""
    del embedding_table
    return None


def gated_update(gated: GatedLayerPrompt, layer_values, hidden: Array, context) -> Array:
  """One scanned layer of SPT: `layer_inputs` with the layer's parameters passed in."""
  (layer_params, active), (positions, mask) = layer_values, context
  pooled = pool_text_states(hidden, mask, positions)
  propagated = deep.gather_positions(hidden, positions)
  mixed = gated.apply({"params": layer_params}, propagated, pooled)
  return jnp.where(active, deep.replace_at_positions(hidden, mixed, positions), hidden)


def pool_text_states(hidden: Array, mask: Array, positions: Array) -> Array:
  """Mean of hidden [b, l', d] over the real text positions (mask [b, l'] minus `positions`)."""
  is_text = jax.vmap(lambda m, pos: m.at[pos].set(False))(mask, positions)
  text = is_text.astype(jnp.float32)[..., None]
  total = jnp.sum(hidden.astype(jnp.float32) * text, axis=1)
  return total / jnp.maximum(jnp.sum(text, axis=1), 1.0)


# ------------------------------------------------------------------------- the hard decision


def gate_logits(prompt_params: Mapping) -> dict[int, float]:
  """{layer: g_l} read from a (trainable or full) parameter tree."""
  flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(prompt_params), sep="/")
  logits = {}
  for path, value in flat.items():
    match = GATE_PATH.search(path)
    if match:
      logits[int(match.group(2))] = float(getattr(value, "value", value))
  return dict(sorted(logits.items()))


def gate_values(prompt_params: Mapping) -> dict[int, float]:
  """{layer: a_l = sigmoid(g_l)}."""
  return {layer: float(jax.nn.sigmoid(g)) for layer, g in gate_logits(prompt_params).items()}


def select_layers(gates: Mapping[int, float], k: int) -> tuple[int, ...]:
  """The K layers with the largest gate value (ties: lower layer first), in layer order."""
  if not isinstance(k, int) or isinstance(k, bool) or not 0 <= k <= len(gates):
    raise ValueError(f"the SPT layer budget K must be an integer in [0, {len(gates)}] (the "
                     f"number of gated layers), got {k!r}")
  ranked = sorted(gates, key=lambda layer: (-float(gates[layer]), layer))
  return tuple(sorted(ranked[:k]))
