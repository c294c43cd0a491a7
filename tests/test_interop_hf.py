"""Hugging Face T5 loading, checked against logits, encoder states and greedy ids that
transformers itself produced (../shared/fixtures/hf_t5_tiny_v1_1), and against an independent
float64 NumPy forward pass that reads HF tensor names directly (for v1.0-style variants)."""

from __future__ import annotations

import json
import math
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from prompt_jax.interop import hf
from prompt_jax.models import t5
from prompt_jax.models.encoder_decoder import EncoderDecoderModel
from prompt_jax.storage import frozen_models
from tests.conftest import shared_fixture

# Values compared against tolerances: CI runs these again under another CPU instruction set.
pytestmark = pytest.mark.numerics

FIXTURE = "hf_t5_tiny_v1_1"


def _fixture():
  path = shared_fixture(FIXTURE)
  arrays = {n: np.load(path / f"{n}.npy") for n in (
      "input_ids", "attention_mask", "decoder_input_ids", "logits", "encoder_last_hidden_state",
      "generated_ids")}
  return path, arrays


def _logits_tolerance(reference):
  """Float32 logits (ours, or torch's in the fixture) against float32 or float64 ones. Rounding of
  ~6e-8 per op through 2+2 layers of 32- and 64-term sums leaves them apart by a fraction of the
  logits' *scale*, not of each logit's size (a small logit carries the error of the large terms it
  sums): torch's float32 is 2.5e-7 of the largest |logit| (25.8) from float64, ours 3e-7 to 4.2e-7,
  with YNNPACK's (AVX-512 or AVX2) or Eigen's kernels. Allow 2e-6 of it: a fixed atol=1e-5 was
  0.97 used, and cached decoding exceeded it (1.0e-5) with YNNPACK's AVX2 kernels. A mis-mapped
  weight, norm or bias moves logits by percents of it: one layer norm's weights read as ones, or
  one relative-bias table as zeros, moves them by 2% to 11%."""
  return dict(rtol=0, atol=2e-6 * float(np.max(np.abs(reference))))


def _logits(cfg, params, ids, dec):
  return np.asarray(t5.Transformer(cfg).apply({"params": params}, ids, dec, np.ones_like(dec),
                                              enable_dropout=False))


# ------------------------------------------- an independent HF-semantics forward pass (float64)


def _hf_bucket(rel, bidirectional, num_buckets, max_distance):
  ret, n = 0, rel  # rel = key - query, HF's sign convention
  if bidirectional:
    num_buckets //= 2
    ret += num_buckets if n > 0 else 0
    n = abs(n)
  else:
    n = -min(n, 0)
  exact = num_buckets // 2
  if n < exact:
    return ret + n
  large = exact + int(np.float32(math.log(np.float32(n) / exact) / math.log(max_distance / exact)
                                 * (num_buckets - exact)))
  return ret + min(large, num_buckets - 1)


