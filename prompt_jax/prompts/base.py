"""The prompt interface between prompt methods and the frozen encoder.

A *prompt generator* is a Linen module with an integer attribute `length` and

    __call__(input_tokens [b, l], embedded_inputs [b, l, d], embedding_table [vocab, d])
        -> prompt [b, length, d]

`embedding_table` is the frozen token embedding, passed so that initialisers (sampled vocabulary,
class labels, SuperPos) can read it; generators that do not need it ignore it.

`InputPrompt` wraps a generator into the encoder hook the model expects (see
`prompt_jax.models.t5`): it places the prompt in the embedded input (`prefix`,
`prefix_after_bos` or `suffix`) and extends the attention mask. Its child is named `prompt`, so a
plain prompt's parameter lives at `encoder/prompt/prompt/prompt` exactly as in T5X prompt tuning.

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

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array

PLACEMENTS = ("prefix", "prefix_after_bos", "suffix")
MAX_ENCODER_LENGTH = 8192


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


def insert_prompt(prompt: Array, embedded: Array, input_tokens: Array, placement: str) -> Array:
  """Place prompt [b, p, d] into embedded inputs [b, l, d] -> [b, p + l, d]."""
  if placement == "prefix":
    return jnp.concatenate([prompt, embedded], axis=1)
  if placement == "prefix_after_bos":
    return jnp.concatenate([embedded[:, :1], prompt, embedded[:, 1:]], axis=1)
  if placement == "suffix":
    # Right after the last real token, before the padding, so that relative distances between
    # prompt and text do not depend on how much padding the batch has.
    return _scatter_after_inputs(prompt, embedded, input_tokens)
  raise ValueError(f"prompt placement must be one of {PLACEMENTS}, got {placement!r}")


def _scatter_after_inputs(prompt: Array, embedded: Array, input_tokens: Array) -> Array:
  prompt_length = prompt.shape[1]
  input_length = embedded.shape[1]
  lengths = jnp.sum(input_tokens > 0, axis=1)  # [b]
  positions = jnp.arange(prompt_length + input_length)[None, :]  # [1, total]
  in_prompt = (positions >= lengths[:, None]) & (positions < lengths[:, None] + prompt_length)
  text_index = jnp.where(positions < lengths[:, None], positions, positions - prompt_length)
  text_index = jnp.clip(text_index, 0, input_length - 1)
  prompt_index = jnp.clip(positions - lengths[:, None], 0, prompt_length - 1)
  text = jnp.take_along_axis(embedded, text_index[..., None], axis=1)
  from_prompt = jnp.take_along_axis(prompt, prompt_index[..., None], axis=1)
  return jnp.where(in_prompt[..., None], from_prompt, text)


def prompt_mask(input_tokens: Array, prompt_length: int, placement: str) -> Array:
  """[b, l] tokens -> [b, p + l] bool mask with the prompt positions set."""
  real = input_tokens > 0
  ones = jnp.ones((input_tokens.shape[0], prompt_length), dtype=bool)
  if placement == "prefix":
    return jnp.concatenate([ones, real], axis=1)
  if placement == "prefix_after_bos":
    return jnp.concatenate([real[:, :1], ones, real[:, 1:]], axis=1)
  if placement == "suffix":
    lengths = jnp.sum(real, axis=1)
    positions = jnp.arange(prompt_length + input_tokens.shape[1])[None, :]
    return positions < (lengths + prompt_length)[:, None]
  raise ValueError(f"prompt placement must be one of {PLACEMENTS}, got {placement!r}")


def prompt_positions(input_tokens: Array, prompt_length: int, placement: str) -> Array:
  """[b, l] tokens -> [b, p] indices of the prompt positions in the encoder sequence."""
  offsets = jnp.arange(prompt_length)[None, :]
  batch = input_tokens.shape[0]
  if placement == "prefix":
    return jnp.broadcast_to(offsets, (batch, prompt_length))
  if placement == "prefix_after_bos":
    return jnp.broadcast_to(offsets + 1, (batch, prompt_length))
  if placement == "suffix":
    return jnp.sum(input_tokens > 0, axis=1)[:, None] + offsets
  raise ValueError(f"prompt placement must be one of {PLACEMENTS}, got {placement!r}")


class InputPrompt(nn.Module):
  """Encoder hook for input-level prompts (Lester et al. and its reparameterisations).

  Attributes:
    prompt: the generator (its parameters appear under `encoder/prompt/prompt/`).
    placement: where the prompt goes in the encoder input.
    max_encoder_length: the encoder length budget (keyword only; see the module docstring).
  """

  prompt: nn.Module
  placement: str = "prefix"
  max_encoder_length: int = dataclasses.field(default=MAX_ENCODER_LENGTH, kw_only=True)

  def __post_init__(self):
    if self.placement not in PLACEMENTS:
      raise ValueError(f"{type(self).__name__}.placement must be one of {PLACEMENTS}, "
                       f"got {self.placement!r}")
    check_prompt_length(self.max_encoder_length, f"{type(self).__name__}.max_encoder_length")
    super().__post_init__()

  @property
  def length(self) -> int:
    return int(self.prompt.length)

  def __call__(self, input_tokens: Array, embedded_inputs: Array, embedding_table: Array,
               prompt_ids: Array | None = None):
    """-> (embedded [b, p + l, d], mask [b, p + l])."""
    if prompt_ids is not None:
      raise ValueError(f"{type(self).__name__} holds one prompt; prompt_ids need a prompt bank")
    check_encoder_length(self.length, input_tokens.shape[1], self.max_encoder_length)
    prompt = self.prompt(input_tokens, embedded_inputs, embedding_table)
    prompt = prompt.astype(embedded_inputs.dtype)
    embedded = insert_prompt(prompt, embedded_inputs, input_tokens, self.placement)
    return embedded, prompt_mask(input_tokens, self.length, self.placement)

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

  def layer_inputs(self, layer: int, hidden: Array, input_tokens: Array) -> Array:
    """Input-level prompts leave the hidden states of every layer alone."""
    del layer, input_tokens
    return hidden
