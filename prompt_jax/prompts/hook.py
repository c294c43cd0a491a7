"""The encoder prompt hook contract: what `prompt_jax.models.t5` calls on `Transformer.prompt`.

`PromptHook` lists every member the model reads; a hook is any Linen module that has them all
(structural typing: it need not subclass anything). The model imports nothing from this package,
so it reads the members directly and relies on every hook defining them; `InputLevelOnly` gives
the defaults of a hook that only touches the encoder's input (no batch features, no layer
changes). The hook's parameters live at `encoder/prompt/...`, as in T5X prompt tuning.

Shapes: b batch, l input tokens, l' encoder positions (l + prompt length, or l for packed rows),
d embedding width.
"""

from __future__ import annotations

from typing import Any, Callable, ClassVar, Mapping, Optional, Protocol, runtime_checkable

import jax

Array = jax.Array
PromptFeatures = Mapping[str, Array]  # per-example hook inputs: name -> [b, ...]
# kind -> (keys, values) [layers, b, p, heads, kv]: see `PromptHook.attention_prefixes`.
AttentionPrefixes = Mapping[str, tuple[Array, Array]]
# (layer_values, context, update): see `PromptHook.scan_layer_inputs`.
ScanLayerInputs = tuple[Any, Any, Callable[[Any, Array, Any], Array]]


@runtime_checkable
class PromptHook(Protocol):
  """The encoder prompt hook (`prompt_jax.models.t5.Transformer(config, prompt=hook)`).

  Attributes:
    input_features: the per-example batch features the hook reads, e.g. ('prompt_ids',) for a
      prompt bank, () for none. `EncoderDecoderModel` takes exactly these from the batch (those
      present) and the model forwards them untouched as one mapping, `prompt_features`
      {name: [b, ...]}. A hook that needs a new per-example input declares it here; the model
      does not change. Packed rows: a hook that fills prompt slots declares
      `encoder_segment_ids` and `encoder_positions` (the model refuses packed inputs otherwise).
  """

  input_features: ClassVar[tuple[str, ...]]

  def __call__(self, input_tokens: Array, embedded_inputs: Array, embedding_table: Array,
               prompt_features: Optional[PromptFeatures] = None) -> tuple[Array, Array]:
    """input_tokens [b, l], embedded_inputs [b, l, d], embedding_table [vocab, d] ->
    (embedded [b, l', d], mask [b, l']). Called once, on the embedded input tokens. The hook
    checks `prompt_features`: one it does not read, or a missing one it needs, is a ValueError
    (while parameters are being created they may be absent: the dummy batch has none)."""
    ...

  def input_mask(self, input_tokens: Array) -> Array:
    """input_tokens [b, l] -> mask [b, l'], the `__call__` mask without computing a prompt
    (decoding steps use it; it depends on the tokens only)."""
    ...

  def layer_inputs(self, layer: int, hidden: Array, input_tokens: Array,
                   prompt_features: Optional[PromptFeatures] = None) -> Array:
    """hidden [b, l', d] -> [b, l', d] before encoder layer `layer` (0 .. num_layers - 1):
    deep prompts and SPT replace the prompt positions, input-level hooks return `hidden`."""
    ...

  def scan_layer_inputs(self, num_layers: int, hidden: Array, input_tokens: Array,
                        prompt_features: Optional[PromptFeatures] = None
                        ) -> Optional[ScanLayerInputs]:
    """Scanned layers (`T5Config.scan_layers`) only: called once before the scan instead of
    `layer_inputs`. None when no layer changes; else (layer_values, context, update):
    `layer_values` a tree of [num_layers, ...] arrays (layer l gets slice l), `context` a tree
    every layer sees, `update(layer_values_l, hidden [b, l', d], context) -> hidden` a pure
    function (no module) equal to `layer_inputs(l, ...)`. The hook's parameters keep their own
    names (e.g. `layers_{l}`); only the frozen blocks are stacked. A hook that cannot run
    scanned sets `scan_layer_inputs = None`, and the model refuses `scan_layers=True`."""
    ...

  def attention_prefixes(self, batch_size: int, layout: Mapping[str, tuple[int, int, int]],
                         prompt_features: Optional[PromptFeatures] = None
                         ) -> Optional[AttentionPrefixes]:
    """Keys/values every query of an attention sees in front of the sequence's own, or None.

    `layout` {kind: (layers, heads, kv)} for the kinds of `models.t5.ATTENTION_KINDS`
    ("encoder" self-attention, "decoder_self", "decoder_cross") this call uses: the encoder
    asks for "encoder", the decoder for its two. Returns {kind: (keys, values)}, each
    [layers, batch_size, p, heads, kv], for the asked kinds the hook prefixes (others may be
    left out; extra ones are checked and not used). Prefix positions carry no
    relative-position bias and no mask; they are computed once per batch (encoder call,
    training decoder call, first decoding step, whose cache keeps them). The model checks the
    shapes."""
    ...

  def export(self, embedding_table: Array) -> Optional[Array]:
    """The prompt folded into a plain array ([length, d]; [n, length, d] for n prompts), or
    None when it depends on the input. Called by `base.export_prompt`, never by the model."""
    ...


class InputLevelOnly:
  """Defaults of `PromptHook` for hooks that only touch the encoder's input: no batch features,
  every layer's hidden states unchanged, no attention prefixes (a mixin for Linen hooks; it
  has no fields)."""

  input_features: ClassVar[tuple[str, ...]] = ()

  def layer_inputs(self, layer: int, hidden: Array, input_tokens: Array,
                   prompt_features: Optional[PromptFeatures] = None) -> Array:
    """hidden [b, l', d] unchanged."""
    del layer, input_tokens, prompt_features
    return hidden

  def scan_layer_inputs(self, num_layers: int, hidden: Array, input_tokens: Array,
                        prompt_features: Optional[PromptFeatures] = None) -> None:
    """Scanned layers: no layer changes (None)."""
    del num_layers, hidden, input_tokens, prompt_features
    return None

  def attention_prefixes(self, batch_size: int, layout: Mapping[str, tuple[int, int, int]],
                         prompt_features: Optional[PromptFeatures] = None) -> None:
    """No attention prefixes (None)."""
    del batch_size, layout, prompt_features
    return None


@runtime_checkable
class MultiPromptHook(PromptHook, Protocol):
  """A hook holding several prompts, one chosen per example by the `prompt_ids` feature [b]
  (prompt banks, shared+task prompts, MPT): what multi-task training and serving need."""

  num_prompts: int
