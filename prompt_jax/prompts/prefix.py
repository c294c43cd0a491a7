"""Prefix tuning (Li and Liang, ACL 2021, arXiv 2101.00190) for T5's encoder and decoder.

Every attention layer gets p trainable key/value vectors in front of the sequence's own (the
model's attention-prefix channel, `prompt_jax.models.t5`, "Attention prefixes"); the input
tokens and the frozen weights are untouched. As the paper does for BART, the encoder's
self-attention, the decoder's self-attention and its cross-attention each get their own prefix
(`kinds`), one per layer:

    attention_l(x) = softmax([q K_prefix_l^T | q K^T + bias]) [V_prefix_l ; V]
    K_prefix_l, V_prefix_l   [p, heads, kv]   (post-projection, no position bias, never masked)

Reparameterisation (the paper's, `reparameterization='mlp'`): each kind's prefixes come from a
smaller matrix P' through a two-layer MLP, which the paper found makes training stable:

    P'      [p, token_dim]                          `{kind}/tokens`          ~ N(0, 1)
    H       = tanh(P' W1 + b1)      [p, hidden_dim] `{kind}/hidden/{kernel,bias}`
    O       = H W2 + b2             [p, layers * 2 * heads * kv]   `{kind}/out/{kernel,bias}`
    O.reshape(p, layers, 2, heads, kv): [:, l, 0] keys, [:, l, 1] values of layer l

(the authors' layout: `view(p, layers * 2, heads, kv)`, keys and values interleaved per layer).
After training the MLP is folded away (`fold_reparameterization`): the prefixes themselves
become the parameters of a `reparameterization='none'` hook, `{kind}/key`, `{kind}/value`
[layers, p, heads, kv], which computes the same model with no MLP.

The authors' defaults (XiangLi1999/PrefixTuning): `hidden_dim` 512, `token_dim` the model
width, tanh, PyTorch's Linear initialisation (U(+-1/sqrt(fan_in)) weights and biases), AdamW
lr 5e-5 with a linear decay, prefix length 10 (table-to-text) to 200 (summarisation).

Trainable parameters per kind: p * token_dim + (token_dim + 1) * hidden_dim + (hidden_dim + 1)
* layers * 2 * heads * kv with the MLP; p * layers * 2 * heads * kv folded. A prefix is not an
input prompt: `export` is None (no plain [length, embed] form); serve from the run directory or
the folded parameters. The prompt's position bias statement and the decode cache are the
model's (see `prompt_jax.models.t5`).
"""

from __future__ import annotations

from typing import Mapping, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from prompt_jax.prompts import base, initializers
from prompt_jax.prompts.hook import InputLevelOnly, PromptFeatures

Array = jax.Array

KINDS = ("encoder", "decoder_self", "decoder_cross")  # the model's ATTENTION_KINDS
REPARAMETERIZATIONS = ("mlp", "none")
# The MLP's output width (layers * 2 * heads * kv) and the folded prefixes' axes: replicated,
# like every prompt parameter.
LOGICAL_AXIS_RULES = (("prefix_out", None), ("prefix_layers", None), ("prefix_heads", None),
                      ("prefix_kv", None))


class PrefixStream(nn.Module):
  """One attention kind's prefixes for every layer: () -> (keys, values) [layers, p, heads, kv].

  Attributes: see `PrefixTuning` (the same names)."""

  length: int
  reparameterization: str = "mlp"
  hidden_dim: int = 512
  token_dim: Optional[int] = None
  init_stddev: float = 0.5

  @nn.compact
  def __call__(self, layers: int, heads: int, kv: int) -> tuple[Array, Array]:
    if self.reparameterization == "none":
      shape = (layers, self.length, heads, kv)
      axes = ("prefix_layers", "prompt", "prefix_heads", "prefix_kv")
      init = nn.initializers.normal(stddev=self.init_stddev)
      key = self.param("key", nn.with_logical_partitioning(init, axes), shape)
      value = self.param("value", nn.with_logical_partitioning(init, axes), shape)
      return key, value
    token_dim = self.token_dim or heads * kv
    out_dim = layers * 2 * heads * kv
    tokens = self.param("tokens", nn.with_logical_partitioning(
        nn.initializers.normal(stddev=1.0), ("prompt", "prompt_embed")),
        (self.length, token_dim))
    hidden = initializers.torch_linear(self.hidden_dim, token_dim, ("prompt_embed", "prompt_mlp"),
                                       "hidden")(tokens)
    out = initializers.torch_linear(out_dim, self.hidden_dim, ("prompt_mlp", "prefix_out"),
                                    "out")(jnp.tanh(hidden))
    out = out.reshape(self.length, layers, 2, heads, kv).transpose(2, 1, 0, 3, 4)
    return out[0], out[1]


