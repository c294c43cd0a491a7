"""Tasks over the user's own files (`data.file_tasks`): the spec, every error message, the rows
seqio yields, rank classification on the evaluation splits only, mixtures, the text metrics
(checked against sacrebleu / rouge-score and by hand), and a short training run on a JSONL file."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
import seqio

from prompt_jax.data import file_tasks, metrics, pipeline, synthetic
from prompt_jax.training import trainer
from tests.conftest import shared_fixture
from tests.test_trainer import _model

LENGTHS = {"inputs": 64, "targets": 16}


def _write_jsonl(path, rows) -> str:
  path.write_text("".join(json.dumps(row) + "\n" for row in rows))
  return str(path)


def _reviews(n, start=0):
  """n synthetic review rows {'text', 'label'}."""
  examples = synthetic.make_examples("validation")[start:start + n]
  return [{"text": e["sentence"], "label": e["sentiment"]} for e in examples]


def _rows(task, split):
  ds = task.get_dataset(LENGTHS, split=split, shuffle=False)
  return list(ds.as_numpy_iterator())


def _error(spec) -> str:
  with pytest.raises(ValueError) as info:
    pipeline.get_task_or_mixture(spec)
  message = str(info.value)
  assert "\n" not in message, message
  return message


# ------------------------------------------------------------------------------------ spec


def test_the_spec_splits_on_commas_before_known_keys_only():
  spec = ("file:train=a.csv,input=premise: {premise}, hypothesis: {hypothesis}, x=1 {y},"
          "target=label, metrics=accuracy+macro_f1,labels=yes|no")
  assert file_tasks.parse_spec(spec) == {
      "train": "a.csv", "input": "premise: {premise}, hypothesis: {hypothesis}, x=1 {y}",
      "target": "label", "metrics": "accuracy+macro_f1", "labels": "yes|no"}


@pytest.mark.parametrize("spec, unknown", [
    ("file:train=a.jsonl,fo=bar", "fo"),  # after a path
    ("file:trian=a.jsonl", "trian"),  # the first key
    ("file:train=a.jsonl,input={a} {b},output=c", "output"),  # after a template
])
def test_an_unknown_key_is_named_with_the_known_ones(spec, unknown):
  assert _error(spec) == (f"spec {spec!r}: unknown key {unknown!r}; known keys: train, "
                          "validation, test, input, target, metrics, labels, scoring, vocabulary")


def test_other_spec_errors():
  assert "expected key=value, got 'a.jsonl'" in _error("file:a.jsonl")
  assert "key 'train' given twice" in _error("file:train=a.jsonl,train=b.jsonl")
  assert _error("file:train=a.jsonl,metrics=accuracy+blue") == (
      "unknown metric 'blue'; known metrics: accuracy, macro_f1, exact_match, bleu, rouge "
      "(join several with '+')")
  assert "unknown scoring 'ranked'; known: generate, rank" in _error(
      "file:train=a.jsonl,scoring=ranked")
  assert "scoring=rank needs labels=" in _error("file:train=a.jsonl,scoring=rank")
  assert "train='a.jsonl; demo_sentiment' holds a ';'; specs are joined as 'file:...;file:...'" \
      in _error("file:train=a.jsonl; demo_sentiment")


def test_template_rendering():
  values = {"premise": "it rains", "hypothesis": "it is wet", "unused": "x"}
  assert file_tasks.render("premise: {premise} hypothesis: {hypothesis}", values) == (
      "premise: it rains hypothesis: it is wet")
  assert file_tasks.render("{{literal}} {premise}", values) == "{literal} it rains"
  assert file_tasks.render("hypothesis", values) == "it is wet"  # a plain field name
  assert file_tasks.template_fields("{a}, then {b} and {a}") == ["a", "b", "a"]
  for bad in ("{a.b}", "{0}", "{}", "{a:>5}", "{a!r}", "unclosed {a"):
    with pytest.raises(ValueError, match="input template"):
      file_tasks.template_fields(bad)


# ---------------------------------------------------------------------------------- errors


def test_each_bad_row_is_named_by_file_line_and_field(tmp_path):
  good = json.dumps({"text": "fine", "label": "positive"})
  cases = {
      "missing.jsonl": (
          [good, json.dumps({"text": "no label", "sentiment": "negative"})], "",
          "{path}, line 2: field 'label' (target) is missing; the row has fields 'text', "
          "'sentiment'"),
      "empty_target.jsonl": (
          [good, good, json.dumps({"text": "t", "label": "  "})], "",
          "{path}, line 3: the target (field 'label') is empty"),
      "not_json.jsonl": (
          [good, '{"text": "a" "label": "b"}'], "",
          "{path}, line 2: not valid JSON (Expecting ',' delimiter at column 14)"),
      "not_object.jsonl": (
          ['["a", "b"]'], "",
          "{path}, line 1: not a JSON object (got an array); a .jsonl file holds one "
          '{{"field": value, ...}} per line'),
      "template.jsonl": (
          [good, "", json.dumps({"label": "negative", "title": "t"})], ",input=review: {text}",
          "{path}, line 3: field 'text' (in input=review: {{text}}) is missing; the row has "
          "fields 'label', 'title'"),
      "label.jsonl": (
          [good, json.dumps({"text": "b", "label": "neutral"})], ",labels=negative|positive",
          "{path}, line 2: target 'neutral' (field 'label') is not one of "
          "labels=negative|positive"),
      "nested.jsonl": (
          [json.dumps({"text": ["a"], "label": "x"})], "",
          "{path}, line 1: field 'text' (input) is a JSON array, not text"),
      "tabs.csv": (
          ["text\tlabel", "good\tpositive"], "",
          "{path}, line 1: the header is one field 'text\\tlabel' that looks tab-separated, but "
          ".csv files are comma-separated: name it .tsv"),
      "commas.tsv": (
          ["text,label", "good,positive"], "",
          "{path}, line 1: the header is one field 'text,label' that looks comma-separated, but "
          ".tsv files are tab-separated: name it .csv"),
      "columns.csv": (
          ["text,label", "good,positive", "", "one, two, three,negative"], "",
          "{path}, line 4: 4 values but the header has 2 fields (text, label); quote values "
          "that hold a comma"),
      "empty.jsonl": ([], "", "{path}: the file is empty (no rows)"),
      "header_only.tsv": (["text\tlabel"], "",
                          "{path}: the file has a header (text, label) but no rows"),
  }
  for filename, (lines, extra, expected) in cases.items():
    path = tmp_path / filename
    path.write_text("".join(line + "\n" for line in lines))
    spec = f"file:train={path},input=text,target=label{extra}"
    if "input=" in extra:
      spec = f"file:train={path},target=label{extra}"
    assert _error(spec) == expected.format(path=path), filename
  latin1 = tmp_path / "latin1.csv"
  latin1.write_bytes("text,label\nbad,negative\ncaf\xe9 au lait,positive\n".encode("latin-1"))
  assert _error(f"file:train={latin1},input=text,target=label") == (
      f"{latin1}, line 3: not UTF-8 text (invalid continuation byte at byte 27)")


def test_a_missing_file_names_the_path_and_the_working_directory(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  message = _error("file:train=data/train.jsonl")
  assert message == (f"file not found: {os.path.join(os.getcwd(), 'data', 'train.jsonl')} "
                     f"(relative paths are resolved against the working directory "
                     f"{os.getcwd()})")
  assert "Parquet would need pyarrow" in _error("file:train=data/train.parquet")
  assert "unknown format '.txt'; expected .jsonl, .csv, .tsv" in _error("file:train=a.txt")
  assert "vocabulary= 'nothing.model': no such file or directory" in _error(
      "file:train=a.jsonl,vocabulary=nothing.model")
  (tmp_path / "hf_dir").mkdir()
  assert _error("file:train=a.jsonl,vocabulary=hf_dir") == (
      f"vocabulary= directory {os.path.join(os.getcwd(), 'hf_dir')} has no spiece.model")


# ------------------------------------------------------------------------------------ rows


def test_the_rows_seqio_yields_are_the_files_rows_tokenised(tmp_path):
  rows = _reviews(5)
  train = _write_jsonl(tmp_path / "train.jsonl", rows)
  dev = tmp_path / "dev.csv"  # commas and quotes inside a value, CRLF line ends
  dev.write_text('sentence,gold\r\n"good, really ""good""",positive\r\nbad,negative\r\n')
  task = pipeline.get_task_or_mixture(
      f"file:train={train},input=review: {{text}}, ok?,target=label,vocabulary=byte")
  vocab = seqio.ByteVocabulary()
  got = _rows(task, "train")
  assert len(got) == len(rows)
  for example, row in zip(got, rows):
    expected_input = f"review: {row['text']}, ok?"
    assert example["inputs_pretokenized"].decode() == expected_input
    np.testing.assert_array_equal(example["inputs"], vocab.encode(expected_input) + [1])
    np.testing.assert_array_equal(example["targets"], vocab.encode(row["label"]) + [1])
  csv_task = pipeline.get_task_or_mixture(f"file:validation={dev},input=sentence,target=gold,"
                                          "vocabulary=byte")
  assert [(x["inputs_pretokenized"].decode(), x["targets_pretokenized"].decode())
          for x in _rows(csv_task, "validation")] == [('good, really "good"', "positive"),
                                                      ("bad", "negative")]
  assert csv_task.splits == ("validation",)


