"""seqio-style metric functions: `metric(targets, predictions) -> {name: value}` (percentages).

The GLUE/SuperGLUE metrics follow T5 (t5/evaluation/metrics.py) so that numbers are comparable
with published ones: class ids come from the tasks' postprocessors, and a prediction that is no
valid label (-1) counts as wrong. `macro_f1`, `exact_match`, `bleu` and `rouge` compare strings
(the metrics of file tasks, `file_tasks.METRICS`). `rank_classification` turns a task's metrics
into a score metric: the label whose string scores highest is the prediction.
"""

from __future__ import annotations

import collections
import re
import string
from typing import Any, Callable, Sequence

import numpy as np
import scipy.stats

Metric = Callable[[Sequence, Sequence], dict]


def _check_lengths(name: str, targets: Sequence, predictions: Sequence) -> None:
  if len(targets) != len(predictions):
    raise ValueError(f"{name}: {len(targets)} targets but {len(predictions)} predictions")


def accuracy(targets: Sequence, predictions: Sequence) -> dict[str, float]:
  """Exact-match accuracy in percent."""
  _check_lengths("accuracy", targets, predictions)
  if not targets:
    return {"accuracy": 0.0}
  hits = [t == p for t, p in zip(targets, predictions)]
  return {"accuracy": 100.0 * float(np.mean(hits))}


def _binary_f1(targets: np.ndarray, predictions: np.ndarray) -> float:
  tp = float(np.sum((predictions == 1) & (targets == 1)))
  fp = float(np.sum((predictions == 1) & (targets != 1)))
  fn = float(np.sum((predictions != 1) & (targets == 1)))
  return 0.0 if tp == 0 else 2 * tp / (2 * tp + fp + fn)


def f1_score_with_invalid(targets: Sequence[int], predictions: Sequence[int]) -> dict[str, float]:
  """F1 of the positive class (1); a prediction other than 0 or 1 counts as wrong."""
  _check_lengths("f1", targets, predictions)
  targets, predictions = np.asarray(targets), np.array(predictions)
  invalid = (predictions != 0) & (predictions != 1)
  predictions[invalid] = 1 - targets[invalid]
  return {"f1": 100.0 * _binary_f1(targets, predictions)}


def matthews_corrcoef(targets: Sequence[int], predictions: Sequence[int]) -> dict[str, float]:
  """Matthews correlation (CoLA) in percent; 0 when it is undefined (a constant column)."""
  _check_lengths("matthews_corrcoef", targets, predictions)
  targets, predictions = np.asarray(targets), np.asarray(predictions)
  labels = np.unique(np.concatenate([targets, predictions]))
  confusion = np.array([[np.sum((targets == a) & (predictions == b)) for b in labels]
                        for a in labels], dtype=np.float64)
  t_sum, p_sum = confusion.sum(1), confusion.sum(0)
  n, correct = confusion.sum(), np.trace(confusion)
  cov_tp = correct * n - t_sum @ p_sum
  cov_tt = n * n - t_sum @ t_sum
  cov_pp = n * n - p_sum @ p_sum
  if cov_tt * cov_pp == 0:
    return {"matthews_corrcoef": 0.0}
  return {"matthews_corrcoef": 100.0 * cov_tp / np.sqrt(cov_tt * cov_pp)}


def pearson_corrcoef(targets: Sequence[float], predictions: Sequence[float]) -> dict[str, float]:
  _check_lengths("pearson_corrcoef", targets, predictions)
  return {"pearson_corrcoef": 100.0 * float(scipy.stats.pearsonr(targets, predictions)[0])}


def spearman_corrcoef(targets: Sequence[float], predictions: Sequence[float]) -> dict[str, float]:
  _check_lengths("spearman_corrcoef", targets, predictions)
  return {"spearman_corrcoef": 100.0 * float(scipy.stats.spearmanr(targets, predictions)[0])}


