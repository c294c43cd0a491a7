"""Prompt banks and ensembles: mixed batches equal each example alone, deterministic voting,
N prompts trained at once equal N separate runs, ensemble evaluation equals a by-hand vote."""

from __future__ import annotations

import collections
import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from prompt_jax import params as params_lib
from prompt_jax.data import pipeline, synthetic  # noqa: F401  (registers demo tasks)
from prompt_jax.models import t5
from prompt_jax.models.encoder_decoder import EncoderDecoderModel
from prompt_jax.partitioning import Partitioner
from prompt_jax.programs import PromptPrograms
from prompt_jax.prompts import initializers
from prompt_jax.prompts.bank import PromptBank, check_prompt_ids
from prompt_jax.prompts.base import InputPrompt
from prompt_jax.prompts.plain import Prompt
from prompt_jax.serving import ensemble, evaluation, inference
from prompt_jax.training import optimizers, trainer
from tests.adafactor_tolerance import assert_adafactor_runs_agree

# Values compared against tolerances: CI runs these again under another CPU instruction set.
pytestmark = pytest.mark.numerics

DEMO_CHECKPOINT = "builtin:demo_t5_tiny.npz"
LENGTHS = {"inputs": 64, "targets": 16}
PROMPT_LENGTH = 4


def _bank_model(num_prompts, placement="prefix", normalizer="NUM_REAL_TARGET_TOKENS"):
  return EncoderDecoderModel(
      t5.Transformer(t5.preset("tiny"), PromptBank(num_prompts, PROMPT_LENGTH,
                                                   initializers.uniform(), placement)),
      loss_normalizing_factor=normalizer)


def _plain_model(placement="prefix", normalizer="NUM_REAL_TARGET_TOKENS"):
  return EncoderDecoderModel(
      t5.Transformer(t5.preset("tiny"), InputPrompt(Prompt(PROMPT_LENGTH,
                                                           initializers.uniform()), placement)),
      loss_normalizing_factor=normalizer)


def _plain_params(prompt):
  return {"encoder": {"prompt": {"prompt": {"prompt": jnp.asarray(prompt)}}}}


def _bank_params(prompts):
  return {"encoder": {"prompt": {"prompt": {"prompts": jnp.asarray(prompts)}}}}


@pytest.fixture(scope="module")
def frozen():
  pt = PromptPrograms.for_training(_plain_model(), trainer.adafactor(), Partitioner(), 64, 16, 8)
  return pt.load_frozen_params(DEMO_CHECKPOINT)


def _random_batch(rng, batch_size, input_length=24, target_length=6):
  tokens = rng.integers(3, 259, size=(batch_size, input_length)).astype(np.int32)
  lengths = rng.integers(5, input_length, size=batch_size)
  tokens[np.arange(input_length)[None, :] >= lengths[:, None]] = 0
  targets = rng.integers(3, 259, size=(batch_size, target_length)).astype(np.int32)
  targets[:, -1] = 0
  inputs = np.concatenate([np.zeros((batch_size, 1), np.int32), targets[:, :-1]], axis=1)
  return {"encoder_input_tokens": tokens, "decoder_input_tokens": inputs,
          "decoder_target_tokens": targets, "decoder_loss_weights": (targets > 0).astype(np.int32)}


# ------------------------------------------------------------------------------- mixed batches


@pytest.mark.parametrize("placement", ["prefix", "prefix_after_bos", "suffix"])
def test_mixed_batch_gives_each_example_its_logits_alone(frozen, placement):
  rng = np.random.default_rng(0)
  prompts = rng.uniform(-0.5, 0.5, size=(3, PROMPT_LENGTH, 64)).astype(np.float32)
  batch = _random_batch(rng, 6)
  ids = np.array([2, 0, 1, 1, 0, 2], np.int32)
  bank, plain = _bank_model(3, placement), _plain_model(placement)
  mixed = np.asarray(jax.jit(bank.logits)(params_lib.merge_params(_bank_params(prompts), frozen),
                                          dict(batch, prompt_ids=ids)))
  plain_logits = jax.jit(plain.logits)
  for prompt_id in range(3):
    params = params_lib.merge_params(_plain_params(prompts[prompt_id]), frozen)
    # The same batch, every example with this one prompt (a plain single-prompt model).
    uniform = np.asarray(plain_logits(params, batch))
    rows = ids == prompt_id
    np.testing.assert_allclose(mixed[rows], uniform[rows], atol=1e-6, rtol=0)
    # Literally alone (batch of one): XLA's float32 sums differ with the batch shape (one row
    # takes other dot kernels) by ~1e-6 of the logits' scale (|logit| <= ~11) for any model, up to
    # 1.1e-6 of it here; mixing prompts adds nothing on top of that. (A fixed 2e-5 was half used.)
    for j in np.flatnonzero(rows):
      alone = np.asarray(plain_logits(params, {k: v[j:j + 1] for k, v in batch.items()}))[0]
      shape_noise = np.max(np.abs(uniform[j] - alone))
      assert np.max(np.abs(mixed[j] - alone)) <= shape_noise + 1e-6
      assert shape_noise < 1e-5 * np.max(np.abs(alone))
  # A wrong prompt is far off: the checks can fail.
  wrong = np.asarray(plain_logits(params_lib.merge_params(_plain_params(prompts[0]), frozen),
                                  batch))
  assert np.max(np.abs(mixed[0] - wrong[0])) > 1e-3


