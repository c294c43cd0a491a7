"""Prompt initialisers (Lester et al. 2021, section 3.1): small pure functions.

Each returns `init(rng, shape, embedding_table) -> [length, embed] float32`, where
`embedding_table` [vocab, embed] is the frozen model's token embedding. Errors name the bad value.
"""

from __future__ import annotations

import os
from typing import Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

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


def _shape_label(ndim: int) -> str:
  return {2: "prompt length, model emb_dim",
          3: "number of prompts, prompt length, model emb_dim"}.get(ndim, "")


def check_prompt_array(array, source: str, expected_shape: Optional[Sequence[int]] = None, *,
                       allow_bank: bool = False) -> np.ndarray:
  """A prompt array read from `source` (a file name, for messages), checked -> float32.

  Raises ValueError naming `source` for: anything but a NumPy array, a non-floating dtype
  (integers, bool, complex, objects), a rank other than 2 ([length, embed]; 3 for a bank's
  [num_prompts, length, embed] when `allow_bank`), an empty dimension, a shape other than
  `expected_shape`, and NaN or infinite values (how many, and where the first is)."""
  if not isinstance(array, np.ndarray):
    raise ValueError(f"prompt file {source!r} holds a {type(array).__name__}, not a .npy array")
  if array.dtype.fields is not None or not jnp.issubdtype(array.dtype, jnp.floating):
    raise ValueError(f"prompt file {source!r} has dtype {array.dtype}; a prompt must be floating "
                     "point (e.g. float32)")
  shape = tuple(int(n) for n in array.shape)
  if expected_shape is not None:
    expected = tuple(int(n) for n in expected_shape)
    if shape != expected:
      label = _shape_label(len(expected))
      raise ValueError(f"prompt file {source!r} has shape {shape}, expected {expected}"
                       + (f" ({label})" if label else ""))
  else:
    ranks = (2, 3) if allow_bank else (2,)
    if array.ndim not in ranks:
      what = "[length, embed] or a bank's [num_prompts, length, embed]" if allow_bank else (
          "[length, embed]")
      raise ValueError(f"prompt file {source!r} must hold {what}, got shape {shape}")
  if 0 in shape:
    raise ValueError(f"prompt file {source!r} has shape {shape}: a prompt needs at least one "
                     "token and one embedding column")
  finite = np.isfinite(array)
  if not finite.all():
    bad = int(array.size - np.count_nonzero(finite))
    first = tuple(int(i) for i in np.argwhere(~finite)[0])
    raise ValueError(f"prompt file {source!r} has {bad} non-finite value"
                     f"{'s' if bad != 1 else ''} (NaN or inf); the first is "
                     f"{array[first]} at index {list(first)}")
  return array.astype(np.float32)


def read_npy(path: str) -> np.ndarray:
  """`np.load(path)` of a `.npy` file (no pickles, no `.npz`) with one-line errors naming `path`;
  the array itself is not checked (see `check_prompt_array`)."""
  try:
    with open(path, "rb") as f:
      magic = f.read(6)
  except FileNotFoundError as e:
    raise FileNotFoundError(f"prompt file {path!r} does not exist") from e
  except IsADirectoryError as e:
    raise ValueError(f"prompt file {path!r} is a directory, not a .npy file") from e
  if magic.startswith(b"PK\x03\x04"):
    raise ValueError(f"prompt file {path!r} is a .npz archive, not a .npy array")
  if magic != b"\x93NUMPY":
    raise ValueError(f"prompt file {path!r} is not a .npy file (it lacks the .npy header; "
                     f"first bytes {magic!r})")
  try:
    return np.load(path, allow_pickle=False)
  except (ValueError, EOFError, OSError) as e:
    reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
    raise ValueError(f"prompt file {path!r} is not a readable .npy array ({reason})") from e


def load_prompt_array(path: str, expected_shape: Optional[Sequence[int]] = None, *,
                      allow_bank: bool = False) -> np.ndarray:
  """A `[length, embed]` prompt from a `.npy` file, checked by `check_prompt_array`, as
  float32."""
  return check_prompt_array(read_npy(path), path, expected_shape, allow_bank=allow_bank)


def split_prompt_source(source: str) -> tuple[str, str]:
  """`FILE.npy#ROW` -> (`FILE.npy`, `ROW`); a source without '#', or naming an existing file
  (whose name has a '#'), -> (source, '')."""
  if "#" not in source or os.path.lexists(source):
    return source, ""
  path, _, row = source.partition("#")
  return path, row


def load_prompt_source(source: str, path: Optional[str] = None) -> np.ndarray:
  """A `[length, embed]` float32 prompt from `FILE.npy` or `FILE.npy#ROW` (row ROW of a prompt
  bank's `[N, length, embed]` export, 0 <= ROW < N; see `split_prompt_source`), checked by
  `check_prompt_array`; one-line errors name `source`. `path`: the .npy to read when `source`
  names it otherwise (e.g. a run directory's latest export)."""
  path, row = split_prompt_source(source) if path is None else (path, "")
  if not os.path.exists(path):
    raise FileNotFoundError(f"prompt source {source!r} does not exist")
  array = read_npy(path)
  if row:
    valid = row.isascii() and row.isdigit() and len(row) <= 18
    if array.ndim != 3 or not valid or int(row) >= array.shape[0]:
      shown = row if len(row) <= 30 else f"{row[:20]}... ({len(row)} characters)"
      raise ValueError(f"prompt source {f'{path}#{shown}'!r}: '#<row>' needs a "
                       f"[N, length, embed] bank export and 0 <= row < N; got shape "
                       f"{array.shape} and row {shown!r}")
    array = array[int(row)]
  if array.ndim != 2:
    raise ValueError(f"prompt source {source!r} must hold [length, embed], got shape "
                     f"{array.shape} (a bank export needs '#<row>')")
  return check_prompt_array(array, source)


def from_array(path: str, bank_mean: bool = False) -> PromptInit:
  """The prompt saved at `path` (.npy), e.g. a released prompt; its shape must match exactly.

  `bank_mean=True` reads a bank `[num_prompts, length, embed]` (e.g. a multi-task run's
  prompts/prompt_<step>.npy) and starts from the mean of its prompts (SPoT's transfer from
  several source tasks)."""
  array = load_prompt_array(path, allow_bank=bank_mean)
  if bank_mean:
    if array.ndim != 3:
      raise ValueError(f"{path}: bank_mean needs a bank [num_prompts, length, embed], got shape "
                       f"{array.shape}")
    array = array.mean(axis=0)

  def init(rng, shape, embedding_table=None):
    del rng, embedding_table
    return jnp.asarray(check_prompt_array(array, path, shape))

  return init
