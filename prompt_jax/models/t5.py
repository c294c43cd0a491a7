"""The frozen T5 encoder-decoder (v1.0, v1.1 and LM-adapted) in Flax Linen.

Parameter names, shapes and logical axes follow T5X/Flaxformer exactly, so T5X checkpoints load
without renaming and the module fits T5X's `EncoderDecoderModel`:

  token_embedder/embedding                                   [vocab, embed]
  encoder/relpos_bias/rel_embedding                          [heads, relpos_buckets]
  encoder/layers_{i}/pre_attention_layer_norm/scale          [embed]
  encoder/layers_{i}/attention/{query,key,value}/kernel      [embed, joined_kv]
  encoder/layers_{i}/attention/out/kernel                    [joined_kv, embed]
  encoder/layers_{i}/pre_mlp_layer_norm/scale                [embed]
  encoder/layers_{i}/mlp/{wi_0,wi_1 | wi}/kernel             [embed, mlp]
  encoder/layers_{i}/mlp/wo/kernel                           [mlp, embed]
  encoder/encoder_norm/scale                                 [embed]
  decoder/...  self_attention, encoder_decoder_attention, pre_{self,cross}_attention_layer_norm
  decoder/decoder_norm/scale, decoder/logits_dense/kernel    [embed, vocab] (untied only)

The model knows nothing about prompt methods. It accepts an *encoder prompt hook*: any Linen
module with the members below, which the model reads directly (every hook defines them all). The
contract is written out, with shapes, as the Protocol `prompt_jax.prompts.hook.PromptHook` (this
module imports nothing from `prompt_jax.prompts`; `prompts.base.InputPrompt` is the input-level
hook). The hook's parameters live at `encoder/prompt/...`, as in T5X prompt tuning.

  input_features: tuple[str, ...]
      The per-example batch features the hook reads (a bank: ('prompt_ids',)); the model hands
      them over untouched as one mapping, `prompt_features` {name: [b, ...]}.
  __call__(input_tokens [b, l], embedded_inputs [b, l, d], embedding_table [vocab, d],
           prompt_features) -> (embedded [b, l', d], mask [b, l'])
      Called once, on the embedded input tokens.
  input_mask(input_tokens [b, l]) -> mask [b, l']
      The same mask without computing a prompt (decoding steps).
  layer_inputs(layer, hidden [b, l', d], input_tokens [b, l], prompt_features) -> hidden
      Called before every encoder layer (per-layer stacks).
  scan_layer_inputs(num_layers, hidden, input_tokens, prompt_features)
      -> None | (layer_values, context, update)
      Scanned layers (`T5Config.scan_layers`): called once before the scan instead of
      `layer_inputs`; `update(layer_values_l, hidden, context) -> hidden` runs before each
      block. A hook whose `scan_layer_inputs` is None is refused under scan.
  attention_prefixes(batch_size, layout, prompt_features) -> None | {kind: (keys, values)}
      Attention prefixes (below); `layout` is `prefix_layout(config)` restricted to the kinds
      the calling stack uses (the encoder asks for "encoder", the decoder for its two).

Attention prefixes (the channel prefix tuning uses; it names no method): a hook may give any of
the attentions in `ATTENTION_KINDS` ("encoder" self-attention, "decoder_self",
"decoder_cross") p extra key/value positions per layer, (keys, values) each [layers, b, p,
heads, kv], post-projection (the frozen key/value kernels never see them). Every query attends
to them in front of the sequence's own keys, in one softmax:

    scores = [q . K_prefix | q . K + bias],   out = softmax(scores) . [V_prefix | V]

The prefix positions get **no relative-position bias and no mask**: T5's bias depends on
`key_position - query_position`, and a prefix is not part of the sequence (in the paper's
GPT-2 and BART, whose positions are added to the input embeddings, the prefix activations carry
no position either), so every query sees the prefix the same way and the sequence's own
biases are exactly those of the unprefixed model. Padding queries see the prefix too (their
outputs are masked downstream as before). Computed once per batch: per encoder call, per
teacher-forced decoder call, and at the first decoding step, which stores the decoder
self-attention prefix in the cache (`cached_prefix_key`/`_value` [b, p, heads, kv], one row
per example) and the cross-attention prefix in front of the cached cross keys/values; later
steps read them (beams attend to their example's row). Scanned layers slice the [layers, ...]
arrays per layer; remat recomputes nothing of them (they enter each block as inputs).

A model without a hook refuses non-empty `prompt_features`. Folding a trained prompt into a plain
array for serving is not the model's business: `prompt_jax.prompts.base.export_prompt(hook,
params)` applies the hook's `export(embedding_table)` outside the model.

Scanned layers (`T5Config.scan_layers=True`): each stack's blocks are one `nn.scan`, so XLA
compiles one block per stack instead of num_layers copies; the block parameters are stacked,
`encoder/layers/attention/query/kernel` [layers, embed, joined_kv] (logical axis `layers`
first), the decode cache is [b, layers, ...]. Checkpoints keep the per-layer names;
`prompt_jax.models.layer_stack` converts at load time.

Packed inputs (`encoder_segment_ids`, T5X's packing features) with a hook: the hook must declare
`encoder_segment_ids` (and reads `encoder_positions`) in `input_features`, or the encoder refuses
them. Such a hook returns the row as it is ([b, l, d], l' = l: the data side reserved every
example's prompt slots, `prompt_jax.data.packing`) with mask `segment_ids > 0`; the segment ids
mask encoder self-attention and cross-attention, `decoder_segment_ids` decoder self-attention.
Relative position biases need no positions: within a segment they equal the unpacked ones.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from prompt_jax.models import activation_dtype, matmul

Array = jax.Array
PromptFeatures = Mapping[str, Array]  # the hook's per-example inputs, name -> [batch, ...]
KeyValuePrefix = tuple[Array, Array]  # (keys, values), each [b, p, heads, kv]

_ACTIVATIONS: dict[str, Callable[[Array], Array]] = {
    "relu": nn.relu,
    "gelu": lambda x: nn.gelu(x, approximate=True),  # T5 1.1's gelu_new (tanh approximation)
    "gelu_exact": lambda x: nn.gelu(x, approximate=False),
    "silu": nn.silu,
    "linear": lambda x: x,
}

REMAT_POLICIES = ("none", "full", "dots_saveable", "dots_with_no_batch_dims_saveable")


@dataclasses.dataclass(frozen=True)
class T5Config:
  """Architecture hyperparameters. `dtype` is the activation dtype ('auto': bfloat16 where the
  platform has bf16 matrix units, else float32; see `activation_dtype`); parameters stay
  float32."""

  vocab_size: int = 32128
  emb_dim: int = 512
  num_heads: int = 6
  head_dim: int = 64
  mlp_dim: int = 1024
  num_encoder_layers: int = 8
  num_decoder_layers: int = 8
  mlp_activations: tuple[str, ...] = ("gelu", "linear")
  logits_via_embedding: bool = False
  dropout_rate: float = 0.1
  relative_attention_num_buckets: int = 32
  relative_attention_max_distance: int = 128
  dtype: str = "float32"
  remat_policy: str = "none"
  layer_norm_epsilon: float = 1e-6
  scan_layers: bool = False

  def __post_init__(self):
    for name in ("vocab_size", "emb_dim", "num_heads", "head_dim", "mlp_dim",
                 "num_encoder_layers", "num_decoder_layers", "relative_attention_num_buckets",
                 "relative_attention_max_distance"):
      value = getattr(self, name)
      if not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"T5Config.{name} must be a positive integer, got {value!r}")
    object.__setattr__(self, "mlp_activations", tuple(self.mlp_activations))
    for act in self.mlp_activations:
      if act not in _ACTIVATIONS:
        raise ValueError(f"T5Config.mlp_activations: unknown activation {act!r}; "
                         f"expected one of {sorted(_ACTIVATIONS)}")
    if not 0.0 <= self.dropout_rate < 1.0:
      raise ValueError(f"T5Config.dropout_rate must be in [0, 1), got {self.dropout_rate!r}")
    # 'auto' (the real-model gin files' ACTIVATION_DTYPE) becomes this host's dtype here, so
    # every reader (run.json, the programs) sees the dtype that runs.
    object.__setattr__(self, "dtype", activation_dtype.resolve_here(self.dtype))
    try:
      jnp.dtype(self.dtype)
    except TypeError as e:
      raise ValueError(f"T5Config.dtype: unknown dtype {self.dtype!r}; expected a jax dtype "
                       f"name such as 'float32' or 'bfloat16', or 'auto'") from e
    if not isinstance(self.scan_layers, (bool, np.bool_)):
      raise ValueError(f"T5Config.scan_layers must be True or False, got {self.scan_layers!r}")
    if self.remat_policy not in REMAT_POLICIES:
      raise ValueError(f"T5Config.remat_policy must be one of {REMAT_POLICIES}, "
                       f"got {self.remat_policy!r}")

  @property
  def activation_dtype(self):
    return jnp.dtype(self.dtype)

  def replace(self, **changes) -> T5Config:
    return dataclasses.replace(self, **changes)


def _t5_1_1(emb, heads, mlp, layers, head_dim=64):
  return T5Config(vocab_size=32128, emb_dim=emb, num_heads=heads, head_dim=head_dim,
                  mlp_dim=mlp, num_encoder_layers=layers, num_decoder_layers=layers,
                  mlp_activations=("gelu", "linear"), logits_via_embedding=False)


def _t5_1_0(emb, heads, mlp, layers, head_dim=64):
  return T5Config(vocab_size=32128, emb_dim=emb, num_heads=heads, head_dim=head_dim,
                  mlp_dim=mlp, num_encoder_layers=layers, num_decoder_layers=layers,
                  mlp_activations=("relu",), logits_via_embedding=True)


PRESETS: dict[str, T5Config] = {
    "t5_1_1_small": _t5_1_1(512, 6, 1024, 8),
    "t5_1_1_base": _t5_1_1(768, 12, 2048, 12),
    "t5_1_1_large": _t5_1_1(1024, 16, 2816, 24),
    "t5_1_1_xl": _t5_1_1(2048, 32, 5120, 24),
    "t5_1_1_xxl": _t5_1_1(4096, 64, 10240, 24),
    "t5_1_0_small": _t5_1_0(512, 8, 2048, 6),
    "t5_1_0_base": _t5_1_0(768, 12, 3072, 12),
    "t5_1_0_large": _t5_1_0(1024, 16, 4096, 24),
    "t5_1_0_xl": _t5_1_0(1024, 32, 16384, 24, head_dim=128),   # "3B"
    "t5_1_0_xxl": _t5_1_0(1024, 128, 65536, 24, head_dim=128),  # "11B"
    # A laptop-sized T5 1.1 for tests and the demo; the byte vocabulary (3 special + 256 bytes),
    # padded to a multiple of 128 as T5 checkpoints pad theirs.
    "tiny": T5Config(vocab_size=384, emb_dim=64, num_heads=4, head_dim=16, mlp_dim=128,
                     num_encoder_layers=2, num_decoder_layers=2, dropout_rate=0.0,
                     relative_attention_num_buckets=32, relative_attention_max_distance=128),
}
# The LM-adapted checkpoints share the T5 1.1 architecture; every gin_configs/models/<name>.gin
# is also a preset name (the tiny model as `tiny` and `t5_1_1_tiny`).
for _size in ("small", "base", "large", "xl", "xxl"):
  PRESETS[f"t5_1_1_lm_adapted_{_size}"] = PRESETS[f"t5_1_1_{_size}"]
PRESETS["t5_1_1_tiny"] = PRESETS["tiny"]


def preset(name: str, **overrides) -> T5Config:
  """A named architecture (`t5_1_1_base`, `t5_1_0_small`, `tiny`, ...) with optional overrides."""
  if name not in PRESETS:
    raise ValueError(f"unknown T5 preset {name!r}; expected one of {sorted(PRESETS)}")
  return PRESETS[name].replace(**overrides)


# ------------------------------------------------------------------------------------- layers


def _param_with_axes(module: nn.Module, name: str, init, shape, axes):
  return module.param(name, nn.with_logical_partitioning(init, axes), shape, jnp.float32)


class Dense(nn.Module):
  """A bias-free dense layer whose kernel carries logical axis names."""

  features: int
  kernel_axes: tuple[str, str]
  kernel_init: Callable = nn.initializers.lecun_normal()
  dtype: Any = jnp.float32
  out_dtype: Any = None  # the result's dtype (default `dtype`); the sum is float32 either way

  @nn.compact
  def __call__(self, x: Array) -> Array:
    kernel = _param_with_axes(self, "kernel", self.kernel_init,
                              (x.shape[-1], self.features), self.kernel_axes)
    return matmul.einsum("...i,io->...o", x, kernel, self.dtype, self.out_dtype)


class Embed(nn.Module):
  """Token embedding table `[vocab, embed]`; `attend` gives tied output logits."""

  num_embeddings: int
  features: int
  dtype: Any = jnp.float32

  def setup(self):
    self.embedding = _param_with_axes(self, "embedding", nn.initializers.normal(stddev=1.0),
                                      (self.num_embeddings, self.features), ("vocab", "embed"))

  def __call__(self, tokens: Array) -> Array:
    """[batch, length] int -> [batch, length, embed]."""
    return jnp.take(self.embedding, tokens.astype(jnp.int32), axis=0).astype(self.dtype)

  def attend(self, query: Array) -> Array:
    """[..., embed] -> float32 [..., vocab] by dot product with every embedding row."""
    return matmul.einsum("...e,ve->...v", query, self.embedding, self.dtype,
                         out_dtype=jnp.float32)


class RMSNorm(nn.Module):
  """T5's layer norm: `scale * x / sqrt(mean(x^2) + eps)`, no mean, no bias, in float32."""

  epsilon: float = 1e-6
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    scale = _param_with_axes(self, "scale", nn.initializers.ones, (x.shape[-1],), ("embed",))
    x = x.astype(jnp.float32)
    y = x * jax.lax.rsqrt(jnp.mean(jnp.square(x), axis=-1, keepdims=True) + self.epsilon)
    return (y * scale).astype(self.dtype)