def test_jsonl_lines_end_at_newlines_only(tmp_path):
  """CRLF line ends, a blank line, and U+2028 (a line break for str.splitlines) inside a JSON
  string written unescaped."""
  path = tmp_path / "crlf.jsonl"
  rows = [{"inputs": "one\u2028two", "targets": "x"}, {"inputs": "three", "targets": "y"}]
  path.write_text("\r\n".join([json.dumps(rows[0], ensure_ascii=False), "",
                                json.dumps(rows[1])]) + "\r\n", encoding="utf-8")
  task = pipeline.get_task_or_mixture(f"file:train={path},vocabulary=byte")
  assert [(x["inputs_pretokenized"].decode(), x["targets_pretokenized"].decode())
          for x in _rows(task, "train")] == [(r["inputs"], r["targets"]) for r in rows]
  assert _error(f"file:validation={path},labels=x") == (
      f"{path}, line 3: target 'y' (field 'targets') is not one of labels=x")


def test_a_sentencepiece_model_file_or_directory_tokenises_with_that_model(tmp_path):
  model = shared_fixture("t5_spiece.model")
  (tmp_path / "hf_model").mkdir()
  shutil.copy(model, tmp_path / "hf_model" / "spiece.model")
  train = _write_jsonl(tmp_path / "t.jsonl", [{"inputs": "the soup was bland",
                                                "targets": "negative"}])
  vocab = seqio.SentencePieceVocabulary(str(model))
  for where in (model, tmp_path / "hf_model"):
    task = pipeline.get_task_or_mixture(f"file:train={train},vocabulary={where}")
    (example,) = _rows(task, "train")
    np.testing.assert_array_equal(example["inputs"], vocab.encode("the soup was bland") + [1])
    np.testing.assert_array_equal(example["targets"], vocab.encode("negative") + [1])
    assert task.output_features["inputs"].vocabulary.vocab_size == vocab.vocab_size