class PrefixTuning(InputLevelOnly, nn.Module):
  """The prefix-tuning hook: input unchanged, p key/value prefixes per layer of each kind.

  Attributes:
    length: p, prefix positions per layer (from gin: %PROMPT_LENGTH).
    kinds: which attentions get prefixes, a subset of ("encoder", "decoder_self",
      "decoder_cross"); all three by default, as the paper's BART set-up.
    reparameterization: 'mlp' (train through P' and the MLP) or 'none' (the prefixes are the
      parameters: serving after `fold_reparameterization`, or training them directly).
    hidden_dim: the MLP's hidden width (the authors' `mid_dim`, 512).
    token_dim: the width of P' (None: heads * kv, the model width for every T5 preset).
    init_stddev: initial N(0, stddev) of direct ('none') prefixes.
  """

  length: int = 10
  kinds: Sequence[str] = KINDS
  reparameterization: str = "mlp"
  hidden_dim: int = 512
  token_dim: Optional[int] = None
  init_stddev: float = 0.5

  def __post_init__(self):
    base.check_prompt_length(self.length, "PrefixTuning.length")
    kinds = tuple(self.kinds)
    unknown = [k for k in kinds if k not in KINDS]
    if unknown or not kinds or len(set(kinds)) != len(kinds):
      raise ValueError(f"PrefixTuning.kinds must be distinct names among {KINDS}, got "
                       f"{list(kinds)}")
    object.__setattr__(self, "kinds", kinds)
    if self.reparameterization not in REPARAMETERIZATIONS:
      raise ValueError(f"PrefixTuning.reparameterization must be one of {REPARAMETERIZATIONS}, "
                       f"got {self.reparameterization!r}")
    base.check_prompt_length(self.hidden_dim, "PrefixTuning.hidden_dim")
    if self.token_dim is not None:
      base.check_prompt_length(self.token_dim, "PrefixTuning.token_dim")
    super().__post_init__()

  def setup(self):
    settings = dict(length=self.length, reparameterization=self.reparameterization,
                    hidden_dim=self.hidden_dim, token_dim=self.token_dim,
                    init_stddev=self.init_stddev)
    # One attribute per kind, so the parameters live at encoder/prompt/{kind}/...
    if "encoder" in self.kinds:
      self.encoder = PrefixStream(**settings)
    if "decoder_self" in self.kinds:
      self.decoder_self = PrefixStream(**settings)
    if "decoder_cross" in self.kinds:
      self.decoder_cross = PrefixStream(**settings)

  def __call__(self, input_tokens: Array, embedded_inputs: Array, embedding_table: Array,
               prompt_features: Optional[PromptFeatures] = None) -> tuple[Array, Array]:
    """The encoder's input unchanged: ([b, l, d], mask [b, l])."""
    del embedding_table
    if prompt_features:
      raise ValueError(f"PrefixTuning reads no batch features, got {sorted(prompt_features)}")
    return embedded_inputs, self.input_mask(input_tokens)

  def input_mask(self, input_tokens: Array) -> Array:
    """[b, l] -> [b, l]: the real tokens (a prefix adds no sequence positions)."""
    return input_tokens > 0

  def prefixes(self, layout: Mapping[str, tuple[int, int, int]]) -> dict:
    """{kind: (keys, values) [layers, p, heads, kv]} float32 of this hook's kinds that `layout`
    asks for, one set for every example."""
    return {kind: getattr(self, kind)(*layout[kind]) for kind in self.kinds if kind in layout}

  def attention_prefixes(self, batch_size: int, layout: Mapping[str, tuple[int, int, int]],
                         prompt_features: Optional[PromptFeatures] = None) -> dict:
    """{kind: (keys, values) [layers, batch_size, p, heads, kv]} (the model's channel)."""
    del prompt_features
    per_batch = lambda x: jnp.broadcast_to(x[:, None], (x.shape[0], batch_size) + x.shape[1:])
    return {kind: (per_batch(k), per_batch(v)) for kind, (k, v) in self.prefixes(layout).items()}

  def export(self, embedding_table: Array) -> None:
    """None: a prefix lives in every attention layer, it has no input-prompt form."""
    del embedding_table
    return None


def fold_reparameterization(hook: PrefixTuning, hook_params: Mapping,
                            layout: Mapping[str, tuple[int, int, int]]
                            ) -> tuple[PrefixTuning, dict]:
  """The MLP folded away: (a `reparameterization='none'` copy of `hook`, its parameters
  {kind: {"key", "value": [layers, p, heads, kv]}}), which compute the same prefixes.

  `hook_params`: the hook's parameters (the model's `encoder/prompt` subtree, unboxed);
  `layout`: `prompt_jax.models.t5.prefix_layout(config)`."""
  if hook.reparameterization == "none":
    return hook, dict(hook_params)
  prefixes = hook.apply({"params": hook_params}, layout, method=PrefixTuning.prefixes)
  folded = hook.clone(parent=None, reparameterization="none")
  return folded, {kind: {"key": k, "value": v} for kind, (k, v) in prefixes.items()}
