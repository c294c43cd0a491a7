"""Metric functions against values computed by hand (working in the comments)."""

from __future__ import annotations

import pytest

from prompt_jax.data import glue, metrics, superglue


def test_accuracy():
  assert metrics.accuracy([1, 0, 1, 1], [1, 1, 1, 0]) == {"accuracy": 50.0}
  with pytest.raises(ValueError, match="3 targets but 2 predictions"):
    metrics.accuracy([1, 0, 1], [1, 0])


def test_f1_counts_invalid_predictions_as_wrong():
  # the -1 at position 2 becomes 0 (wrong): tp=2 (0, 3), fp=1 (1), fn=1 (2) -> 4 / 6
  got = metrics.f1_score_with_invalid([1, 0, 1, 1, 0], [1, 1, -1, 1, 0])
  assert got["f1"] == pytest.approx(100 * 4 / 6)
  assert metrics.f1_score_with_invalid([0, 0], [0, 0])["f1"] == 0.0


def test_matthews_corrcoef():
  # TP=2 TN=1 FP=1 FN=1: (2*1 - 1*1) / sqrt(3 * 3 * 2 * 2) = 1/6
  got = metrics.matthews_corrcoef([1, 1, 1, 0, 0], [1, 1, 0, 0, 1])
  assert got["matthews_corrcoef"] == pytest.approx(100 / 6)
  assert metrics.matthews_corrcoef([1, 0, 1], [1, 1, 1])["matthews_corrcoef"] == 0.0
  assert metrics.matthews_corrcoef([1, 0, 1], [1, 0, 1])["matthews_corrcoef"] == pytest.approx(100)
  # An invalid prediction (-1) is its own class: perfect on the valid ones, below 100 overall.
  assert metrics.matthews_corrcoef([1, 0, 1, 0], [1, 0, -1, 0])["matthews_corrcoef"] < 100


def test_pearson_and_spearman():
  # dt = [-1.5, -.5, .5, 1.5], dp = [-3, -1, 0, 4]: 11 / sqrt(5 * 26)
  got = metrics.pearson_corrcoef([1, 2, 3, 4], [2, 4, 5, 9])
  assert got["pearson_corrcoef"] == pytest.approx(100 * 11 / 130 ** 0.5)
  # rank differences [0, 1, 1, 0]: 1 - 6 * 2 / (4 * 15) = 0.8
  got = metrics.spearman_corrcoef([1, 2, 3, 4], [1, 3, 2, 4])
  assert got["spearman_corrcoef"] == pytest.approx(80.0)


def test_mean_multiclass_f1():
  # class 0: F1 1; class 1: F1 0; class 2: tp 1, fp 1, fn 1 -> 0.5. Mean 0.5.
  got = metrics.mean_multiclass_f1(3)([0, 1, 2, 2], [0, 2, 2, 1])
  assert got == {"mean_3class_f1": pytest.approx(50.0)}


def test_multirc_exact_match_and_f1a_grouped_by_question():
  targets = [{"value": 1, "group": 0}, {"value": 0, "group": 0}, {"value": 1, "group": 1},
             {"value": 1, "group": 1}, {"value": 0, "group": 2}]
  predictions = [{"value": v} for v in (1, 0, 1, 0, 1)]
  # question 0 all right, 1 one answer wrong, 2 wrong -> 1/3
  assert metrics.multirc_exact_match(targets, predictions)["exact_match"] == pytest.approx(
      100 / 3)
  # over answers: tp 2, fp 1, fn 1 -> 4/6
  assert metrics.multirc_f1_over_all_answers(targets, predictions)["f1"] == pytest.approx(
      100 * 4 / 6)


def test_record_max_over_answers_once_per_query():
  targets = [{"value": ["Barack Obama", "Obama"], "group": (0, 0)},
             {"value": ["Barack Obama", "Obama"], "group": (0, 0)},  # same query, ignored
             {"value": ["the Eiffel Tower"], "group": (0, 1)}]
  predictions = [{"value": "Obama."}, {"value": "nonsense"}, {"value": "Eiffel tower in Paris"}]
  got = metrics.record_max_over_answers(targets, predictions)
  # query 1: "eiffel tower" vs "eiffel tower in paris": P 2/4, R 2/2 -> F1 2/3, EM 0
  assert got["em"] == pytest.approx(50.0)
  assert got["f1"] == pytest.approx(100 * (1 + 2 / 3) / 2)


def test_rank_classification_picks_the_most_likely_label():
  rows = []
  for example, gold in enumerate([1, 0, 0]):
    for candidate in (0, 1):
      rows.append({"example": example, "target": gold, "candidate": candidate})
  scores = [-2.0, -1.0,   # -> 1, right
            -0.5, -3.0,   # -> 0, right
            -4.0, -1.0]   # -> 1, wrong
  metric = metrics.rank_classification([metrics.accuracy, metrics.f1_score_with_invalid])
  got = metric(rows, scores)
  assert got["accuracy"] == pytest.approx(200 / 3)
  # predictions [1, 0, 1] vs [1, 0, 0]: tp 1, fp 1 -> 2/3
  assert got["f1"] == pytest.approx(200 / 3)


def test_rank_postprocessor_uses_the_tasks_own_postprocessor():
  example = {"rank_gold": b"True", "targets_pretokenized": b"False", "rank_example": 4,
             "idx/question": 9}
  row = glue.rank_classification_postprocessor(
      "False", example=example, is_target=True,
      base_postprocess_fn=superglue.multirc_postprocessor)
  assert row == {"example": 4, "target": {"value": 1, "group": 9}, "candidate": {"value": 0}}
  assert glue.rank_classification_postprocessor(
      -1.5, example=example, is_target=False,
      base_postprocess_fn=superglue.multirc_postprocessor) == -1.5


def test_label_and_float_postprocessors():
  assert glue.string_label_to_class_id("positive", ("negative", "positive")) == 1
  assert glue.string_label_to_class_id("great", ("negative", "positive")) == -1
  assert glue.string_to_float("3.4") == pytest.approx(3.4)
  assert glue.string_to_float("three") == -1.0


def test_wsc_postprocessor_matches_referents_like_t5():
  example = {"targets_pretokenized": b"the pony", "label": 1}
  assert superglue.wsc_simple_postprocessor("", example=example, is_target=True) == 1
  assert superglue.wsc_simple_postprocessor("The Pony", example=example) == 1
  assert superglue.wsc_simple_postprocessor("pony", example=example) == 1
  assert superglue.wsc_simple_postprocessor("the boy", example=example) == 0
  assert superglue.wsc_simple_postprocessor("the pony's", example=example) == 0
  assert superglue.wsc_simple_postprocessor("the", example=example) == -1
