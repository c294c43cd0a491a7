"""seqio Task/Mixture -> batches of `encoder_input_tokens`, `decoder_input_tokens`,
`decoder_target_tokens`, `decoder_loss_weights` (T5X's encoder-decoder features).

The pipeline is deterministic for a given seed, so the data-iterator position saved in a
checkpoint is just the number of batches consumed: resuming skips that many.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib
import logging
from typing import Iterator, Mapping, Optional

import numpy as np
import seqio

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class DatasetConfig:
  """Which seqio task to read and how (T5X's `utils.DatasetConfig`, trimmed).

  Attributes:
    mixture_or_task_name: a registered seqio Task or Mixture.
    task_feature_lengths: e.g. {'inputs': 512, 'targets': 8}; longer examples are truncated
      (and counted in the log).
    split: dataset split.
    batch_size: global batch size (summed over hosts).
    shuffle: shuffle (training) or keep order (evaluation).
    seed: shuffle seed; fixed so that resuming reproduces the same order.
    module: a module to import first so that its tasks are registered (e.g. 'tasks').
  """

  mixture_or_task_name: str
  task_feature_lengths: Mapping[str, int]
  split: str = "train"
  batch_size: int = 32
  shuffle: bool = True
  seed: Optional[int] = 0
  use_cached: bool = False
  pack: bool = False
  module: Optional[str] = None

  def __post_init__(self):
    if self.batch_size < 1:
      raise ValueError(f"DatasetConfig.batch_size must be >= 1, got {self.batch_size}")
    for key in ("inputs", "targets"):
      if key not in self.task_feature_lengths:
        raise ValueError(f"DatasetConfig.task_feature_lengths needs {key!r}, got "
                         f"{dict(self.task_feature_lengths)}")


def get_task_or_mixture(name: str, module: Optional[str] = None):
  """The registered seqio Task or Mixture called `name`; unknown names list the closest ones."""
  if module:
    importlib.import_module(module)
  try:
    return seqio.get_mixture_or_task(name)
  except ValueError:
    known = sorted(set(seqio.TaskRegistry.names()) | set(seqio.MixtureRegistry.names()))
    close = difflib.get_close_matches(name, known, n=5, cutoff=0.4)
    hint = f"; closest: {', '.join(close)}" if close else f"; {len(known)} are registered"
    raise ValueError(f"unknown seqio task or mixture {name!r}{hint}") from None


def _count_truncated(dataset, feature_lengths: Mapping[str, int]):
  """Log (once, on a sample) how many examples exceed the feature lengths."""
  over = {k: 0 for k in feature_lengths}
  seen = 0
  for ex in dataset.take(1000).as_numpy_iterator():
    seen += 1
    for k, n in feature_lengths.items():
      if k in ex and len(ex[k]) > n:
        over[k] += 1
  for k, n in over.items():
    if n:
      log.warning("%d of the first %d examples have %r longer than %d tokens; they are "
                  "truncated", n, seen, k, feature_lengths[k])
  return over


def get_dataset(cfg: DatasetConfig, *, shard_id: int = 0, num_shards: int = 1,
                num_epochs: Optional[int] = None, drop_remainder: bool = True):
  """A tf.data.Dataset of per-host batches in the encoder-decoder feature layout."""
  task = get_task_or_mixture(cfg.mixture_or_task_name, cfg.module)
  if cfg.batch_size % num_shards:
    raise ValueError(f"batch_size {cfg.batch_size} is not divisible by {num_shards} hosts")
  raw = task.get_dataset(sequence_length=dict(cfg.task_feature_lengths), split=cfg.split,
                         use_cached=cfg.use_cached, shuffle=False, num_epochs=1,
                         shard_info=seqio.ShardInfo(shard_id, num_shards), seed=cfg.seed)
  _count_truncated(raw, cfg.task_feature_lengths)
  ds = seqio.get_dataset(
      cfg.mixture_or_task_name, task_feature_lengths=dict(cfg.task_feature_lengths),
      dataset_split=cfg.split, shuffle=cfg.shuffle, num_epochs=num_epochs,
      feature_converter=seqio.EncDecFeatureConverter(pack=cfg.pack),
      shard_info=seqio.ShardInfo(shard_id, num_shards), use_cached=cfg.use_cached,
      seed=cfg.seed, verbose=False)
  return ds.batch(cfg.batch_size // num_shards, drop_remainder=drop_remainder)


def iterate_batches(cfg: DatasetConfig, *, start_step: int = 0, shard_id: int = 0,
                    num_shards: int = 1) -> Iterator[dict[str, np.ndarray]]:
  """Endless training batches, skipping the first `start_step` (the resume position)."""
  ds = get_dataset(cfg, shard_id=shard_id, num_shards=num_shards, num_epochs=None)
  if start_step:
    ds = ds.skip(start_step)
  for batch in ds.as_numpy_iterator():
    yield {k: v.astype(np.int32) for k, v in batch.items()}


def pad_batch(batch: Mapping[str, np.ndarray], batch_size: int):
  """Pad a final short batch with all-zero rows; returns (batch, number of real rows)."""
  n = len(next(iter(batch.values())))
  if n == batch_size:
    return dict(batch), n
  return {k: np.concatenate([v, np.zeros((batch_size - n,) + v.shape[1:], v.dtype)])
          for k, v in batch.items()}, n