def relative_position_bucket(relative_position, bidirectional: bool, num_buckets: int,
                             max_distance: int):
  """T5's bucketing of `memory_position - query_position` (int array) into `num_buckets` ids."""
  ret = 0
  n = -relative_position
  if bidirectional:
    num_buckets //= 2
    ret = ret + (n < 0).astype(jnp.int32) * num_buckets
    n = jnp.abs(n)
  else:
    n = jnp.maximum(n, 0)
  max_exact = num_buckets // 2
  is_small = n < max_exact
  safe_n = jnp.maximum(n, 1).astype(jnp.float32)
  val_if_large = max_exact + (
      jnp.log(safe_n / max_exact + np.finfo(np.float32).eps)
      / np.log(max_distance / max_exact) * (num_buckets - max_exact)).astype(jnp.int32)
  val_if_large = jnp.minimum(val_if_large, num_buckets - 1)
  return ret + jnp.where(is_small, n, val_if_large)


class RelativePositionBiases(nn.Module):
  """Learned per-head attention bias by bucketed relative distance, shared by a whole stack."""

  num_buckets: int
  max_distance: int
  num_heads: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, query_positions: Array, key_positions: Array, bidirectional: bool):
    """[q] and [k] int positions -> bias [1, heads, q, k]."""
    rel_embedding = _param_with_axes(
        self, "rel_embedding", nn.initializers.normal(stddev=1.0),
        (self.num_heads, self.num_buckets), ("heads", "relpos_buckets"))
    relative_position = key_positions[None, :] - query_positions[:, None]
    buckets = relative_position_bucket(relative_position, bidirectional, self.num_buckets,
                                       self.max_distance)
    values = jnp.take(rel_embedding, buckets, axis=1)  # [heads, q, k]
    return values[None].astype(self.dtype)


