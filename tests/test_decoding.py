"""Beam search and sampling (prompt_jax/models/decoding.py), checked against independent
computations.

- Beam search as wide as the search space returns exactly the exhaustive ranking of every
  complete sequence, each scored by teacher forcing the whole sequence through the model
  (`model.logits`, cross-checked with `model.score_batch`), with alpha = 0 and with T5X's
  brevity penalty ((5 + len) / 6) ** alpha computed here in NumPy.
- One beam, temperature -> 0 and top-k = 1 all give `predict_batch`'s greedy tokens, also on the
  Hugging Face fixture (whose greedy ids transformers produced).
- The first-step token distribution of many samples matches softmax(logits / T) within a
  total-variation bound that a wrong temperature or a wrong top-k / top-p support breaks.
- Samples are reproducible given the seed, do not depend on the batch an example is in, and
  beams of a prompt bank keep their example's prompt.
- An 8-device mesh (8x1 and 4x2, in a subprocess) gives the 1-device beams and samples.
- On the Hugging Face fixture, 4-beam search gives the beams and scores of transformers'
  `generate(num_beams=4, length_penalty=0.0)`, recorded below as constants (the test itself
  runs no torch or transformers).
"""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
import textwrap

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import seqio

from prompt_jax.host_devices import with_device_count
from prompt_jax.interop import hf
from prompt_jax.models import decoding, t5
from prompt_jax.models.encoder_decoder import EncoderDecoderModel
from prompt_jax.programs import PromptPrograms
from prompt_jax.prompts import initializers
from prompt_jax.prompts.bank import PromptBank
from prompt_jax.prompts.base import InputPrompt
from prompt_jax.prompts.plain import Prompt
from prompt_jax.serving import inference
from tests.conftest import REPO_ROOT, shared_fixture

EOS = 1
INPUTS = np.array([[2, 3, 4, 1, 0, 0], [3, 3, 2, 4, 2, 1]], np.int32)


def _small(vocab: int, seed: int = 0, dtype: str = "float32", logit_scale: float = 1.0):
  """A random T5 1.1 with a `vocab`-token vocabulary -> (model, params)."""
  cfg = t5.T5Config(vocab_size=vocab, emb_dim=32, num_heads=2, head_dim=8, mlp_dim=64,
                    num_encoder_layers=2, num_decoder_layers=2, dropout_rate=0.0, dtype=dtype)
  model = EncoderDecoderModel(t5.Transformer(cfg))
  params = nn.unbox(model.init(jax.random.key(seed), model.dummy_batch(1, 6, 4)))
  kernel = params["decoder"]["logits_dense"]["kernel"]
  params["decoder"]["logits_dense"]["kernel"] = kernel * logit_scale
  return model, params


def _jit_decode(fn, model, *args, **kwargs):
  return jax.jit(lambda p, b: fn(model, p, b, *args, **kwargs))


# --------------------------------------------------------------- the independent reference


def _complete_sequences(vocab: int, length: int):
  """Every sequence a decoder can finish with: ended by EOS at position 1..length, or `length`
  tokens without EOS (truncated)."""
  others = [t for t in range(vocab) if t != EOS]
  seqs = []
  for n in range(1, length + 1):
    seqs += [prefix + (EOS,) for prefix in itertools.product(others, repeat=n - 1)]
  seqs += list(itertools.product(others, repeat=length))
  return seqs


