"""GLUE/SuperGLUE seqio tasks on `tfds.testing.mock_data`: every registered task yields
correctly shaped, correctly prefixed, correctly labelled examples."""

from __future__ import annotations

import atexit
import contextlib
import functools
import os
import re
import shutil
import tempfile

import numpy as np
import pytest
import seqio
import tensorflow_datasets as tfds

import prompt_jax.tasks  # noqa: F401  (registers everything)
from prompt_jax.data import glue, pipeline, superglue
from tests.conftest import shared_fixture

LENGTHS = {"inputs": 256, "targets": 32}
NUM_EXAMPLES = 3

# T5's input formats, written out by hand: (start of inputs, other keys in order).
EXPECTED_FORMAT = {
    "glue_cola_v002": ("cola sentence: ", []),
    "glue_sst2_v002": ("sst2 sentence: ", []),
    "glue_mrpc_v002": ("mrpc sentence1: ", ["sentence2: "]),
    "glue_qqp_v002": ("qqp question1: ", ["question2: "]),
    "glue_stsb_v002": ("stsb sentence1: ", ["sentence2: "]),
    "glue_mnli_v002": ("mnli hypothesis: ", ["premise: "]),
    "glue_mnli_matched_v002": ("mnli hypothesis: ", ["premise: "]),
    "glue_mnli_mismatched_v002": ("mnli hypothesis: ", ["premise: "]),
    "glue_qnli_v002": ("qnli question: ", ["sentence: "]),
    "glue_rte_v002": ("rte sentence1: ", ["sentence2: "]),
    "glue_wnli_v002": ("wnli sentence1: ", ["sentence2: "]),
    "glue_ax_v002": ("mnli hypothesis: ", ["premise: "]),
    "super_glue_boolq_v102": ("boolq passage: ", ["question: "]),
    "super_glue_cb_v102": ("cb hypothesis: ", ["premise: "]),
    "super_glue_copa_v102": ("copa choice1: ", ["choice2: ", "premise: ", "question: "]),
    "super_glue_multirc_v102": ("multirc question: ", ["answer: ", "paragraph: "]),
    "super_glue_record_v102": ("record query: ", ["entities: ", "passage: "]),
    "super_glue_rte_v102": ("rte hypothesis: ", ["premise: "]),
    "super_glue_wic_v102": ("wic sentence1: ", ["sentence2: ", "word: "]),
    "super_glue_axb_v102": ("rte hypothesis: ", ["premise: "]),
    "super_glue_axg_v102": ("rte hypothesis: ", ["premise: "]),
    "super_glue_wsc_v102_simple_train": ("wsc: ", []),
    "super_glue_wsc_v102_simple_eval": ("wsc: ", []),
}
LABELS = {
    "glue_cola_v002": ["unacceptable", "acceptable"],
    "glue_sst2_v002": ["negative", "positive"],
    "glue_mrpc_v002": ["not_equivalent", "equivalent"],
    "glue_qqp_v002": ["not_duplicate", "duplicate"],
    "glue_mnli_v002": ["entailment", "neutral", "contradiction"],
    "glue_mnli_matched_v002": ["entailment", "neutral", "contradiction"],
    "glue_mnli_mismatched_v002": ["entailment", "neutral", "contradiction"],
    "glue_qnli_v002": ["entailment", "not_entailment"],
    "glue_rte_v002": ["entailment", "not_entailment"],
    "glue_wnli_v002": ["not_entailment", "entailment"],
    "glue_ax_v002": ["entailment", "neutral", "contradiction"],
    "super_glue_boolq_v102": ["False", "True"],
    "super_glue_cb_v102": ["entailment", "contradiction", "neutral"],
    "super_glue_copa_v102": ["choice1", "choice2"],
    "super_glue_multirc_v102": ["False", "True"],
    "super_glue_rte_v102": ["entailment", "not_entailment"],
    "super_glue_wic_v102": ["False", "True"],
    "super_glue_axb_v102": ["entailment", "not_entailment"],
    "super_glue_axg_v102": ["entailment", "not_entailment"],
}
SPECS = {spec.name: spec for spec in glue.glue_specs() + superglue.super_glue_specs()}


def _variants():
  for base, spec in SPECS.items():
    for name in glue.task_names(spec):
      yield base, name


VARIANTS = sorted(_variants(), key=lambda v: v[1])


def test_every_t5_task_and_mixture_is_registered():
  assert set(EXPECTED_FORMAT) == set(SPECS)
  registered = set(seqio.TaskRegistry.names())
  for _, name in VARIANTS:
    assert name in registered and name + "_bytes" in registered
  mixtures = set(seqio.MixtureRegistry.names())
  for name in ("glue_v002_proportional", "super_glue_v102_proportional"):
    for variant in (name, "taskless_" + name, name + "_bytes", "taskless_" + name + "_bytes"):
      assert variant in mixtures
  glue_mixture = seqio.get_mixture_or_task("glue_v002_proportional")
  rates = {t.name: glue_mixture.get_rate(t) for t in glue_mixture.tasks}
  assert rates["glue_sst2_v002"] == 67_349 and rates["glue_mnli_matched_v002"] == 0
  assert "glue_wnli_v002" in rates and rates["glue_wnli_v002"] == 0


