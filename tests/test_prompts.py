"""Lester et al. prompt initialisers and the released-prompt fixture."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import seqio

from prompt_jax.models import t5
from prompt_jax.prompts import base, initializers
from prompt_jax.prompts.base import InputPrompt
from prompt_jax.prompts.plain import Prompt
from prompt_jax.storage import prompt_files
from tests.conftest import shared_fixture

TABLE = np.random.default_rng(0).normal(size=(300, 8)).astype(np.float32)


def test_uniform_range_and_shape():
  p = np.asarray(initializers.uniform(-0.5, 0.5)(jax.random.key(0), (50, 8), None))
  assert p.shape == (50, 8)
  assert p.min() >= -0.5 and p.max() < 0.5
  assert p.min() < -0.4 and p.max() > 0.4  # covers the range, not a constant


def test_sampled_vocabulary_rows_come_from_the_population():
  p = np.asarray(initializers.sampled_vocabulary(population_size=20)(
      jax.random.key(1), (10, 8), TABLE))
  for row in p:
    matches = np.where(np.all(TABLE == row, axis=1))[0]
    assert len(matches) == 1 and matches[0] < 20
  assert len({tuple(r) for r in p}) == 10  # drawn without replacement


def test_sampled_vocabulary_first_id_offsets_the_population():
  # Byte vocabulary: ids 35..129 are printable ASCII; nothing below or above may be drawn.
  p = np.asarray(initializers.sampled_vocabulary(population_size=95, first_id=35)(
      jax.random.key(4), (60, 8), TABLE))
  ids = [int(np.where(np.all(TABLE == row, axis=1))[0][0]) for row in p]
  assert min(ids) >= 35 and max(ids) < 130
  assert len(set(ids)) == 60  # without replacement
  # The window is clipped at the vocabulary's end: ids 290..299 only, with replacement.
  p = np.asarray(initializers.sampled_vocabulary(population_size=50, first_id=290)(
      jax.random.key(5), (20, 8), TABLE))
  ids = {int(np.where(np.all(TABLE == row, axis=1))[0][0]) for row in p}
  assert ids <= set(range(290, 300))


def test_class_labels_fill_uses_first_id():
  init = initializers.class_labels(["ab", "c"], seqio.ByteVocabulary(), population_size=10,
                                   first_id=200)
  p = np.asarray(init(jax.random.key(6), (8, 8), TABLE))
  for row in p[2:]:
    assert 200 <= np.where(np.all(TABLE == row, axis=1))[0][0] < 210


@pytest.mark.parametrize("kwargs, message", [
    ({"first_id": -1}, "sampled_vocabulary.first_id must be >= 0, got -1"),
    ({"population_size": 0}, "sampled_vocabulary.population_size must be >= 1, got 0"),
])
def test_sampled_vocabulary_rejects_bad_population(kwargs, message):
  with pytest.raises(ValueError, match=message):
    initializers.sampled_vocabulary(**kwargs)


def test_first_id_beyond_the_vocabulary_is_rejected():
  init = initializers.sampled_vocabulary(first_id=300)
  with pytest.raises(ValueError, match="first_id=300 is not below the vocabulary size 300"):
    init(jax.random.key(0), (4, 8), TABLE)


def test_class_labels_average_subtokens_then_fill():
  vocab = seqio.ByteVocabulary()
  init = initializers.class_labels(["ab", "c"], vocab, population_size=50)
  p = np.asarray(init(jax.random.key(2), (5, 8), TABLE))
  ids_ab, ids_c = vocab.encode("ab"), vocab.encode("c")
  np.testing.assert_allclose(p[0], TABLE[ids_ab].mean(0), rtol=1e-6)
  np.testing.assert_allclose(p[1], TABLE[ids_c[0]], rtol=1e-6)
  for row in p[2:]:
    assert np.where(np.all(TABLE == row, axis=1))[0][0] < 50


def test_class_label_that_tokenises_to_nothing_is_rejected():
  with pytest.raises(ValueError, match="class label '' tokenises to no tokens"):
    initializers.class_labels(["positive", ""], seqio.ByteVocabulary())


def test_class_labels_need_room_in_the_prompt():
  init = initializers.class_labels(["a", "b", "c"], seqio.ByteVocabulary())
  with pytest.raises(ValueError, match="prompt length 2 is shorter than the 3 rows"):
    init(jax.random.key(0), (2, 8), TABLE)


def test_from_string_uses_each_token():
  vocab = seqio.ByteVocabulary()
  p = np.asarray(initializers.from_string("hi!", vocab, 10)(jax.random.key(3), (4, 8), TABLE))
  np.testing.assert_allclose(p[:3], TABLE[vocab.encode("hi!")], rtol=1e-6)


def test_from_array_checks_shape(tmp_path):
  path = tmp_path / "p.npy"
  np.save(path, np.ones((3, 8), np.float32))
  init = prompt_files.from_array(str(path))
  np.testing.assert_array_equal(init(jax.random.key(0), (3, 8), None), np.ones((3, 8)))
  with pytest.raises(ValueError, match=r"has shape \(3, 8\), expected \(4, 8\)"):
    init(jax.random.key(0), (4, 8), None)
  np.save(tmp_path / "bad.npy", np.ones((3,), np.float32))
  with pytest.raises(ValueError, match=r"must hold \[length, embed\], got shape \(3,\)"):
    prompt_files.from_array(str(tmp_path / "bad.npy"))


def test_prompt_initialiser_sees_the_frozen_embedding():
  """init_missing creates only the prompt and samples it from the *given* embedding table."""
  from prompt_jax.models.encoder_decoder import EncoderDecoderModel
  from prompt_jax.params import split_params, unbox
  cfg = t5.preset("tiny")
  model = EncoderDecoderModel(t5.Transformer(
      cfg, InputPrompt(Prompt(6, initializers.sampled_vocabulary(100)))))
  batch = model.dummy_batch(2, 8, 4)
  frozen = split_params(unbox(model.init(jax.random.key(0), batch)))[1]
  frozen["token_embedder"]["embedding"] = jnp.asarray(
      np.random.default_rng(5).normal(size=(384, 64)), jnp.float32)
  full = unbox(model.init_missing(jax.random.key(1), frozen, batch))
  prompt = np.asarray(full["encoder"]["prompt"]["prompt"]["prompt"])
  table = np.asarray(frozen["token_embedder"]["embedding"])
  for row in prompt:
    assert np.where(np.all(np.isclose(table, row), axis=1))[0][0] < 100


def test_released_prompt_loads_into_a_base_sized_config():
  path = shared_fixture("prompt_t5_1_1_lm100k_base_sst2.npy")
  released = np.load(path)
  module = t5.Transformer(t5.preset("t5_1_1_lm_adapted_base"),
                          InputPrompt(Prompt(100, prompt_files.from_array(str(path)))))
  tokens = jnp.ones((1, 4), jnp.int32)
  init = lambda: module.init(jax.random.key(0), tokens, tokens, tokens, enable_dropout=False)
  shapes = jax.eval_shape(init)["params"]["encoder"]["prompt"]["prompt"]["prompt"]
  assert tuple(shapes.value.shape) == released.shape == (100, 768)
  p = prompt_files.from_array(str(path))(jax.random.key(0), (100, 768), None)
  np.testing.assert_array_equal(np.asarray(p), released)
  with pytest.raises(ValueError, match=r"expected \(100, 512\)"):
    prompt_files.from_array(str(path))(jax.random.key(0), (100, 512), None)


# ------------------------------------------------------------------------------ placements


def _check_placement(placement: str, prompt_length: int = 3):
  """Insertion, mask and positions of `placement` agree: the prompt rows sit at `positions`, the
  mask is True there, and removing them gives back the inputs and their mask, in order."""
  rng = np.random.default_rng(7)
  tokens = rng.integers(3, 50, size=(3, 6)).astype(np.int32)
  for row, length in enumerate([6, 4, 2]):  # per-example padding
    tokens[row, length:] = 0
  embedded = rng.normal(size=(3, 6, 5)).astype(np.float32)
  prompt = rng.normal(size=(3, prompt_length, 5)).astype(np.float32)
  seq = np.asarray(base.insert_prompt(prompt, embedded, tokens, placement))
  mask = np.asarray(base.prompt_mask(tokens, prompt_length, placement))
  positions = np.asarray(base.prompt_positions(tokens, prompt_length, placement))
  assert seq.shape == (3, 6 + prompt_length, 5) and mask.shape == (3, 6 + prompt_length)
  for row in range(3):
    np.testing.assert_array_equal(seq[row, positions[row]], prompt[row])
    assert mask[row, positions[row]].all()
    np.testing.assert_array_equal(np.delete(seq[row], positions[row], axis=0), embedded[row])
    np.testing.assert_array_equal(np.delete(mask[row], positions[row]), tokens[row] > 0)
  return positions


@pytest.mark.parametrize("placement", base.PLACEMENTS)
def test_placement_insertion_mask_and_positions_agree(placement):
  positions = _check_placement(placement)
  lengths = np.array([6, 4, 2])
  start = {"prefix": np.zeros(3), "prefix_after_bos": np.ones(3), "suffix": lengths}[placement]
  np.testing.assert_array_equal(positions, start[:, None] + np.arange(3)[None, :])


def test_a_new_placement_is_one_table_entry(monkeypatch):
  monkeypatch.setitem(base.PLACEMENT_TABLE, "before_last_real",
                      base.Placement(start=lambda tokens: jnp.sum(tokens > 0, axis=1) - 1))
  positions = _check_placement("before_last_real")
  np.testing.assert_array_equal(positions[:, 0], [5, 3, 1])
  with pytest.raises(ValueError, match="prompt placement must be one of .* got 'middle'"):
    base.prompt_mask(jnp.ones((1, 2), jnp.int32), 1, "middle")