def _teacher_forced_log_likelihoods(model, params, inputs_row, seqs, length):
  """float64 log-likelihood of each sequence given one input, from one teacher-forced forward
  pass over all of them. The decoder mask comes from all-ones targets (padding masks only the
  targets' zeros otherwise, and 0 is an ordinary token for a decoder)."""
  targets = np.zeros((len(seqs), length), np.int32)
  for i, s in enumerate(seqs):
    targets[i, :len(s)] = s
  decoder_inputs = np.pad(targets[:, :-1], ((0, 0), (1, 0)))
  batch = {"encoder_input_tokens": np.repeat(inputs_row[None], len(seqs), 0),
           "decoder_input_tokens": decoder_inputs,
           "decoder_target_tokens": np.ones_like(targets)}
  logits = np.asarray(jax.jit(model.logits)(params, batch), np.float64)
  log_probs = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
  token_ll = np.take_along_axis(log_probs, targets[..., None], -1)[..., 0]
  lengths = np.array([len(s) for s in seqs])
  ll = (token_ll * (np.arange(length)[None] < lengths[:, None])).sum(1)
  # The same numbers through score_batch, for the sequences its padding mask reads correctly.
  plain = [i for i, s in enumerate(seqs) if 0 not in s]
  scored = jax.jit(model.score_batch)(params, {
      "encoder_input_tokens": batch["encoder_input_tokens"][plain],
      "decoder_input_tokens": decoder_inputs[plain], "decoder_target_tokens": targets[plain]})
  np.testing.assert_allclose(np.asarray(scored), ll[plain], atol=1e-4, rtol=0)
  return ll, lengths


def _ranked(seqs, ll, lengths, alpha):
  scores = ll / ((5.0 + lengths) / 6.0) ** alpha  # T5X's brevity penalty, EOS counted
  order = np.argsort(-scores, kind="stable")
  return [seqs[i] for i in order], scores[order]


def _as_tuples(tokens):
  """[n, L] decoder output (0 after EOS) -> sequences without the trailing padding."""
  out = []
  for row in np.asarray(tokens):
    row = [int(t) for t in row]
    out.append(tuple(row[:row.index(EOS) + 1]) if EOS in row else tuple(row))
  return out


# --------------------------------------------------------------------------- beam search

VOCAB, LENGTH = 5, 3
SPACE = _complete_sequences(VOCAB, LENGTH)  # 1 + 4 + 16 + 64 = 85


@pytest.fixture(scope="module")
def small():
  return _small(VOCAB, logit_scale=0.6)


@pytest.fixture(scope="module")
def reference(small):
  model, params = small
  return [_teacher_forced_log_likelihoods(model, params, row, SPACE, LENGTH) for row in INPUTS]


@pytest.mark.parametrize("alpha", [0.0, 0.6])
def test_beam_as_wide_as_the_search_space_is_the_exhaustive_ranking(small, reference, alpha):
  """85 beams: no step has more than 16 * 5 = 80 candidates, so nothing is pruned and the
  search must return every complete sequence, ranked exactly as the enumeration ranks them."""
  model, params = small
  tokens, scores = _jit_decode(decoding.beam_search, model, LENGTH, len(SPACE), alpha)(
      params, {"encoder_input_tokens": INPUTS})
  assert tokens.shape == (2, len(SPACE), LENGTH) and scores.dtype == jnp.float32
  for row, (ll, lengths) in enumerate(reference):
    want_seqs, want_scores = _ranked(SPACE, ll, lengths, alpha)
    got = _as_tuples(tokens[row])
    np.testing.assert_allclose(np.asarray(scores[row]), want_scores, atol=2e-5, rtol=0)
    # Sequences match one for one (the reference scores have no near-ties at this tolerance).
    assert np.min(np.diff(-want_scores)) > 1e-4
    assert got == want_seqs
    # A real competition between lengths: the top ten mix EOS at 1, 2, 3 and truncation.
    assert len({(len(s), s[-1] == EOS) for s in want_seqs[:10]}) >= 3


def test_brevity_penalty_changes_the_ranking_as_t5x_defines_it(reference):
  """The two rankings above differ (so a search ignoring alpha fails one of them)."""
  for ll, lengths in reference:
    assert _ranked(SPACE, ll, lengths, 0.0)[0][:10] != _ranked(SPACE, ll, lengths, 0.6)[0][:10]
  np.testing.assert_allclose(np.asarray(decoding.brevity_penalty(0.6, 7)), (12 / 6) ** 0.6)


