"""Prefix tuning: the model's attention-prefix channel against an independent NumPy T5 (every
attention kind, no position bias on the prefix), the authors' MLP against NumPy and folded away
exactly, cached greedy/beam decoding against teacher forcing (per layer, scanned and remat),
only the prefix parameters train, the gin file, and the demo trained to >= 95% accuracy."""

from __future__ import annotations

import json

import flax
import flax.linen as nn
import gin
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from prompt_jax import cli, gin_utils
from prompt_jax import params as params_lib
from prompt_jax.data import pipeline, synthetic  # noqa: F401  (registers demo tasks)
from prompt_jax.models import decoding, layer_stack, t5
from prompt_jax.models.encoder_decoder import EncoderDecoderModel
from prompt_jax.partitioning import Partitioner
from prompt_jax.programs import PromptPrograms
from prompt_jax.prompts import base, prefix
from prompt_jax.training import optimizers
from tests import reference_t5
from tests.conftest import GIN_CONFIGS

ENC = np.array([[5, 9, 17, 33, 60, 1, 0, 0], [7, 8, 1, 0, 0, 0, 0, 0]], np.int32)
DEC_IN = np.array([[0, 11, 12, 13, 14], [0, 21, 22, 0, 0]], np.int32)
DEC_TGT = np.array([[11, 12, 13, 14, 1], [21, 22, 1, 0, 0]], np.int32)
DEMO_CHECKPOINT = "builtin:demo_t5_tiny.npz"


def _flat(tree):
  return flax.traverse_util.flatten_dict(flax.core.unfreeze(tree), sep="/")


def _model_and_params(hook, seed=0, **config):
  module = t5.Transformer(t5.preset("tiny", **config), hook)
  params = nn.unbox(module.init(jax.random.key(seed), ENC, DEC_IN, DEC_TGT,
                                enable_dropout=False)["params"])
  return module, params


def _numpy_prefixes(params, layout, kinds):
  """{kind: (keys, values) [layers, p, heads, kv]} float64 from the hook's parameters, by the
  formula in prefix.py's docstring (tanh MLP, O.reshape(p, layers, 2, heads, kv))."""
  out = {}
  for kind in kinds:
    p = {k: np.asarray(v, np.float64) for k, v in _flat(params["encoder"]["prompt"][kind]).items()}
    layers, heads, kv = layout[kind]
    if "key" in p:
      out[kind] = (p["key"], p["value"])
      continue
    hidden = np.tanh(p["tokens"] @ p["hidden/kernel"] + p["hidden/bias"])
    o = (hidden @ p["out/kernel"] + p["out/bias"]).reshape(-1, layers, 2, heads, kv)
    out[kind] = (o[:, :, 0].transpose(1, 0, 2, 3), o[:, :, 1].transpose(1, 0, 2, 3))
  return out


@pytest.mark.parametrize("kinds,reparameterization", [
    (prefix.KINDS, "none"), (prefix.KINDS, "mlp"), (("decoder_cross",), "none"),
    (("encoder", "decoder_self"), "mlp")])
def test_logits_match_an_independent_numpy_t5_with_prefixes(kinds, reparameterization):
  """Teacher-forced logits equal the float64 NumPy T5 (tests/reference_t5.py) whose attentions
  get the prefix keys/values in front with bias 0 and no mask: T5's relative-position bias sees
  only the sequence, and padded keys stay masked. Tolerance as test_t5's reference check: the
  tiny random model's logits are O(10) and float32 accumulates over 4 blocks (2e-4 absolute)."""
  hook = prefix.PrefixTuning(length=3, kinds=kinds, reparameterization=reparameterization,
                             hidden_dim=8, init_stddev=1.0)
  module, params = _model_and_params(hook)
  logits = np.asarray(module.apply({"params": params}, ENC, DEC_IN, DEC_TGT,
                                   enable_dropout=False))
  layout = t5.prefix_layout(module.config)
  prefixes = _numpy_prefixes(params, layout, kinds)
  emb = np.asarray(params["token_embedder"]["embedding"])
  for b in range(ENC.shape[0]):
    ref = reference_t5.forward(params, module.config, emb[ENC[b]], ENC[b] > 0, DEC_IN[b],
                               DEC_TGT[b] > 0, prefixes)
    plain = reference_t5.forward(params, module.config, emb[ENC[b]], ENC[b] > 0, DEC_IN[b],
                                 DEC_TGT[b] > 0)
    valid = DEC_TGT[b] > 0
    np.testing.assert_allclose(logits[b][valid], ref[valid], atol=2e-4, rtol=1e-4)
    assert np.abs(ref[valid] - plain[valid]).max() > 1e-2  # the prefix changes the output