def test_t5_names_use_the_t5_sentencepiece_vocabulary_by_default(monkeypatch):
  vocab = seqio.get_mixture_or_task("glue_sst2_v002").output_features["targets"].vocabulary
  assert isinstance(vocab, seqio.SentencePieceVocabulary)
  monkeypatch.delenv(glue.VOCABULARY_ENV, raising=False)
  assert glue.default_vocabulary().sentencepiece_model_file == glue.DEFAULT_SENTENCEPIECE_MODEL
  monkeypatch.setenv(glue.VOCABULARY_ENV, "byte")
  assert isinstance(glue.default_vocabulary(), seqio.ByteVocabulary)
  bytes_vocab = seqio.get_mixture_or_task("glue_sst2_v002_bytes").output_features[
      "inputs"].vocabulary
  assert isinstance(bytes_vocab, seqio.ByteVocabulary)


@functools.cache
def _mock_metadata_dir(num_examples: int) -> str:
  """Split metadata (names and sizes, which seqio reads) for every GLUE/SuperGLUE dataset, as a
  prepared dataset has; written once per process into a temporary data dir."""
  data_dir = tempfile.mkdtemp(prefix="mock_glue_")
  atexit.register(shutil.rmtree, data_dir, ignore_errors=True)
  splits_of: dict[str, set] = {}
  for spec in SPECS.values():
    splits_of.setdefault(spec.tfds_name, set()).update(spec.splits)
  for tfds_name, splits in splits_of.items():
    name, version = tfds_name.split(":")
    builder = tfds.builder(name, data_dir=data_dir, version=version)
    template = tfds.core.ShardedFileTemplate(
        data_dir=builder.data_dir, template="{DATASET}-{SPLIT}.{FILEFORMAT}-{SHARD_X_OF_Y}",
        dataset_name=builder.name, filetype_suffix="tfrecord")
    builder.info.set_splits(tfds.core.SplitDict([
        tfds.core.SplitInfo(name=s, shard_lengths=[num_examples], num_bytes=0,
                            filename_template=template.replace(split=s))
        for s in sorted(splits)]))
    os.makedirs(builder.data_dir, exist_ok=True)
    builder.info.write_to_directory(builder.data_dir)
  return data_dir


@contextlib.contextmanager
def mock_glue(num_examples: int = NUM_EXAMPLES):
  """`tfds.testing.mock_data` for every GLUE/SuperGLUE dataset (random text and labels)."""
  with tfds.testing.mock_data(num_examples=num_examples,
                              data_dir=_mock_metadata_dir(num_examples)):
    yield


def _eval_split(name: str) -> str:
  splits = seqio.get_mixture_or_task(name).splits
  for split in ("validation", "validation_matched", "train", "test"):
    if split in splits:
      return split
  raise AssertionError(splits)


def _examples(name: str, split: str):
  task = seqio.get_mixture_or_task(name)
  with mock_glue():
    ds = task.get_dataset(LENGTHS, split=split, shuffle=False, use_cached=False)
    return list(ds.as_numpy_iterator())


def _check_example(base: str, name: str, ex: dict, vocab: seqio.Vocabulary):
  prefix, keys = EXPECTED_FORMAT[base]
  if name.startswith("taskless_"):
    prefix = prefix.split(" ", 1)[1]
  inputs = ex["inputs_pretokenized"].decode()
  targets = ex["targets_pretokenized"].decode()
  assert inputs.startswith(prefix), (name, inputs)
  position = len(prefix)
  for key in keys:  # the other fields appear in T5's order
    found = inputs.find(" " + key, position)
    assert found > 0, (name, key, inputs)
    position = found
  for feature, text in (("inputs", inputs), ("targets", targets)):
    tokens = ex[feature]
    assert tokens.ndim == 1 and tokens.dtype == np.int32
    expected = list(vocab.encode(text))[:LENGTHS[feature] - 1] + [1]
    np.testing.assert_array_equal(tokens, expected)
  if base in LABELS:
    assert targets in LABELS[base]
  elif base == "glue_stsb_v002":
    value = float(targets)
    assert re.fullmatch(r"\d\.\d", targets) and 0 <= value <= 5
    assert abs(value * 5 - round(value * 5)) < 1e-6
  elif base == "super_glue_record_v102":
    assert targets in {a.decode() for a in ex["answers"]}
  elif "wsc" in base:
    assert "*" in inputs