def test_rank_scoring_expands_the_evaluation_splits_only(tmp_path):
  labels = ("negative", "positive", "neutral")
  train = _write_jsonl(tmp_path / "train.jsonl", _reviews(4))
  dev = _write_jsonl(tmp_path / "dev.jsonl", _reviews(3, start=4))
  spec = (f"file:train={train},validation={dev},input=text,target=label,vocabulary=byte,"
          f"labels={'|'.join(labels)},scoring=rank,metrics=accuracy+macro_f1")
  task = pipeline.get_task_or_mixture(spec)
  train_rows = _rows(task, "train")
  assert len(train_rows) == 4 and not any("rank_gold" in x for x in train_rows)
  assert [x["targets_pretokenized"].decode() for x in train_rows] == [
      r["label"] for r in _reviews(4)]
  dev_rows = _rows(task, "validation")
  gold = [r["label"] for r in _reviews(3, start=4)]
  assert [x["targets_pretokenized"].decode() for x in dev_rows] == list(labels) * 3
  assert [x["rank_gold"].decode() for x in dev_rows] == [g for g in gold for _ in labels]
  assert [int(x["rank_example"]) for x in dev_rows] == [0, 0, 0, 1, 1, 1, 2, 2, 2]
  # The rank metric takes the likeliest label per example as the prediction: score the gold
  # label highest, except in example 0 where 'neutral' (no review's label) wins.
  targets = [task.postprocess_fn(None, example=x, is_target=True) for x in dev_rows]
  scores = [1.0 if t["candidate"] == t["target"] else 0.0 for t in targets]
  scores[0:3] = [0.0, 0.0, 1.0]
  chosen = ["neutral"] + gold[1:]
  (rank_metric,) = task.metric_fns
  assert rank_metric(targets, scores) == pytest.approx({
      **metrics.accuracy(gold, chosen), **metrics.macro_f1(gold, chosen)})
  assert rank_metric(targets, scores)["accuracy"] == pytest.approx(200 / 3)