def test_one_attention_layer_with_a_prefix_matches_numpy_to_1e_5():
  """One attention module (the whole channel: scores, joint softmax, mix) with a prefix against
  the NumPy attention, fp32 vs float64, at 1e-5: a single layer with O(1) outputs."""
  cfg = t5.preset("tiny")
  attention = t5.MultiHeadDotProductAttention(cfg)
  rng = np.random.default_rng(0)
  x = rng.normal(size=(2, 5, cfg.emb_dim)).astype(np.float32)
  pk, pv = (rng.normal(size=(2, 3, cfg.num_heads, cfg.head_dim)).astype(np.float32)
            for _ in range(2))
  mask = np.array([[1, 1, 1, 1, 0], [1, 1, 0, 0, 0]], bool)
  bias_np = rng.normal(size=(1, cfg.num_heads, 5, 5)).astype(np.float32)
  bias = bias_np + np.where(mask[:, None, None, :], 0.0, -1e10).astype(np.float32)
  params = attention.init(jax.random.key(0), x, x, bias, enable_dropout=False)["params"]
  params = nn.unbox(params)
  got = np.asarray(attention.apply({"params": params}, x, x, bias, enable_dropout=False,
                                   prefix=(pk, pv)))
  kernels = {name: {"kernel": np.asarray(params[name]["kernel"], np.float64)}
             for name in ("query", "key", "value", "out")}
  for b in range(2):
    want = reference_t5.attention(kernels, x[b].astype(np.float64), x[b].astype(np.float64),
                                  bias_np[0], np.broadcast_to(mask[b][None], (5, 5)),
                                  cfg.num_heads, cfg.head_dim, (pk[b], pv[b]))
    np.testing.assert_allclose(got[b], want, atol=1e-5, rtol=1e-5)


def test_mlp_folds_away_exactly_and_prefix_has_no_plain_export():
  hook = prefix.PrefixTuning(length=4, hidden_dim=16)
  module, params = _model_and_params(hook)
  layout = t5.prefix_layout(module.config)
  folded_hook, folded = prefix.fold_reparameterization(hook, params["encoder"]["prompt"], layout)
  assert folded_hook.reparameterization == "none"
  assert {k: v.shape for k, v in _flat(folded).items()} == {
      f"{kind}/{name}": (2, 4, 4, 16) for kind in prefix.KINDS for name in ("key", "value")}
  want = _numpy_prefixes(params, layout, prefix.KINDS)
  for kind in prefix.KINDS:  # float32 MLP vs float64: 1e-5
    np.testing.assert_allclose(np.asarray(folded[kind]["key"]), want[kind][0], atol=1e-5)
    np.testing.assert_allclose(np.asarray(folded[kind]["value"]), want[kind][1], atol=1e-5)
  folded_module = t5.Transformer(module.config, folded_hook)
  folded_params = dict(params, encoder=dict(params["encoder"], prompt=folded))
  a = module.apply({"params": params}, ENC, DEC_IN, DEC_TGT, enable_dropout=False)
  b = folded_module.apply({"params": folded_params}, ENC, DEC_IN, DEC_TGT, enable_dropout=False)
  np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5)  # same prefixes in f32
  assert params_lib.count(folded) == 6 * 2 * 4 * 4 * 16
  assert base.export_prompt(hook, params) is None


def _decode_model(config_overrides=None):
  hook = prefix.PrefixTuning(length=3, hidden_dim=8)
  model = EncoderDecoderModel(t5.Transformer(t5.preset("tiny", **(config_overrides or {})),
                                             hook), eos_id=-1)
  return model


@pytest.fixture(scope="module")
def decode_setup():
  model = _decode_model()
  tokens = np.array(jax.random.randint(jax.random.key(1), (3, 9), 3, 300), np.int32)
  tokens[0, 6:] = 0
  tokens[2, 3:] = 0
  params = nn.unbox(model.init(jax.random.key(0), model.dummy_batch(3, 9, 7)))
  return model, params, tokens


def _teacher_forced_greedy(model, params, tokens, steps):
  prefix_tokens = np.zeros((tokens.shape[0], 1), np.int32)
  logits_fn = jax.jit(lambda d: model.module.apply({"params": params}, tokens, d,
                                                   jnp.ones_like(d), enable_dropout=False))
  for _ in range(steps):
    nxt = np.argmax(np.asarray(logits_fn(prefix_tokens))[:, -1], axis=-1).astype(np.int32)
    prefix_tokens = np.concatenate([prefix_tokens, nxt[:, None]], axis=1)
  return prefix_tokens[:, 1:]


@pytest.mark.parametrize("overrides", [{}, {"scan_layers": True, "remat_policy": "full"}],
                         ids=["per_layer", "scanned_remat"])