def test_mixed_batch_greedy_decoding_matches_each_prompt_alone(frozen):
  rng = np.random.default_rng(1)
  prompts = rng.uniform(-0.5, 0.5, size=(2, PROMPT_LENGTH, 64)).astype(np.float32)
  tokens = _random_batch(rng, 4)["encoder_input_tokens"]
  ids = np.array([1, 0, 0, 1], np.int32)
  bank, plain = _bank_model(2), _plain_model()
  mixed = jax.jit(lambda p, b: bank.predict_batch(p, b, 8))(
      params_lib.merge_params(_bank_params(prompts), frozen),
      {"encoder_input_tokens": tokens, "prompt_ids": ids})
  plain_predict = jax.jit(lambda p, b: plain.predict_batch(p, b, 8))
  for prompt_id in range(2):
    alone = plain_predict(params_lib.merge_params(_plain_params(prompts[prompt_id]), frozen),
                          {"encoder_input_tokens": tokens})
    np.testing.assert_array_equal(np.asarray(mixed)[ids == prompt_id],
                                  np.asarray(alone)[ids == prompt_id])


def test_bank_needs_prompt_ids_and_checks_them(frozen):
  bank = _bank_model(2)
  params = params_lib.merge_params(_bank_params(np.zeros((2, PROMPT_LENGTH, 64), np.float32)),
                                   frozen)
  batch = _random_batch(np.random.default_rng(2), 2)
  logits = jax.jit(bank.logits)
  with pytest.raises(ValueError, match="needs prompt_ids"):
    logits(params, batch)
  with pytest.raises(ValueError, match=r"prompt_ids must lie in \[0, 2\), got values from 0 to 2"):
    check_prompt_ids([0, 2], 2)
  # Inside a compiled step an id past the end poisons only its own row.
  logits = np.asarray(logits(params, dict(batch, prompt_ids=np.array([0, 5], np.int32))))
  assert np.all(np.isfinite(logits[0])) and np.all(np.isnan(logits[1]))
  with pytest.raises(ValueError, match="init_fn has 3 initialisers, expected one or "
                                       "num_prompts=2"):
    PromptBank(2, 4, [initializers.uniform()] * 3)


def test_bank_initialises_each_prompt_with_its_own_rng(frozen):
  model = _bank_model(3)
  full = jax.jit(lambda rng, f: model.init_missing(rng, f, model.dummy_batch(2, 8, 4)))(
      jax.random.key(0), frozen)
  prompts = np.asarray(params_lib.unbox(full)["encoder"]["prompt"]["prompt"]["prompts"])
  assert prompts.shape == (3, PROMPT_LENGTH, 64)
  assert np.all(prompts >= -0.5) and np.all(prompts < 0.5)
  assert not np.allclose(prompts[0], prompts[1]) and not np.allclose(prompts[1], prompts[2])


# -------------------------------------------------------------------------------------- voting


