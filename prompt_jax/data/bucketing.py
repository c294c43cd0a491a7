"""Length bucketing: pad each batch to one of a few fixed lengths instead of the maximum.

GLUE sentences are short and vary in length; padding every batch to `inputs=512` wastes most of
the encoder's work, while padding to each batch's longest example gives a new compiled shape for
almost every batch. Buckets sit in between: every batch is padded to the smallest bucket that
holds its longest example, so the jitted step compiles once per bucket (a handful of times).

Padding is trailing zeros, which the encoder masks out of attention, so each example's loss is
the same at any bucket (up to float summation order): prefix and suffix prompts sit at the same
relative positions, the relative position biases of real tokens do not change.

    batches = pipeline.iterate_bucketed_batches(cfg, buckets=(32, 64, 128))  # a seqio task's
"""

from __future__ import annotations

import collections
from typing import Iterable, Iterator, Mapping, Sequence

import numpy as np

DEFAULT_BUCKETS = (32, 64, 128, 256, 512)
ENCODER_KEYS = ("encoder_input_tokens", "encoder_segment_ids", "encoder_positions")


def check_buckets(buckets: Sequence[int]) -> tuple[int, ...]:
  """Sorted, positive, distinct bucket lengths."""
  out = tuple(sorted(int(b) for b in buckets))
  if not out or out[0] < 1 or len(set(out)) != len(out):
    raise ValueError(f"length buckets must be distinct positive integers, got {tuple(buckets)}")
  return out


def bucket_length(length: int, buckets: Sequence[int]) -> int:
  """The smallest bucket >= `length`."""
  for bucket in check_buckets(buckets):
    if length <= bucket:
      return bucket
  raise ValueError(f"an example of length {length} is longer than the largest length bucket "
                   f"{max(buckets)}; add a bucket or raise the task's input length")


def real_lengths(tokens: np.ndarray) -> np.ndarray:
  """[b, l] token ids with trailing zero padding -> [b] lengths (last non-zero position + 1)."""
  tokens = np.asarray(tokens)
  nonzero = tokens != 0
  last = tokens.shape[-1] - np.argmax(nonzero[..., ::-1], axis=-1)
  return np.where(nonzero.any(axis=-1), last, 0)


def _resize(array: np.ndarray, length: int) -> np.ndarray:
  """Trim or zero-pad the last axis of `array` to `length`."""
  if array.shape[-1] >= length:
    return array[..., :length]
  pad = [(0, 0)] * (array.ndim - 1) + [(0, length - array.shape[-1])]
  return np.pad(array, pad)


def trim_to_bucket(batch: Mapping[str, np.ndarray], buckets: Sequence[int],
                   keys: Sequence[str] = ENCODER_KEYS) -> dict[str, np.ndarray]:
  """A batch padded to its longest example's bucket (only `keys` present in it change)."""
  length = bucket_length(int(real_lengths(batch["encoder_input_tokens"]).max(initial=1)),
                         buckets)
  return {k: _resize(np.asarray(v), length) if k in keys else np.asarray(v)
          for k, v in batch.items()}


def bucket_by_length(examples: Iterable[Mapping[str, np.ndarray]], batch_size: int,
                     buckets: Sequence[int], keys: Sequence[str] = ENCODER_KEYS,
                     flush: bool = False) -> Iterator[dict[str, np.ndarray]]:
  """Group single examples (1-D features) by the bucket of their input length.

  A batch is emitted as soon as a bucket has `batch_size` examples, padded to that bucket. With
  `flush`, the examples left at the end come out in short batches (pad them with
  `pipeline.pad_batch` if the step needs a fixed batch size).
  """
  buckets = check_buckets(buckets)
  if batch_size < 1:
    raise ValueError(f"batch_size must be >= 1, got {batch_size}")
  queues: dict[int, list] = collections.defaultdict(list)

  def emit(bucket: int, rows: list) -> dict[str, np.ndarray]:
    return {k: np.stack([_resize(np.asarray(r[k]), bucket) if k in keys else np.asarray(r[k])
                         for r in rows]) for k in rows[0]}

  for example in examples:
    length = int(real_lengths(np.asarray(example["encoder_input_tokens"])[None])[0])
    bucket = bucket_length(max(length, 1), buckets)
    queue = queues[bucket]
    queue.append(example)
    if len(queue) == batch_size:
      yield emit(bucket, queue)
      queues[bucket] = []
  if flush:
    for bucket in sorted(queues):
      if queues[bucket]:
        yield emit(bucket, queues[bucket])
