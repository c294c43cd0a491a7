"""Packing with prompts: every packed example's loss and prompt gradient equal its unpacked ones,
examples in a row never see each other, and hooks that cannot pack are refused."""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from prompt_jax.data import packing
from prompt_jax.models import losses, t5
from prompt_jax.models.encoder_decoder import EncoderDecoderModel
from prompt_jax.prompts import initializers
from prompt_jax.prompts.bank import PromptBank
from prompt_jax.prompts.base import PROMPT_SLOT_ID, InputPrompt
from prompt_jax.prompts.deep import DeepPrompt
from prompt_jax.prompts.plain import Prompt
from tests.test_import_graph import import_graph

P = 5  # prompt length
ROW, TARGETS = 64, 16  # packed row: encoder positions (prompt slots included), decoder positions
CFG = t5.preset("tiny")


def _examples(seed=0, n=7, max_in=20, max_tgt=6):
  rng = np.random.default_rng(seed)
  out = []
  for _ in range(n):
    n_in, n_tgt = rng.integers(2, max_in + 1), rng.integers(1, max_tgt + 1)
    enc, tgt = np.zeros(max_in, np.int32), np.zeros(max_tgt, np.int32)
    enc[:n_in] = rng.integers(3, 300, n_in)
    tgt[:n_tgt] = rng.integers(3, 300, n_tgt)
    out.append({"encoder_input_tokens": enc, "decoder_target_tokens": tgt})
  return out


def _unpacked(examples):
  """The examples as one ordinary (padded) batch."""
  enc = np.stack([e["encoder_input_tokens"] for e in examples])
  tgt = np.stack([e["decoder_target_tokens"] for e in examples])
  dec_in = np.concatenate([np.zeros_like(tgt[:, :1]), tgt[:, :-1]], axis=1)
  return {"encoder_input_tokens": enc, "decoder_input_tokens": dec_in,
          "decoder_target_tokens": tgt, "decoder_loss_weights": (tgt > 0).astype(np.int32)}


@functools.cache
def _model_and_params(hook_name="prefix"):
  hooks = {
      "prefix": lambda: InputPrompt(Prompt(P, initializers.uniform())),
      "suffix": lambda: InputPrompt(Prompt(P, initializers.uniform()), "suffix"),
      "deep": lambda: DeepPrompt(Prompt(P, initializers.uniform()), layers=(1,)),
      "bank": lambda: PromptBank(num_prompts=1, length=P),
  }
  model = EncoderDecoderModel(t5.Transformer(CFG, hooks[hook_name]()))
  params = nn.unbox(model.init(jax.random.key(0), model.dummy_batch(2, 8, 4)))
  return model, params


def _token_losses(model, params, batch):
  """Per-token loss [b, t] (cross-entropy + z-loss) times the loss weights."""
  logits = model.logits(params, {k: jnp.asarray(v) for k, v in batch.items()})
  token_loss, _ = losses.cross_entropy_with_z_loss(logits, jnp.asarray(
      batch["decoder_target_tokens"]), model.z_loss)
  return np.asarray(token_loss * batch["decoder_loss_weights"])


def _packed_example_losses(model, params, batch, layout):
  """{example index: its loss summed over its target tokens} from one packed batch."""
  token_loss = _token_losses(model, params, batch)
  out = {}
  for r, row in enumerate(layout):
    sums = packing.segment_sums(token_loss[r], batch["decoder_segment_ids"][r])
    for segment, example in enumerate(row, start=1):
      out[example] = sums[segment]
  return out


def _pack(examples, rows=3):
  lengths = lambda key: [int(np.sum(e[key] > 0)) for e in examples]
  layout = packing.first_fit(lengths("encoder_input_tokens"), lengths("decoder_target_tokens"),
                             rows, ROW, TARGETS, P)
  batches = packing.pack_examples(examples, rows, ROW, TARGETS, P, slot_id=PROMPT_SLOT_ID)
  assert len(batches) == len(layout) == 1, "the test wants every example in one packed batch"
  assert max(len(row) for row in layout[0]) >= 2, "no row holds two examples"
  return batches[0], layout[0]