def combine_masks_to_bias(mask: Optional[Array], dtype) -> Optional[Array]:
  """Boolean/0-1 mask [b, 1, q, k] -> additive bias with a large negative value where masked."""
  if mask is None:
    return None
  return jnp.where(mask > 0, 0.0, -1e10).astype(dtype)


def make_attention_mask(query_mask: Array, key_mask: Array) -> Array:
  """[b, q], [b, k] -> [b, 1, q, k] float mask (1 = attend)."""
  return (query_mask[:, None, :, None] & key_mask[:, None, None, :]).astype(jnp.float32)


def make_segment_mask(query_segments: Array, key_segments: Array) -> Array:
  return (query_segments[:, None, :, None] == key_segments[:, None, None, :]).astype(jnp.float32)


def _rows_per_example(rows: int, examples: int) -> int:
  if rows % examples:
    raise ValueError(f"an attention prefix for {examples} examples cannot serve {rows} rows "
                     f"(rows must be a multiple: n beams or samples per example)")
  return rows // examples


def prefix_scores(q: Array, prefix_keys: Array) -> Array:
  """q [r, q, heads, kv], prefix_keys [b, p, heads, kv] (r = n * b rows, example-major) ->
  float32 scores [r, heads, q, p]: every row's queries against its example's prefix keys."""
  (rows, length, heads, _), (examples, p) = q.shape, prefix_keys.shape[:2]
  n = _rows_per_example(rows, examples)
  per_example = q.reshape((examples, n * length) + q.shape[2:])
  scores = jnp.einsum("bqhd,bphd->bhqp", per_example, prefix_keys,
                      preferred_element_type=jnp.float32)
  scores = scores.reshape(examples, heads, n, length, p).transpose(0, 2, 1, 3, 4)
  return scores.reshape(rows, heads, length, p)


def prefix_mix(weights: Array, prefix_values: Array) -> Array:
  """weights [r, heads, q, p], prefix_values [b, p, heads, kv] -> float32 [r, heads, q, kv]:
  the weighted sum of each row's example's prefix values."""
  (rows, heads, length, p), examples = weights.shape, prefix_values.shape[0]
  n = _rows_per_example(rows, examples)
  per_example = weights.reshape(examples, n, heads, length, p).transpose(0, 2, 1, 3, 4)
  per_example = per_example.reshape(examples, heads, n * length, p)
  out = jnp.einsum("bhqp,bphd->bhqd", per_example.astype(prefix_values.dtype), prefix_values,
                   preferred_element_type=jnp.float32)
  out = out.reshape(examples, heads, n, length, -1).transpose(0, 2, 1, 3, 4)
  return out.reshape(rows, heads, length, -1)