def test_narrow_beams_score_what_they_return(small, reference):
  """4 beams: distinct sequences, best first, each with its teacher-forced score."""
  model, params = small
  for alpha in (0.0, 0.6):
    tokens, scores = _jit_decode(decoding.beam_search, model, LENGTH, 4, alpha)(
        params, {"encoder_input_tokens": INPUTS})
    for row, (ll, lengths) in enumerate(reference):
      exact = dict(zip(SPACE, ll / ((5.0 + lengths) / 6.0) ** alpha))
      got = _as_tuples(tokens[row])
      assert len(set(got)) == 4
      np.testing.assert_allclose(np.asarray(scores[row]), [exact[s] for s in got], atol=2e-5)
      assert np.all(np.diff(np.asarray(scores[row])) <= 0)
      # The best of 4 beams is the exhaustive best here.
      assert got[0] == _ranked(SPACE, ll, lengths, alpha)[0][0]


def test_empty_beam_slots_are_marked():
  """More beams (10) than complete sequences (vocabulary {0, EOS, 2}, length 2: [EOS], two
  ending in EOS, four truncated): the 3 slots left are -inf with tokens 0."""
  model, params = _small(3)
  space = _complete_sequences(3, 2)
  tokens, scores = _jit_decode(decoding.beam_search, model, 2, len(space) + 3, 0.0)(
      params, {"encoder_input_tokens": INPUTS % 3})
  assert np.all(np.isfinite(np.asarray(scores[:, :len(space)])))
  assert np.all(np.asarray(scores[:, len(space):]) == -np.inf)
  assert not np.asarray(tokens[:, len(space):]).any()
  assert sorted(_as_tuples(tokens[0, :len(space)])) == sorted(space)


# ------------------------------------------------------------------ greedy, three ways


def _tiny_random():
  model = EncoderDecoderModel(t5.Transformer(t5.preset("tiny")))
  params = nn.unbox(model.init(jax.random.key(3), model.dummy_batch(1, 9, 7)))
  tokens = np.array(jax.random.randint(jax.random.key(1), (3, 9), 3, 300), np.int32)
  tokens[0, 6:] = 0
  return model, params, tokens


@pytest.mark.parametrize("which", ["tiny", "small_vocab", "bf16"])
def test_one_beam_and_cold_sampling_are_greedy(which):
  if which == "tiny":
    model, params, tokens = _tiny_random()
    length = 7
  else:
    # Seed 9 of the 8-token model: greedy ends row 0 with EOS at step 2, row 1 runs to the end.
    model, params = _small(8, 9, "bfloat16" if which == "bf16" else "float32")
    tokens, length = INPUTS % 8, 5
  batch = {"encoder_input_tokens": tokens}
  want = np.asarray(jax.jit(model.predict_batch, static_argnums=2)(params, batch, length))
  decoders = [decoding.Greedy(), decoding.BeamSearch(num_decodes=1, alpha=0.0),
              decoding.TemperatureSampling(temperature=0.0),
              decoding.TemperatureSampling(temperature=1e-5, seed=3),
              decoding.TemperatureSampling(temperature=1.0, topk=1, seed=3)]
  for decoder in decoders:
    out, scores = jax.jit(lambda p, b, d=decoder: d(model, p, b, length))(params, batch)
    np.testing.assert_array_equal(np.asarray(out)[:, 0], want, err_msg=str(decoder))
    assert out.shape == (len(tokens), 1, length) and scores.dtype == jnp.float32
  if which == "tiny":
    assert len(np.unique(want)) > 3  # a real decode, not a constant
  elif which == "small_vocab":
    assert want[0, 1] == EOS and EOS not in want[1]  # one row ends early, one does not