def test_same_spec_same_task_and_a_taken_name_is_refused(tmp_path, monkeypatch):
  train = _write_jsonl(tmp_path / "train.jsonl", _reviews(3))
  spec = f"file:train={train},input=text,target=label,vocabulary=byte"
  first = pipeline.get_task_or_mixture(spec)
  assert pipeline.get_task_or_mixture(spec) is first
  assert seqio.get_mixture_or_task(spec) is first  # what seqio.get_dataset/Evaluator look up
  assert first.name.startswith("file_train_") and seqio.get_mixture_or_task(first.name) is first
  monkeypatch.chdir(tmp_path)  # the relative path names the same file: the same task
  assert file_tasks.register_spec("file:train=train.jsonl,input=text,target=label,"
                                  "vocabulary=byte") == first.name
  other = file_tasks.register_spec(f"file:train={train},input=text,target=label,"
                                   "vocabulary=byte,metrics=exact_match")
  assert other != first.name
  name = file_tasks.register_file_task("my_reviews_task", train=train, input="text",
                                       target="label", vocabulary="byte")
  assert name == "my_reviews_task"
  with pytest.raises(ValueError, match="'my_reviews_task' is already registered by a file "
                                       "task with other files or options"):
    file_tasks.register_file_task("my_reviews_task", train=train, input="text",
                                  target="label", vocabulary="byte", metrics=["bleu"])
  with pytest.raises(ValueError, match="'demo_sentiment' is already registered by another"):
    file_tasks.register_file_task("demo_sentiment", train=train, vocabulary="byte")