def mean_multiclass_f1(num_classes: int) -> Metric:
  """Unweighted mean over classes 0..num_classes-1 of the per-class F1 (CB's 'macro F1')."""
  name = f"mean_{num_classes}class_f1"

  def metric(targets: Sequence[int], predictions: Sequence[int]) -> dict[str, float]:
    _check_lengths(name, targets, predictions)
    targets, predictions = np.asarray(targets), np.asarray(predictions)
    per_class = [_binary_f1((targets == c).astype(int), (predictions == c).astype(int))
                 for c in range(num_classes)]
    return {name: 100.0 * float(np.mean(per_class))}
  metric.__name__ = name
  return metric


def macro_f1(targets: Sequence[str], predictions: Sequence[str]) -> dict[str, float]:
  """Unweighted mean, over the labels that occur among `targets`, of each label's F1 (one label
  against the rest), in percent. A prediction that is none of those labels counts as wrong."""
  _check_lengths("macro_f1", targets, predictions)
  labels = sorted(set(targets))
  if not labels:
    return {"macro_f1": 0.0}
  targets, predictions = np.asarray(targets, dtype=object), np.asarray(predictions, dtype=object)
  per_label = [_binary_f1((targets == label).astype(int), (predictions == label).astype(int))
               for label in labels]
  return {"macro_f1": 100.0 * float(np.mean(per_label))}


# ------------------------------------------------------------------------- grouped (SuperGLUE)


def multirc_f1_over_all_answers(targets: Sequence[dict], predictions: Sequence[dict]):
  """MultiRC F1a: binary F1 over every (question, answer) pair."""
  return f1_score_with_invalid([t["value"] for t in targets], [p["value"] for p in predictions])


def multirc_exact_match(targets: Sequence[dict], predictions: Sequence[dict]):
  """MultiRC EM: per question, 1 if every answer's label is right; averaged over questions."""
  _check_lengths("exact_match", targets, predictions)
  groups: dict[Any, list[bool]] = collections.defaultdict(list)
  for t, p in zip(targets, predictions):
    groups[t["group"]].append(t["value"] == p["value"])
  if not groups:
    return {"exact_match": 0.0}
  return {"exact_match": 100.0 * float(np.mean([all(hits) for hits in groups.values()]))}


def normalize_squad(text: str) -> str:
  """SQuAD's answer normalisation: lower case, no punctuation, articles or extra spaces."""
  text = "".join(ch for ch in text.lower() if ch not in set(string.punctuation))
  text = re.sub(r"\b(a|an|the)\b", " ", text)
  return " ".join(text.split())


def _token_f1(target: str, prediction: str) -> float:
  pred_tokens, target_tokens = prediction.split(), target.split()
  common = collections.Counter(pred_tokens) & collections.Counter(target_tokens)
  same = sum(common.values())
  if same == 0:
    return 0.0
  precision, recall = same / len(pred_tokens), same / len(target_tokens)
  return 2 * precision * recall / (precision + recall)


def squad(targets: Sequence[Sequence[str]], predictions: Sequence[str]) -> dict[str, float]:
  """Exact match and token F1, each the max over an example's answers, in percent."""
  _check_lengths("squad", targets, predictions)
  ems, f1s = [], []
  for answers, prediction in zip(targets, predictions):
    answers = [normalize_squad(a) for a in answers]
    prediction = normalize_squad(prediction)
    ems.append(max(float(a == prediction) for a in answers))
    f1s.append(max(_token_f1(a, prediction) for a in answers))
  if not ems:
    return {"em": 0.0, "f1": 0.0}
  return {"em": 100.0 * float(np.mean(ems)), "f1": 100.0 * float(np.mean(f1s))}


def record_max_over_answers(targets: Sequence[dict], predictions: Sequence[dict]):
  """ReCoRD: SQuAD EM/F1 (max over all answers), one prediction per (passage, query).

  The ReCoRD task repeats a query once per answer; only the first copy of each group counts.
  """
  _check_lengths("record", targets, predictions)
  seen, answers, predicted = set(), [], []
  for t, p in zip(targets, predictions):
    if t["group"] in seen:
      continue
    seen.add(t["group"])
    answers.append(t["value"])
    predicted.append(p["value"])
  return squad(answers, predicted)