def test_sampling_just_above_the_greedy_threshold_is_greedy():
  """temperature 1e-3 takes the sampling path; with the greedy path's smallest top-2 logit gap
  (checked here) a sample differs from argmax with probability < e^-20."""
  model, params = _small(8, 9)
  batch = {"encoder_input_tokens": INPUTS % 8}
  want = np.asarray(jax.jit(model.predict_batch, static_argnums=2)(params, batch, 7))
  decoder_inputs = np.pad(want[:, :-1], ((0, 0), (1, 0)))
  logits = np.asarray(jax.jit(model.logits)(params, dict(
      batch, decoder_input_tokens=decoder_inputs, decoder_target_tokens=np.ones_like(want))))
  top2 = np.sort(logits, -1)[..., -2:]
  assert (top2[..., 1] - top2[..., 0]).min() > 0.02
  out, _ = _jit_decode(decoding.temperature_sample, model, 7, jax.random.key(0), 1e-3,
                       num_decodes=3)(params, batch)
  np.testing.assert_array_equal(np.asarray(out), np.repeat(want[:, None], 3, 1))


def test_greedy_reproduces_transformers_generate_on_the_hf_fixture():
  path = shared_fixture("hf_t5_tiny_v1_1")
  cfg, params = hf.load_t5(str(path))
  model = EncoderDecoderModel(t5.Transformer(cfg))
  ids = np.load(path / "input_ids.npy")
  generated = np.load(path / "generated_ids.npy")[:, 1:]  # transformers 4.57.6, greedy
  batch = {"encoder_input_tokens": ids}
  for decoder in (decoding.Greedy(), decoding.BeamSearch(1, 0.0),
                  decoding.TemperatureSampling(topk=1)):
    out, _ = jax.jit(lambda p, b, d=decoder: d(model, p, b, generated.shape[1]))(params, batch)
    np.testing.assert_array_equal(np.asarray(out)[:, 0], generated)


# Hugging Face's 4-beam search on the fixture model, produced with transformers 4.57.6 and torch
# 2.13.0+cpu (one thread) by
#   model = T5ForConditionalGeneration.from_pretrained("../shared/fixtures/hf_t5_tiny_v1_1")
#   out = model.generate(input_ids=HF_BEAM_INPUTS, attention_mask=HF_BEAM_INPUTS != 0,
#                        max_new_tokens=6, num_beams=4, num_return_sequences=4,
#                        length_penalty=0.0, early_stopping=False, do_sample=False,
#                        output_scores=True, return_dict_in_generate=True)
# HF_BEAM_TOKENS are out.sequences without the start token 0, with what HF writes after EOS
# (more EOS) set to 0 as ours does; HF_BEAM_SCORES are out.sequences_scores (each checked there
# to equal its beam's teacher-forced log-likelihood, EOS included, within 1e-4).
# early_stopping=False is HF's default: a batch row stops when its best running log-likelihood
# cannot beat its worst finished beam, which with length_penalty=0 is exact and is our stopping
# rule (early_stopping=True would stop at the 4th finished beam, a different search).
# Rows 0-1 are the fixture's input_ids; rows 2-7 were picked from random inputs because beams
# end in EOS at different steps (6 of the 8 rows), including at the last step, next to beams
# truncated at 6 tokens.
HF_BEAM_INPUTS = [
    [79, 33, 124, 121, 10, 25, 27, 24, 75, 46, 62, 1], [121, 86, 85, 16, 22, 114, 41, 1],
    [87, 72, 1], [118, 38, 16, 19, 124, 1], [38, 16, 1], [16, 67, 99, 1], [50, 34, 43, 1],
    [26, 90, 35, 122, 1]]
