"""Prompt ensembles (Lester et al. 2021, section 6): N prompts for one task on one frozen model.

Training: a `PromptBank` holds the N prompts; `ReplicateAcrossPrompts` (the trainer's
`batch_transforms`) turns a batch of B examples into N*B rows, prompt-major (rows i*B .. i*B+B-1
carry prompt i), with `prompt_ids`; `per_prompt` gives every prompt its own optimizer state by
vmapping an optax transformation over the leading prompt axis. With the mean-type loss
normalisers (T5X's 'NUM_REAL_TARGET_TOKENS', 'NUM_TOTAL_TARGET_TOKENS', 'AVERAGE_PER_SEQUENCE')
the replicated loss is the mean of the N per-prompt losses, so each prompt's gradient is 1/N of
its own run's; `per_prompt` multiplies it back by N. Together, N prompts train exactly as N
separate runs with the same initial prompts and data (dropout aside: masks are drawn per row).

Evaluation: `EnsembleEvaluator` decodes (or scores) every example once per prompt in the same
mixed batches and reports, for each metric, each prompt's value (`prompt_<i>/<metric>`), their
mean (`mean_prompt/...`), the best single prompt (`best_prompt/...`, the maximum over prompts of
that metric) and the ensemble (`ensemble/...`):
  - generated outputs: majority vote over the N decoded token sequences (`majority_vote`); a tie
    goes to the tied sequence first produced by the lowest prompt index;
  - rank classification (seqio score metrics): the N log-likelihoods of each candidate are
    averaged (`average_scores`) before the task picks the best-scoring candidate.
"""

from __future__ import annotations

import dataclasses
import logging
from collections import Counter
from typing import Any, Hashable, Mapping, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import seqio

from prompt_jax import params as params_lib
from prompt_jax.data import pipeline
from prompt_jax.models import decoding as decoding_lib
from prompt_jax.serving import evaluators

log = logging.getLogger(__name__)

# ----------------------------------------------------------------------------------- training


def replicate_across_prompts(batch: Mapping[str, np.ndarray], num_prompts: int) -> dict:
  """B examples -> N*B rows, prompt-major, plus `prompt_ids` [N*B] (row i*B + j: example j with
  prompt i). An existing `prompt_ids` is replaced."""
  if num_prompts < 1:
    raise ValueError(f"num_prompts must be >= 1, got {num_prompts}")
  features = {k: v for k, v in batch.items() if k != "prompt_ids"}
  size = len(next(iter(features.values())))
  out = {k: np.concatenate([np.asarray(v)] * num_prompts) for k, v in features.items()}
  out["prompt_ids"] = np.repeat(np.arange(num_prompts, dtype=np.int32), size)
  return out


@dataclasses.dataclass(frozen=True)
class ReplicateAcrossPrompts:
  """`trainer.train(batch_transforms=[...])`: `replicate_across_prompts(batch, num_prompts)`."""

  num_prompts: int

  def __post_init__(self):
    if not isinstance(self.num_prompts, int) or self.num_prompts < 1:
      raise ValueError(f"ReplicateAcrossPrompts.num_prompts must be a positive integer, got "
                       f"{self.num_prompts!r}")

  def __call__(self, batch: Mapping[str, np.ndarray]) -> dict:
    return replicate_across_prompts(batch, self.num_prompts)


# ------------------------------------------------------------------------------------ voting


def majority_vote(predictions: Sequence[Sequence[Hashable]]) -> list:
  """predictions[i][j]: prompt i's output for example j -> the ensemble's output per example.

  The most frequent output wins; among tied outputs, the one produced by the lowest prompt
  index wins (so the result never depends on hashing or dict order)."""
  if not predictions:
    raise ValueError("majority_vote needs predictions of at least one prompt, got none")
  counts = {len(p) for p in predictions}
  if len(counts) != 1:
    raise ValueError(f"every prompt needs one prediction per example; got lengths "
                     f"{[len(p) for p in predictions]}")
  voted = []
  for column in zip(*predictions):
    votes = Counter(column)
    best = max(votes.values())
    voted.append(next(candidate for candidate in column if votes[candidate] == best))
  return voted


def average_scores(scores: np.ndarray) -> np.ndarray:
  """[num_prompts, b] log-likelihoods -> [b] their mean (the ensemble's rank-classification
  score)."""
  scores = np.asarray(scores, np.float64)
  if scores.ndim != 2:
    raise ValueError(f"scores must be [num_prompts, batch], got shape {scores.shape}")
  return scores.mean(axis=0)


# -------------------------------------------------------------------------------- evaluation


def num_prompts_of(programs) -> int:
  """N, from the leading axis of the programs' (bank) prompt parameters."""
  return params_lib.leading_size(programs.abstract_prompt, "trainable parameter")


def _all_prompt_outputs(programs, prompt_params, frozen_params, ds, batch_size: int,
                        num_prompts: int, max_decode_length: int, kind: str):
  """(indices, [N, n] outputs) for one dataset; every example once per prompt, mixed batches."""
  indices, outputs = [], []
  for batch_indices, batch, real in evaluators.batches(ds, batch_size):
    rows = replicate_across_prompts(batch, num_prompts)
    if kind == "predict":
      tokens = programs.predict(prompt_params, frozen_params, rows, max_decode_length)
      out = tokens.reshape(num_prompts, batch_size, -1)[:, :real]
    else:
      scores = programs.score(prompt_params, frozen_params, rows)
      out = scores.reshape(num_prompts, batch_size)[:, :real]
    indices.extend(batch_indices)
    outputs.append(out)
  if not outputs:
    return [], np.zeros((num_prompts, 0))
  return indices, np.concatenate(outputs, axis=1)


