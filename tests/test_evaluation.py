"""End to end on mock GLUE data: prompt-tune the tiny demo model, evaluate (greedy decoding and
rank classification) and get the metric table; metrics checked against an independent
computation from the model's own outputs."""

from __future__ import annotations

import glob
import json
import os

import numpy as np
import pytest
import seqio

import prompt_jax.tasks  # noqa: F401  (registers the GLUE tasks)
from prompt_jax import params
from prompt_jax.data import pipeline
from prompt_jax.models import decoding, t5
from prompt_jax.models.encoder_decoder import EncoderDecoderModel
from prompt_jax.prompts import initializers
from prompt_jax.prompts.base import InputPrompt
from prompt_jax.prompts.plain import Prompt
from prompt_jax.serving import evaluation, evaluators, loading
from prompt_jax.training import trainer
from tests.test_tasks_glue import mock_glue

LENGTHS = {"inputs": 96, "targets": 16}
NUM_EXAMPLES = 8
TASK = "taskless_glue_sst2_v002_bytes"
DEMO_CHECKPOINT = "builtin:demo_t5_tiny.npz"


def _model():
  return EncoderDecoderModel(
      t5.Transformer(t5.preset("tiny"), InputPrompt(Prompt(4, initializers.uniform()))))


def _cfg(name, split="validation", batch_size=8, shuffle=False):
  return pipeline.DatasetConfig(name, LENGTHS, split=split, batch_size=batch_size,
                                shuffle=shuffle, module="prompt_jax.tasks")


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
  """4 training steps on mock SST-2 (byte vocabulary), with evaluation before and after."""
  model_dir = str(tmp_path_factory.mktemp("glue_run"))
  with mock_glue(NUM_EXAMPLES):
    summary = trainer.train(
        model=_model(), model_dir=model_dir, train_steps=4,
        train_dataset_cfg=_cfg(TASK, split="train", shuffle=True),
        eval_dataset_cfg=_cfg(TASK), initial_checkpoint_path=DEMO_CHECKPOINT,
        checkpoint_every_steps=4, eval_every_steps=2, log_every_steps=2)
  return model_dir, summary


def _validation_examples(name):
  task = seqio.get_mixture_or_task(name)
  with mock_glue(NUM_EXAMPLES):
    ds = task.get_dataset(LENGTHS, split="validation", shuffle=False)
    return list(ds.as_numpy_iterator())


@pytest.fixture(scope="module")
def restored(trained_run):
  """(trainer, frozen params, prompt params, step) restored from the run's MODEL_DIR."""
  pt, frozen = loading.build_programs(_model(), DEMO_CHECKPOINT)
  prompt, step = loading.load_prompt_params(pt, frozen, model_dir=trained_run[0])
  return pt, frozen, prompt, step


def test_train_then_eval_reports_t5_metrics(trained_run):
  _, summary = trained_run
  for key in ("eval_untrained", "eval_trained"):
    accuracy = summary[key]["accuracy"]
    assert accuracy * NUM_EXAMPLES / 100 == pytest.approx(round(accuracy * NUM_EXAMPLES / 100))
  assert summary["step"] == 4


def test_greedy_accuracy_matches_decoding_by_hand(trained_run, restored):
  _, summary = trained_run
  pt, frozen, prompt, step = restored
  assert step == 4
  examples = _validation_examples(TASK)
  tokens = np.zeros((len(examples), LENGTHS["inputs"]), np.int32)
  for i, ex in enumerate(examples):
    tokens[i, :len(ex["inputs"])] = ex["inputs"]
  batch, _ = pipeline.pad_batch({"encoder_input_tokens": tokens}, 8)
  out = pt.predict(prompt, frozen, batch, LENGTHS["targets"])
  vocab = seqio.ByteVocabulary()
  hits = [vocab.decode([int(t) for t in row]) == ex["targets_pretokenized"].decode()
          for row, ex in zip(out, examples)]
  assert summary["eval_trained"]["accuracy"] == pytest.approx(100 * np.mean(hits))