class MultiHeadDotProductAttention(nn.Module):
  """T5 attention: no 1/sqrt(d) scaling at run time (folded into the query init), 2-D kernels."""

  config: T5Config

  @nn.compact
  def __call__(self, inputs_q: Array, inputs_kv: Array, bias: Optional[Array], *,
               enable_dropout: bool, decode: bool = False,
               cross_cache: Optional[str] = None, decode_index: Optional[Array] = None,
               prefix: Optional[KeyValuePrefix] = None) -> Array:
    """inputs_q [b, q, embed], inputs_kv [b, k, embed], bias [b|1, heads, q, k] -> [b, q, embed].

    `prefix` (keys, values), each [b', p, heads, kv] with b = n * b' rows (n per example,
    example-major): p extra key/value positions every query attends to, in front of the k
    computed ones, with no relative-position bias and no mask (see "Attention prefixes" in the
    module docstring). While decoding, self-attention stores them once in the cache
    (`cached_prefix_key`/`_value` [b', p, heads, kv]) and reads them back on later steps;
    cross-attention writes them into its cached keys/values.

    `cross_cache` (cross-attention while decoding): 'write' computes the keys/values of
    `inputs_kv` and stores them, with the key bias, in the `cache` collection
    (`cached_cross_key`/`_value` [b, heads, kv, k], `cached_cross_bias` [b, 1, 1, k]); 'read'
    takes them from there instead of recomputing them (and ignores `bias`); inputs_q may then
    have n rows per cached row (the beams of an example, example-major). `decode_index` []: the
    decoding step (the decoder's `cache_index`), where `decode=True` writes this step's k/v."""
    cfg = self.config
    dtype = cfg.activation_dtype
    joined = cfg.num_heads * cfg.head_dim
    query_init = nn.initializers.normal(stddev=(cfg.emb_dim * cfg.head_dim) ** -0.5)
    kv_init = nn.initializers.normal(stddev=cfg.emb_dim ** -0.5)
    out_init = nn.initializers.normal(stddev=joined ** -0.5)
    split = lambda x: x.reshape(x.shape[:2] + (cfg.num_heads, cfg.head_dim))
    constrain = lambda x: nn.with_logical_constraint(x, ("batch", "length", "heads", "kv"))
    if cross_cache == "read" and self.has_variable("cache", "cached_cross_key"):
      return self._attend_to_cross_cache(inputs_q, enable_dropout)
    if prefix is not None:
      prefix = tuple(x.astype(dtype) for x in prefix)
    q = Dense(joined, ("embed", "joined_kv"), query_init, dtype, name="query")(inputs_q)
    q = constrain(split(q))
    k = Dense(joined, ("embed", "joined_kv"), kv_init, dtype, name="key")(inputs_kv)
    v = Dense(joined, ("embed", "joined_kv"), kv_init, dtype, name="value")(inputs_kv)
    k, v = constrain(split(k)), constrain(split(v))
    if cross_cache is not None:
      # Stored keys-last, [b, heads, kv, k], the layout the per-step matmuls read in place (XLA
      # on CPU copies a [b, k, heads, kv] cache into it at every step otherwise). A prefix is
      # stored in front of the keys, with a zero bias: later steps read one key set.
      key_bias = jnp.zeros((1, 1, 1, k.shape[1]), jnp.float32) if bias is None else \
          bias[:, :1, :1].astype(jnp.float32)  # decoding's encoder mask is the same per query
      key_bias = jnp.broadcast_to(key_bias, (k.shape[0], 1, 1, k.shape[1]))
      cached_k, cached_v = k, v
      if prefix is not None:
        cached_k = jnp.concatenate([prefix[0], k], axis=1)
        cached_v = jnp.concatenate([prefix[1], v], axis=1)
        key_bias = jnp.concatenate(
            [jnp.zeros(key_bias.shape[:-1] + (prefix[0].shape[1],), jnp.float32), key_bias], -1)
      self.put_variable("cache", "cached_cross_key", cached_k.transpose(0, 2, 3, 1))
      self.put_variable("cache", "cached_cross_value", cached_v.transpose(0, 2, 3, 1))
      self.put_variable("cache", "cached_cross_bias", key_bias)

    if decode:
      prefix = self._cached_prefix(prefix)
      k, v, bias = self._update_cache(k, v, bias, decode_index)

    # Heads-major operands ([b, h, q, d] x [b, h, d, k]): the layout XLA's CPU dot runs fast
    # (one encoder layer 45 -> 12 ms at the small shape); same values.
    logits = matmul.einsum("bhqd,bhdk->bhqk", q.transpose(0, 2, 1, 3), k.transpose(0, 2, 3, 1),
                           dtype, out_dtype=jnp.float32)
    if bias is not None:
      logits = logits + bias.astype(jnp.float32)
    if prefix is not None:  # the prefix's scores first, one softmax over both
      logits = jnp.concatenate([prefix_scores(q, prefix[0]), logits], axis=-1)
    weights = jax.nn.softmax(logits, axis=-1)
    # T5X's (flaxformer's) `broadcast_dropout`: one keep mask per key, shared by every query
    # position ([b, heads, 1, k]), as Mesh TF T5 drops along the length dimension.
    weights = nn.Dropout(cfg.dropout_rate, broadcast_dims=(-2,))(
        weights, deterministic=not enable_dropout)
    if prefix is not None:
      prefix_length = prefix[0].shape[1]
      prefix_out = prefix_mix(weights[..., :prefix_length], prefix[1])
      weights = weights[..., prefix_length:]
    out = matmul.einsum("bhqk,bhkd->bhqd", weights, v.transpose(0, 2, 1, 3), dtype)
    if prefix is not None:
      out = out + prefix_out.astype(out.dtype)
    out = out.transpose(0, 2, 1, 3)
    out = out.reshape(out.shape[:2] + (joined,))
    return Dense(cfg.emb_dim, ("joined_kv", "embed"), out_init, dtype, name="out")(out)

  def _cached_prefix(self, prefix: Optional[KeyValuePrefix]) -> Optional[KeyValuePrefix]:
    """Decoding self-attention: store a given prefix in the cache (init and a sequence's first
    step), or read the stored one back (later steps, which pass none)."""
    if prefix is not None:
      for name, value in zip(("key", "value"), prefix):
        self.put_variable("cache", f"cached_prefix_{name}", value)
      return prefix
    if self.has_variable("cache", "cached_prefix_key"):
      return tuple(self.get_variable("cache", f"cached_prefix_{name}")
                   for name in ("key", "value"))
    return None

  def _attend_to_cross_cache(self, inputs_q: Array, enable_dropout: bool) -> Array:
    """Cross-attention of inputs_q [r, q, embed] to the cached keys/values of b = r / n examples
    (n beams or samples per example, example-major) -> [r, q, embed].

    Each example's keys/values [b, heads, kv, k] and key bias [b, 1, 1, k] are stored once, and
    its n rows attend to them as n * q queries of one row: nothing is repeated per beam.
    """
    cfg = self.config
    dtype = cfg.activation_dtype
    joined = cfg.num_heads * cfg.head_dim
    k, v, bias = (self.get_variable("cache", f"cached_cross_{name}")
                  for name in ("key", "value", "bias"))
    rows, length, _ = inputs_q.shape
    x = inputs_q.reshape((k.shape[0], -1, inputs_q.shape[-1]))
    q = Dense(joined, ("embed", "joined_kv"), dtype=dtype, name="query")(x)
    q = q.reshape(q.shape[:2] + (cfg.num_heads, cfg.head_dim))
    logits = jnp.einsum("bqhd,bhdk->bhqk", q, k, preferred_element_type=jnp.float32)
    weights = jax.nn.softmax(logits + bias, axis=-1)
    weights = nn.Dropout(cfg.dropout_rate, broadcast_dims=(-2,))(
        weights, deterministic=not enable_dropout)
    out = jnp.einsum("bhqk,bhdk->bqhd", weights.astype(dtype), v,
                     preferred_element_type=jnp.float32).astype(dtype)
    out = Dense(cfg.emb_dim, ("joined_kv", "embed"), dtype=dtype, name="out")(
        out.reshape(out.shape[:2] + (joined,)))
    return out.reshape((rows, length, cfg.emb_dim))

  def _update_cache(self, k: Array, v: Array, bias: Optional[Array], index: Optional[Array]):
    """Autoregressive self-attention: write this step's k/v at `index`, attend to <= it.

    At init (`decode=True` with full-length inputs) this only creates the `cache` variables
    `cached_key`/`cached_value` [b, heads, max_length, kv] (heads-major, as attention reads
    them; every cache array leads with the batch, which scanned layers rely on). k, v
    [b, 1, heads, kv]; bias [1, heads, 1, max_length] (the current row) or [1, heads,
    max_length, max_length] -> (keys, values, step bias).
    """
    is_initialized = self.has_variable("cache", "cached_key")
    heads_major = lambda x: x.transpose(0, 2, 1, 3)  # [b, l, heads, kv] <-> [b, heads, l, kv]
    cache_shape = (k.shape[0], k.shape[2], k.shape[1], k.shape[3])
    cached_key = self.variable("cache", "cached_key", jnp.zeros, cache_shape, k.dtype)
    cached_value = self.variable("cache", "cached_value", jnp.zeros, cache_shape, v.dtype)
    if not is_initialized:
      return k, v, bias
    if index is None:
      raise ValueError("decoding steps need decode_index (the decoder's cache_index)")
    length = k.shape[1]
    max_length = cached_key.value.shape[2]
    if length != 1:
      raise ValueError(f"autoregressive decoding takes one token per step, got length {length}")
    cached_key.value = jax.lax.dynamic_update_slice(cached_key.value, heads_major(k),
                                                    (0, 0, index, 0))
    cached_value.value = jax.lax.dynamic_update_slice(cached_value.value, heads_major(v),
                                                      (0, 0, index, 0))
    causal = (jnp.arange(max_length) <= index)[None, None, None, :]
    step_bias = jnp.where(causal, 0.0, -1e10).astype(jnp.float32)
    if bias is not None:
      if bias.shape[-2] != 1:  # the whole [max_length, max_length] bias: take the current row
        bias = jax.lax.dynamic_slice_in_dim(bias, index, 1, axis=-2)
      step_bias = step_bias + bias.astype(jnp.float32)
    return heads_major(cached_key.value), heads_major(cached_value.value), step_bias