def test_packed_layout_reserves_the_prompt_in_front_of_every_example():
  examples = _examples()
  batch, layout = _pack(examples)
  for r, row in enumerate(layout):
    seg, pos = batch["encoder_segment_ids"][r], batch["encoder_positions"][r]
    for s, i in enumerate(row, start=1):
      tokens = examples[i]["encoder_input_tokens"]
      tokens = tokens[tokens > 0]
      np.testing.assert_array_equal(pos[seg == s], np.arange(P + len(tokens)))
      np.testing.assert_array_equal(batch["encoder_input_tokens"][r][seg == s],
                                    np.r_[[PROMPT_SLOT_ID] * P, tokens])
      targets = examples[i]["decoder_target_tokens"]
      targets = targets[targets > 0]
      dseg = batch["decoder_segment_ids"][r]
      np.testing.assert_array_equal(batch["decoder_target_tokens"][r][dseg == s], targets)
      np.testing.assert_array_equal(batch["decoder_input_tokens"][r][dseg == s],
                                    np.r_[0, targets[:-1]])
    assert np.all(batch["encoder_input_tokens"][r][seg == 0] == 0)


def test_packed_loss_per_example_equals_unpacked():
  model, params = _model_and_params()
  examples = _examples()
  unpacked = _token_losses(model, params, _unpacked(examples)).sum(axis=1)
  batch, layout = _pack(examples)
  packed = _packed_example_losses(model, params, batch, layout)
  np.testing.assert_allclose([packed[i] for i in range(len(examples))], unpacked,
                             rtol=1e-5, atol=1e-5)


def test_packed_batch_loss_and_prompt_gradient_equal_unpacked():
  # NUM_REAL_TARGET_TOKENS (T5X's default, also T5X's normaliser for packed batches) divides by
  # the same number of real target tokens either way.
  model, params = _model_and_params()
  examples = _examples()
  batch, _ = _pack(examples)

  def loss_and_grad(batch):
    def loss(prompt):
      full = dict(params, encoder=dict(params["encoder"], prompt=prompt))
      return model.loss_fn(full, {k: jnp.asarray(v) for k, v in batch.items()}, None)[0]
    return jax.value_and_grad(loss)(params["encoder"]["prompt"])

  loss_packed, grad_packed = loss_and_grad(batch)
  loss_unpacked, grad_unpacked = loss_and_grad(_unpacked(examples))
  np.testing.assert_allclose(loss_packed, loss_unpacked, rtol=1e-5, atol=1e-5)
  g_packed = grad_packed["prompt"]["prompt"]
  g_unpacked = grad_unpacked["prompt"]["prompt"]
  assert g_packed.shape == (P, CFG.emb_dim) and float(jnp.abs(g_unpacked).max()) > 1e-4
  np.testing.assert_allclose(g_packed, g_unpacked, rtol=1e-5, atol=1e-5)


def test_an_example_never_sees_the_others_in_its_row():
  model, params = _model_and_params()
  examples = _examples()
  batch, layout = _pack(examples)
  row = max(range(len(layout)), key=lambda r: len(layout[r]))
  changed = layout[row][0]
  before = _packed_example_losses(model, params, batch, layout)
  rng = np.random.default_rng(9)
  edited = [dict(e) for e in examples]
  for key in ("encoder_input_tokens", "decoder_target_tokens"):
    tokens = edited[changed][key].copy()
    tokens[tokens > 0] = rng.integers(3, 300, int(np.sum(tokens > 0)))
    edited[changed][key] = tokens
  batch2, layout2 = _pack(edited)
  assert layout2 == layout
  after = _packed_example_losses(model, params, batch2, layout)
  assert abs(after[changed] - before[changed]) > 1e-3  # the edit does change that example
  for other in layout[row][1:]:
    assert after[other] == before[other]  # bit for bit: masked pairs contribute exact zeros


def test_t5x_positional_call_gives_the_same_logits():
  model, params = _model_and_params()
  batch, _ = _pack(_examples())
  b = {k: jnp.asarray(v) for k, v in batch.items()}
  via_model = model.logits(params, b)
  positional = model.module.apply(
      {"params": params}, b["encoder_input_tokens"], b["decoder_input_tokens"],
      b["decoder_target_tokens"], b["encoder_segment_ids"], b["decoder_segment_ids"],
      b["encoder_positions"], b["decoder_positions"], enable_dropout=False)
  np.testing.assert_array_equal(via_model, positional)


@pytest.mark.parametrize("hook_name, message", [
    ("suffix", "packed inputs (encoder_segment_ids) need placement 'prefix', got "
               "InputPrompt.placement='suffix'"),
    ("deep", "DeepPrompt changes the hidden states of the prompt positions inside the encoder; "
             "packed inputs (encoder_segment_ids) work with InputPrompt only"),
    ("bank", "packed inputs (encoder_segment_ids) need a prompt hook that reads "
             "encoder_segment_ids; PromptBank does not"),
])
def test_hooks_that_cannot_pack_are_refused(hook_name, message):
  model, params = _model_and_params(hook_name)
  batch, _ = _pack(_examples())
  with pytest.raises(ValueError) as e:
    model.logits(params, {k: jnp.asarray(v) for k, v in batch.items()})
  assert str(e.value) == message


