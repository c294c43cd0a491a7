"""A seqio mixture as tagged training batches: every example carries its task's index.

Multi-task prompt tuning trains one prompt per task of a mixture in one run. The task of each
example is its index in `task_names(mixture)` (the mixture's task list, in seqio's order), given
as the batch feature `prompt_ids` [b] -- the feature a prompt bank selects its prompt with, so
task t's examples see prompt t. Tasks are sampled at the mixture's rates from a seeded
`tf.data` sampler, so the data position of a run is again the number of batches consumed:
resuming skips that many and sees the same tasks and examples as an uninterrupted run.
"""

from __future__ import annotations

import dataclasses
from typing import Iterator

import numpy as np
import seqio

from prompt_jax.data import pipeline

TASK_FEATURE = "prompt_ids"  # the per-example task index, as prompt banks read it


def task_names(cfg: pipeline.DatasetConfig) -> list[str]:
  """The tasks of `cfg`'s mixture (a single task is a mixture of one), in seqio's order."""
  provider = pipeline.get_task_or_mixture(cfg.mixture_or_task_name, cfg.module)
  return [task.name for task in getattr(provider, "tasks", [provider])]


def task_rates(cfg: pipeline.DatasetConfig) -> dict[str, float]:
  """{task: sampling probability} from the mixture's rates (a task alone has rate 1)."""
  provider = pipeline.get_task_or_mixture(cfg.mixture_or_task_name, cfg.module)
  if not isinstance(provider, seqio.Mixture):
    return {provider.name: 1.0}
  rates = {task.name: float(provider.get_rate(task)) for task in provider.tasks}
  total = sum(rates.values())
  if total <= 0:
    raise ValueError(f"mixture {cfg.mixture_or_task_name!r} has no positive task rate: {rates}")
  return {name: rate / total for name, rate in rates.items()}


def check_trainable_mixture(cfg: pipeline.DatasetConfig) -> None:
  """ValueError naming the task when a task of `cfg`'s mixture would never be trained: its
  rate is 0 (it would be reported at its untrained score as if trained) or it has no `cfg.split`
  split (an evaluation-only task)."""
  provider = pipeline.get_task_or_mixture(cfg.mixture_or_task_name, cfg.module)
  for task in getattr(provider, "tasks", [provider]):
    if isinstance(provider, seqio.Mixture) and not float(provider.get_rate(task)) > 0:
      raise ValueError(f"task {task.name!r} has rate {provider.get_rate(task)} in mixture "
                       f"{cfg.mixture_or_task_name!r}: its prompt would never be trained; give "
                       "it a positive rate or leave it out of the training mixture")
    if cfg.split not in task.splits:
      raise ValueError(f"task {task.name!r} of {cfg.mixture_or_task_name!r} has no "
                       f"{cfg.split!r} split (its splits: {sorted(task.splits)}): an "
                       "evaluation-only task cannot be trained; leave it out of the training "
                       "mixture")


def task_config(cfg: pipeline.DatasetConfig, task: str) -> pipeline.DatasetConfig:
  """`cfg` reading only `task` (e.g. to evaluate one task of the mixture)."""
  return dataclasses.replace(cfg, mixture_or_task_name=task)


def get_tagged_dataset(cfg: pipeline.DatasetConfig, *, shard_id: int = 0, num_shards: int = 1):
  """Endless per-host batches of the mixture's tasks sampled at its rates, each example with
  `prompt_ids` = its task's index."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  names = task_names(cfg)
  rates = task_rates(cfg)
  if cfg.batch_size % num_shards:
    raise ValueError(f"batch_size {cfg.batch_size} is not divisible by {num_shards} hosts")
  datasets = []
  for index, name in enumerate(names):
    single = task_config(cfg, name)
    pipeline.count_truncated(single, shard_id=shard_id, num_shards=num_shards)
    ds = seqio.get_dataset(
        name, task_feature_lengths=dict(cfg.task_feature_lengths), dataset_split=cfg.split,
        shuffle=cfg.shuffle, num_epochs=None,
        feature_converter=seqio.EncDecFeatureConverter(pack=False),
        shard_info=seqio.ShardInfo(shard_id, num_shards), use_cached=cfg.use_cached,
        seed=cfg.seed, verbose=False)
    datasets.append(ds.map(lambda ex, i=index: dict(ex, **{TASK_FEATURE: tf.constant(i)})))
  weights = [rates[name] for name in names]
  mixed = tf.data.Dataset.sample_from_datasets(datasets, weights=weights, seed=cfg.seed or 0,
                                               stop_on_empty_dataset=False)
  return mixed.batch(cfg.batch_size // num_shards, drop_remainder=True)


def iterate_tagged_batches(cfg: pipeline.DatasetConfig, *, start_step: int = 0,
                           shard_id: int = 0, num_shards: int = 1
                           ) -> Iterator[dict[str, np.ndarray]]:
  """Endless tagged training batches, skipping the first `start_step` (the resume position)."""
  ds = get_tagged_dataset(cfg, shard_id=shard_id, num_shards=num_shards)
  if start_step:
    ds = ds.skip(start_step)
  for batch in ds.as_numpy_iterator():
    yield {k: v.astype(np.int32) for k, v in batch.items()}