class EnsembleEvaluator:
  """A prompt bank's evaluator (`evaluators.Evaluator`): each prompt's metrics, their mean, the
  best single prompt and the ensemble (majority vote / averaged scores) on the eval split.

  Keys: `<kind>/<metric>` with kind in prompt_<i>, mean_prompt, best_prompt, ensemble (metric
  names as `evaluators.TaskEvaluator` gives them). Decoding is greedy only (a vote over beams is
  not defined here); predictions are not logged (`log_dir` is accepted and unused).
  """

  def __init__(self, dataset_cfg: pipeline.DatasetConfig, *, max_decode_length: int,
               decoding: Optional[Any] = None, log_dir: Optional[str] = None):
    del log_dir
    if decoding_lib.resolve(decoding) != decoding_lib.Greedy():
      raise ValueError(f"DECODE_FN {decoding!r}: the ensemble evaluator decodes greedily only; "
                       "use DECODE_FN = @decoding.Greedy()")
    self.dataset_cfg, self.max_decode_length = dataset_cfg, int(max_decode_length)
    self._evaluator: Optional[seqio.Evaluator] = None

  def __call__(self, programs, prompt_params, frozen_params, step: int) -> dict[str, float]:
    if self._evaluator is None:
      self._evaluator = evaluators.seqio_evaluator(self.dataset_cfg)
    num_prompts = num_prompts_of(programs)
    cache: dict[tuple[int, str], Any] = {}  # (id of seqio's cached task dataset, kind) -> outputs

    def outputs(ds, kind):
      key = (id(ds), kind)
      if key not in cache:
        cache[key] = _all_prompt_outputs(programs, prompt_params, frozen_params, ds,
                                         self.dataset_cfg.batch_size, num_prompts,
                                         self.max_decode_length, kind)
      return cache[key]

    results: dict[str, float] = {}
    per_prompt_scores = []
    for member in list(range(num_prompts)) + [None]:
      predict_fn, score_fn = _member_fns(outputs, member, num_prompts)
      all_metrics, _ = self._evaluator.evaluate(compute_metrics=True, predict_fn=predict_fn,
                                                score_fn=score_fn, step=step)
      flat = evaluators.flatten_metrics(all_metrics.result())
      if member is None:
        results.update({f"ensemble/{k}": v for k, v in flat.items()})
      else:
        per_prompt_scores.append(flat)
        results.update({f"prompt_{member}/{k}": v for k, v in flat.items()})
    for name in per_prompt_scores[0]:
      values = [scores[name] for scores in per_prompt_scores]
      results[f"mean_prompt/{name}"] = float(np.mean(values))
      results[f"best_prompt/{name}"] = float(np.max(values))
    if jax.process_index() == 0:
      print(format_ensemble_table(results), flush=True)
    return results


def _member_fns(outputs, member: Optional[int], num_prompts: int):
  """seqio predict/score fns for prompt `member`, or for the ensemble when None; `outputs(ds,
  kind)` gives every prompt's (indices, [N, n] outputs)."""
  def predict_fn(ds, model_params=None):
    del model_params
    indices, tokens = outputs(ds, "predict")
    if member is not None:
      chosen = tokens[member]
    else:
      chosen = majority_vote([[tuple(int(t) for t in row) for row in tokens[i]]
                              for i in range(num_prompts)])
    return [(i, [int(t) for t in row]) for i, row in zip(indices, chosen)]

  def score_fn(ds, model_params=None):
    del model_params
    indices, scores = outputs(ds, "score")
    chosen = scores[member] if member is not None else average_scores(scores)
    return list(zip(indices, np.asarray(chosen, np.float64).tolist()))
  return predict_fn, score_fn


def format_ensemble_table(scores: Mapping[str, float]) -> str:
  """`EnsembleEvaluator`'s keys as a table: one row per metric, one column per prompt, then
  mean, best single prompt and ensemble."""
  kinds, metrics = [], []
  for key in scores:
    kind, metric = key.split("/", 1)
    if kind not in kinds:
      kinds.append(kind)
    if metric not in metrics:
      metrics.append(metric)
  members = sorted((k for k in kinds if k.startswith("prompt_")), key=lambda k: int(k[7:]))
  columns = members + [k for k in ("mean_prompt", "best_prompt", "ensemble") if k in kinds]
  width = max(len("metric"), *(len(m) for m in metrics))
  cell = max(9, *(len(c) for c in columns))
  lines = ["metric".ljust(width) + "".join(f"  {c:>{cell}}" for c in columns)]
  lines.append("-" * width + "".join("  " + "-" * cell for _ in columns))
  for metric in sorted(metrics):
    row = metric.ljust(width)
    for column in columns:
      value = scores.get(f"{column}/{metric}")
      row += f"  {'-' if value is None else f'{value:.2f}':>{cell}}"
    lines.append(row)
  return "\n".join(lines)


def stacked_prompts(prompts: Sequence[np.ndarray]) -> jax.Array:
  """N plain [length, embed] prompts -> the bank parameter [N, length, embed] (float32)."""
  shapes = {np.shape(p) for p in prompts}
  if len(shapes) != 1 or len(next(iter(shapes))) != 2:
    raise ValueError(f"prompts must all be [length, embed] of one shape, got {sorted(shapes)}")
  return jnp.stack([jnp.asarray(p, jnp.float32) for p in prompts])
