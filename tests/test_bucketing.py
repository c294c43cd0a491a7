"""Length bucketing: few shapes, every example exactly once, each example's loss unchanged."""

from __future__ import annotations

import collections

import jax
import numpy as np
import pytest

from prompt_jax import params as params_lib
from prompt_jax.data import bucketing, pipeline, synthetic  # noqa: F401  (registers demo tasks)
from prompt_jax.models import t5
from prompt_jax.models.encoder_decoder import EncoderDecoderModel
from prompt_jax.prompts import initializers
from prompt_jax.prompts.base import InputPrompt
from prompt_jax.prompts.plain import Prompt


def _examples(lengths, full_length=64, seed=0):
  rng = np.random.default_rng(seed)
  out = []
  for i, n in enumerate(lengths):
    tokens = np.zeros(full_length, np.int32)
    tokens[:n] = rng.integers(3, 300, n)
    targets = np.array([i % 250 + 3, 1, 0, 0], np.int32)
    out.append({"encoder_input_tokens": tokens,
                "decoder_input_tokens": np.concatenate([[0], targets[:-1]]).astype(np.int32),
                "decoder_target_tokens": targets,
                "decoder_loss_weights": (targets > 0).astype(np.int32)})
  return out


def test_bucket_length_and_errors():
  assert bucketing.bucket_length(1, (8, 32)) == 8
  assert bucketing.bucket_length(8, (32, 8)) == 8
  assert bucketing.bucket_length(9, (8, 32)) == 32
  with pytest.raises(ValueError, match="length 33 is longer than the largest length bucket 32"):
    bucketing.bucket_length(33, (8, 32))
  with pytest.raises(ValueError, match="distinct positive"):
    bucketing.check_buckets((8, 8))


def test_real_lengths_counts_to_the_last_real_token():
  tokens = np.array([[5, 6, 0, 0], [5, 0, 7, 0], [0, 0, 0, 0], [1, 2, 3, 4]])
  np.testing.assert_array_equal(bucketing.real_lengths(tokens), [2, 3, 0, 4])


def test_bucket_by_length_emits_every_example_once_in_few_shapes():
  rng = np.random.default_rng(1)
  lengths = rng.integers(1, 65, 203)
  examples = _examples(lengths)
  batches = list(bucketing.bucket_by_length(examples, 8, (16, 32, 64), flush=True))
  shapes = {b["encoder_input_tokens"].shape[1] for b in batches}
  assert shapes <= {16, 32, 64}
  seen = collections.Counter()
  for b in batches:
    width = b["encoder_input_tokens"].shape[1]
    got = bucketing.real_lengths(b["encoder_input_tokens"])
    # Each example sits in the smallest bucket that holds it.
    assert all(bucketing.bucket_length(n, (16, 32, 64)) == width for n in got)
    for row in b["encoder_input_tokens"]:
      seen[row[row > 0].tobytes()] += 1
  want = collections.Counter(ex["encoder_input_tokens"][ex["encoder_input_tokens"] > 0]
                             .tobytes() for ex in examples)
  assert seen == want
  assert sum(len(b["encoder_input_tokens"]) for b in batches) == len(examples)
  assert all(len(b["encoder_input_tokens"]) == 8 for b in batches[:-len(shapes)])


@pytest.mark.parametrize("placement", ["prefix", "suffix"])
def test_each_example_scores_the_same_at_any_bucket(placement):
  model = EncoderDecoderModel(t5.Transformer(
      t5.preset("tiny"), InputPrompt(Prompt(5, initializers.uniform()), placement=placement)))
  examples = _examples([3, 17, 30, 9, 1, 25, 12, 31])
  full = {k: np.stack([e[k] for e in examples]) for k in examples[0]}
  params = params_lib.unbox(model.init(jax.random.key(0), full))
  score = jax.jit(model.score_batch)
  at_full_length = np.asarray(score(params, full))
  trimmed = bucketing.trim_to_bucket(full, (32, 64))
  assert trimmed["encoder_input_tokens"].shape == (8, 32)
  np.testing.assert_allclose(np.asarray(score(params, trimmed)), at_full_length, atol=2e-5,
                             rtol=1e-5)
  # Bucketed batches mix differently; match every example's score by its target id.
  by_target = dict(zip(full["decoder_target_tokens"][:, 0], at_full_length))
  for batch in bucketing.bucket_by_length(examples, 4, (8, 16, 32, 64), flush=True):
    got = np.asarray(score(params, batch))
    want = [by_target[t] for t in batch["decoder_target_tokens"][:, 0]]
    np.testing.assert_allclose(got, want, atol=2e-5, rtol=1e-5)


def test_iterate_bucketed_batches_from_a_seqio_task():
  cfg = pipeline.DatasetConfig("demo_sentiment", {"inputs": 64, "targets": 16}, batch_size=8)
  batches = pipeline.iterate_bucketed_batches(cfg, (16, 32, 64))
  first = [next(batches) for _ in range(6)]
  for batch in first:
    width = batch["encoder_input_tokens"].shape[1]
    assert batch["encoder_input_tokens"].shape[0] == 8
    assert width in (16, 32, 64)
    assert bucketing.real_lengths(batch["encoder_input_tokens"]).max() <= width
    assert batch["decoder_target_tokens"].shape == (8, 16)
  # Resuming skips exactly the consumed batches.
  resumed = next(pipeline.iterate_bucketed_batches(cfg, (16, 32, 64), start_step=3))
  for key in resumed:
    np.testing.assert_array_equal(resumed[key], first[3][key])
  with pytest.raises(ValueError, match="largest length bucket 128 exceeds the input length 64"):
    next(pipeline.iterate_bucketed_batches(cfg, (32, 128)))
