"""The prompt interface between prompt methods and the frozen encoder.

A *prompt generator* is a Linen module with an integer attribute `length` and

    __call__(input_tokens [b, l], embedded_inputs [b, l, d], embedding_table [vocab, d])
        -> prompt [b, length, d]

`embedding_table` is the frozen token embedding, passed so that initialisers (sampled vocabulary,
class labels, SuperPos) can read it; generators that do not need it ignore it.

`InputPrompt` wraps a generator into the encoder hook the model expects (the contract:
`prompt_jax.prompts.hook.PromptHook`): it places the prompt in the embedded input and extends the
attention mask. Its child is named `prompt`, so a plain prompt's parameter lives at
`encoder/prompt/prompt/prompt` exactly as in T5X prompt tuning.

Placements (`PLACEMENTS`): a placement is one `Placement` entry of `PLACEMENT_TABLE`, defined by
where the prompt starts in the encoder sequence; insertion, mask and prompt positions all follow
from that start (`insert_prompt`, `prompt_mask`, `prompt_positions`). Adding a placement is adding
one entry.

Per-example inputs: a hook lists the batch features it reads in `input_features` (a bank:
`('prompt_ids',)`); the model hands exactly those to the hook as one mapping, `prompt_features`.

Packed rows (`prompt_jax.data.packing`): several examples share one encoder row, and each keeps
its own copy of the prompt. The data side reserves the prompt's p positions in front of every
example (token `PROMPT_SLOT_ID`, which the caller hands to the packer as `slot_id`), so that
`encoder_segment_ids` and `encoder_positions` (T5X's packing features) cover the prompt:
positions 0..p-1 of a segment are its prompt slots, its tokens follow. `InputPrompt` reads these
two features (`PACKED_FEATURES`); when they are present it inserts nothing and fills each slot
with prompt row `position` (`fill_prompt_slots`), and the mask is `segment_ids > 0`.
The model's segment masks keep the examples apart and its relative positions are the unpacked
ones within a segment. Only the `prefix` placement and input-level hooks pack; without the two
features the unpacked path runs unchanged.

Export: `export_prompt(hook, params)` folds a trained hook into the plain [length, embed] array
that serves with zero overhead, by applying the hook's `export` to the frozen embedding table.
The model never calls `export`.

Logical axes: `prompt` (prompt tokens), `prompt_embed` (the embedding width of prompt vectors) and
`prompt_mlp` (hidden width of a reparameterisation network) are the shared vocabulary of prompt
parameters (`LOGICAL_AXIS_RULES`, all replicated: a prompt is tiny and every device needs all of
it). A method file whose parameters use a name of its own declares its rule in its own
`LOGICAL_AXIS_RULES`; `prompt_jax.prompts.logical_axis_rules()` collects them all.

Encoder length budget: prompt length + input length may not exceed `max_encoder_length`
(`MAX_ENCODER_LENGTH` = 8192 tokens by default). T5's bucketed relative positions accept any
length, so the bound is about memory: the encoder's attention scores grow with the square of the
sequence, 8192^2 float32 scores are 256 MiB per head and example, and a typo such as
PROMPT_LENGTH=100000 would ask for terabytes. The check runs when the model is first traced
(`init_abstract`), before anything is allocated; raise `InputPrompt.max_encoder_length` (gin:
`base.InputPrompt.max_encoder_length = 16384`) for genuinely longer inputs.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, ClassVar, Mapping, Optional, Union

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from prompt_jax.prompts.hook import InputLevelOnly, PromptFeatures

Array = jax.Array

MAX_ENCODER_LENGTH = 8192
PACKED_FEATURES = ("encoder_segment_ids", "encoder_positions")  # T5X's packing features
PACKED_PLACEMENTS = ("prefix",)
# The token id of reserved prompt slots (non-zero: seqio's packer strips zeros as padding): the
# caller hands it to `prompt_jax.data.packing` (`slot_id`), the hook replaces those embeddings.
PROMPT_SLOT_ID = 1
LOGICAL_AXIS_RULES = (("prompt", None), ("prompt_embed", None), ("prompt_mlp", None))


def check_prompt_length(length, name: str = "PROMPT_LENGTH") -> int:
  """`length` as an int; raises ValueError unless it is an integer >= 1 (bools are refused)."""
  if isinstance(length, bool) or not isinstance(length, (int, np.integer)) or length < 1:
    raise ValueError(f"{name} must be an integer >= 1, got {length!r}")
  return int(length)


def check_encoder_length(prompt_length: int, input_length: int,
                         max_encoder_length: int = MAX_ENCODER_LENGTH) -> None:
  """Raise ValueError (naming all three numbers) when prompt + inputs exceed the encoder budget."""
  if prompt_length + input_length > max_encoder_length:
    raise ValueError(f"prompt length {prompt_length} + inputs length {input_length} = "
                     f"{prompt_length + input_length} encoder tokens exceed the budget "
                     f"max_encoder_length={max_encoder_length} (attention memory grows with its "
                     "square; raise InputPrompt.max_encoder_length if this is intended)")


@dataclasses.dataclass(frozen=True)
class Placement:
  """Where a prompt of p tokens goes in the encoder sequence.

  `start(input_tokens [b, l])` is the index of the prompt's first token: a Python int when it is
  the same for every example (then insertion is a concatenation), or a [b] int array. The input
  tokens before `start` stay in front of the prompt, the rest follow it.
  """

  start: Callable[[Array], Union[int, Array]]

  def positions(self, input_tokens: Array, prompt_length: int) -> Array:
    """[b, l] tokens -> [b, p] indices of the prompt positions in the encoder sequence."""
    start = jnp.broadcast_to(jnp.asarray(self.start(input_tokens)), input_tokens.shape[:1])
    return start[:, None] + jnp.arange(prompt_length)[None, :]

  def insert(self, prompt: Array, embedded: Array, input_tokens: Array) -> Array:
    """prompt [b, p, d], embedded inputs [b, l, d] -> [b, p + l, d]."""
    start = self.start(input_tokens)
    if isinstance(start, int):
      return jnp.concatenate([embedded[:, :start], prompt, embedded[:, start:]], axis=1)
    in_prompt, text_index, prompt_index = self._layout(start, prompt.shape[1], embedded.shape[1])
    text = jnp.take_along_axis(embedded, text_index[..., None], axis=1)
    from_prompt = jnp.take_along_axis(prompt, prompt_index[..., None], axis=1)
    return jnp.where(in_prompt[..., None], from_prompt, text)

  def mask(self, input_tokens: Array, prompt_length: int) -> Array:
    """[b, l] tokens -> [b, p + l] bool: the prompt positions and the real (non-pad) tokens."""
    real = input_tokens > 0
    start = self.start(input_tokens)
    if isinstance(start, int):
      ones = jnp.ones((input_tokens.shape[0], prompt_length), dtype=bool)
      return jnp.concatenate([real[:, :start], ones, real[:, start:]], axis=1)
    in_prompt, text_index, _ = self._layout(start, prompt_length, input_tokens.shape[1])
    return in_prompt | jnp.take_along_axis(real, text_index, axis=1)

  @staticmethod
  def _layout(start: Array, prompt_length: int, input_length: int):
    """Per-example start [b] -> (in_prompt, text index, prompt index), each [b, p + l]."""
    positions = jnp.arange(prompt_length + input_length)[None, :]
    start = start[:, None]
    in_prompt = (positions >= start) & (positions < start + prompt_length)
    text_index = jnp.where(positions < start, positions, positions - prompt_length)
    text_index = jnp.clip(text_index, 0, input_length - 1)
    prompt_index = jnp.clip(positions - start, 0, prompt_length - 1)
    return in_prompt, text_index, prompt_index


PLACEMENT_TABLE: dict[str, Placement] = {
    "prefix": Placement(start=lambda input_tokens: 0),
    # After the first token (a BOS or task token stays first).
    "prefix_after_bos": Placement(start=lambda input_tokens: 1),
    # Right after the last real token, before the padding, so that relative distances between
    # prompt and text do not depend on how much padding the batch has.
    "suffix": Placement(start=lambda input_tokens: jnp.sum(input_tokens > 0, axis=1)),
}
PLACEMENTS = tuple(PLACEMENT_TABLE)


def placement_of(placement: str) -> Placement:
  """The `Placement` named `placement`; ValueError for an unknown name."""
  if placement not in PLACEMENT_TABLE:
    raise ValueError(f"prompt placement must be one of {PLACEMENTS}, got {placement!r}")
  return PLACEMENT_TABLE[placement]


def insert_prompt(prompt: Array, embedded: Array, input_tokens: Array, placement: str) -> Array:
  """Place prompt [b, p, d] into embedded inputs [b, l, d] -> [b, p + l, d]."""
  return placement_of(placement).insert(prompt, embedded, input_tokens)


def prompt_mask(input_tokens: Array, prompt_length: int, placement: str) -> Array:
  """[b, l] tokens -> [b, p + l] bool mask with the prompt positions set."""
  return placement_of(placement).mask(input_tokens, prompt_length)


def prompt_positions(input_tokens: Array, prompt_length: int, placement: str) -> Array:
  """[b, l] tokens -> [b, p] indices of the prompt positions in the encoder sequence."""
  return placement_of(placement).positions(input_tokens, prompt_length)


def fill_prompt_slots(prompt: Array, embedded: Array, input_tokens: Array, segment_ids: Array,
                      positions: Array) -> Array:
  """Packed rows: prompt [b, p, d] into embedded [b, l, d] -> [b, l, d].

  A slot is a position with segment id > 0 and position < p (input_tokens, segment_ids,
  positions [b, l]); it gets prompt row `position`, every other position keeps its embedding.
  A slot whose token is not `PROMPT_SLOT_ID` (rows packed without reserving the prompt, e.g.
  plain `EncDecFeatureConverter(pack=True)`, whose first p tokens would be overwritten) gets a
  NaN row, so that the loss cannot pass silently."""
  length = prompt.shape[1]
  slot = (segment_ids > 0) & (positions < length)
  index = jnp.clip(positions, 0, length - 1).astype(jnp.int32)
  rows = jnp.take_along_axis(prompt, index[..., None], axis=1)
  rows = jnp.where((input_tokens == PROMPT_SLOT_ID)[..., None], rows, jnp.nan)
  return jnp.where(slot[..., None], rows, embedded)


def unread_features(hook: nn.Module, prompt_features: Optional[PromptFeatures]) -> list[str]:
  """The names in `prompt_features` that `hook` does not list in its `input_features`."""
  declared = set(hook.input_features)
  return sorted(set(prompt_features or {}) - declared)


def rows_by_prompt_id(hook: nn.Module, rows: Array, input_tokens: Array,
                      prompt_features: Optional[PromptFeatures], what: str = "prompts",
                      hint: str = "") -> Array:
  """rows [n, p, d] -> [b, p, d]: example j gets rows[prompt_ids[j]] (prompt banks and
  multi-task hooks; an id outside [0, n) gives a NaN row, so it cannot pass silently).

  `prompt_ids` comes from `prompt_features`, the only feature such a hook reads; it may be
  absent for n == 1 or while parameters are being created. `what`/`hint` word the error."""
  name = type(hook).__name__
  unread = unread_features(hook, prompt_features)
  if unread:
    raise ValueError(f"{name} reads only the batch feature prompt_ids, got {unread}")
  prompt_ids = (prompt_features or {}).get("prompt_ids")
  if prompt_ids is None:
    if rows.shape[0] != 1 and not hook.is_mutable_collection("params"):
      raise ValueError(f"a {name} of {rows.shape[0]} {what} needs prompt_ids [batch] "
                       f"(batch['prompt_ids']{hint}); got None")
    prompt_ids = jnp.zeros(input_tokens.shape[:1], jnp.int32)
  if prompt_ids.shape != input_tokens.shape[:1]:
    raise ValueError(f"prompt_ids must have shape [batch] = {input_tokens.shape[:1]}, "
                     f"got {prompt_ids.shape}")
  return jnp.take(rows, prompt_ids, axis=0, mode="fill", fill_value=jnp.nan)


def export_prompt(hook: Optional[nn.Module], params: Mapping) -> Optional[Array]:
  """A hook's prompt folded into a plain array for serving, or None.

  `params` is the model's (unboxed) parameter tree; only the hook's parameters
  (`encoder/prompt/...`) and the frozen embedding table (`token_embedder/embedding`) are read,
  and the hook's `export(embedding_table)` computes the result: [length, embed] for one prompt
  ([num_prompts, length, embed] for a bank). None without a hook (`hook` is None, e.g.
  `Transformer.prompt` of a model without prompt) or when the prompt depends on the input.
  """
  if hook is None:
    return None
  table = params["token_embedder"]["embedding"]
  return hook.apply({"params": params["encoder"]["prompt"]}, table, method=hook.export)


def check_placement(hook: nn.Module) -> None:
  """Raise ValueError unless `hook.placement` is one of `PLACEMENTS` and
  `hook.max_encoder_length` an integer >= 1 (the fields every input-level hook has)."""
  name = type(hook).__name__
  if hook.placement not in PLACEMENTS:
    raise ValueError(f"{name}.placement must be one of {PLACEMENTS}, got {hook.placement!r}")
  check_prompt_length(hook.max_encoder_length, f"{name}.max_encoder_length")


class PerExamplePrompt(InputLevelOnly):
  """Defaults of a hook that computes its own prompt for every example (SMoP, ATTEMPT): it has
  the fields `length`, `placement` and `max_encoder_length`, places a [b, length, d] prompt as
  `InputPrompt` does, and has no plain form to export (a mixin; it has no fields)."""

  def place(self, prompt: Array, embedded_inputs: Array, input_tokens: Array
            ) -> tuple[Array, Array]:
    """prompt [b, length, d], embedded inputs [b, l, d] -> (embedded [b, length + l, d],
    mask [b, length + l])."""
    embedded = insert_prompt(prompt.astype(embedded_inputs.dtype), embedded_inputs,
                             input_tokens, self.placement)
    return embedded, self.input_mask(input_tokens)

  def input_mask(self, input_tokens: Array) -> Array:
    return prompt_mask(input_tokens, self.length, self.placement)

  def export(self, embedding_table: Array) -> None:
    """None: the prompt depends on the input."""
    del embedding_table
    return None


class InputPrompt(InputLevelOnly, nn.Module):
  """Encoder hook for input-level prompts (Lester et al. and its reparameterisations).

  Attributes:
    prompt: the generator (its parameters appear under `encoder/prompt/prompt/`).
    placement: where the prompt goes in the encoder input.
    max_encoder_length: the encoder length budget (keyword only; see the module docstring).

  It holds one prompt for every example. Its only batch features are the packing ones
  (`PACKED_FEATURES`, present in packed batches only; see the module docstring).
  """

  input_features: ClassVar[tuple[str, ...]] = PACKED_FEATURES

  prompt: nn.Module
  placement: str = "prefix"
  max_encoder_length: int = dataclasses.field(default=MAX_ENCODER_LENGTH, kw_only=True)

  def __post_init__(self):
    check_placement(self)
    super().__post_init__()

  @property
  def length(self) -> int:
    return int(self.prompt.length)

  def __call__(self, input_tokens: Array, embedded_inputs: Array, embedding_table: Array,
               prompt_features: Optional[PromptFeatures] = None):
    """-> (embedded [b, p + l, d], mask [b, p + l]); packed rows: ([b, l, d], [b, l])."""
    unread = unread_features(self, prompt_features)
    if unread:
      raise ValueError(f"{type(self).__name__} holds one prompt; {', '.join(unread)} need a "
                       "prompt bank")
    packed = self._packed_features(input_tokens, prompt_features)
    if packed is not None:
      segment_ids, positions = packed
      prompt = self.prompt(input_tokens, embedded_inputs, embedding_table)
      prompt = prompt.astype(embedded_inputs.dtype)
      embedded = fill_prompt_slots(prompt, embedded_inputs, input_tokens, segment_ids, positions)
      return embedded, segment_ids > 0
    check_encoder_length(self.length, input_tokens.shape[1], self.max_encoder_length)
    prompt = self.prompt(input_tokens, embedded_inputs, embedding_table)
    prompt = prompt.astype(embedded_inputs.dtype)
    embedded = insert_prompt(prompt, embedded_inputs, input_tokens, self.placement)
    return embedded, prompt_mask(input_tokens, self.length, self.placement)

  def _packed_features(self, input_tokens: Array, prompt_features: Optional[PromptFeatures]):
    """(segment_ids, positions) [b, l] of packed rows, or None for unpacked inputs."""
    features = prompt_features or {}
    given = [k for k in PACKED_FEATURES if features.get(k) is not None]
    if not given:
      return None
    name = type(self).__name__
    if len(given) < len(PACKED_FEATURES):
      missing = [k for k in PACKED_FEATURES if k not in given]
      raise ValueError(f"packed inputs need {' and '.join(PACKED_FEATURES)}; {name} got "
                       f"{given[0]} without {missing[0]}")
    if type(self).layer_inputs is not InputPrompt.layer_inputs:
      raise ValueError(f"{name} changes the hidden states of the prompt positions inside the "
                       "encoder; packed inputs (encoder_segment_ids) work with InputPrompt only")
    if self.placement not in PACKED_PLACEMENTS:
      raise ValueError(f"packed inputs (encoder_segment_ids) need placement 'prefix', got "
                       f"{name}.placement={self.placement!r}")
    for k in PACKED_FEATURES:
      if features[k].shape != input_tokens.shape:
        raise ValueError(f"{k} must have the shape of encoder_input_tokens "
                         f"{input_tokens.shape}, got {features[k].shape}")
    if input_tokens.shape[1] > self.max_encoder_length:
      raise ValueError(f"packed rows of {input_tokens.shape[1]} encoder tokens exceed the budget "
                       f"max_encoder_length={self.max_encoder_length}")
    return features["encoder_segment_ids"], features["encoder_positions"]

  def input_mask(self, input_tokens: Array) -> Array:
    return prompt_mask(input_tokens, self.length, self.placement)

  def positions(self, input_tokens: Array) -> Array:
    """[b, p] indices of the prompt positions in the encoder sequence."""
    return prompt_positions(input_tokens, self.length, self.placement)

  def export(self, embedding_table: Array) -> Array:
    """The prompt as a plain [length, embed] array (generators here do not read the input)."""
    tokens = jnp.ones((1, 1), jnp.int32)
    embedded = jnp.zeros((1, 1, embedding_table.shape[-1]), embedding_table.dtype)
    return self.prompt(tokens, embedded, embedding_table)[0]

