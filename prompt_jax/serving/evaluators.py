"""Evaluators: one protocol for every way a run is scored, and the seqio set-up they share.

An evaluator is built once per run from what it scores and how (a dataset config, the decode
length, a decoding, a log directory) and called at every evaluation:

  evaluator(programs, prompt_params, frozen_params, step) -> {metric name: value}

`TaskEvaluator` scores a task (or mixture) with its own seqio metrics; `ensemble.EnsembleEvaluator`
a prompt bank and `multitask_evaluation.MultitaskEvaluator` a multi-task run implement the same
protocol on the same set-up (`seqio_evaluator`, `batches`); `evaluation.EVALUATORS` names them.
Generative tasks are decoded with the KV cache (greedily by default; `decoding` chooses beam
search or sampling, whose best decode is the prediction); `_rank` tasks are scored label by
label.
"""

from __future__ import annotations

import logging
import os
from typing import Any, Mapping, Optional, Protocol

import numpy as np
import seqio

from prompt_jax.data import pipeline
from prompt_jax.models import decoding as decoding_lib

log = logging.getLogger(__name__)


class Evaluator(Protocol):
  """Scores a prompt: built once per run, called at every evaluation."""

  def __call__(self, programs, prompt_params, frozen_params, step: int) -> dict[str, float]:
    """Metrics of `prompt_params` (with `frozen_params`, through `programs`) at `step`."""


def batches(ds, batch_size: int):
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


def make_predict_fn(programs, prompt_params, frozen_params, batch_size: int,
                    max_decode_length: int, decoding: Optional[Any] = None):
  """seqio `PredictFnCallable`: dataset -> [(index, token ids)] with the KV cache: the best
  decode of `decoding` (a `prompt_jax.models.decoding` object; None is greedy)."""
  decoding = decoding_lib.resolve(decoding)

  def predict_fn(ds, model_params: Optional[Any] = None):
    del model_params
    outputs = []
    for indices, batch, real in batches(ds, batch_size):
      tokens = programs.predict(prompt_params, frozen_params, batch, max_decode_length,
                                decoding)
      outputs.extend((i, [int(t) for t in row]) for i, row in zip(indices, tokens[:real]))
    return outputs
  return predict_fn


def make_score_fn(programs, prompt_params, frozen_params, batch_size: int):
  """seqio `ScoreFnCallable`: dataset -> [(index, log-likelihood of the targets)]."""
  def score_fn(ds, model_params: Optional[Any] = None):
    del model_params
    outputs = []
    for indices, batch, real in batches(ds, batch_size):
      scores = programs.score(prompt_params, frozen_params, batch)
      outputs.extend(zip(indices, scores[:real].tolist()))
    return outputs
  return score_fn


def count_truncated(evaluator: seqio.Evaluator,
                    feature_lengths: Mapping[str, int]) -> dict[str, dict[str, int]]:
  """Per task and feature, how many eval examples were cut to the feature length (logged)."""
  counts = {}
  for task in evaluator.eval_tasks:
    over = {k: 0 for k in feature_lengths}
    total = 0
    for ex in evaluator.cached_task_datasets[task.name].as_numpy_iterator():
      total += 1
      for key, length in feature_lengths.items():
        text = ex.get(f"{key}_pretokenized")
        if key in ex and text is not None and len(ex[key]) >= length:
          vocab = task.output_features[key].vocabulary
          over[key] += len(vocab.encode(text.decode("utf-8"))) + 1 > length
    for key, n in over.items():
      if n:
        log.warning("%s: %d of %d evaluation examples have %r longer than %d tokens; they are "
                    "truncated", task.name, n, total, key, feature_lengths[key])
    counts[task.name] = over
  return counts


def seqio_evaluator(dataset_cfg: pipeline.DatasetConfig,
                    log_dir: Optional[str] = None) -> seqio.Evaluator:
  """The seqio Evaluator of `dataset_cfg`'s eval split (its examples tokenized and cached in
  memory); truncated examples are counted in the log once, here."""
  provider = pipeline.get_task_or_mixture(dataset_cfg.mixture_or_task_name, dataset_cfg.module)
  if log_dir:
    os.makedirs(log_dir, exist_ok=True)
  evaluator = seqio.Evaluator(
      mixture_or_task_name=dataset_cfg.mixture_or_task_name,
      feature_converter=seqio.EncDecFeatureConverter(pack=False),
      eval_split=dataset_cfg.split, use_cached=dataset_cfg.use_cached,
      sequence_length=dict(dataset_cfg.task_feature_lengths), log_dir=log_dir,
      logger_cls=(seqio.JSONLogger,) if log_dir else (), async_compute_metrics=False)
  if not evaluator.eval_tasks:
    splits = sorted({s for t in getattr(provider, "tasks", [provider]) for s in t.splits})
    raise ValueError(f"{dataset_cfg.mixture_or_task_name!r} has no task with metrics and a "
                     f"{dataset_cfg.split!r} split to evaluate (its splits: {splits})")
  count_truncated(evaluator, dataset_cfg.task_feature_lengths)
  return evaluator


class TaskEvaluator:
  """Every task of `dataset_cfg.mixture_or_task_name` on its eval split, with the task's own
  metrics; generative tasks decoded with `decoding` (None: greedy) and scored on the best decode.

  Keys are `<metric>` for a single task and `<task>/<metric>` for a mixture. With `log_dir`,
  seqio's JSONLogger writes every input, target and prediction there (`<task>-<step>.jsonl`).
  The seqio Evaluator (the tokenized eval examples, cached in memory) is built at the first call
  and reused by the next ones, as T5X's train loop does: building one costs seconds.
  """

  def __init__(self, dataset_cfg: pipeline.DatasetConfig, *, max_decode_length: int,
               decoding: Optional[Any] = None, log_dir: Optional[str] = None):
    self.dataset_cfg, self.max_decode_length = dataset_cfg, int(max_decode_length)
    self.decoding, self.log_dir = decoding_lib.resolve(decoding), log_dir
    self._evaluator: Optional[seqio.Evaluator] = None

  def __call__(self, programs, prompt_params, frozen_params, step: int) -> dict[str, float]:
    if self._evaluator is None:
      self._evaluator = seqio_evaluator(self.dataset_cfg, self.log_dir)
    batch_size = self.dataset_cfg.batch_size
    predict_fn = make_predict_fn(programs, prompt_params, frozen_params, batch_size,
                                 self.max_decode_length, self.decoding)
    score_fn = make_score_fn(programs, prompt_params, frozen_params, batch_size)
    all_metrics, _ = self._evaluator.evaluate(compute_metrics=True, predict_fn=predict_fn,
                                              score_fn=score_fn, step=step)
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


def format_metrics_table(scores: Mapping[str, float], title: str = "metric") -> str:
  """A plain-text two-column table, one metric per row."""
  width = max([len(title)] + [len(k) for k in scores])
  lines = [f"{title:<{width}}  {'value':>8}", f"{'-' * width}  {'-' * 8}"]
  lines += [f"{name:<{width}}  {value:8.2f}" for name, value in sorted(scores.items())]
  return "\n".join(lines)