HF_BEAM_TOKENS = [
    [[93, 76, 99, 99, 99, 99], [29, 44, 62, 20, 126, 97], [29, 41, 97, 38, 86, 107],
     [29, 41, 97, 38, 6, 126]],
    [[57, 65, 30, 30, 30, 30], [57, 65, 30, 101, 120, 16], [57, 65, 30, 22, 38, 51],
     [57, 65, 30, 30, 30, 22]],
    [[93, 101, 1, 0, 0, 0], [93, 67, 1, 0, 0, 0], [101, 101, 1, 0, 0, 0], [93, 67, 4, 117, 1, 0]],
    [[93, 1, 0, 0, 0, 0], [93, 93, 1, 0, 0, 0], [122, 77, 123, 1, 0, 0],
     [93, 32, 108, 75, 16, 15]],
    [[93, 51, 113, 11, 1, 0], [93, 51, 113, 11, 101, 52], [93, 51, 113, 11, 52, 52],
     [93, 51, 113, 11, 11, 1]],
    [[93, 72, 8, 11, 1, 0], [93, 99, 99, 99, 99, 99], [93, 72, 1, 0, 0, 0], [93, 95, 72, 1, 0, 0]],
    [[122, 41, 7, 68, 15, 51], [41, 7, 68, 117, 1, 0], [41, 7, 68, 15, 51, 7],
     [122, 41, 7, 68, 117, 1]],
    [[29, 75, 15, 15, 15, 15], [122, 52, 52, 4, 4, 4], [122, 41, 26, 77, 1, 0],
     [122, 41, 26, 77, 123, 1]]]
HF_BEAM_SCORES = [
    [-0.901724, -4.291814, -4.390117, -4.396055], [-2.754774, -3.148073, -3.632113, -3.642805],
    [-2.148438, -2.354223, -2.754853, -3.929183], [-1.223223, -3.211088, -3.572772, -3.833479],
    [-0.806104, -3.166891, -3.294434, -3.299424], [-1.174618, -1.71477, -2.785825, -3.2968],
    [-2.087206, -2.115607, -3.144405, -3.225555], [-2.348977, -4.726151, -5.423078, -5.678741]]


def test_beam_search_reproduces_transformers_beams_on_the_hf_fixture():
  path = shared_fixture("hf_t5_tiny_v1_1")
  cfg, params = hf.load_t5(str(path))
  model = EncoderDecoderModel(t5.Transformer(cfg))
  inputs = np.zeros((len(HF_BEAM_INPUTS), 12), np.int32)
  for row, ids in zip(inputs, HF_BEAM_INPUTS):
    row[:len(ids)] = ids
  np.testing.assert_array_equal(inputs[:2], np.load(path / "input_ids.npy"))
  tokens, scores = _jit_decode(decoding.beam_search, model, 6, 4, 0.0)(
      params, {"encoder_input_tokens": inputs})
  np.testing.assert_array_equal(np.asarray(tokens), np.array(HF_BEAM_TOKENS))
  np.testing.assert_allclose(np.asarray(scores), np.array(HF_BEAM_SCORES), atol=1e-4, rtol=0)
  # The beams do compete across lengths: EOS at 5 different steps, and beams truncated at 6.
  ends = {seq.index(EOS) + 1 if EOS in seq else 0 for beams in HF_BEAM_TOKENS for seq in beams}
  assert ends == {0, 2, 3, 4, 5, 6}


# ------------------------------------------------------------------------------ sampling

SAMPLES = 4000


def _first_step_probs(model, params, inputs, temperature):
  batch = {"encoder_input_tokens": inputs, "decoder_input_tokens": np.zeros((len(inputs), 1),
                                                                           np.int32),
           "decoder_target_tokens": np.ones((len(inputs), 1), np.int32)}
  logits = np.asarray(jax.jit(model.logits)(params, batch), np.float64)[:, 0]
  z = logits / temperature
  p = np.exp(z - z.max(-1, keepdims=True))
  return logits, p / p.sum(-1, keepdims=True)


def _first_tokens(model, params, inputs, seed=0, **kwargs):
  out, _ = _jit_decode(decoding.temperature_sample, model, 1, jax.random.key(seed),
                       num_decodes=SAMPLES, **kwargs)(params, {"encoder_input_tokens": inputs})
  return np.asarray(out)[:, :, 0]


def _tv(samples, probs):
  empirical = np.bincount(samples, minlength=len(probs)) / len(samples)
  return 0.5 * np.abs(empirical - probs).sum()


@pytest.fixture(scope="module")
def eight():
  return _small(8, seed=9)