def hf_forward(w, c, input_ids, attention_mask, decoder_input_ids):
  """HF T5ForConditionalGeneration in float64 from `w` (HF names) and `c` (config.json)."""
  w = {k: np.asarray(v, np.float64) for k, v in w.items()}
  eps, heads, d_kv = c["layer_norm_epsilon"], c["num_heads"], c["d_kv"]
  nb, md = c["relative_attention_num_buckets"], c["relative_attention_max_distance"]
  gated = c["feed_forward_proj"].startswith("gated")
  act = (lambda x: np.maximum(x, 0)) if c["feed_forward_proj"].endswith("relu") else (
      lambda x: 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x ** 3))))
  norm = lambda x, name: w[name] * x / np.sqrt(np.mean(x * x, -1, keepdims=True) + eps)

  def attn(prefix, xq, xkv, bias, key_mask):
    split = lambda x: x.reshape(x.shape[0], -1, heads, d_kv).transpose(0, 2, 1, 3)
    q, k, v = (split(x @ w[f"{prefix}.{n}.weight"].T) for n, x in (("q", xq), ("k", xkv),
                                                                     ("v", xkv)))
    scores = q @ k.transpose(0, 1, 3, 2) + bias
    scores = np.where(key_mask[:, None, None, :], scores, -1e30)
    p = np.exp(scores - scores.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    out = (p @ v).transpose(0, 2, 1, 3).reshape(xq.shape[0], xq.shape[1], -1)
    return out @ w[f"{prefix}.o.weight"].T

  def ff(prefix, x):
    if gated:
      h = act(x @ w[f"{prefix}.wi_0.weight"].T) * (x @ w[f"{prefix}.wi_1.weight"].T)
    else:
      h = act(x @ w[f"{prefix}.wi.weight"].T)
    return h @ w[f"{prefix}.wo.weight"].T

  def rel_bias(name, q_len, k_len, bidirectional):
    ids = np.array([[_hf_bucket(k - q, bidirectional, nb, md) for k in range(k_len)]
                    for q in range(q_len)])
    return w[name][ids].transpose(2, 0, 1)[None]  # [1, heads, q, k]

  mask = attention_mask.astype(bool)
  x = w["shared.weight"][input_ids]
  bias = rel_bias("encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight",
                  x.shape[1], x.shape[1], True)
  for i in range(c["num_layers"]):
    b = f"encoder.block.{i}.layer"
    y = norm(x, f"{b}.0.layer_norm.weight")
    x = x + attn(f"{b}.0.SelfAttention", y, y, bias, mask)
    x = x + ff(f"{b}.1.DenseReluDense", norm(x, f"{b}.1.layer_norm.weight"))
  encoded = norm(x, "encoder.final_layer_norm.weight")

  y = w["shared.weight"][decoder_input_ids]
  t = y.shape[1]
  dbias = rel_bias("decoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight", t, t,
                   False) + np.where(np.tril(np.ones((t, t), bool)), 0.0, -1e30)
  for i in range(c.get("num_decoder_layers") or c["num_layers"]):
    b = f"decoder.block.{i}.layer"
    z = norm(y, f"{b}.0.layer_norm.weight")
    y = y + attn(f"{b}.0.SelfAttention", z, z, dbias, np.ones(y.shape[:2], bool))
    z = norm(y, f"{b}.1.layer_norm.weight")
    y = y + attn(f"{b}.1.EncDecAttention", z, encoded, 0.0, mask)
    y = y + ff(f"{b}.2.DenseReluDense", norm(y, f"{b}.2.layer_norm.weight"))
  y = norm(y, "decoder.final_layer_norm.weight")
  if c.get("scale_decoder_outputs", c.get("tie_word_embeddings", True)):
    y = y * c["d_model"] ** -0.5
  return y @ w.get("lm_head.weight", w["shared.weight"]).T, encoded


# ----------------------------------------------------------------------- the real HF artefacts


def test_logits_and_encoder_states_match_transformers():
  path, ref = _fixture()
  cfg, params = hf.load_t5(str(path))
  assert cfg.mlp_activations == ("gelu", "linear") and not cfg.logits_via_embedding
  ids, dec = ref["input_ids"], ref["decoder_input_ids"]
  logits = _logits(cfg, params, ids, dec)
  np.testing.assert_allclose(logits, ref["logits"], **_logits_tolerance(ref["logits"]))
  encoded = np.asarray(t5.Transformer(cfg).apply({"params": params}, ids, enable_dropout=False,
                                                 method=t5.Transformer.encode))
  real = ref["attention_mask"].astype(bool)
  # |state| <= 3.2 after the final norm: 1e-5 is ~3e-6 of the scale; 1e-6 seen.
  np.testing.assert_allclose(encoded[real], ref["encoder_last_hidden_state"][real], atol=1e-5,
                             rtol=0)


def test_independent_reference_reproduces_transformers():
  """The float64 reference used for the variants below agrees with transformers itself."""
  path, ref = _fixture()
  logits, _ = hf_forward(load_file(str(path / "model.safetensors")),
                         json.loads((path / "config.json").read_text()), ref["input_ids"],
                         ref["attention_mask"], ref["decoder_input_ids"])
  np.testing.assert_allclose(logits, ref["logits"], **_logits_tolerance(ref["logits"]))


def test_greedy_decode_with_cache_reproduces_generate():
  path, ref = _fixture()
  cfg, params = hf.load_t5(str(path))
  model = EncoderDecoderModel(t5.Transformer(cfg))
  steps = ref["generated_ids"].shape[1] - 1
  out = jax.jit(model.predict_batch, static_argnums=2)(
      params, {"encoder_input_tokens": jnp.asarray(ref["input_ids"])}, steps)
  np.testing.assert_array_equal(np.asarray(out), ref["generated_ids"][:, 1:])


def test_step_by_step_cached_decoding_matches_each_position():
  path, ref = _fixture()
  cfg, params = hf.load_t5(str(path))
  module = t5.Transformer(cfg)
  ids, dec = jnp.asarray(ref["input_ids"]), jnp.asarray(ref["decoder_input_ids"])
  length = dec.shape[1]
  encoded = module.apply({"params": params}, ids, enable_dropout=False, method=module.encode)
  shapes = jax.eval_shape(lambda: module.init(jax.random.key(0), ids, dec, dec, decode=True,
                                              enable_dropout=False)["cache"])
  cache = jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
  for position in range(length):
    token = dec[:, position:position + 1]
    logits, variables = module.apply({"params": params, "cache": cache}, encoded, ids, token,
                                     token, enable_dropout=False, decode=True,
                                     max_decode_length=length, mutable=["cache"],
                                     method=module.decode)
    cache = variables["cache"]
    np.testing.assert_allclose(np.asarray(logits[:, 0]), ref["logits"][:, position],
                               err_msg=f"decoder position {position}",
                               **_logits_tolerance(ref["logits"]))


def test_sharded_safetensors_with_index_load_identically(tmp_path):
  path, _ = _fixture()
  tensors = load_file(str(path / "model.safetensors"))
  names = sorted(tensors)
  shards = {"model-00001-of-00002.safetensors": names[::2],
            "model-00002-of-00002.safetensors": names[1::2]}
  for file, keys in shards.items():
    save_file({k: tensors[k] for k in keys}, str(tmp_path / file))
  index = {"metadata": {}, "weight_map": {k: f for f, keys in shards.items() for k in keys}}
  (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
  shutil.copy(path / "config.json", tmp_path / "config.json")
  cfg_a, params_a = hf.load_t5(str(path))
  cfg_b, params_b = hf.load_t5(str(tmp_path))
  assert cfg_a == cfg_b
  jax.tree_util.tree_map(np.testing.assert_array_equal, params_a, params_b)


def _variant(tmp_path, tensors, config):
  save_file(tensors, str(tmp_path / "model.safetensors"))
  (tmp_path / "config.json").write_text(json.dumps(config))
  return str(tmp_path)


def test_t5_1_0_layout_relu_wi_tied_scaled_output(tmp_path):
  """v1.0: one `wi`, ReLU, tied embeddings, output scaled by d_model^-0.5."""
  path, ref = _fixture()
  tensors = load_file(str(path / "model.safetensors"))
  config = json.loads((path / "config.json").read_text())
  del tensors["lm_head.weight"]
  for name in list(tensors):
    if name.endswith("wi_0.weight"):
      tensors[name.replace("wi_0", "wi")] = tensors.pop(name)
    elif name.endswith("wi_1.weight"):
      del tensors[name]
  tensors["encoder.embed_tokens.weight"] = tensors["shared.weight"]  # a harmless duplicate
  config.update(feed_forward_proj="relu", dense_act_fn="relu", is_gated_act=False,
                tie_word_embeddings=True)
  cfg, params = hf.load_t5(_variant(tmp_path, tensors, config))
  assert cfg.mlp_activations == ("relu",) and cfg.logits_via_embedding
  assert "logits_dense" not in params["decoder"]
  np.testing.assert_array_equal(params["encoder"]["layers_1"]["mlp"]["wi"]["kernel"],
                                tensors["encoder.block.1.layer.1.DenseReluDense.wi.weight"].T)
  want, _ = hf_forward(tensors, config, ref["input_ids"], ref["attention_mask"],
                       ref["decoder_input_ids"])
  np.testing.assert_allclose(_logits(cfg, params, ref["input_ids"], ref["decoder_input_ids"]),
                             want, **_logits_tolerance(want))


@pytest.mark.parametrize("drop_lm_head,tie,scale", [(True, False, None), (False, True, False),
                                                    (False, False, True)])
def test_every_output_layer_convention_matches_the_reference(tmp_path, drop_lm_head, tie, scale):
  path, ref = _fixture()
  tensors = load_file(str(path / "model.safetensors"))
  config = json.loads((path / "config.json").read_text())
  if drop_lm_head:
    del tensors["lm_head.weight"]
  config["tie_word_embeddings"] = tie
  if scale is not None:
    config["scale_decoder_outputs"] = scale
  cfg, params = hf.load_t5(_variant(tmp_path, tensors, config))
  want, _ = hf_forward(tensors, config, ref["input_ids"], ref["attention_mask"],
                       ref["decoder_input_ids"])
  np.testing.assert_allclose(_logits(cfg, params, ref["input_ids"], ref["decoder_input_ids"]),
                             want, **_logits_tolerance(want))


def test_missing_unknown_and_misshaped_tensors_are_refused_by_name(tmp_path):
  path, _ = _fixture()
  tensors = load_file(str(path / "model.safetensors"))
  config = json.loads((path / "config.json").read_text())

  missing = dict(tensors)
  del missing["decoder.block.1.layer.2.DenseReluDense.wo.weight"]
  (tmp_path / "a").mkdir()
  with pytest.raises(ValueError, match=r"lacks 1 tensors.*decoder\.block\.1\.layer\.2\."
                                       r"DenseReluDense\.wo\.weight"):
    hf.load_t5(_variant(tmp_path / "a", missing, config))

  unknown = dict(tensors, **{"encoder.block.0.layer.0.SelfAttention.q.bias": np.zeros(32,
                                                                                     np.float32)})
  (tmp_path / "b").mkdir()
  with pytest.raises(ValueError, match=r"encoder\.block\.0\.layer\.0\.SelfAttention\.q\.bias"):
    hf.load_t5(_variant(tmp_path / "b", unknown, config))

  (tmp_path / "c").mkdir()
  with pytest.raises(ValueError, match=r"'encoder\.block\.0\.layer\.1\.DenseReluDense\.wi_0\."
                                       r"weight' has shape \(64, 32\), config\.json implies "
                                       r"\(128, 32\)"):
    hf.load_t5(_variant(tmp_path / "c", tensors, dict(config, d_ff=128)))


def test_checkpoints_dispatch_and_orbax_round_trip_is_bit_exact(tmp_path):
  path, _ = _fixture()
  cfg, params = hf.load_t5(str(path))
  via_dispatch = frozen_models.load_frozen_params(str(path), cfg)
  jax.tree_util.tree_map(np.testing.assert_array_equal, params, via_dispatch)
  frozen_models.save_params_orbax(params, str(tmp_path / "orbax"))
  restored = frozen_models.load_frozen_params(str(tmp_path / "orbax"), cfg)
  flat_a = jax.tree_util.tree_leaves_with_path(params)
  flat_b = dict(jax.tree_util.tree_leaves_with_path(restored))
  assert len(flat_a) == len(flat_b) == 52
  for key, value in flat_a:
    restored_value = np.asarray(flat_b[key])
    assert restored_value.dtype == value.dtype
    assert restored_value.tobytes() == value.tobytes(), key