def test_beam_search_accuracy_is_the_accuracy_of_its_best_decode(restored):
  """`evaluate(decoding=BeamSearch(...))`: the metric sees the first (best) beam, checked by
  decoding the validation split with the programs and comparing strings by hand."""
  pt, frozen, prompt, _ = restored
  beams = decoding.BeamSearch(num_decodes=3, alpha=0.6)
  examples = _validation_examples(TASK)
  tokens = np.zeros((len(examples), LENGTHS["inputs"]), np.int32)
  for i, ex in enumerate(examples):
    tokens[i, :len(ex["inputs"])] = ex["inputs"]
  batch, _ = pipeline.pad_batch({"encoder_input_tokens": tokens}, 8)
  out, scores = pt.predict(prompt, frozen, batch, LENGTHS["targets"], beams, return_scores=True)
  assert out.shape == (8, 3, LENGTHS["targets"]) and np.all(np.diff(scores, axis=1) <= 0)
  vocab = seqio.ByteVocabulary()
  hits = [vocab.decode([int(t) for t in rows[0]]) == ex["targets_pretokenized"].decode()
          for rows, ex in zip(out, examples)]
  with mock_glue(NUM_EXAMPLES):
    got = evaluators.TaskEvaluator(_cfg(TASK), max_decode_length=LENGTHS["targets"],
                                   decoding=beams)(pt, prompt, frozen, 0)
  assert got["accuracy"] == pytest.approx(100 * np.mean(hits))


def test_a_greedy_only_evaluator_refuses_another_decoding():
  with mock_glue(NUM_EXAMPLES), pytest.raises(ValueError, match="decodes greedily only"):
    evaluation.run_evaluation(model=_model(), dataset_cfg=_cfg(TASK), evaluator="ensemble",
                              decoding=decoding.BeamSearch())


def test_an_unknown_evaluator_is_refused_with_the_known_ones():
  with pytest.raises(ValueError, match="unknown evaluator 'ensembel'; known: task, ensemble"):
    evaluation.make_evaluator("ensembel", _cfg(TASK), max_decode_length=8)


def test_prompt_jax_eval_on_a_rank_task_prints_the_table(trained_run, restored, capsys):
  model_dir, _ = trained_run
  rank_task = TASK.replace("_bytes", "_rank_bytes")
  with mock_glue(NUM_EXAMPLES):
    result = evaluation.run_evaluation(
        model=_model(), dataset_cfg=_cfg(rank_task), initial_checkpoint_path=DEMO_CHECKPOINT,
        model_dir=model_dir)
  printed = capsys.readouterr().out
  assert "accuracy" in printed and f"{result['metrics']['accuracy']:8.2f}" in printed
  assert result["step"] == 4
  assert glob.glob(os.path.join(model_dir, "eval_validation", "events.out.tfevents.*"))
  with open(os.path.join(model_dir, "eval_validation", f"{rank_task}-metrics.jsonl")) as f:
    assert json.loads(f.readline())["accuracy"] == pytest.approx(result["metrics"]["accuracy"])

  # Independently: score both label strings of every example, pick the larger.
  pt, frozen, prompt, _ = restored
  vocab = seqio.ByteVocabulary()
  examples = _validation_examples(TASK)
  labels = ["negative", "positive"]
  encoder = np.zeros((len(examples) * 2, LENGTHS["inputs"]), np.int32)
  target = np.zeros((len(examples) * 2, LENGTHS["targets"]), np.int32)
  for i, ex in enumerate(examples):
    for j, label in enumerate(labels):
      ids = list(vocab.encode(label)) + [1]
      encoder[2 * i + j, :len(ex["inputs"])] = ex["inputs"]
      target[2 * i + j, :len(ids)] = ids
  batch = {"encoder_input_tokens": encoder, "decoder_target_tokens": target,
           "decoder_input_tokens": np.pad(target[:, :-1], ((0, 0), (1, 0))),
           "decoder_loss_weights": (target > 0).astype(np.int32)}
  scores = np.asarray(pt.model.score_batch(params.merge_params(prompt, frozen), batch))
  chosen = scores.reshape(len(examples), 2).argmax(-1)
  hits = [labels[c] == ex["targets_pretokenized"].decode() for c, ex in zip(chosen, examples)]
  assert result["metrics"]["accuracy"] == pytest.approx(100 * np.mean(hits))


def _score_labels_by_hand(pt, frozen, prompt, sentences, labels):
  """[len(sentences), len(labels)] summed target log-likelihoods, one row per pair."""
  vocab = seqio.ByteVocabulary()
  rows = [(s, label) for s in sentences for label in labels]
  encoder = np.zeros((len(rows), LENGTHS["inputs"]), np.int32)
  target = np.zeros((len(rows), LENGTHS["targets"]), np.int32)
  for i, (sentence, label) in enumerate(rows):
    inputs, ids = list(vocab.encode(sentence)) + [1], list(vocab.encode(label)) + [1]
    encoder[i, :len(inputs)], target[i, :len(ids)] = inputs, ids
  batch = {"encoder_input_tokens": encoder, "decoder_target_tokens": target,
           "decoder_input_tokens": np.pad(target[:, :-1], ((0, 0), (1, 0))),
           "decoder_loss_weights": (target > 0).astype(np.int32)}
  scores = pt.model.score_batch(params.merge_params(prompt, frozen), batch)
  return np.asarray(scores).reshape(len(sentences), len(labels))