class MlpBlock(nn.Module):
  """Gated (v1.1: `wi_0`, `wi_1`) or plain (v1.0: `wi`) feed-forward block."""

  config: T5Config

  @nn.compact
  def __call__(self, x: Array, *, enable_dropout: bool) -> Array:
    cfg = self.config
    dtype = cfg.activation_dtype
    init = nn.initializers.normal(stddev=cfg.emb_dim ** -0.5)
    hidden = None
    for i, act in enumerate(cfg.mlp_activations):
      name = "wi" if len(cfg.mlp_activations) == 1 else f"wi_{i}"
      h = _ACTIVATIONS[act](Dense(cfg.mlp_dim, ("embed", "mlp"), init, dtype, name=name)(x))
      hidden = h if hidden is None else hidden * h
    hidden = nn.with_logical_constraint(hidden, ("batch", "length", "mlp"))
    # Broadcast along length, as T5X's MlpBlock: one mask per example and hidden unit.
    hidden = nn.Dropout(cfg.dropout_rate, broadcast_dims=(-2,))(
        hidden, deterministic=not enable_dropout)
    wo_init = nn.initializers.normal(stddev=cfg.mlp_dim ** -0.5)
    return Dense(cfg.emb_dim, ("mlp", "embed"), wo_init, dtype, name="wo")(hidden)


def _encoder_layer(cfg: T5Config, x: Array, bias: Array, enable_dropout: bool,
                   prefix: Optional[KeyValuePrefix] = None) -> Array:
  """One encoder block, x [b, l, embed] -> [b, l, embed]. Its submodules are created in the
  calling module (`EncoderLayer`, or the scanned step), so both hold T5X's names. `prefix`:
  this layer's self-attention prefix (or None)."""
  dtype = cfg.activation_dtype
  drop = nn.Dropout(cfg.dropout_rate, broadcast_dims=(-2,))
  y = RMSNorm(cfg.layer_norm_epsilon, dtype, name="pre_attention_layer_norm")(x)
  y = MultiHeadDotProductAttention(cfg, name="attention")(y, y, bias,
                                                          enable_dropout=enable_dropout,
                                                          prefix=prefix)
  x = x + drop(y, deterministic=not enable_dropout)
  y = RMSNorm(cfg.layer_norm_epsilon, dtype, name="pre_mlp_layer_norm")(x)
  y = MlpBlock(cfg, name="mlp")(y, enable_dropout=enable_dropout)
  x = x + drop(y, deterministic=not enable_dropout)
  return nn.with_logical_constraint(x, ("batch", "length", "embed"))


def _decoder_layer(cfg: T5Config, x: Array, encoded: Array, self_bias: Optional[Array],
                   cross_bias: Optional[Array], enable_dropout: bool, decode: bool,
                   reuse_cross_cache: bool, decode_index: Optional[Array],
                   self_prefix: Optional[KeyValuePrefix] = None,
                   cross_prefix: Optional[KeyValuePrefix] = None) -> Array:
  """One decoder block, x [b, t, embed] -> [b, t, embed] (submodules as `_encoder_layer`);
  the prefixes of its self- and cross-attention (or None)."""
  dtype = cfg.activation_dtype
  drop = nn.Dropout(cfg.dropout_rate, broadcast_dims=(-2,))
  y = RMSNorm(cfg.layer_norm_epsilon, dtype, name="pre_self_attention_layer_norm")(x)
  y = MultiHeadDotProductAttention(cfg, name="self_attention")(
      y, y, self_bias, enable_dropout=enable_dropout, decode=decode, decode_index=decode_index,
      prefix=self_prefix)
  x = x + drop(y, deterministic=not enable_dropout)
  y = RMSNorm(cfg.layer_norm_epsilon, dtype, name="pre_cross_attention_layer_norm")(x)
  cross_cache = ("read" if reuse_cross_cache else "write") if decode else None
  y = MultiHeadDotProductAttention(cfg, name="encoder_decoder_attention")(
      y, encoded, cross_bias, enable_dropout=enable_dropout, cross_cache=cross_cache,
      prefix=cross_prefix)
  x = x + drop(y, deterministic=not enable_dropout)
  y = RMSNorm(cfg.layer_norm_epsilon, dtype, name="pre_mlp_layer_norm")(x)
  y = MlpBlock(cfg, name="mlp")(y, enable_dropout=enable_dropout)
  x = x + drop(y, deterministic=not enable_dropout)
  return nn.with_logical_constraint(x, ("batch", "length", "embed"))


class EncoderLayer(nn.Module):
  config: T5Config

  @nn.compact
  def __call__(self, x: Array, bias: Array, enable_dropout: bool,
               prefix: Optional[KeyValuePrefix] = None) -> Array:
    return _encoder_layer(self.config, x, bias, enable_dropout, prefix)


class DecoderLayer(nn.Module):
  config: T5Config

  @nn.compact
  def __call__(self, x: Array, encoded: Array, self_bias: Optional[Array],
               cross_bias: Optional[Array], enable_dropout: bool, decode: bool,
               reuse_cross_cache: bool = False, decode_index: Optional[Array] = None,
               self_prefix: Optional[KeyValuePrefix] = None,
               cross_prefix: Optional[KeyValuePrefix] = None) -> Array:
    return _decoder_layer(self.config, x, encoded, self_bias, cross_bias, enable_dropout,
                          decode, reuse_cross_cache, decode_index, self_prefix, cross_prefix)


# jax's dots policies plus the named matmul outputs: the bf16 matmuls are a custom VJP whose
# dots those policies do not see (models/matmul.py); without the names `dots_saveable` compiled
# to the same program as `full` for per-layer bf16 models.
_REMAT_POLICIES = {
    "full": None,
    "dots_saveable": jax.checkpoint_policies.save_from_both_policies(
        jax.checkpoint_policies.dots_saveable,
        jax.checkpoint_policies.save_only_these_names(matmul.MATMUL, matmul.BATCHED_MATMUL)),
    "dots_with_no_batch_dims_saveable": jax.checkpoint_policies.save_from_both_policies(
        jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
        jax.checkpoint_policies.save_only_these_names(matmul.MATMUL)),
}


