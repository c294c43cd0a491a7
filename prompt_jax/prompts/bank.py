"""A prompt bank: `num_prompts` Lester et al. prompts on one frozen model, chosen per example.

The bank holds one parameter, `prompts` [num_prompts, length, embed] (at
`encoder/prompt/prompt/prompts`), and every example of a batch names its prompt with the batch
feature `prompt_ids` [b] (the bank's `input_features`, which the model hands to it). One batch
can therefore mix prompts -- N prompts of an ensemble, or the prompts of N tasks -- and the frozen
model still runs once per batch. Each example sees exactly what it would see alone with its own
prompt: prompt rows are gathered, then placed as `InputPrompt` places a single prompt.

Out-of-range ids cannot raise inside a compiled step: ids >= num_prompts gather NaN rows, so a bad
id poisons its own outputs instead of silently picking another prompt (negative ids count from
the end, as in numpy). Callers check ids on the host with `check_prompt_ids`.
"""

from __future__ import annotations

from typing import Callable, ClassVar, Optional, Sequence, Union

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from prompt_jax.prompts import base, hook, initializers
from prompt_jax.prompts.base import PLACEMENTS, insert_prompt, prompt_mask

Array = jax.Array
PromptInit = Callable  # init(rng, [length, embed], embedding_table) -> [length, embed]

# The bank's own axis (which prompt of the bank); replicated like every prompt axis.
LOGICAL_AXIS_RULES = (("prompts", None),)


def check_prompt_ids(prompt_ids, num_prompts: int) -> np.ndarray:
  """Host-side check: `prompt_ids` [b] must be integers in [0, num_prompts)."""
  ids = np.asarray(prompt_ids)
  if ids.ndim != 1 or not np.issubdtype(ids.dtype, np.integer):
    raise ValueError(f"prompt_ids must be a 1-D integer array [batch], got dtype {ids.dtype} and "
                     f"shape {ids.shape}")
  if ids.size and (ids.min() < 0 or ids.max() >= num_prompts):
    raise ValueError(f"prompt_ids must lie in [0, {num_prompts}), got values from {ids.min()} "
                     f"to {ids.max()}")
  return ids.astype(np.int32)


class PromptStack(nn.Module):
  """The bank's parameter `prompts` [num_prompts, length, embed].

  Prompt i is initialised by `init_fn` (or `init_fn[i]` when a sequence is given) with the rng
  `fold_in(rng, i)`, so N prompts can start from N seeds or N different initialisers.
  """

  num_prompts: int
  length: int
  init_fn: Union[PromptInit, Sequence[PromptInit]]

  @nn.compact
  def __call__(self, embedding_table: Array) -> Array:
    """-> [num_prompts, length, embed]."""
    init_fns = (list(self.init_fn) if isinstance(self.init_fn, (list, tuple))
                else [self.init_fn] * self.num_prompts)

    def init(rng, shape):
      return jnp.stack([fn(jax.random.fold_in(rng, i), shape[1:], embedding_table)
                        for i, fn in enumerate(init_fns)])

    return self.param(
        "prompts", nn.with_logical_partitioning(init, ("prompts", "prompt", "prompt_embed")),
        (self.num_prompts, self.length, embedding_table.shape[-1]))


class PromptBank(hook.InputLevelOnly, nn.Module):
  """Encoder hook with `num_prompts` prompts; `prompt_ids` [b] picks one per example.

  Attributes:
    num_prompts: number of prompts N.
    length: tokens per prompt (all prompts of a bank have the same length).
    init_fn: one initialiser for all prompts (each gets its own rng) or a sequence of N.
    placement: 'prefix', 'prefix_after_bos' or 'suffix', as for `InputPrompt`.

  Without `prompt_ids` a bank of one prompt uses it; larger banks need ids, except while their
  parameters are being created (the model's dummy batch has none).
  """

  input_features: ClassVar[tuple[str, ...]] = ("prompt_ids",)

  num_prompts: int = 2
  length: int = 100
  init_fn: Union[PromptInit, Sequence[PromptInit]] = initializers.uniform()
  placement: str = "prefix"

  def __post_init__(self):
    if not isinstance(self.num_prompts, (int, np.integer)) or self.num_prompts < 1:
      raise ValueError(f"PromptBank.num_prompts must be a positive integer, got "
                       f"{self.num_prompts!r}")
    if not isinstance(self.length, (int, np.integer)) or self.length < 1:
      raise ValueError(f"PromptBank.length must be a positive integer, got {self.length!r}")
    if isinstance(self.init_fn, (list, tuple)) and len(self.init_fn) != self.num_prompts:
      raise ValueError(f"PromptBank.init_fn has {len(self.init_fn)} initialisers, expected one "
                       f"or num_prompts={self.num_prompts}")
    if self.placement not in PLACEMENTS:
      raise ValueError(f"PromptBank.placement must be one of {PLACEMENTS}, "
                       f"got {self.placement!r}")
    super().__post_init__()

  def setup(self):
    self.prompt = PromptStack(int(self.num_prompts), int(self.length), self.init_fn)

  def __call__(self, input_tokens: Array, embedded_inputs: Array, embedding_table: Array,
               prompt_features: Optional[base.PromptFeatures] = None):
    """-> (embedded [b, p + l, d], mask [b, p + l]) with example j using prompt prompt_ids[j]."""
    prompts = self.prompt(embedding_table)  # [n, p, d]
    chosen = base.rows_by_prompt_id(self, prompts, input_tokens, prompt_features)
    chosen = chosen.astype(embedded_inputs.dtype)  # [b, p, d]
    embedded = insert_prompt(chosen, embedded_inputs, input_tokens, self.placement)
    return embedded, prompt_mask(input_tokens, self.length, self.placement)

  def input_mask(self, input_tokens: Array) -> Array:
    return prompt_mask(input_tokens, self.length, self.placement)

  def export(self, embedding_table: Array) -> Array:
    """All prompts, [num_prompts, length, embed] (row i is prompt i's plain [length, embed])."""
    return self.prompt(embedding_table)