def test_majority_vote_and_documented_tie_breaking():
  # Column 0: "b" has 2 votes. Column 1: three-way tie -> prompt 0's "b".
  assert ensemble.majority_vote([["a", "b"], ["b", "a"], ["b", "c"]]) == ["b", "b"]
  # 2-2 ties go to the candidate of the lowest prompt index, whatever the values are.
  assert ensemble.majority_vote([["x"], ["y"], ["y"], ["x"]]) == ["x"]
  assert ensemble.majority_vote([["y"], ["x"], ["x"], ["y"]]) == ["y"]
  # A tie between candidates first seen at prompts 1 and 2 (prompt 0 is the odd one out).
  assert ensemble.majority_vote([["z"], ["q"], ["p"], ["p"], ["q"]]) == ["q"]
  # Identical on repeated calls (no hash or dict-order dependence).
  votes = [[(i % 3, 7)] * 5 for i in range(6)]
  assert ensemble.majority_vote(votes) == ensemble.majority_vote(votes) == [(0, 7)] * 5
  with pytest.raises(ValueError, match="one prediction per example"):
    ensemble.majority_vote([["a"], ["a", "b"]])


def test_average_scores_is_the_mean_over_prompts():
  scores = np.array([[-1.0, -4.0], [-3.0, -2.0], [-2.0, -6.0]])
  np.testing.assert_allclose(ensemble.average_scores(scores), [-2.0, -4.0])
  with pytest.raises(ValueError, match="scores must be"):
    ensemble.average_scores(np.zeros(3))


def test_replicate_across_prompts_is_prompt_major():
  batch = {"encoder_input_tokens": np.array([[5, 6], [7, 0]], np.int32)}
  rows = ensemble.ReplicateAcrossPrompts(3)(batch)
  np.testing.assert_array_equal(rows["prompt_ids"], [0, 0, 1, 1, 2, 2])
  np.testing.assert_array_equal(rows["encoder_input_tokens"],
                                np.concatenate([batch["encoder_input_tokens"]] * 3))


# ------------------------------------------------------------------------------------ training


def _train_curves(frozen, num_prompts, steps, optimizer_for_bank, optimizer=None):
  """Per-prompt loss curves of (N separate runs, one bank run) from the same initial prompts
  and the same batches; and both runs' final prompts."""
  rng = np.random.default_rng(3)
  batches = [_random_batch(rng, 4) for _ in range(steps)]
  sep = PromptPrograms.for_training(_plain_model(), optimizer or trainer.adafactor(),
                                    Partitioner(), 24, 6, 4)
  initial, separate_losses, separate_final = [], [], []
  for i in range(num_prompts):
    state = sep.init_state(frozen, jax.random.key(10 + i))
    initial.append(np.asarray(state.prompt_params["encoder"]["prompt"]["prompt"]["prompt"]))
    losses = []
    for batch in batches:
      state, metrics = sep.train_step(state, frozen, batch, jax.random.key(0))
      losses.append(float(metrics["loss"]))
    separate_losses.append(losses)
    separate_final.append(np.asarray(state.prompt_params["encoder"]["prompt"]["prompt"]
                                     ["prompt"]))
  bank = PromptPrograms.for_training(_bank_model(num_prompts), optimizer_for_bank,
                                     Partitioner(), 24, 6, 4 * num_prompts)
  prompts = _bank_params(np.stack(initial))
  state = trainer.TrainState(step=jnp.array(0, jnp.int32), prompt_params=prompts,
                             opt_state=optimizer_for_bank.init(prompts))
  replicate = ensemble.ReplicateAcrossPrompts(num_prompts)
  bank_losses, mean_losses = [[] for _ in range(num_prompts)], []
  for batch in batches:
    for i in range(num_prompts):  # each prompt's loss on the batch, before the step
      one = dict(batch, prompt_ids=np.full(4, i, np.int32))
      bank_losses[i].append(float(bank.eval_step(state.prompt_params, frozen, one)["loss"]))
    state, metrics = bank.train_step(state, frozen, replicate(batch), jax.random.key(0))
    mean_losses.append(float(metrics["loss"]))
  bank_final = np.asarray(state.prompt_params["encoder"]["prompt"]["prompt"]["prompts"])
  return (np.array(separate_losses), np.array(bank_losses), np.array(mean_losses),
          np.stack(separate_final), bank_final)