def _maybe_remat(layer_cls, policy: str, static_argnums: Sequence[int] = (),
                 in_scan: bool = False):
  """Rematerialise each call of `layer_cls` by `policy` (inside a scan, the scan already keeps
  XLA from merging recomputation across layers: prevent_cse off, as Flax advises)."""
  if policy == "none":
    return layer_cls
  return nn.remat(layer_cls, policy=_REMAT_POLICIES[policy],
                  static_argnums=tuple(static_argnums), prevent_cse=not in_scan)


# ----------------------------------------------------------------------------- scanned layers
#
# With `T5Config.scan_layers`, the blocks of a stack are one `nn.scan` over a step that holds a
# single block's submodules: parameters are stored stacked, `encoder/layers/attention/query/
# kernel` [layers, embed, joined_kv] (logical axis "layers" first), and XLA compiles one block
# instead of num_layers copies. The decode cache keeps the batch first: [b, layers, ...].
# Checkpoints on disk keep T5X's per-layer `layers_{i}`: `layer_stack.stack_layers` converts at
# load time.


class _EncoderScanStep(nn.Module):
  """Scan body: the prompt hook's per-layer update (if any), then one encoder block.

  layer_update(layer_values, hidden [b, l', d], context) -> hidden: a pure function from the
  hook (`scan_layer_inputs` in the module docstring); layer_values are this layer's slice."""

  config: T5Config
  enable_dropout: bool
  layer_update: Optional[Callable] = None

  @nn.compact
  def __call__(self, x: Array, bias: Array, context: Any, layer_values: Any,
               prefix: Optional[KeyValuePrefix]):
    if self.layer_update is not None:
      x = self.layer_update(layer_values, x, context)
    return _encoder_layer(self.config, x, bias, self.enable_dropout, prefix), None


class _DecoderScanStep(nn.Module):
  """Scan body: one decoder block."""

  config: T5Config
  enable_dropout: bool
  decode: bool
  reuse_cross_cache: bool

  @nn.compact
  def __call__(self, y: Array, encoded: Array, self_bias: Optional[Array],
               cross_bias: Optional[Array], decode_index: Optional[Array],
               self_prefix: Optional[KeyValuePrefix], cross_prefix: Optional[KeyValuePrefix]):
    return _decoder_layer(self.config, y, encoded, self_bias, cross_bias, self.enable_dropout,
                          self.decode, self.reuse_cross_cache, decode_index, self_prefix,
                          cross_prefix), None


def _scanned(step_cls, cfg: T5Config, num_layers: int, num_broadcast: int, num_sliced: int):
  """nn.scan of `step_cls` (rematerialised per layer by cfg.remat_policy) over num_layers:
  params and cache stacked (params on axis 0, cache on axis 1 behind the batch), independent
  dropout and init randomness per layer, the first `num_broadcast` inputs shared by all, the
  next `num_sliced` ([layers, ...] trees, e.g. attention prefixes) sliced per layer."""
  step = _maybe_remat(step_cls, cfg.remat_policy, in_scan=True)
  in_axes = (nn.broadcast,) * num_broadcast + (0,) * num_sliced
  return nn.scan(step, variable_axes={"params": 0, "cache": 1},
                 split_rngs={"params": True, "dropout": True}, in_axes=in_axes,
                 length=num_layers, metadata_params={nn.PARTITION_NAME: "layers"})


# --------------------------------------------------------------------------- attention prefixes

# The attentions a hook may give prefixes to, and which stack's layer count each has.
ATTENTION_KINDS = ("encoder", "decoder_self", "decoder_cross")
AttentionPrefixes = Mapping[str, KeyValuePrefix]  # kind -> [layers, b, p, heads, kv] pairs


def prefix_layout(cfg: T5Config) -> dict[str, tuple[int, int, int]]:
  """kind -> (layers, heads, kv): the shape of one example's prefix per position."""
  return {"encoder": (cfg.num_encoder_layers, cfg.num_heads, cfg.head_dim),
          "decoder_self": (cfg.num_decoder_layers, cfg.num_heads, cfg.head_dim),
          "decoder_cross": (cfg.num_decoder_layers, cfg.num_heads, cfg.head_dim)}


def check_attention_prefixes(prefixes: Optional[AttentionPrefixes],
                             layout: Mapping[str, tuple[int, int, int]], batch_size: int,
                             hook_name: str) -> dict:
  """The hook's prefixes as a dict, each kind's (keys, values) [layers, batch_size, p, heads,
  kv]; ValueError naming the kind and shape otherwise."""
  if prefixes is None:
    return {}
  unknown = sorted(set(prefixes) - set(ATTENTION_KINDS))
  if unknown:
    raise ValueError(f"{hook_name}.attention_prefixes returned unknown kinds {unknown}; "
                     f"known: {', '.join(ATTENTION_KINDS)}")
  for kind, pair in prefixes.items():
    layers, heads, kv = layout[kind]
    if not isinstance(pair, (tuple, list)) or len(pair) != 2:
      raise ValueError(f"{hook_name}.attention_prefixes[{kind!r}] must be (keys, values)")
    for name, x in zip(("keys", "values"), pair):
      shape = tuple(x.shape)
      if len(shape) != 5 or shape[:2] != (layers, batch_size) or shape[3:] != (heads, kv):
        raise ValueError(f"{hook_name}.attention_prefixes[{kind!r}] {name} have shape {shape}; "
                         f"expected [layers={layers}, batch={batch_size}, p, heads={heads}, "
                         f"kv={kv}]")
    if tuple(pair[0].shape) != tuple(pair[1].shape):
      raise ValueError(f"{hook_name}.attention_prefixes[{kind!r}]: keys {tuple(pair[0].shape)} "
                       f"and values {tuple(pair[1].shape)} differ")
  return dict(prefixes)


def _layer(prefix: Optional[KeyValuePrefix], i: int) -> Optional[KeyValuePrefix]:
  """Layer i's (keys, values) [b, p, heads, kv] of a stacked prefix (None stays None)."""
  return None if prefix is None else (prefix[0][i], prefix[1][i])