def test_first_step_samples_follow_softmax_of_logits_over_temperature(eight):
  """TV(empirical, softmax(l / T)) is about 0.02 for 4000 samples of 8 tokens; the bound 0.05
  fails for the wrong temperature (checked: TV to softmax(l) is far larger)."""
  model, params = eight
  temperature = 0.5
  _, want = _first_step_probs(model, params, INPUTS % 8, temperature)
  _, at_one = _first_step_probs(model, params, INPUTS % 8, 1.0)
  samples = _first_tokens(model, params, INPUTS % 8, temperature=temperature)
  for row in range(len(INPUTS)):
    assert 0.5 * np.abs(want[row] - at_one[row]).sum() > 0.15  # the bound can tell T apart
    assert _tv(samples[row], want[row]) < 0.05


def test_top_k_and_top_p_restrict_the_support(eight):
  model, params = eight
  inputs = INPUTS % 8
  logits, probs = _first_step_probs(model, params, inputs, 1.0)
  samples = _first_tokens(model, params, inputs, temperature=1.0, topk=3)
  for row in range(len(inputs)):
    allowed = np.argsort(-logits[row])[:3]
    assert set(np.unique(samples[row])) == set(allowed.tolist())
    want = np.zeros(8)
    want[allowed] = probs[row, allowed] / probs[row, allowed].sum()
    assert _tv(samples[row], want) < 0.05
  topp = 0.6
  samples = _first_tokens(model, params, inputs, temperature=1.0, topp=topp)
  for row in range(len(inputs)):
    order = np.argsort(-probs[row])
    mass_before = np.cumsum(probs[row, order]) - probs[row, order]
    allowed = order[mass_before < topp]  # the smallest prefix with mass >= topp
    assert 1 < len(allowed) < 6
    assert set(np.unique(samples[row])) == set(allowed.tolist())
    want = np.zeros(8)
    want[allowed] = probs[row, allowed] / probs[row, allowed].sum()
    assert _tv(samples[row], want) < 0.05


def test_sampling_support_at_the_nucleus_boundary():
  logits = jnp.log(jnp.array([[0.05, 0.5, 0.15, 0.3]]))
  for topp, kept in ((0.45, {1}), (0.75, {1, 3}), (0.85, {1, 2, 3}), (1.0, {0, 1, 2, 3})):
    support, ids = decoding.sampling_support(logits, 1.0, topp=topp)
    ids = np.arange(4) if ids is None else np.asarray(ids)[0]
    assert {int(i) for i, v in zip(ids, np.asarray(support)[0]) if v > -np.inf} == kept
  support, ids = decoding.sampling_support(logits, 2.0, topk=2, topp=0.7)
  assert np.asarray(ids)[0].tolist() == [1, 3]
  np.testing.assert_allclose(np.asarray(support)[0], np.log([0.5, 0.3]) / 2.0, rtol=1e-6)


def test_samples_are_reproducible_per_example_and_scored_by_the_model(eight):
  model, params = eight
  inputs = INPUTS % 8
  run = lambda seed, x: _jit_decode(decoding.temperature_sample, model, 4, jax.random.key(seed),
                                    0.9, num_decodes=6)(params, {"encoder_input_tokens": x})
  tokens, scores = run(7, inputs)
  again, _ = run(7, inputs)
  np.testing.assert_array_equal(np.asarray(tokens), np.asarray(again))
  assert not np.array_equal(np.asarray(run(8, inputs)[0]), np.asarray(tokens))
  # The same example in another batch (another position, other neighbours, more padding):
  # the same samples.
  other = np.zeros((3, 9), np.int32)
  other[0, :6], other[2, :6] = inputs[1], (inputs[0] + 3) % 8
  other[1, :6] = inputs[0]
  moved, _ = run(7, other)
  np.testing.assert_array_equal(np.asarray(moved[1]), np.asarray(tokens[0]))
  np.testing.assert_array_equal(np.asarray(moved[0]), np.asarray(tokens[1]))
  # Scores: the model's log-likelihood of each sample (EOS included), best first.
  for row in range(len(inputs)):
    seqs = _as_tuples(tokens[row])
    assert len(set(seqs)) > 1
    ll, _ = _teacher_forced_log_likelihoods(model, params, inputs[row], seqs, 4)
    np.testing.assert_allclose(np.asarray(scores[row]), ll, atol=2e-5)
    assert np.all(np.diff(np.asarray(scores[row])) <= 0)