def test_two_file_tasks_make_a_mixture_at_the_rate_of_their_rows(tmp_path):
  a = _write_jsonl(tmp_path / "a.jsonl", [{"inputs": f"a{i}", "targets": "x"} for i in range(6)])
  b = _write_jsonl(tmp_path / "b.jsonl", [{"inputs": f"b{i}", "targets": "y"} for i in range(2)])
  spec = f"file:train={a},vocabulary=byte; file:train={b},vocabulary=byte"
  mixture = pipeline.get_task_or_mixture(spec)
  assert isinstance(mixture, seqio.Mixture) and seqio.get_mixture_or_task(spec) is mixture
  assert sorted(mixture.get_rate(t) for t in mixture.tasks) == [2.0, 6.0]
  ds = seqio.get_dataset(spec, task_feature_lengths=LENGTHS, dataset_split="train", seed=0,
                         feature_converter=seqio.PassThroughFeatureConverter(), num_epochs=None)
  firsts = [chr(x["inputs"][0] - 3) for x in ds.take(400).as_numpy_iterator()]
  assert 0.65 < firsts.count("a") / len(firsts) < 0.85  # 6 / 8 = 0.75
  # From Python: named file tasks join a seqio mixture like any task.
  named = file_tasks.register_file_task("mixed_reviews_a", train=a, vocabulary="byte")
  seqio.MixtureRegistry.add("mixed_reviews_mixture", [(named, 1.0), ("demo_sentiment", 1.0)])
  assert {t.name for t in seqio.get_mixture_or_task("mixed_reviews_mixture").tasks} == {
      "mixed_reviews_a", "demo_sentiment"}


def test_examples_task_from_pairs_and_dicts():
  name = file_tasks.register_examples_task(
      train=[("the soup was bland", "negative"), ("a lovely trip", "positive")],
      validation=[("dull", "negative")], vocabulary="byte", labels=["negative", "positive"])
  assert name == file_tasks.register_examples_task(
      train=[("the soup was bland", "negative"), ("a lovely trip", "positive")],
      validation=[("dull", "negative")], vocabulary="byte", labels=["negative", "positive"])
  task = seqio.get_mixture_or_task(name)
  assert [x["inputs_pretokenized"].decode() for x in _rows(task, "train")] == [
      "the soup was bland", "a lovely trip"]
  dicts = file_tasks.register_examples_task(
      train=[{"q": "2+2", "a": 4}, {"q": "1+1", "a": 2}], input="question: {q}", target="a",
      vocabulary="byte", metrics="exact_match")
  assert [(x["inputs_pretokenized"].decode(), x["targets_pretokenized"].decode())
          for x in _rows(seqio.get_mixture_or_task(dicts), "train")] == [
              ("question: 2+2", "4"), ("question: 1+1", "2")]
  with pytest.raises(ValueError, match=r"^train\[1\]: target 'maybe' \(field 'targets'\) is not "
                                       r"one of labels=negative\|positive$"):
    file_tasks.register_examples_task(train=[("a", "negative"), ("b", "maybe")],
                                      labels="negative|positive", vocabulary="byte")
  with pytest.raises(ValueError, match=r"^validation\[0\]: expected an \(input, target\) pair"):
    file_tasks.register_examples_task(train=[("a", "b")], validation=["just text"],
                                      vocabulary="byte")


# --------------------------------------------------------------------------------- metrics


def test_macro_f1_by_hand():
  targets = ["a", "a", "b", "c"]
  predictions = ["a", "b", "b", "x"]  # 'x' is no label: wrong
  # a: tp 1, fp 0, fn 1 -> 2/3; b: tp 1, fp 1, fn 0 -> 2/3; c: tp 0 -> 0. Mean 4/9.
  assert metrics.macro_f1(targets, predictions)["macro_f1"] == pytest.approx(100 * 4 / 9)

  def f1(label):  # precision/recall form, independent of the metric's tp/fp/fn form
    predicted = [t for t, p in zip(targets, predictions) if p == label]
    actual = [p for t, p in zip(targets, predictions) if t == label]
    precision = predicted.count(label) / len(predicted) if predicted else 0.0
    recall = actual.count(label) / len(actual)
    return 0.0 if precision + recall == 0 else 2 * precision * recall / (precision + recall)
  assert metrics.macro_f1(targets, predictions)["macro_f1"] == pytest.approx(
      100 * np.mean([f1(label) for label in "abc"]))
  assert metrics.macro_f1(targets, targets)["macro_f1"] == pytest.approx(100.0)
  with pytest.raises(ValueError, match="macro_f1: 4 targets but 3 predictions"):
    metrics.macro_f1(targets, predictions[:3])