class Encoder(nn.Module):
  """Embeds tokens, lets the prompt hook insert the prompt, runs the layers, final norm."""

  config: T5Config
  shared_embedding: nn.Module
  prompt: Optional[nn.Module] = None

  def input_mask(self, encoder_input_tokens: Array) -> Array:
    """[b, l] tokens -> [b, l'] bool mask of the encoder sequence (prompt positions included)."""
    if self.prompt is None:
      return encoder_input_tokens > 0
    return self.prompt.input_mask(encoder_input_tokens)

  def attention_prefixes(self, batch_size: int, prompt_features: Optional[PromptFeatures],
                         kinds: Sequence[str]) -> AttentionPrefixes:
    """The hook's attention prefixes of `kinds` (the calling stack's) for `batch_size`
    examples, checked against this model's shapes: {kind: (keys, values) [layers, b, p, heads,
    kv]} ({} without a hook). The hook is asked for `kinds` only, so the encoder and the
    decoder each compute just their own."""
    if self.prompt is None:
      return {}
    layout = prefix_layout(self.config)
    asked = {kind: layout[kind] for kind in kinds}
    prefixes = self.prompt.attention_prefixes(batch_size, asked, prompt_features)
    return check_attention_prefixes(prefixes, layout, batch_size, type(self.prompt).__name__)

  @nn.compact
  def __call__(self, encoder_input_tokens: Array, encoder_segment_ids: Optional[Array] = None,
               *, enable_dropout: bool = True,
               prompt_features: Optional[PromptFeatures] = None) -> Array:
    """[b, l] tokens -> encoded [b, l', embed] (l' = l + prompt length; l for packed rows).

    `prompt_features`: the hook's per-example inputs (see the module docstring)."""
    cfg = self.config
    dtype = cfg.activation_dtype
    features = dict(prompt_features or {})
    x = self.shared_embedding(encoder_input_tokens)
    if self.prompt is not None:
      # Packed rows: the hook fills every example's prompt slots, so it must read the segment
      # ids (handed over from the batch, or from this argument); the masks below use them.
      if encoder_segment_ids is None:
        encoder_segment_ids = features.get("encoder_segment_ids")
      elif "encoder_segment_ids" in self.prompt.input_features:
        features.setdefault("encoder_segment_ids", encoder_segment_ids)
      else:
        raise ValueError(f"packed inputs (encoder_segment_ids) need a prompt hook that reads "
                         f"encoder_segment_ids; {type(self.prompt).__name__} does not")
      x, mask = self.prompt(encoder_input_tokens, x, self.shared_embedding.embedding, features)
    else:
      if features:
        raise ValueError(f"{', '.join(sorted(features))} were given but the model has no prompt")
      mask = encoder_input_tokens > 0
    x = nn.with_logical_constraint(x.astype(dtype), ("batch", "length", "embed"))
    x = nn.Dropout(cfg.dropout_rate, broadcast_dims=(-2,))(x, deterministic=not enable_dropout)

    attention_mask = make_attention_mask(mask, mask)
    if encoder_segment_ids is not None:
      attention_mask = attention_mask * make_segment_mask(encoder_segment_ids, encoder_segment_ids)
    length = x.shape[1]
    positions = jnp.arange(length)
    bias = RelativePositionBiases(cfg.relative_attention_num_buckets,
                                  cfg.relative_attention_max_distance, cfg.num_heads, dtype,
                                  name="relpos_bias")(positions, positions, bidirectional=True)
    bias = bias + combine_masks_to_bias(attention_mask, dtype)

    prefix = self.attention_prefixes(x.shape[0], features, ("encoder",)).get("encoder")
    if cfg.scan_layers:
      x = self._scanned_layers(x, bias, encoder_input_tokens, features, enable_dropout, prefix)
    else:
      layer_cls = _maybe_remat(EncoderLayer, cfg.remat_policy, static_argnums=(3,))
      for i in range(cfg.num_encoder_layers):
        if self.prompt is not None:
          x = self.prompt.layer_inputs(i, x, encoder_input_tokens, features)
        x = layer_cls(cfg, name=f"layers_{i}")(x, bias, enable_dropout, _layer(prefix, i))
    x = RMSNorm(cfg.layer_norm_epsilon, dtype, name="encoder_norm")(x)
    return nn.Dropout(cfg.dropout_rate, broadcast_dims=(-2,))(x, deterministic=not enable_dropout)

  def _scanned_layers(self, x: Array, bias: Array, encoder_input_tokens: Array,
                      features: dict, enable_dropout: bool,
                      prefix: Optional[KeyValuePrefix]) -> Array:
    """The encoder blocks as one scan; the hook's per-layer changes come from its
    `scan_layer_inputs` (None: it changes no layer)."""
    cfg = self.config
    layer_values = context = update = None
    if self.prompt is not None:
      scan_inputs = self.prompt.scan_layer_inputs
      if scan_inputs is None:
        raise ValueError(f"T5Config.scan_layers=True needs a prompt hook with scan_layer_inputs; "
                         f"{type(self.prompt).__name__} has none (set scan_layers=False)")
      per_layer = scan_inputs(cfg.num_encoder_layers, x, encoder_input_tokens, features)
      if per_layer is not None:
        layer_values, context, update = per_layer
    scan = _scanned(_EncoderScanStep, cfg, cfg.num_encoder_layers, num_broadcast=2,
                    num_sliced=2)
    x, _ = scan(cfg, enable_dropout, update, name="layers")(x, bias, context, layer_values,
                                                             prefix)
    return x


class Decoder(nn.Module):
  """Causal decoder with cross-attention; returns float32 logits [b, l, vocab]."""

  config: T5Config
  shared_embedding: nn.Module

  @nn.compact
  def __call__(self, encoded: Array, decoder_input_tokens: Array,
               decoder_mask: Optional[Array], encoder_decoder_mask: Optional[Array], *,
               enable_dropout: bool = True, decode: bool = False,
               max_decode_length: Optional[int] = None,
               reuse_cross_cache: bool = False,
               prefixes: Optional[AttentionPrefixes] = None) -> Array:
    """`prefixes`: {"decoder_self" | "decoder_cross": (keys, values) [layers, b, p, heads, kv]}
    (checked by `Encoder.attention_prefixes`); later decoding steps pass none (cached)."""
    cfg = self.config
    prefixes = prefixes or {}
    self_prefix, cross_prefix = prefixes.get("decoder_self"), prefixes.get("decoder_cross")
    dtype = cfg.activation_dtype
    y = self.shared_embedding(decoder_input_tokens)
    y = nn.Dropout(cfg.dropout_rate, broadcast_dims=(-2,))(y, deterministic=not enable_dropout)

    positions = query_positions = jnp.arange(decoder_input_tokens.shape[1])
    decode_index = None
    if decode:
      # One token per step: only the current position's row of the bias, [1, heads, 1, L] for
      # the whole cache (L = max_decode_length); `cache_index` counts the steps taken.
      index = self.variable("cache", "cache_index", lambda: jnp.array(0, jnp.int32))
      if not self.is_initializing():
        if max_decode_length is None:
          raise ValueError("decode=True needs max_decode_length (the length of the cache)")
        decode_index = index.value
        positions, query_positions = jnp.arange(max_decode_length), decode_index[None]
        index.value = index.value + 1
    self_bias = RelativePositionBiases(cfg.relative_attention_num_buckets,
                                       cfg.relative_attention_max_distance, cfg.num_heads, dtype,
                                       name="relpos_bias")(query_positions, positions,
                                                           bidirectional=False)
    if decoder_mask is not None:
      self_bias = self_bias + combine_masks_to_bias(decoder_mask, dtype)
    cross_bias = combine_masks_to_bias(encoder_decoder_mask, dtype)

    if cfg.scan_layers:
      scan = _scanned(_DecoderScanStep, cfg, cfg.num_decoder_layers, num_broadcast=4,
                      num_sliced=2)
      y, _ = scan(cfg, enable_dropout, decode, reuse_cross_cache, name="layers")(
          y, encoded, self_bias, cross_bias, decode_index, self_prefix, cross_prefix)
    else:
      layer_cls = _maybe_remat(DecoderLayer, cfg.remat_policy, static_argnums=(5, 6, 7))
      for i in range(cfg.num_decoder_layers):
        y = layer_cls(cfg, name=f"layers_{i}")(y, encoded, self_bias, cross_bias,
                                               enable_dropout, decode, reuse_cross_cache,
                                               decode_index, _layer(self_prefix, i),
                                               _layer(cross_prefix, i))
    y = RMSNorm(cfg.layer_norm_epsilon, dtype, name="decoder_norm")(y)
    y = nn.Dropout(cfg.dropout_rate, broadcast_dims=(-2,))(y, deterministic=not enable_dropout)
    # Logits come out in float32 for the loss; their matmul runs in the activation dtype summed
    # in float32 (in bf16, casting the [embed, vocab] kernel to float32 every step cost more
    # than the logits themselves on CPU: 28 -> 3.5 ms forward at the T5 1.1 small shape).
    if cfg.logits_via_embedding:
      logits = self.shared_embedding.attend(y) / np.sqrt(cfg.emb_dim)
    else:
      logits = Dense(cfg.vocab_size, ("embed", "vocab"), nn.initializers.normal(
          stddev=cfg.emb_dim ** -0.5), dtype, jnp.float32, name="logits_dense")(y)
    return nn.with_logical_constraint(logits, ("batch", "length", "vocab"))