# ------------------------------------------------------------------- prompt banks and seams


def test_every_beam_keeps_its_examples_prompt():
  """A bank of 3 prompts; 4 examples with mixed prompt ids decode as each does alone."""
  model = EncoderDecoderModel(t5.Transformer(
      t5.preset("tiny"), PromptBank(3, 4, initializers.uniform(-1.0, 1.0))))
  params = nn.unbox(model.init(jax.random.key(5), model.dummy_batch(1, 9, 6)))
  tokens = np.array(jax.random.randint(jax.random.key(2), (4, 9), 3, 300), np.int32)
  tokens[1] = tokens[0]
  ids = np.array([0, 2, 1, 2], np.int32)
  for decoder in (decoding.BeamSearch(3, 0.6), decoding.TemperatureSampling(0.8, seed=1,
                                                                            num_decodes=2)):
    fn = jax.jit(lambda p, b, d=decoder: d(model, p, b, 6))
    mixed, mixed_scores = fn(params, {"encoder_input_tokens": tokens, "prompt_ids": ids})
    for i in range(4):
      alone, alone_scores = fn(params, {"encoder_input_tokens": tokens[i:i + 1],
                                        "prompt_ids": ids[i:i + 1]})
      np.testing.assert_array_equal(np.asarray(mixed[i]), np.asarray(alone[0]))
      np.testing.assert_allclose(np.asarray(mixed_scores[i]), np.asarray(alone_scores[0]),
                                 atol=1e-5)
    # Same input, different prompt: different decodes (so the check above can fail).
    assert not np.array_equal(np.asarray(mixed[0]), np.asarray(mixed[1]))


def test_decoders_are_hashable_validated_and_parsed():
  assert hash(decoding.BeamSearch(4, 0.6)) == hash(decoding.BeamSearch(4, 0.6))
  assert decoding.resolve(None) == decoding.Greedy()
  assert decoding.parse("greedy") == decoding.Greedy()
  assert decoding.parse("beam_search(num_decodes=8, alpha=0.0)") == decoding.BeamSearch(8, 0.0)
  assert decoding.parse("temperature_sample(temperature=0.7, topk=40, seed=2)") == \
      decoding.TemperatureSampling(0.7, 40, 0.0, 2)
  for bad, message in (("beam(3)", "unknown decoding"),
                       ("beam_search(beams=3)", "has no parameter 'beams'"),
                       ("beam_search(3)", "keyword=literal")):
    with pytest.raises(ValueError, match=message):
      decoding.parse(bad)
  with pytest.raises(ValueError, match="alpha"):
    decoding.BeamSearch(4, -1.0)
  with pytest.raises(ValueError, match="topp"):
    decoding.TemperatureSampling(topp=1.5)
  with pytest.raises(ValueError, match="num_decodes"):
    decoding.BeamSearch(0)