# -------------------------------------------------------------------------------- free text


def exact_match(targets: Sequence[str], predictions: Sequence[str]) -> dict[str, float]:
  """Percentage of predictions equal to their target after SQuAD's normalisation
  (`normalize_squad`: lower case, no punctuation, articles or extra whitespace)."""
  _check_lengths("exact_match", targets, predictions)
  if not targets:
    return {"exact_match": 0.0}
  hits = [normalize_squad(t) == normalize_squad(p) for t, p in zip(targets, predictions)]
  return {"exact_match": 100.0 * float(np.mean(hits))}


def bleu(targets: Sequence[str], predictions: Sequence[str]) -> dict[str, float]:
  """sacrebleu's corpus BLEU (0-100) with T5's settings: one reference per example, the 'intl'
  tokenizer, exponential smoothing, case-sensitive."""
  _check_lengths("bleu", targets, predictions)
  if not targets:
    return {"bleu": 0.0}
  # Imported here: only text tasks need it.
  import sacrebleu  # pylint: disable=g-import-not-at-top
  result = sacrebleu.corpus_bleu(list(predictions), [list(targets)], smooth_method="exp",
                                 tokenize="intl")
  return {"bleu": float(result.score)}


ROUGE_TYPES = ("rouge1", "rouge2", "rougeLsum")


def _rouge_summary(text: str) -> str:
  """rougeLsum reads one sentence per line: a line break after each ' . ' (T5's preparation)."""
  return text.replace(" . ", " .\n")


def rouge(targets: Sequence[str], predictions: Sequence[str]) -> dict[str, float]:
  """ROUGE-1, ROUGE-2 and ROUGE-Lsum F-measure (rouge-score, Porter stemming), each the mean
  over examples, in percent."""
  _check_lengths("rouge", targets, predictions)
  if not targets:
    return {name: 0.0 for name in ROUGE_TYPES}
  # rouge-score imports nltk (about a second): only text tasks pay for it.
  from rouge_score import rouge_scorer  # pylint: disable=g-import-not-at-top
  scorer = rouge_scorer.RougeScorer(list(ROUGE_TYPES), use_stemmer=True)
  totals = dict.fromkeys(ROUGE_TYPES, 0.0)
  for target, prediction in zip(targets, predictions):
    scores = scorer.score(_rouge_summary(target), _rouge_summary(prediction))
    for name in ROUGE_TYPES:
      totals[name] += scores[name].fmeasure
  return {name: 100.0 * total / len(targets) for name, total in totals.items()}


# ------------------------------------------------------------------------ rank classification


def rank_classification(metric_fns: Sequence[Metric]) -> Callable:
  """A seqio score metric: per example, the candidate label with the highest log-likelihood
  is the prediction; then `metric_fns` (the free-decoding task's metrics) score them.

  Targets (from `glue.rank_classification_postprocessor`) are dicts with `example` (which
  input), `target` (the example's postprocessed target) and `candidate` (the postprocessed
  value this row's label string would have as a prediction); one row per candidate label.
  """
  def rank_metric(targets: Sequence[dict], scores: Sequence[float]) -> dict[str, float]:
    _check_lengths("rank_classification", targets, scores)
    best: dict[Any, tuple[float, Any, Any]] = {}
    order = []
    for t, score in zip(targets, scores):
      key = t["example"]
      if key not in best:
        order.append(key)
      if key not in best or float(score) > best[key][0]:
        best[key] = (float(score), t["target"], t["candidate"])
    gold = [best[k][1] for k in order]
    chosen = [best[k][2] for k in order]
    results = {}
    for fn in metric_fns:
      results.update(fn(gold, chosen))
    return results
  return rank_metric
