"""Span corruption and prefix-LM preprocessing (prompt_jax/data/pretraining.py) on fixed inputs."""

import os
import re

import jax
import numpy as np
import pytest

from prompt_jax.data import pretraining

S0, S1, S2 = 383, 382, 381  # sentinels counted down from the top of the 384-row vocabulary


def _restore(inputs, targets):
  """Undo span corruption: put each sentinel's target span back in place of the sentinel."""
  spans, current = {}, None
  for t in targets:
    if t >= 259:
      current = int(t)
      spans[current] = []
    else:
      spans[current].append(int(t))
  out = []
  for t in inputs:
    out.extend(spans[int(t)] if t >= 259 else [int(t)])
  return out


def test_sentinel_ids_count_down_from_the_top():
  assert [pretraining.sentinel_id(k) for k in range(3)] == [S0, S1, S2]
  assert pretraining.sentinel_id(124) == 259  # the last id above the byte range


def test_span_corruption_hand_computed():
  tokens = np.array([10, 11, 12, 13, 14, 15, 16])
  mask = np.array([0, 0, 1, 1, 0, 1, 0], bool)
  inputs, targets = pretraining.span_corruption(tokens, mask)
  np.testing.assert_array_equal(inputs, [10, 11, S0, 14, S1, 16])
  np.testing.assert_array_equal(targets, [S0, 12, 13, S1, 15, S2])


def test_span_corruption_ending_in_noise_and_custom_vocab():
  inputs, targets = pretraining.span_corruption(np.array([5, 6, 7, 8]),
                                                np.array([0, 0, 1, 1], bool), vocab_size=100)
  np.testing.assert_array_equal(inputs, [5, 6, 99])
  np.testing.assert_array_equal(targets, [99, 7, 8])


def test_span_corruption_rejects_mismatched_mask():
  with pytest.raises(ValueError, match="differ in shape"):
    pretraining.span_corruption(np.arange(4), np.zeros(3, bool))


@pytest.mark.parametrize("length,noise,spans", [(100, 15, 5), (112, 17, 6), (20, 3, 1)])
def test_noise_mask_density_and_span_count(length, noise, spans):
  rng = np.random.default_rng(0)
  for _ in range(20):
    mask = pretraining.random_spans_noise_mask(length, rng)
    assert mask.shape == (length,) and not mask[0]
    assert mask.sum() == noise  # round(length * 0.15)
    starts = np.flatnonzero(mask & ~np.concatenate([[False], mask[:-1]]))
    assert len(starts) == spans  # round(noise / 3)


def test_span_corruption_round_trips_on_random_masks():
  rng = np.random.default_rng(1)
  tokens = rng.integers(3, 259, 112)
  for _ in range(10):
    mask = pretraining.random_spans_noise_mask(len(tokens), rng)
    inputs, targets = pretraining.span_corruption(tokens, mask)
    assert len(inputs) == 112 - 17 + 6
    assert _restore(inputs, targets) == tokens.tolist()


def test_prefix_lm_split_hand_computed():
  inputs, targets = pretraining.prefix_lm_split(np.array([5, 6, 7, 8, 9]), 2)
  np.testing.assert_array_equal(inputs, [5, 6])
  np.testing.assert_array_equal(targets, [7, 8, 9])
  for bad in (0, 5):
    with pytest.raises(ValueError, match="split_point must be in"):
      pretraining.prefix_lm_split(np.arange(5), bad)


def test_corpus_examples_reconstruct_the_corpus():
  corpus = pretraining.corpus_tokens("validation")
  n = pretraining.SPAN_CORRUPTION_CHUNK
  for i, ex in zip(range(5), pretraining.span_corruption_examples("validation")):
    assert _restore(ex["inputs"], ex["targets"]) == corpus[i * n:(i + 1) * n].tolist()
  n = pretraining.PREFIX_LM_CHUNK
  for i, ex in zip(range(5), pretraining.prefix_lm_examples("validation")):
    assert 8 <= len(ex["targets"]) <= 31
    np.testing.assert_array_equal(np.concatenate([ex["inputs"], ex["targets"]]),
                                  corpus[i * n:(i + 1) * n])
  text = bytes((corpus[:2000] - 3).astype(np.uint8)).decode("utf-8", "replace")
  assert " the " in text  # English prose, not code or noise


def test_seqio_task_appends_eos_and_fits_feature_lengths():
  from prompt_jax.data import pipeline
  task = pipeline.get_task_or_mixture("pretrain_span_corruption_bytes")
  ds = task.get_dataset(sequence_length=pretraining.FEATURE_LENGTHS, split="validation",
                        shuffle=False)
  first = next(ds.as_numpy_iterator())
  expected = next(pretraining.span_corruption_examples("validation"))
  np.testing.assert_array_equal(first["inputs"], np.append(expected["inputs"], 1))
  np.testing.assert_array_equal(first["targets"], np.append(expected["targets"], 1))
  assert len(first["inputs"]) <= 128 and len(first["targets"]) <= 32