def test_training_n_prompts_equals_n_separate_runs(frozen):
  optimizer = optimizers.per_prompt(trainer.adafactor())
  separate, bank, mean, separate_final, bank_final = _train_curves(frozen, 2, 5, optimizer)
  assert separate[:, -1].max() < separate[:, 0].min()  # they do train
  # Losses of ~8 from two programs that sum in other orders (the bank gathers each row's prompt,
  # its step sees 2 * 4 rows), on prompts that differ by rounding only (below): float32 rounds
  # ~6e-8 per op, and the losses agree to <= 1e-6 relative (a fixed atol=1e-5 was 2/3 used).
  np.testing.assert_allclose(bank, separate, rtol=1e-5)
  np.testing.assert_allclose(mean, separate.mean(axis=0), rtol=1e-5)
  # Adafactor's g / sqrt(v) turns float32 rounding in near-zero gradient entries (the batch
  # shapes differ: 4 vs 2 * 4 rows) into ~1e-4 differences of single prompt entries (|p| ~ 1):
  # compare against how far 5 steps move the prompts (see adafactor_tolerance).
  assert_adafactor_runs_agree(bank_final, separate_final, steps=5)


def _clipped_sgd():
  return optax.chain(optax.clip_by_global_norm(0.5), optax.sgd(0.5))


def test_one_shared_optimizer_couples_the_prompts(frozen):
  # The negative control: clipping by the global norm of all prompts' gradients couples them,
  # as Adafactor's update clipping by the RMS of the whole update can.
  separate, shared, *_ = _train_curves(frozen, 2, 4, _clipped_sgd(), _clipped_sgd())
  assert np.max(np.abs(shared - separate)) > 1e-2


@pytest.mark.slow
def test_per_prompt_clipping_equals_separate_runs(frozen):
  separate, bank, _, separate_final, bank_final = _train_curves(
      frozen, 2, 4, optimizers.per_prompt(_clipped_sgd()), _clipped_sgd())
  np.testing.assert_allclose(bank, separate, atol=1e-5, rtol=0)
  np.testing.assert_allclose(bank_final, separate_final, atol=1e-5, rtol=0)


def test_per_prompt_rejects_leaves_without_a_common_prompt_axis():
  optimizer = optimizers.per_prompt(trainer.adafactor())
  with pytest.raises(ValueError, match="same leading prompt axis"):
    optimizer.init({"a": jnp.zeros((3, 4)), "b": jnp.zeros((2, 4))})


# ---------------------------------------------------------------------------------- evaluation


def test_ensemble_evaluation_equals_per_prompt_runs_and_a_vote_by_hand(frozen):
  num_prompts = 3
  eval_cfg = pipeline.DatasetConfig("demo_sentiment", LENGTHS, split="validation",
                                    batch_size=100, shuffle=False)
  bank = PromptPrograms.for_training(_bank_model(num_prompts),
                                     optimizers.per_prompt(trainer.adafactor()),
                                     Partitioner(), 64, 16, 100)
  state = bank.init_state(frozen, jax.random.key(0))
  prompts = np.asarray(state.prompt_params["encoder"]["prompt"]["prompt"]["prompts"])
  scores = ensemble.EnsembleEvaluator(eval_cfg, max_decode_length=16)(
      bank, state.prompt_params, frozen, 0)

  plain = PromptPrograms.for_training(_plain_model(), trainer.adafactor(), Partitioner(), 64, 16,
                                      100)
  records = list(inference.task_records(eval_cfg))
  vocabulary = pipeline.get_task_or_mixture("demo_sentiment").output_features["inputs"].vocabulary
  targets = [r["targets"] for r in records]
  per_prompt = []
  for i in range(num_prompts):
    texts = inference.predict_texts(plain, _plain_params(prompts[i]), frozen,
                                    [r["inputs"] for r in records], vocabulary, 64, 16,
                                    batch_size=100)
    per_prompt.append(texts)
    accuracy = 100 * np.mean([p == t for p, t in zip(texts, targets)])
    assert scores[f"prompt_{i}/accuracy"] == pytest.approx(accuracy)
  voted = []
  for column in zip(*per_prompt):  # the documented rule, written out independently
    counts = collections.Counter(column)
    voted.append(next(c for c in column if counts[c] == max(counts.values())))
  accuracy = 100 * np.mean([p == t for p, t in zip(voted, targets)])
  assert scores["ensemble/accuracy"] == pytest.approx(accuracy)
  per_prompt_accuracy = [scores[f"prompt_{i}/accuracy"] for i in range(num_prompts)]
  assert scores["best_prompt/accuracy"] == max(per_prompt_accuracy)
  assert scores["mean_prompt/accuracy"] == pytest.approx(np.mean(per_prompt_accuracy))
  table = ensemble.format_ensemble_table(scores)
  assert table.splitlines()[0].split() == ["metric", "prompt_0", "prompt_1", "prompt_2",
                                           "mean_prompt", "best_prompt", "ensemble"]