def make_decoder_mask(decoder_target_tokens: Array,
                      decoder_segment_ids: Optional[Array] = None) -> Array:
  """Causal mask that also hides padding (target == 0) and other segments: [b, 1, l, l]."""
  valid = decoder_target_tokens > 0
  length = decoder_target_tokens.shape[-1]
  causal = jnp.tril(jnp.ones((length, length), dtype=bool))[None, None]
  mask = causal & valid[:, None, :, None] & valid[:, None, None, :]
  if decoder_segment_ids is not None:
    mask = mask & (decoder_segment_ids[:, None, :, None] == decoder_segment_ids[:, None, None, :])
  return mask.astype(jnp.float32)


class Transformer(nn.Module):
  """T5 encoder-decoder with T5X's `EncoderDecoder` call signature.

  `prompt` is an optional encoder prompt hook (see the module docstring); its parameters are
  created at `encoder/prompt/...`.
  """

  config: T5Config
  prompt: Optional[nn.Module] = None

  def setup(self):
    cfg = self.config
    self.token_embedder = Embed(cfg.vocab_size, cfg.emb_dim, cfg.activation_dtype)
    # A fresh, unbound copy so that the hook is adopted by the encoder (encoder/prompt/...)
    # instead of by this module.
    hook = None if self.prompt is None else self.prompt.clone(parent=None, _deep_clone=True)
    self.encoder = Encoder(cfg, self.token_embedder, hook)
    self.decoder = Decoder(cfg, self.token_embedder)

  def encode(self, encoder_input_tokens: Array, encoder_segment_ids: Optional[Array] = None,
             *, enable_dropout: bool = True,
             prompt_features: Optional[PromptFeatures] = None) -> Array:
    """[b, l] tokens -> [b, l', embed] encoded (prompt positions included)."""
    return self.encoder(encoder_input_tokens, encoder_segment_ids, enable_dropout=enable_dropout,
                        prompt_features=prompt_features)

  def encoder_mask(self, encoder_input_tokens: Array) -> Array:
    """[b, l] -> [b, l'] bool: which encoded positions are real (prompt positions are)."""
    return self.encoder.input_mask(encoder_input_tokens)

  def decode(self, encoded: Array, encoder_input_tokens: Array, decoder_input_tokens: Array,
             decoder_target_tokens: Array, encoder_segment_ids: Optional[Array] = None,
             decoder_segment_ids: Optional[Array] = None,
             decoder_positions: Optional[Array] = None, *, enable_dropout: bool = True,
             decode: bool = False, max_decode_length: Optional[int] = None,
             reuse_cross_cache: bool = False,
             prompt_features: Optional[PromptFeatures] = None) -> Array:
    """Logits [b, t, vocab] for decoder inputs [b, t] given `encoded` [b, l', embed].

    With `decode=True` every step also stores the cross-attention keys/values of `encoded` in
    the cache; `reuse_cross_cache=True` (all steps after the first) reads them back instead of
    recomputing them, which is most of a step's work for long inputs. The hook's decoder
    attention prefixes (for `prompt_features`) are computed on every call except those steps,
    which read them from the cache."""
    del decoder_positions  # relative attention derives positions itself
    if encoder_segment_ids is not None and self.prompt is not None:
      encoder_mask = encoder_segment_ids > 0  # packed rows hold their prompt slots already
    else:
      encoder_mask = self.encoder_mask(encoder_input_tokens)
    if decode:
      decoder_mask = None
      encoder_decoder_mask = make_attention_mask(jnp.ones_like(decoder_target_tokens) > 0,
                                                 encoder_mask)
    else:
      decoder_mask = make_decoder_mask(decoder_target_tokens, decoder_segment_ids)
      encoder_decoder_mask = make_attention_mask(decoder_target_tokens > 0, encoder_mask)
      if encoder_segment_ids is not None and decoder_segment_ids is not None:
        encoder_decoder_mask = encoder_decoder_mask * make_segment_mask(decoder_segment_ids,
                                                                        encoder_segment_ids)
    prefixes = None
    if not (decode and reuse_cross_cache):
      prefixes = self.encoder.attention_prefixes(decoder_input_tokens.shape[0], prompt_features,
                                                 ("decoder_self", "decoder_cross"))
    return self.decoder(encoded, decoder_input_tokens, decoder_mask, encoder_decoder_mask,
                        enable_dropout=enable_dropout, decode=decode,
                        max_decode_length=max_decode_length,
                        reuse_cross_cache=reuse_cross_cache, prefixes=prefixes)

  def __call__(self, encoder_input_tokens: Array, decoder_input_tokens: Array,
               decoder_target_tokens: Array, encoder_segment_ids: Optional[Array] = None,
               decoder_segment_ids: Optional[Array] = None,
               encoder_positions: Optional[Array] = None,
               decoder_positions: Optional[Array] = None, *, enable_dropout: bool = True,
               decode: bool = False,
               prompt_features: Optional[PromptFeatures] = None) -> Array:
    """Teacher-forced logits [b, t, vocab] (float32); `prompt_features`: the hook's inputs."""
    features = dict(prompt_features or {})
    if self.prompt is not None:
      # Packed rows (T5X's positional call passes them as arguments): a hook that declares the
      # packing features gets them; the segment ids also reach the masks from the features.
      declared = self.prompt.input_features
      if encoder_positions is not None and "encoder_positions" in declared:
        features.setdefault("encoder_positions", encoder_positions)
      if encoder_segment_ids is None:
        encoder_segment_ids = features.get("encoder_segment_ids")
    prompt_features = features or prompt_features
    del encoder_positions  # relative attention derives positions itself
    encoded = self.encode(encoder_input_tokens, encoder_segment_ids,
                          enable_dropout=enable_dropout, prompt_features=prompt_features)
    return self.decode(encoded, encoder_input_tokens, decoder_input_tokens,
                       decoder_target_tokens, encoder_segment_ids, decoder_segment_ids,
                       decoder_positions, enable_dropout=enable_dropout, decode=decode,
                       prompt_features=prompt_features)
