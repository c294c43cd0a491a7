"""Validation metrics: greedy decoding of a seqio task, scored by the task's own metric
functions through `seqio.Evaluator`."""

from __future__ import annotations

import logging
from typing import Any, Mapping, Optional

import numpy as np
import seqio

from prompt_jax.data import pipeline

log = logging.getLogger(__name__)


def _batches(ds, batch_size: int):
  """seqio's (index, features) pairs -> (indices, padded numpy batch, real rows)."""
  indices, examples = [], []
  for index, example in ds.as_numpy_iterator():
    indices.append(int(index))
    examples.append(example)
    if len(examples) == batch_size:
      yield indices, *_stack(examples, batch_size)
      indices, examples = [], []
  if examples:
    yield indices, *_stack(examples, batch_size)


def _stack(examples, batch_size):
  batch = {k: np.stack([ex[k] for ex in examples]) for k in examples[0]}
  return pipeline.pad_batch(batch, batch_size)


def make_predict_fn(trainer, prompt_params, frozen_params, batch_size: int,
                    max_decode_length: int):
  """seqio `PredictFnCallable`: dataset -> [(index, token ids)]."""
  def predict_fn(ds, model_params: Optional[Any] = None):
    del model_params
    outputs = []
    for indices, batch, real in _batches(ds, batch_size):
      tokens = trainer.predict(prompt_params, frozen_params, batch, max_decode_length)
      outputs.extend((i, [int(t) for t in row]) for i, row in zip(indices, tokens[:real]))
    return outputs
  return predict_fn


def evaluate(trainer, prompt_params, frozen_params, dataset_cfg: pipeline.DatasetConfig,
             max_decode_length: int) -> dict[str, float]:
  """Metrics of every task in `dataset_cfg.mixture_or_task_name` on its eval split.

  Keys are `<metric>` for a single task and `<task>/<metric>` for a mixture.
  """
  pipeline.get_task_or_mixture(dataset_cfg.mixture_or_task_name, dataset_cfg.module)
  evaluator = seqio.Evaluator(
      mixture_or_task_name=dataset_cfg.mixture_or_task_name,
      feature_converter=seqio.EncDecFeatureConverter(pack=False),
      eval_split=dataset_cfg.split, use_cached=dataset_cfg.use_cached,
      sequence_length=dict(dataset_cfg.task_feature_lengths), log_dir=None,
      async_compute_metrics=False)
  predict_fn = make_predict_fn(trainer, prompt_params, frozen_params, dataset_cfg.batch_size,
                               max_decode_length)
  all_metrics, _ = evaluator.evaluate(compute_metrics=True, predict_fn=predict_fn)
  return flatten_metrics(all_metrics.result())


def flatten_metrics(results: Mapping[str, Mapping[str, Any]]) -> dict[str, float]:
  flat = {}
  single = len(results) == 1
  for task, metrics in results.items():
    for name, value in metrics.items():
      value = getattr(value, "value", value)
      if np.ndim(value) == 0:
        flat[name if single else f"{task}/{name}"] = float(value)
  return flat