def test_ensemble_scores_are_mean_log_likelihoods_of_each_prompt(frozen):
  num_prompts = 2
  rng = np.random.default_rng(4)
  prompts = rng.uniform(-0.5, 0.5, size=(num_prompts, PROMPT_LENGTH, 64)).astype(np.float32)
  batch = _random_batch(rng, 4)
  bank = _bank_model(num_prompts)
  rows = ensemble.replicate_across_prompts(batch, num_prompts)
  bank_scores = np.asarray(jax.jit(bank.score_batch)(
      params_lib.merge_params(_bank_params(prompts), frozen), rows)).reshape(num_prompts, 4)
  plain_score = jax.jit(_plain_model().score_batch)
  alone = np.stack([np.asarray(plain_score(params_lib.merge_params(_plain_params(p), frozen),
                                           batch)) for p in prompts])
  # Log-likelihoods of ~-46 (6 tokens), from a bank and a plain model: float32 sums in other
  # orders, ~1e-7 relative apart (2.5e-7 seen); an atol=1e-5 alone is under 3 float32 ulps at 46.
  np.testing.assert_allclose(bank_scores, alone, atol=1e-5, rtol=1e-5)
  np.testing.assert_allclose(ensemble.average_scores(bank_scores), alone.mean(axis=0),
                             atol=1e-5, rtol=1e-5)



RANK_TASK = "test_ensemble_demo_sentiment_rank"
LABELS = ("negative", "positive")


def _register_rank_task(num_examples=24):
  """Rank classification over the two sentiment labels, on the first validation sentences."""
  import functools  # pylint: disable=g-import-not-at-top

  import seqio  # pylint: disable=g-import-not-at-top
  import tensorflow as tf  # pylint: disable=g-import-not-at-top

  from prompt_jax.data import glue, metrics  # pylint: disable=g-import-not-at-top
  if RANK_TASK in seqio.TaskRegistry.names():
    return
  examples = synthetic.make_examples("validation")[:num_examples]

  def dataset_fn(split, shuffle_files, seed=None):
    del split, shuffle_files, seed
    return tf.data.Dataset.from_tensor_slices({
        "inputs": [ex["sentence"] for ex in examples],
        "targets": [ex["sentiment"] for ex in examples]})
  seqio.TaskRegistry.add(
      RANK_TASK, source=seqio.FunctionDataSource(dataset_fn, splits=["validation"]),
      preprocessors=[functools.partial(glue.expand_label_candidates, label_names=LABELS),
                     seqio.preprocessors.tokenize, seqio.preprocessors.append_eos],
      output_features=synthetic.OUTPUT_FEATURES,
      postprocess_fn=functools.partial(glue.rank_classification_postprocessor,
                                       base_postprocess_fn=lambda s, **_: s),
      metric_fns=[metrics.rank_classification([metrics.accuracy])])


def test_ensemble_rank_classification_averages_each_prompts_log_likelihoods(frozen):
  _register_rank_task()
  num_prompts = 3
  eval_cfg = pipeline.DatasetConfig(RANK_TASK, LENGTHS, split="validation", batch_size=16,
                                    shuffle=False)
  bank = PromptPrograms.for_training(_bank_model(num_prompts),
                                     optimizers.per_prompt(trainer.adafactor()),
                                     Partitioner(), 64, 16, 16)
  state = bank.init_state(frozen, jax.random.key(1))
  prompts = np.asarray(state.prompt_params["encoder"]["prompt"]["prompt"]["prompts"])
  scores = ensemble.EnsembleEvaluator(eval_cfg, max_decode_length=16)(
      bank, state.prompt_params, frozen, 0)

  # Independently: log-likelihood of each label under each prompt, from the plain model.
  vocabulary = synthetic.OUTPUT_FEATURES["inputs"].vocabulary
  examples = synthetic.make_examples("validation")[:24]
  rows = [(ex["sentence"], label) for ex in examples for label in LABELS]
  tokens = inference.encode_inputs([s for s, _ in rows], vocabulary, 64)
  targets = inference.encode_inputs([label for _, label in rows], vocabulary, 16)
  batch = {"encoder_input_tokens": tokens, "decoder_target_tokens": targets,
           "decoder_input_tokens": np.concatenate(
               [np.zeros((len(rows), 1), np.int32), targets[:, :-1]], axis=1),
           "decoder_loss_weights": (targets > 0).astype(np.int32)}
  plain_score = jax.jit(_plain_model().score_batch)
  likelihoods = np.stack([np.asarray(plain_score(
      params_lib.merge_params(_plain_params(p), frozen), batch)).reshape(-1, len(LABELS))
      for p in prompts])  # [prompts, examples, labels]
  gold = np.array([LABELS.index(ex["sentiment"]) for ex in examples])

  def accuracy(ll):
    return 100 * np.mean(np.argmax(ll, axis=-1) == gold)
  for i in range(num_prompts):
    assert scores[f"prompt_{i}/accuracy"] == pytest.approx(accuracy(likelihoods[i]))
  assert scores["ensemble/accuracy"] == pytest.approx(accuracy(likelihoods.mean(axis=0)))