def test_programs_predict_takes_the_decoding():
  model = EncoderDecoderModel(t5.Transformer(
      t5.preset("tiny"), InputPrompt(Prompt(4, initializers.uniform()))))
  pp = PromptPrograms(model, input_length=32, target_length=8)
  frozen = pp.load_frozen_params("builtin:demo_t5_tiny.npz")
  prompt = pp.init_prompt(frozen, jax.random.key(0))
  texts = ["sentiment: the soup was awful", "topic: a wonderful film", "adjective: bland rice",
           "sentiment: great service"]
  batch = {"encoder_input_tokens": inference.encode_inputs(texts, seqio.ByteVocabulary(), 32)}
  greedy = pp.predict(prompt, frozen, batch, 8)
  assert greedy.shape == (4, 8)
  np.testing.assert_array_equal(pp.predict(prompt, frozen, batch, 8, decoding.BeamSearch(1, 0.)),
                                greedy)
  beams, scores = pp.predict(prompt, frozen, batch, 8, decoding.BeamSearch(4, 0.6),
                             return_scores=True)
  assert beams.shape == (4, 4, 8) and scores.shape == (4, 4)
  assert np.all(np.diff(scores, axis=1) <= 0)
  np.testing.assert_array_equal(pp.predict(prompt, frozen, batch, 8, decoding.BeamSearch(4, 0.6)),
                                beams[:, 0])


# --------------------------------------------------------------------------------- meshes

MESH_SCRIPT = textwrap.dedent("""
    import json, jax, numpy as np
    from prompt_jax.models import decoding
    from prompt_jax.data import pipeline, synthetic  # noqa: F401 (registers demo_sentiment)
    from prompt_jax.models import t5
    from prompt_jax.models.encoder_decoder import EncoderDecoderModel
    from prompt_jax.partitioning import Partitioner
    from prompt_jax.programs import PromptPrograms
    from prompt_jax.prompts import initializers
    from prompt_jax.prompts.bank import PromptBank
    assert len(jax.devices()) == 8, jax.devices()
    model = EncoderDecoderModel(t5.Transformer(t5.preset('tiny'),
                                               PromptBank(2, 4, initializers.sampled_vocabulary())))
    cfg = pipeline.DatasetConfig('demo_sentiment', {'inputs': 48, 'targets': 8}, batch_size=8)
    batch = next(pipeline.iterate_batches(cfg))
    batch = {'encoder_input_tokens': batch['encoder_input_tokens'],
             'prompt_ids': np.arange(8, dtype=np.int32) % 2}
    decoders = {'beam': decoding.BeamSearch(4, 0.6),
                'sample': decoding.TemperatureSampling(0.8, topk=20, seed=3, num_decodes=2)}
    devices = jax.devices()
    meshes = {'1x1': Partitioner(devices=devices[:1]), '8x1': Partitioner(num_partitions=1),
              '4x2': Partitioner(num_partitions=2)}
    out = {}
    for name, partitioner in meshes.items():
      pp = PromptPrograms(model, partitioner, input_length=48, target_length=8)
      frozen = pp.load_frozen_params('builtin:demo_t5_tiny.npz')
      prompt = pp.init_prompt(frozen, jax.random.key(0))
      for kind, decoder in decoders.items():
        tokens, scores = pp.predict(prompt, frozen, batch, 8, decoder, return_scores=True)
        out[f'{name}/{kind}'] = {'tokens': tokens.tolist(), 'scores': scores.tolist()}
    print('RESULT' + json.dumps(out))
""")


def test_an_8_device_mesh_decodes_as_one_device():
  env = dict(os.environ, XLA_FLAGS=with_device_count(os.environ.get("XLA_FLAGS", ""), 8),
             JAX_PLATFORMS="cpu")
  proc = subprocess.run([sys.executable, "-c", MESH_SCRIPT], cwd=REPO_ROOT, env=env,
                        capture_output=True, text=True, timeout=900)
  assert proc.returncode == 0, proc.stderr[-4000:]
  out = json.loads(proc.stdout.split("RESULT", 1)[1])
  for kind in ("beam", "sample"):
    one = out[f"1x1/{kind}"]
    assert len({tuple(map(tuple, rows)) for rows in one["tokens"]}) > 1  # not all alike
    for mesh in ("8x1", "4x2"):
      many = out[f"{mesh}/{kind}"]
      np.testing.assert_array_equal(many["tokens"], one["tokens"], err_msg=f"{mesh} {kind}")
      np.testing.assert_allclose(many["scores"], one["scores"], atol=1e-4, rtol=0)