def test_demo_sentiment_rank_accuracy_matches_scoring_by_hand(restored):
  """The sweep's metric: the likelier of 'negative'/'positive' per validation sentence."""
  from prompt_jax.data import synthetic
  pt, frozen, prompt, _ = restored
  cfg = pipeline.DatasetConfig("demo_sentiment_rank", LENGTHS, split="validation",
                               batch_size=100, shuffle=False, module="prompt_jax.data.synthetic")
  got = evaluators.TaskEvaluator(cfg, max_decode_length=16)(pt, prompt, frozen, 0)["accuracy"]
  examples = synthetic.make_examples("validation")
  scores = _score_labels_by_hand(pt, frozen, prompt, [ex["sentence"] for ex in examples],
                                 synthetic.SENTIMENT_LABELS)
  chosen = [synthetic.SENTIMENT_LABELS[i] for i in scores.argmax(-1)]
  want = 100 * np.mean([c == ex["sentiment"] for c, ex in zip(chosen, examples)])
  assert len(examples) == 400 and 0 < want < 100  # a trained-on-SST-2 prompt: not all or none
  assert got == pytest.approx(want)


def test_npy_prompt_export_evaluates_like_the_checkpoint(trained_run):
  model_dir, summary = trained_run
  with mock_glue(NUM_EXAMPLES):
    result = evaluation.run_evaluation(
        model=_model(), dataset_cfg=_cfg(TASK), initial_checkpoint_path=DEMO_CHECKPOINT,
        prompt_path=os.path.join(model_dir, "prompts", "prompt_4.npy"), write_predictions=False)
  assert result["step"] == 4
  assert result["metrics"] == pytest.approx(summary["eval_trained"])


def test_grouped_superglue_metrics_through_seqio(restored):
  """MultiRC (rank classification, grouped by question) and ReCoRD (decoded, max over
  answers) come out of seqio's Evaluator with T5's metric names."""
  pt, frozen, prompt, _ = restored
  with mock_glue(4):
    multirc = evaluators.TaskEvaluator(_cfg("taskless_super_glue_multirc_v102_rank_bytes"),
                                       max_decode_length=16)(pt, prompt, frozen, 0)
    record = evaluators.TaskEvaluator(_cfg("super_glue_record_v102_bytes"),
                                      max_decode_length=16)(pt, prompt, frozen, 0)
  assert set(multirc) == {"f1", "exact_match"}
  assert set(record) == {"em", "f1"}
  assert all(0 <= v <= 100 for v in [*multirc.values(), *record.values()])


def test_prompt_array_of_the_wrong_shape_is_rejected(restored):
  pt = restored[0]
  with pytest.raises(ValueError, match=r"shape \(5, 64\) does not fit"):
    loading.prompt_params_from_array(pt, np.zeros((5, 64), np.float32))


def test_metrics_table_lists_every_metric():
  table = evaluators.format_metrics_table({"f1": 66.666, "accuracy": 50.0})
  lines = table.splitlines()
  assert lines[2].split() == ["accuracy", "50.00"] and lines[3].split() == ["f1", "66.67"]


def test_truncated_eval_examples_are_counted_and_logged(caplog):
  cfg = pipeline.DatasetConfig(TASK, {"inputs": 24, "targets": 16}, split="validation",
                               batch_size=8, shuffle=False, module="prompt_jax.tasks")
  with mock_glue(NUM_EXAMPLES):
    evaluator = seqio.Evaluator(TASK, seqio.EncDecFeatureConverter(pack=False),
                                eval_split="validation",
                                sequence_length=dict(cfg.task_feature_lengths))
    with caplog.at_level("WARNING", logger="prompt_jax.serving.evaluators"):
      counts = evaluators.count_truncated(evaluator, cfg.task_feature_lengths)
  expected = sum(len(ex["inputs_pretokenized"]) + 1 > 24 for ex in _validation_examples(TASK))
  assert expected > 0 and counts[TASK] == {"inputs": expected, "targets": 0}
  assert f"{expected} of {NUM_EXAMPLES} evaluation examples" in caplog.text


def test_evaluating_a_missing_split_names_the_splits(restored):
  pt, frozen, prompt, _ = restored
  with mock_glue(NUM_EXAMPLES), pytest.raises(ValueError, match="validation_matched"):
    evaluators.TaskEvaluator(_cfg("glue_mnli_v002_bytes"), max_decode_length=16)(
        pt, prompt, frozen, 0)
