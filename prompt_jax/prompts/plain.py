"""Lester et al. (2021) prompt tuning: the prompt is a free `[length, embed]` parameter."""

from __future__ import annotations

from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from prompt_jax.prompts import initializers
from prompt_jax.prompts.base import check_prompt_length


class Prompt(nn.Module):
  """A trainable prompt `prompt` [length, embed], broadcast over the batch.

  Attributes:
    length: number of prompt tokens (paper default 100).
    init_fn: an initialiser from `prompt_jax.prompts.initializers`.
  """

  length: int = 100
  init_fn: Callable = initializers.uniform()

  def __post_init__(self):
    check_prompt_length(self.length, "PROMPT_LENGTH (Prompt.length)")
    super().__post_init__()

  @nn.compact
  def __call__(self, input_tokens: jax.Array, embedded_inputs: jax.Array,
               embedding_table: jax.Array) -> jax.Array:
    """-> [batch, length, embed]."""
    embed = embedded_inputs.shape[-1]
    prompt = self.param(
        "prompt",
        nn.with_logical_partitioning(
            lambda rng, shape: self.init_fn(rng, shape, embedding_table),
            ("prompt", "prompt_embed")),
        (self.length, embed))
    return jnp.broadcast_to(prompt, (input_tokens.shape[0],) + prompt.shape)