def test_cached_greedy_and_beams_match_teacher_forcing(decode_setup, overrides):
  """The decode cache holds the prefix once (one row per example) and greedy decoding with it
  gives the tokens of recomputing everything at every step; one beam is greedy; every example
  of a mixed-length batch decodes as it does alone; scanned + remat gives the same tokens."""
  base_model, params, tokens = decode_setup
  model = base_model if not overrides else _decode_model(overrides)
  if overrides.get("scan_layers"):
    params = layer_stack.stack_layers(params)
  steps = 6
  want = _teacher_forced_greedy(base_model, layer_stack.unstack_layers(params)
                                if overrides else params, tokens, steps)
  assert len(np.unique(want)) > 3  # a real decode, not a constant
  got = np.asarray(jax.jit(model.predict_batch, static_argnums=2)(
      params, {"encoder_input_tokens": tokens}, steps))
  np.testing.assert_array_equal(got, want)
  greedy, _ = decoding.greedy(model, params, {"encoder_input_tokens": tokens}, steps)
  np.testing.assert_array_equal(np.asarray(greedy)[:, 0], want)
  one_beam, _ = decoding.beam_search(model, params, {"encoder_input_tokens": tokens}, steps,
                                     num_decodes=1, alpha=0.0)
  np.testing.assert_array_equal(np.asarray(one_beam)[:, 0], want)
  for i in range(tokens.shape[0]):
    alone = np.asarray(model.predict_batch(params, {"encoder_input_tokens": tokens[i:i + 1]},
                                           steps))
    np.testing.assert_array_equal(alone[0], want[i])

  beams, scores = decoding.beam_search(model, params, {"encoder_input_tokens": tokens}, steps,
                                       num_decodes=3, alpha=0.0)
  # A beam's score (alpha 0) is its log-likelihood: the teacher-forced score of its tokens.
  best = np.asarray(beams)[:, 0]
  batch = {"encoder_input_tokens": tokens, "decoder_target_tokens": best,
           "decoder_input_tokens": np.concatenate([np.zeros((3, 1), np.int32), best[:, :-1]], 1),
           "decoder_loss_weights": np.ones_like(best, np.float32)}
  np.testing.assert_allclose(np.asarray(scores)[:, 0],
                             np.asarray(model.score_batch(params, batch)), atol=1e-4)

  cache = model.init_decode_cache(3, tokens.shape[1], steps)
  _, cache = model.decode_step(params, cache, model.encode(params, {"encoder_input_tokens":
                                                                   tokens}),
                               tokens, jnp.zeros((3, 1), jnp.int32), steps,
                               reuse_cross_cache=False)
  flat = _flat(cache)
  prefix_keys = [v for k, v in flat.items() if k.endswith("cached_prefix_key")]
  cross_keys = [v for k, v in flat.items() if k.endswith("cached_cross_key")]
  assert prefix_keys and cross_keys
  layers = 2 if overrides else 1
  for x in prefix_keys:  # [b, (layers,) p, heads, kv]: one row per example
    assert x.shape == (3,) + (layers,) * bool(overrides) + (3, 4, 16), x.shape
  for x in cross_keys:  # the 3 prefix keys in front of the 9 encoded positions
    assert x.shape[-1] == 3 + 9, x.shape


@pytest.fixture(scope="module")
def trained():
  """Prefix tuning (p=4, MLP 16) on the demo's frozen model, two AdamW steps."""
  model = EncoderDecoderModel(t5.Transformer(t5.preset("tiny"),
                                             prefix.PrefixTuning(length=4, hidden_dim=16)))
  pt = PromptPrograms.for_training(model, optimizers.adamw(1e-3), Partitioner(), 64, 16, 8)
  frozen = pt.load_frozen_params(DEMO_CHECKPOINT)
  frozen_before = jax.tree_util.tree_map(np.array, frozen)
  state = pt.init_state(frozen, jax.random.key(0))
  before = jax.tree_util.tree_map(np.array, state)
  cfg = pipeline.DatasetConfig("demo_sentiment", {"inputs": 64, "targets": 16}, batch_size=8,
                               shuffle=False)
  batch = {k: jnp.asarray(v) for k, v in next(pipeline.iterate_batches(cfg)).items()}
  for _ in range(2):
    state, metrics = pt.train_step(state, frozen, batch, jax.random.key(1))
    assert np.isfinite(float(metrics["grad_norm"])) and float(metrics["grad_norm"]) > 0
  return pt, before, state, frozen_before, frozen