def test_prompt_jax_eval_scores_a_trained_bank_like_training_did(tmp_path):
  """`prompt-jax eval --gin_file=runs/ensemble_eval_demo.gin` restores the bank and reports the same
  per-prompt and ensemble metrics as the end of training."""
  import gin

  from prompt_jax import cli
  from tests.conftest import GIN_CONFIGS
  gin.clear_config()
  assert cli.main(["train", f"--gin_file={GIN_CONFIGS}/runs/ensemble_demo.gin",
                   f"--gin.MODEL_DIR='{tmp_path}'", "--gin.TRAIN_STEPS=3",
                   "--gin.EVAL_PERIOD=0", "--gin.CHECKPOINT_PERIOD=3",
                   "--gin.trainer.train.eval_at_start=False"]) == 0
  trained = json.loads((tmp_path / "summary.json").read_text())["eval_trained"]
  gin.clear_config()
  result = cli.run_gin_command(evaluation.run_evaluation, [
      f"--gin_file={GIN_CONFIGS}/runs/ensemble_eval_demo.gin", f"--gin.MODEL_DIR='{tmp_path}'"])
  gin.clear_config()
  assert result["step"] == 3
  assert set(result["metrics"]) == set(trained)
  for name, value in trained.items():
    assert result["metrics"][name] == pytest.approx(value, abs=1e-6), name


def test_ensemble_replication_and_length_bucketing_compose_in_one_run(tmp_path):
  """Both transforms in one run: the bank sees N*B rows trimmed to a bucket, and trains like the
  untrimmed replicated run (trailing padding is masked)."""
  from prompt_jax.data import bucketing  # pylint: disable=g-import-not-at-top
  seen = []

  def record(batch):
    seen.append({k: np.shape(v) for k, v in batch.items()})
    return batch

  def run(name, transforms):
    cfg = pipeline.DatasetConfig("demo_sentiment", LENGTHS, batch_size=4)
    return trainer.train(
        model=_bank_model(2), model_dir=str(tmp_path / name), train_steps=3,
        train_dataset_cfg=cfg, initial_checkpoint_path=DEMO_CHECKPOINT,
        optimizer=optimizers.per_prompt(trainer.adafactor()), checkpoint_every_steps=3,
        log_every_steps=1, batch_transforms=transforms)

  full = run("full", [ensemble.ReplicateAcrossPrompts(2), record])
  full_shapes, seen[:] = list(seen), []
  trimmed = run("trimmed", [ensemble.ReplicateAcrossPrompts(2),
                            lambda b: bucketing.trim_to_bucket(b, buckets=(40, 48, 56, 64)),
                            record])
  assert full_shapes[0]["encoder_input_tokens"] == (8, 64)
  assert seen[0]["prompt_ids"] == (8,)
  assert all(s["encoder_input_tokens"][0] == 8 and s["encoder_input_tokens"][1] < 64
             for s in seen), seen
  # The same computation but for the trimmed (masked, all-zero) tail, summed in another order:
  # the step-3 loss (~0.02) moves by float32 rounding (~1e-6 relative) and by |grad| (~0.02)
  # times the prompts' difference after 2 steps (~1e-4 in norm), ~2e-6.
  assert trimmed["train"]["loss"] == pytest.approx(full["train"]["loss"], abs=1e-5)
  # Prompts: relative to how far 3 Adafactor steps move them (see adafactor_tolerance; a fixed
  # atol=1e-4 was exceeded by one entry, 1.29e-4, on an AVX2-only CPU).
  assert_adafactor_runs_agree(np.load(tmp_path / "trimmed" / "prompts" / "prompt_3.npy"),
                              np.load(tmp_path / "full" / "prompts" / "prompt_3.npy"), steps=3)