def _toy_pretrain_setup():
  from prompt_jax.data import pipeline
  from prompt_jax.models import t5
  config = t5.T5Config(vocab_size=384, emb_dim=16, num_heads=2, head_dim=8, mlp_dim=32,
                       num_encoder_layers=1, num_decoder_layers=1, dropout_rate=0.1)
  lengths = {"inputs": 128, "targets": 32}
  span = pipeline.DatasetConfig("pretrain_span_corruption_bytes", lengths, batch_size=4,
                                module="prompt_jax.data.pretraining")
  prefix = pipeline.DatasetConfig("pretrain_prefix_lm_bytes", lengths, batch_size=4,
                                  module="prompt_jax.data.pretraining")
  return dict(config=config, dataset_cfg=span, lm_adaptation_dataset_cfg=prefix, train_steps=5,
              lm_adaptation_steps=3, warmup_steps=2, learning_rate=1e-2, log_every_steps=100)


@pytest.mark.slow  # two jit compilations; ~20 s idle, minutes on a loaded machine
def test_pretrain_runs_both_phases(tmp_path):
  from prompt_jax.storage import frozen_models  # pylint: disable=g-import-not-at-top
  from prompt_jax.training import pretrain
  setup = {**_toy_pretrain_setup(), "train_steps": 2, "lm_adaptation_steps": 2}
  out = str(tmp_path / "m.npz")
  result = pretrain.pretrain(output_path=out, checkpoint_every_steps=0, **setup)
  assert np.isfinite(result["loss"]) and np.isfinite(result["lm_adaptation_loss"])
  params = frozen_models.load_params_npz(out)
  assert params["token_embedder"]["embedding"].shape == (384, 16)
  with pytest.raises(ValueError, match="lm_adaptation_dataset_cfg"):
    pretrain.pretrain(**{**setup, "lm_adaptation_dataset_cfg": None}, output_path=out)


def test_pretrain_resumes_mid_phase_like_a_straight_run(tmp_path):
  """Cut after LM adaptation's step 2 or span corruption's step 4: the resumed run's weights
  equal the uninterrupted run's (same data order, dropout keys, optimizer state and schedule)."""
  import shutil

  from prompt_jax.storage import frozen_models
  from prompt_jax.training import pretrain
  setup = _toy_pretrain_setup()
  out = str(tmp_path / "run.npz")
  phases = tmp_path / "run_checkpoints"
  straight = pretrain.pretrain(output_path=out, checkpoint_every_steps=2, checkpoint_keep=None,
                               **setup)
  expected = frozen_models.load_params_npz(out)

  def saved_steps(phase):
    return sorted(int(p.name) for p in (phases / phase / "checkpoints").iterdir()
                  if p.name.isdigit())
  # Each phase is a run of its own: every 2nd step of it, and its last step.
  assert saved_steps("pretrain") == [2, 4, 5]
  assert saved_steps("lm_adaptation") == [2, 3]

  def assert_same_weights():
    got = jax.tree_util.tree_leaves_with_path(frozen_models.load_params_npz(out))
    for (path, leaf), want in zip(got, jax.tree_util.tree_leaves(expected), strict=True):
      np.testing.assert_allclose(leaf, want, rtol=1e-5, atol=1e-6, err_msg=str(path))

  # Cut mid LM adaptation (after its step 2), then mid span corruption (after step 4).
  for cut in ({"lm_adaptation": 2}, {"pretrain": 4, "lm_adaptation": 0}):
    for phase, keep_up_to in cut.items():
      for step in saved_steps(phase):
        if step > keep_up_to:
          shutil.rmtree(phases / phase / "checkpoints" / str(step))
    os.remove(out)
    resumed = pretrain.pretrain(output_path=out, checkpoint_every_steps=2, checkpoint_keep=None,
                                **setup)
    assert_same_weights()
    assert resumed["lm_adaptation_loss"] == pytest.approx(straight["lm_adaptation_loss"],
                                                          rel=1e-5)
    assert resumed["loss"] == pytest.approx(straight["loss"], rel=1e-5)

  # A finished run, rerun, trains nothing and writes the same weights again.
  os.remove(out)
  pretrain.pretrain(output_path=out, checkpoint_every_steps=2, **setup)
  assert_same_weights()
  # The finished model is not replaced unasked, before any work.
  with pytest.raises(ValueError, match=rf"pretrain output {re.escape(out)} exists"):
    pretrain.pretrain(output_path=out, checkpoint_every_steps=2, **setup)
  # Other settings against these checkpoints: one line naming both.
  with pytest.raises(ValueError, match=r"holds a run with .*settings.train_steps=5; this "
                                       r"command configures .*settings.train_steps=6"):
    pretrain.pretrain(output_path=out, checkpoint_every_steps=2, overwrite=True,
                      **{**setup, "train_steps": 6})