def test_exact_match_normalises_like_squad():
  assert metrics.exact_match(["The Cat!", "a  dog", "x"], ["cat", "Dog.", "y"]) == {
      "exact_match": pytest.approx(200 / 3)}


def test_bleu_against_sacrebleu_and_by_hand():
  import sacrebleu
  targets = ["the cat sat on the mat", "a quick brown fox jumps", "hello world again"]
  predictions = ["the cat sat on a mat", "a quick fox jumps over", "hello world again"]
  direct = sacrebleu.corpus_bleu(predictions, [targets], smooth_method="exp",
                                 tokenize="intl").score
  assert metrics.bleu(targets, predictions)["bleu"] == pytest.approx(direct)
  assert 0 < direct < 100
  assert metrics.bleu(targets, targets)["bleu"] == pytest.approx(100.0)
  assert metrics.bleu(["a b c d"], ["e f g h"])["bleu"] == pytest.approx(0.0)


def test_rouge_against_rouge_score_and_by_hand():
  from rouge_score import rouge_scorer
  targets = ["the cats sat on the mat . it was warm", "dogs bark loudly"]
  predictions = ["the cat sat . it was warm", "a dog barked"]
  scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeLsum"], use_stemmer=True)
  ours = metrics.rouge(targets, predictions)
  for name in ("rouge1", "rouge2", "rougeLsum"):
    direct = np.mean([scorer.score(t.replace(" . ", " .\n"), p.replace(" . ", " .\n"))[name]
                      .fmeasure for t, p in zip(targets, predictions)])
    assert ours[name] == pytest.approx(100 * direct)
  # By hand: 'the cat sat' against 'the cat sat on the mat': unigrams P 3/3, R 3/6 -> F 2/3;
  # bigrams P 2/2, R 2/5 -> F 4/7; longest common subsequence 3 -> F 2/3.
  by_hand = metrics.rouge(["the cat sat on the mat"], ["the cat sat"])
  assert by_hand == pytest.approx({"rouge1": 200 / 3, "rouge2": 400 / 7, "rougeLsum": 200 / 3})
  assert metrics.rouge(targets, targets) == pytest.approx(
      {"rouge1": 100.0, "rouge2": 100.0, "rougeLsum": 100.0})


# ----------------------------------------------------------------------------- end to end


def test_training_on_a_jsonl_file(tmp_path):
  train = _write_jsonl(tmp_path / "train.jsonl", _reviews(20))
  dev = _write_jsonl(tmp_path / "dev.jsonl", _reviews(6, start=20))
  spec = (f"file:train={train},validation={dev},input=text,target=label,vocabulary=byte,"
          "labels=negative|positive,scoring=rank,metrics=accuracy+macro_f1")
  lengths = {"inputs": 48, "targets": 8}
  summary = trainer.train(
      model=_model(), model_dir=str(tmp_path / "run"), train_steps=3,
      train_dataset_cfg=pipeline.DatasetConfig(spec, lengths, batch_size=4),
      eval_dataset_cfg=pipeline.DatasetConfig(spec, lengths, split="validation",
                                              batch_size=4, shuffle=False),
      checkpoint_every_steps=3, log_every_steps=1)
  assert summary["step"] == 3 and np.isfinite(summary["train"]["loss"])
  for key in ("eval_untrained", "eval_trained"):
    scores = summary[key]
    assert set(scores) >= {"accuracy", "macro_f1"}, scores
    assert scores["accuracy"] * 6 / 100 == pytest.approx(round(scores["accuracy"] * 6 / 100))
    assert 0 <= scores["macro_f1"] <= 100