def test_only_the_prefix_parameters_train(trained):
  """The trainable partition and the optimizer state are the three streams' P' and MLP only,
  every one of them moves, and the frozen model is bit-identical after the steps."""
  pt, before, state, frozen_before, frozen = trained
  assert not any("prompt" in k for k in _flat(pt.abstract_frozen))
  names = set(_flat(state.prompt_params))
  assert names == {f"encoder/prompt/{kind}/{leaf}" for kind in prefix.KINDS
                   for leaf in ("tokens", "hidden/kernel", "hidden/bias", "out/kernel",
                                "out/bias")}
  opt_shapes = {tuple(x.shape) for x in jax.tree_util.tree_leaves(state.opt_state)}
  assert opt_shapes <= {(4, 64), (64, 16), (16,), (16, 256), (256,), ()}, opt_shapes
  for path, leaf in _flat(before.prompt_params).items():
    assert np.abs(leaf - np.asarray(_flat(state.prompt_params)[path])).max() > 1e-4, path
  for path, leaf in _flat(frozen_before).items():
    np.testing.assert_array_equal(leaf, np.asarray(_flat(frozen)[path]), err_msg=path)


class _WrongShapeHook(prefix.PrefixTuning):
  def attention_prefixes(self, batch_size, layout, prompt_features=None):
    keys = jnp.zeros((1, batch_size, 2, 4, 16))
    return {"encoder": (keys, keys)}


@pytest.mark.parametrize("make,message", [
    (lambda: prefix.PrefixTuning(kinds=("encoder", "decoder")),
     r"PrefixTuning.kinds must be distinct names among .*got \['encoder', 'decoder'\]"),
    (lambda: prefix.PrefixTuning(kinds=()), r"PrefixTuning.kinds .* got \[\]"),
    (lambda: prefix.PrefixTuning(reparameterization="lstm"),
     r"reparameterization must be one of \('mlp', 'none'\), got 'lstm'"),
    (lambda: prefix.PrefixTuning(length=0), r"PrefixTuning.length must be an integer >= 1, got 0"),
    (lambda: prefix.PrefixTuning(hidden_dim=-1), r"hidden_dim must be an integer >= 1, got -1"),
])
def test_bad_settings_are_rejected_naming_the_value(make, message):
  with pytest.raises(ValueError, match=message):
    make()


def test_the_model_checks_a_hooks_prefix_shapes():
  with pytest.raises(ValueError, match=r"_WrongShapeHook.attention_prefixes\['encoder'\] keys "
                     r"have shape \(1, 2, 2, 4, 16\); expected \[layers=2, batch=2"):
    _model_and_params(_WrongShapeHook(length=2))


def test_gin_file_builds_the_authors_defaults():
  gin.clear_config()
  try:
    files = [str(GIN_CONFIGS / "models" / "t5_1_1_tiny.gin"),
             str(GIN_CONFIGS / "prompts" / "prefix.gin")]
    model, _ = gin_utils.model_from_gin(files)
    optimizer = gin.query_parameter("%PROMPT_OPTIMIZER").scoped_configurable_fn()
  finally:
    gin.clear_config()
  hook = model.module.prompt
  assert (type(hook), hook.length, hook.kinds, hook.reparameterization, hook.hidden_dim) == (
      prefix.PrefixTuning, 10, prefix.KINDS, "mlp", 512)
  settings = optimizers.description(optimizer)
  assert (settings["name"], settings["learning_rate"], settings["weight_decay"]) == (
      "adamw", 5e-5, 0.0)
  trainable, _ = params_lib.split_params(params_lib.unbox(
      model.init_abstract(model.dummy_batch(1, 8, 4))))
  # per kind: P' 10x64, 64x512 + 512, 512 x (2 layers * 2 * 4 heads * 16) + 256
  assert params_lib.count(trainable) == 3 * (10 * 64 + 64 * 512 + 512 + 512 * 256 + 256)


def test_demo_reaches_95_percent_validation_accuracy(tmp_path):
  """runs/demo.gin with prompts/prefix.gin (p=10, the authors' MLP) and AdamW at lr 3e-3 (the
  paper's 5e-5 is for thousands of steps): >= 95% greedy-decoded accuracy after 40 steps."""
  gin.clear_config()
  try:
    code = cli.main([
        "train", f"--gin_file={GIN_CONFIGS}/runs/demo.gin",
        f"--gin_file={GIN_CONFIGS}/prompts/prefix.gin",
        "--gin.trainer.train.optimizer=%PROMPT_OPTIMIZER",
        "--gin.PROMPT_OPTIMIZER_LEARNING_RATE=3e-3",
        f"--gin.MODEL_DIR='{tmp_path}'", "--gin.TRAIN_STEPS=40", "--gin.EVAL_PERIOD=0",
        "--gin.CHECKPOINT_PERIOD=40"])
  finally:
    gin.clear_config()
  assert code == 0
  summary = json.loads((tmp_path / "summary.json").read_text())
  before, after = summary["eval_untrained"]["accuracy"], summary["eval_trained"]["accuracy"]
  print(f"prefix tuning demo: validation accuracy {before:.2f} -> {after:.2f} after 40 steps")
  assert after >= 95.0, (before, after)
  assert before < 60.0