@pytest.mark.parametrize("base,name", VARIANTS, ids=[v[1] for v in VARIANTS])
def test_mock_pipeline_yields_t5_formatted_examples(base, name):
  """Every variant (byte-vocabulary twin, so no vocabulary file is needed)."""
  name_bytes = name + "_bytes"
  split = _eval_split(name_bytes)
  examples = _examples(name_bytes, split)
  vocab = seqio.ByteVocabulary()
  if name.endswith("_rank"):
    labels = LABELS[base]
    assert len(examples) == NUM_EXAMPLES * len(labels)
    for i, ex in enumerate(examples):  # one row per candidate label, in label order
      assert ex["targets_pretokenized"].decode() == labels[i % len(labels)]
      assert int(ex["rank_example"]) == i // len(labels)
      assert ex["rank_gold"].decode() in labels
  elif base == "super_glue_wsc_v102_simple_train":
    assert all(int(ex["label"]) == 1 for ex in examples)
  elif base != "super_glue_record_v102":
    assert len(examples) == NUM_EXAMPLES
  assert examples, name
  for ex in examples:
    _check_example(base, name, ex, vocab)


def test_rank_variants_are_evaluation_only():
  assert "train" not in seqio.get_mixture_or_task("glue_sst2_v002_rank").splits
  assert "train" in seqio.get_mixture_or_task("glue_sst2_v002").splits


@pytest.fixture(scope="module")
def t5_vocabulary():
  vocab = seqio.SentencePieceVocabulary(str(shared_fixture("t5_spiece.model")))
  glue.register(vocab, suffix="_fixture_spm")
  superglue.register(vocab, suffix="_fixture_spm")
  return vocab


@pytest.mark.parametrize("base", sorted(SPECS))
def test_sentencepiece_tasks_tokenise_with_the_t5_vocabulary(t5_vocabulary, base):
  name = base + "_fixture_spm"
  examples = _examples(name, _eval_split(name))
  assert examples
  for ex in examples:
    _check_example(base, base, ex, t5_vocabulary)


def test_sst2_label_ids_match_the_t5_vocabulary(t5_vocabulary):
  """README facts of the real model: positive -> 1465, negative -> 2841 (+ EOS 1)."""
  ids = {ex["targets_pretokenized"].decode(): list(ex["targets"])
         for ex in _examples("glue_sst2_v002_rank_fixture_spm", "validation")}
  assert ids == {"positive": [1465, 1], "negative": [2841, 1]}


def test_wsc_marks_the_pronoun_and_record_expands_answers():
  """Hand-made examples through the real preprocessors."""
  import tensorflow as tf
  wsc = tf.data.Dataset.from_tensors({
      "text": "Mark told Pete many lies about himself , which Pete included in his book .",
      "span1_text": "Pete", "span1_index": 2, "span2_text": "his", "span2_index": 12,
      "label": 1, "idx": 0})
  (ex,) = list(superglue.wsc_simple(wsc, correct_referent_only=True).as_numpy_iterator())
  assert ex["inputs"].decode() == ("wsc: Mark told Pete many lies about himself , which Pete "
                                   "included in *his* book .")
  assert ex["targets"].decode() == "Pete"
  rec = tf.data.Dataset.from_tensors({
      "passage": "Obama met Merkel.\n@highlight\nTalks went well", "query": "@placeholder met",
      "entities": ["Obama", "Merkel"], "answers": ["Obama", "Barack Obama"],
      "idx": {"passage": 4, "query": 7}})
  rows = list(superglue.record(rec).as_numpy_iterator())
  assert [r["targets"].decode() for r in rows] == ["Obama", "Barack Obama"]
  assert rows[0]["inputs"].decode() == ("record query: @placeholder met entities: Obama, Merkel "
                                        "passage: Obama met Merkel. Talks went well")
  assert all(int(r["idx/query"]) == 7 for r in rows)


def test_stsb_rounds_to_a_fifth():
  import tensorflow as tf
  ds = tf.data.Dataset.from_tensor_slices({
      "sentence1": ["a", "b", "c"], "sentence2": ["d", "e", "f"],
      "label": np.array([1.79, 3.35, 4.91], np.float32), "idx": [0, 1, 2]})
  targets = [ex["targets"].decode() for ex in glue.stsb_text(ds).as_numpy_iterator()]
  assert targets == ["1.8", "3.4", "5.0"]


def test_unknown_task_lists_closest_names():
  with pytest.raises(ValueError, match="glue_sst2_v002"):
    pipeline.get_task_or_mixture("glue_sst_v002", "prompt_jax.tasks")


def test_superglue_mixture_yields_training_batches():
  """The proportional mixture mixes tasks with different extra fields (ReCoRD's answers, WSC's
  label) into one stream of encoder-decoder batches."""
  cfg = pipeline.DatasetConfig("taskless_super_glue_v102_proportional_bytes",
                               {"inputs": 128, "targets": 16}, batch_size=4,
                               module="prompt_jax.tasks")
  with mock_glue():
    batch = next(pipeline.iterate_batches(cfg))
  assert batch["encoder_input_tokens"].shape == (4, 128)
  assert batch["decoder_target_tokens"].shape == (4, 16)
  mixture = seqio.get_mixture_or_task(cfg.mixture_or_task_name)
  rates = {t.name: mixture.get_rate(t) for t in mixture.tasks}
  assert rates["taskless_super_glue_record_v102_bytes"] == 138_854
  assert rates["taskless_super_glue_wsc_v102_simple_eval_bytes"] == 0
