"""Prompt initialisers (Lester et al. 2021, section 3.1): small pure functions.

Each returns `init(rng, shape, embedding_table) -> [length, embed] float32`, where
`embedding_table` [vocab, embed] is the frozen model's token embedding. Errors name the bad value.
"""

from __future__ import annotations

import math
from typing import Callable, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

Array = jax.Array
PromptInit = Callable[[Array, tuple, Optional[Array]], Array]


def uniform(minval: float = -0.5, maxval: float = 0.5) -> PromptInit:
  """U[minval, maxval) per entry; the paper's random init is U[-0.5, 0.5)."""
  if not minval < maxval:
    raise ValueError(f"uniform prompt init needs minval < maxval, got {minval} and {maxval}")

  def init(rng, shape, embedding_table=None):
    del embedding_table
    return jax.random.uniform(rng, shape, jnp.float32, minval, maxval)

  return init


def _check_population(name: str, population_size: int, first_id: int) -> None:
  if population_size < 1:
    raise ValueError(f"{name}.population_size must be >= 1, got {population_size}")
  if first_id < 0:
    raise ValueError(f"{name}.first_id must be >= 0, got {first_id}")


def _sample_rows(rng, embedding_table: Array, count: int, population_size: int,
                 first_id: int = 0) -> Array:
  """`count` rows for ids drawn from [first_id, first_id + population_size) ∩ the vocabulary."""
  vocab = embedding_table.shape[0]
  if first_id >= vocab:
    raise ValueError(f"prompt init first_id={first_id} is not below the vocabulary size {vocab}")
  population = min(population_size, vocab - first_id)
  replace = count > population
  ids = first_id + jax.random.choice(rng, population, (count,), replace=replace)
  return jnp.take(embedding_table, ids, axis=0).astype(jnp.float32)


def _need_table(name: str, embedding_table, shape):
  if embedding_table is None:
    raise ValueError(f"{name} prompt init needs the frozen embedding table, got None")
  if embedding_table.shape[-1] != shape[-1]:
    raise ValueError(f"{name} prompt init: embedding width {embedding_table.shape[-1]} != "
                     f"prompt width {shape[-1]}")


def sampled_vocabulary(population_size: int = 5000, first_id: int = 0) -> PromptInit:
  """Rows of the embedding table for ids drawn from `population_size` ids from `first_id` on.

  T5's SentencePiece ids are roughly sorted by frequency, so the first 5,000 are the most common
  tokens (the paper's setting). A byte vocabulary is not sorted: there, first_id=35,
  population_size=95 is printable ASCII (byte b is id b + 3), leaving out the control bytes,
  the bytes >= 128 and the sentinels, which plain English text never or rarely uses.
  """
  _check_population("sampled_vocabulary", population_size, first_id)

  def init(rng, shape, embedding_table=None):
    _need_table("sampled_vocabulary", embedding_table, shape)
    return _sample_rows(rng, embedding_table, shape[0], population_size, first_id)

  return init


def _embed_token_lists(token_lists: Sequence[Sequence[int]], embedding_table: Array) -> Array:
  rows = [jnp.mean(jnp.take(embedding_table, jnp.asarray(ids), axis=0), axis=0)
          for ids in token_lists]
  return jnp.stack(rows).astype(jnp.float32)


def _fill(rng, head: Array, shape, embedding_table, population_size, first_id) -> Array:
  if head.shape[0] > shape[0]:
    raise ValueError(f"prompt length {shape[0]} is shorter than the {head.shape[0]} rows "
                     "the initialiser must place")
  rest = shape[0] - head.shape[0]
  if rest == 0:
    return head
  return jnp.concatenate(
      [head, _sample_rows(rng, embedding_table, rest, population_size, first_id)])


def class_labels(labels: Sequence[str], vocabulary, population_size: int = 5000,
                 first_id: int = 0) -> PromptInit:
  """Row i = mean embedding of label i's sub-tokens; remaining rows from sampled vocabulary
  (`population_size` and `first_id` as in `sampled_vocabulary`)."""
  _check_population("class_labels", population_size, first_id)
  labels = list(labels)
  if not labels:
    raise ValueError("class_labels prompt init needs at least one label, got []")
  token_lists = []
  for label in labels:
    ids = [int(i) for i in vocabulary.encode(label)]
    if not ids:
      raise ValueError(f"class label {label!r} tokenises to no tokens")
    token_lists.append(ids)

  def init(rng, shape, embedding_table=None):
    _need_table("class_labels", embedding_table, shape)
    head = _embed_token_lists(token_lists, embedding_table)
    return _fill(rng, head, shape, embedding_table, population_size, first_id)

  return init


def from_string(text: str, vocabulary, population_size: int = 5000,
                first_id: int = 0) -> PromptInit:
  """One row per token of `text` (e.g. a task instruction); remaining rows sampled vocabulary
  (`population_size` and `first_id` as in `sampled_vocabulary`)."""
  _check_population("from_string", population_size, first_id)
  ids = [int(i) for i in vocabulary.encode(text)]
  if not ids:
    raise ValueError(f"prompt init string {text!r} tokenises to no tokens")

  def init(rng, shape, embedding_table=None):
    _need_table("from_string", embedding_table, shape)
    head = _embed_token_lists([[i] for i in ids], embedding_table)
    return _fill(rng, head, shape, embedding_table, population_size, first_id)

  return init


def torch_linear(features: int, fan_in: int, axes: tuple[str, str], name: str) -> nn.Dense:
  """A dense layer [fan_in, features] + [features] initialised as `torch.nn.Linear` (kernel and
  bias both U(+-1/sqrt(fan_in))), its kernel on logical `axes` and its bias on `axes[1:]`."""
  bound = 1.0 / math.sqrt(fan_in)

  def init(rng, shape, dtype=jnp.float32):
    return jax.random.uniform(rng, shape, dtype, -bound, bound)

  return nn.Dense(features, name=name, kernel_init=nn.with_logical_partitioning(init, axes),
                  bias_init=nn.with_logical_partitioning(init, axes[1:]))