def test_segment_ids_without_positions_are_refused():
  model, params = _model_and_params()
  batch, _ = _pack(_examples())
  del batch["encoder_positions"]
  with pytest.raises(ValueError, match="InputPrompt got encoder_segment_ids without "
                                       "encoder_positions"):
    model.logits(params, {k: jnp.asarray(v) for k, v in batch.items()})


def test_rows_packed_without_the_prompt_reserved_give_a_nan_loss():
  # Plain EncDecFeatureConverter(pack=True) layout: no slots, the prompt would overwrite tokens.
  model, params = _model_and_params()
  batch = packing.pack_examples(_examples(), 3, ROW, TARGETS, prompt_length=0)[0]
  loss, _ = model.loss_fn(params, {k: jnp.asarray(v) for k, v in batch.items()}, None)
  assert np.isnan(loss)


def test_an_example_longer_than_a_row_is_refused():
  examples = _examples(n=1, max_in=70)
  examples[0]["encoder_input_tokens"][:] = 5
  with pytest.raises(ValueError, match="example 0 needs 5 prompt \\+ 70 input = 75 encoder"):
    packing.pack_examples(examples, 2, ROW, TARGETS, P, slot_id=PROMPT_SLOT_ID)


def test_the_data_side_imports_no_prompt_module():
  graph = import_graph()
  assert not {m for m in graph["prompt_jax.data.packing"] if m.startswith("prompt_jax.prompts")}


def test_prompt_slots_need_the_hooks_slot_token():
  # The data side does not know the prompt: the caller passes the hook's slot token.
  for slot_id in (None, 0, True):
    with pytest.raises(ValueError, match="prompt_length=5 reserves prompt slots: slot_id must be "
                                         "the prompt hook's slot token >= 1"):
      packing.pack_examples(_examples(), 2, ROW, TARGETS, P, slot_id=slot_id)
  with pytest.raises(ValueError, match="slot_id must be"):
    packing.feature_converter(P)


def test_first_fit_fills_earlier_rows_first_and_closes_full_batches():
  layout = packing.first_fit([10, 50, 5, 40, 30], [1] * 5, rows=2, input_length=64,
                             target_length=8, prompt_length=4)
  # 14 | 54 -> new row | 9 fits row 0 | 44 fits nowhere, batch full -> new batch | 34 new row
  assert layout == [[[0, 2], [1]], [[3], [4]]]
  # With 3 rows open, 44 opens a third row and 34 still fits row 0.
  layout = packing.first_fit([10, 50, 5, 40, 30], [1] * 5, rows=2, input_length=64,
                             target_length=8, prompt_length=4, open_rows=3)
  assert layout == [[[0, 2, 4], [1]], [[3]]]


def test_seqio_converter_packs_with_the_prompt_reserved_and_losses_match():
  tf = pytest.importorskip("tensorflow")
  model, params = _model_and_params()
  examples = _examples(seed=3)
  strip = lambda x: x[x > 0]
  ds = None
  for e in examples:
    one = tf.data.Dataset.from_tensors({"inputs": strip(e["encoder_input_tokens"]),
                                        "targets": strip(e["decoder_target_tokens"])})
    ds = one if ds is None else ds.concatenate(one)
  converter = packing.feature_converter(P, slot_id=PROMPT_SLOT_ID)
  rows = list(converter(ds, {"inputs": ROW, "targets": TARGETS}).as_numpy_iterator())
  batch = {k: np.stack([r[k] for r in rows]).astype(np.int32) for k in packing.PACKED_KEYS}
  layout, i = [], 0  # seqio packs in order
  for r in range(len(rows)):
    n = int(batch["encoder_segment_ids"][r].max())
    layout.append(list(range(i, i + n)))
    i += n
  assert i == len(examples) and max(len(row) for row in layout) >= 2
  for r, row in enumerate(layout):
    seg, pos = batch["encoder_segment_ids"][r], batch["encoder_positions"][r]
    for s, j in enumerate(row, start=1):
      tokens = strip(examples[j]["encoder_input_tokens"])
      np.testing.assert_array_equal(pos[seg == s], np.arange(P + len(tokens)))
      np.testing.assert_array_equal(batch["encoder_input_tokens"][r][seg == s],
                                    np.r_[[PROMPT_SLOT_ID] * P, tokens])
  packed = _packed_example_losses(model, params, batch, layout)
  unpacked = _token_losses(model, params, _unpacked(examples)).sum(axis=1)
  np.testing.assert_allclose([packed[j] for j in range(len(examples))], unpacked,
                             rtol=1e-5, atol=1e-5)
