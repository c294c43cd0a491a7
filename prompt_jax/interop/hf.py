"""Hugging Face T5 directories (`config.json` + `*.safetensors`) -> our T5Config and T5X-named
parameters, without torch.

Every tensor is mapped by name; the file must hold exactly the tensors the config implies, apart
from known duplicates (`{encoder,decoder}.embed_tokens.weight`, a tied `lm_head.weight`, the
unused cross-attention relative bias). HF `Linear` weights are `[out, in]`, ours `[in, out]`:

  shared.weight                                            token_embedder/embedding
  {stack}.block.{i}.layer.{j}.{SelfAttention|EncDecAttention}.{q,k,v,o}.weight (transposed)
                                                           {stack}/layers_{i}/<attention>/
                                                           {query,key,value,out}/kernel
  {stack}.block.0.layer.0.SelfAttention.relative_attention_bias.weight [buckets, heads]
                                                           {stack}/relpos_bias/rel_embedding
                                                           [heads, buckets]
  {stack}.block.{i}.layer.{j}.DenseReluDense.{wi|wi_0,wi_1,wo}.weight (transposed)
  {stack}.block.{i}.layer.{j}.layer_norm.weight            .../pre_*_layer_norm/scale
  {stack}.final_layer_norm.weight                          {stack}/{encoder,decoder}_norm/scale
  lm_head.weight (transposed)                              decoder/logits_dense/kernel

Output layer: HF scales the decoder output by `d_model ** -0.5` iff `scale_decoder_outputs`
(default: `tie_word_embeddings`, default True) and multiplies by `lm_head.weight` if present,
else by `shared.weight`. Tied + scaled is our `logits_via_embedding=True`; any other combination
becomes an explicit `logits_dense` kernel (with the scale folded in when needed).
"""

from __future__ import annotations

import json
import os
from typing import Any, Optional

import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import load_file

from prompt_jax.models import t5

# HF activation names -> ours (prompt_jax.models.t5._ACTIVATIONS).
_HF_ACTIVATIONS = {
    "relu": "relu",
    "gelu_new": "gelu",
    "gelu_pytorch_tanh": "gelu",
    "gelu": "gelu_exact",
    "silu": "silu",
    "swish": "silu",
}

# Tensors some Hub checkpoints carry that duplicate or are unused by the model.
_HARMLESS = ("encoder.embed_tokens.weight", "decoder.embed_tokens.weight",
             "decoder.block.0.layer.1.EncDecAttention.relative_attention_bias.weight")

_ATTENTION = (("q", "query"), ("k", "key"), ("v", "value"), ("o", "out"))


def _activations(hf: dict) -> tuple[str, ...]:
  proj = hf.get("feed_forward_proj", "relu")
  if not isinstance(proj, str):
    raise ValueError(f"config.json feed_forward_proj must be 'ACT' or 'gated-ACT', got {proj!r}")
  parts = proj.split("-")
  gated = len(parts) == 2 and parts[0] == "gated"
  if len(parts) > 2 or (len(parts) == 2 and not gated):
    raise ValueError(f"config.json feed_forward_proj must be 'ACT' or 'gated-ACT', got {proj!r}")
  act = hf.get("dense_act_fn") or ("gelu_new" if proj == "gated-gelu" else parts[-1])
  if not isinstance(act, str) or act not in _HF_ACTIVATIONS:
    raise ValueError(f"config.json dense_act_fn {act!r} is not supported; expected one of "
                     f"{sorted(_HF_ACTIVATIONS)}")
  return (_HF_ACTIVATIONS[act], "linear") if gated else (_HF_ACTIVATIONS[act],)


def _required(hf: dict, key: str):
  if key not in hf:
    raise ValueError(f"config.json lacks {key!r}, which a T5 config needs")
  return hf[key]


def _number(hf: dict, key: str, cast=int, default=None):
  """`hf[key]` (or `default` when absent) as a positive `cast` number; anything else (a string,
  null, a fraction for an int field, zero) raises naming the key and value."""
  value = _required(hf, key) if default is None else hf.get(key, default)
  ok = isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0 and (
      cast is float or float(value).is_integer())
  if not ok:
    kind = "a positive integer" if cast is int else "a positive number"
    raise ValueError(f"config.json {key} must be {kind}, got {value!r}")
  return cast(value)


def scales_decoder_outputs(hf: dict) -> bool:
  """Whether HF multiplies the decoder output by `d_model ** -0.5` before the output layer."""
  return bool(hf.get("scale_decoder_outputs", hf.get("tie_word_embeddings", True)))


def t5_config(hf: dict, logits_via_embedding: bool) -> t5.T5Config:
  """Our T5Config for HF `config.json` contents (`logits_via_embedding` depends on the tensors,
  see `load_t5`)."""
  if hf.get("model_type", "t5") not in ("t5", "mt5", "umt5"):
    raise ValueError(f"config.json model_type must be 't5' or 'mt5', got {hf['model_type']!r}")
  if hf.get("model_type") == "umt5":
    raise ValueError("config.json model_type 'umt5' (per-layer relative biases) is not supported")
  num_layers = _number(hf, "num_layers")
  dropout_rate = hf.get("dropout_rate", 0.1)
  if isinstance(dropout_rate, bool) or not isinstance(dropout_rate, (int, float)) or not (
      0 <= dropout_rate < 1):
    raise ValueError(f"config.json dropout_rate must be a number in [0, 1), got {dropout_rate!r}")
  return t5.T5Config(
      vocab_size=_number(hf, "vocab_size"),
      emb_dim=_number(hf, "d_model"),
      num_heads=_number(hf, "num_heads"),
      head_dim=_number(hf, "d_kv"),
      mlp_dim=_number(hf, "d_ff"),
      num_encoder_layers=num_layers,
      num_decoder_layers=(_number(hf, "num_decoder_layers")
                          if hf.get("num_decoder_layers") is not None else num_layers),
      mlp_activations=_activations(hf),
      logits_via_embedding=logits_via_embedding,
      dropout_rate=float(dropout_rate),
      relative_attention_num_buckets=_number(hf, "relative_attention_num_buckets", default=32),
      relative_attention_max_distance=_number(hf, "relative_attention_max_distance",
                                              default=128),
      layer_norm_epsilon=_number(hf, "layer_norm_epsilon", float, default=1e-6),
  )


def read_json(path: str, what: str = "a JSON object") -> dict:
  """A JSON object from `path`; a file that is not UTF-8 JSON, or not an object, raises one
  ValueError naming the file (and the line and column of a syntax error)."""
  try:
    with open(path, "rb") as f:
      text = f.read().decode("utf-8")
  except UnicodeDecodeError as e:
    line = e.object[:e.start].count(b"\n") + 1
    raise ValueError(f"{path}:{line}: not UTF-8 text (byte {e.object[e.start]:#04x} at offset "
                     f"{e.start})") from e
  try:
    value = json.loads(text)
  except json.JSONDecodeError as e:
    raise ValueError(f"{path}:{e.lineno}: not valid JSON: {e.msg} (column {e.colno})") from e
  if not isinstance(value, dict):
    raise ValueError(f"{path}: expected {what}, got a JSON {type(value).__name__}")
  return value


def load_safetensors(path: str) -> dict[str, np.ndarray]:
  """All tensors of one `.safetensors` file; a truncated or corrupt file raises one ValueError
  naming it."""
  try:
    return load_file(path)
  except FileNotFoundError as e:
    raise FileNotFoundError(f"{path!r} does not exist") from e
  except (SafetensorError, OSError, ValueError, TypeError) as e:
    reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
    raise ValueError(f"{path}: not a readable safetensors file, truncated or corrupt "
                     f"({reason})") from e


def read_tensors(path: str) -> dict[str, np.ndarray]:
  """All tensors of `model.safetensors`, or of the shards listed in
  `model.safetensors.index.json`, as NumPy arrays (bfloat16/float16 become float32)."""
  index = os.path.join(path, "model.safetensors.index.json")
  single = os.path.join(path, "model.safetensors")
  if os.path.exists(index):
    weight_map = read_json(index).get("weight_map")
    if not isinstance(weight_map, dict) or not all(
        isinstance(v, str) for v in weight_map.values()):
      raise ValueError(f"{index}: expected a 'weight_map' object of tensor name -> shard file, "
                       f"got {weight_map!r:.80}")
    files = sorted(set(weight_map.values()))
  elif os.path.exists(single):
    weight_map, files = None, ["model.safetensors"]
  else:
    found = sorted(os.listdir(path)) if os.path.isdir(path) else []
    hint = (" (PyTorch .bin weights need torch; convert them with transformers' "
            "save_pretrained(safe_serialization=True))"
            if any(n.endswith(".bin") for n in found) else "")
    raise FileNotFoundError(f"{path!r} has neither model.safetensors nor "
                            f"model.safetensors.index.json{hint}; found {found[:10]}")
  tensors: dict[str, np.ndarray] = {}
  for name in files:
    for key, value in load_safetensors(os.path.join(path, name)).items():
      if weight_map is not None and weight_map.get(key) != name:
        raise ValueError(f"tensor {key!r} is in {name} but model.safetensors.index.json "
                         f"maps it to {weight_map.get(key)!r}")
      tensors[key] = np.asarray(value, dtype=np.float32)
  if weight_map is not None:
    absent = sorted(weight_map.keys() - tensors.keys())
    if absent:
      raise ValueError(f"model.safetensors.index.json lists {len(absent)} tensors that no shard "
                       f"holds, first {absent[0]!r}")
  return tensors


def _expected_tensors(cfg: t5.T5Config) -> dict[str, tuple[tuple[str, ...], tuple[int, ...], bool]]:
  """HF name -> (our path, HF shape, transpose?) for every tensor except the output layer."""
  joined = cfg.num_heads * cfg.head_dim
  d, m = cfg.emb_dim, cfg.mlp_dim
  names: dict[str, tuple[tuple[str, ...], tuple[int, ...], bool]] = {
      "shared.weight": (("token_embedder", "embedding"), (cfg.vocab_size, d), False)}
  wi = ["wi"] if len(cfg.mlp_activations) == 1 else [
      f"wi_{i}" for i in range(len(cfg.mlp_activations))]

  def attention(prefix: str, ours: tuple[str, ...]):
    for hf_name, our_name in _ATTENTION:
      shape = (d, joined) if hf_name == "o" else (joined, d)
      names[f"{prefix}.{hf_name}.weight"] = (ours + (our_name, "kernel"), shape, True)

  def mlp(prefix: str, ours: tuple[str, ...]):
    for name in wi:
      names[f"{prefix}.{name}.weight"] = (ours + (name, "kernel"), (m, d), True)
    names[f"{prefix}.wo.weight"] = (ours + ("wo", "kernel"), (d, m), True)

  def norm(name: str, ours: tuple[str, ...]):
    names[name] = (ours + ("scale",), (d,), False)

  for stack, num_layers in (("encoder", cfg.num_encoder_layers),
                            ("decoder", cfg.num_decoder_layers)):
    names[f"{stack}.block.0.layer.0.SelfAttention.relative_attention_bias.weight"] = (
        (stack, "relpos_bias", "rel_embedding"), (cfg.relative_attention_num_buckets,
                                                  cfg.num_heads), True)
    for i in range(num_layers):
      block, ours = f"{stack}.block.{i}.layer", (stack, f"layers_{i}")
      if stack == "encoder":
        attention(f"{block}.0.SelfAttention", ours + ("attention",))
        norm(f"{block}.0.layer_norm.weight", ours + ("pre_attention_layer_norm",))
        mlp(f"{block}.1.DenseReluDense", ours + ("mlp",))
        norm(f"{block}.1.layer_norm.weight", ours + ("pre_mlp_layer_norm",))
      else:
        attention(f"{block}.0.SelfAttention", ours + ("self_attention",))
        norm(f"{block}.0.layer_norm.weight", ours + ("pre_self_attention_layer_norm",))
        attention(f"{block}.1.EncDecAttention", ours + ("encoder_decoder_attention",))
        norm(f"{block}.1.layer_norm.weight", ours + ("pre_cross_attention_layer_norm",))
        mlp(f"{block}.2.DenseReluDense", ours + ("mlp",))
        norm(f"{block}.2.layer_norm.weight", ours + ("pre_mlp_layer_norm",))
    norm(f"{stack}.final_layer_norm.weight", (stack, f"{stack}_norm"))
  return names


def _set(tree: dict, path: tuple[str, ...], value: Any) -> None:
  for key in path[:-1]:
    tree = tree.setdefault(key, {})
  tree[path[-1]] = value


def load_t5(path: str) -> tuple[t5.T5Config, dict]:
  """A Hugging Face T5 directory -> (T5Config, params) with T5X names, float32 NumPy leaves.

  Raises ValueError naming the tensor when one is missing, unknown, or of the wrong shape."""
  config_path = os.path.join(path, "config.json")
  if not os.path.exists(config_path):
    raise FileNotFoundError(f"{path!r} is not a Hugging Face model directory: no config.json")
  hf = read_json(config_path, "a JSON object of T5 settings")
  tensors = read_tensors(path)

  # The output layer decides `logits_via_embedding`.
  scale = scales_decoder_outputs(hf)
  tied_weights = "lm_head.weight" not in tensors or np.array_equal(tensors["lm_head.weight"],
                                                                    tensors.get("shared.weight"))
  logits_via_embedding = scale and tied_weights
  try:
    cfg = t5_config(hf, logits_via_embedding)
  except ValueError as e:
    raise ValueError(f"{config_path}: {e}") from e

  expected = _expected_tensors(cfg)
  missing = [name for name in expected if name not in tensors]
  if missing:
    raise ValueError(f"{path!r} lacks {len(missing)} tensors that config.json implies, "
                     f"first {missing[0]!r}")
  known = set(expected) | set(_HARMLESS) | {"lm_head.weight"}
  unknown = sorted(tensors.keys() - known)
  if unknown:
    raise ValueError(f"{path!r} has {len(unknown)} tensors that a T5 with this config.json "
                     f"does not use, first {unknown[0]!r}")

  params: dict = {}
  for name, (ours, shape, transpose) in expected.items():
    value = tensors[name]
    if tuple(value.shape) != shape:
      raise ValueError(f"{path!r}: tensor {name!r} has shape {tuple(value.shape)}, config.json "
                       f"implies {shape}")
    _set(params, ours, np.ascontiguousarray(value.T) if transpose else value)

  if not logits_via_embedding:
    output = tensors.get("lm_head.weight", tensors["shared.weight"])
    if tuple(output.shape) != (cfg.vocab_size, cfg.emb_dim):
      raise ValueError(f"{path!r}: tensor 'lm_head.weight' has shape {tuple(output.shape)}, "
                       f"config.json implies {(cfg.vocab_size, cfg.emb_dim)}")
    kernel = output.T * np.float32(cfg.emb_dim ** -0.5) if scale else output.T
    _set(params, ("decoder", "logits_dense", "kernel"),
         np.ascontiguousarray(kernel, dtype=np.float32))
  return cfg, params


def matching_preset(cfg: t5.T5Config) -> Optional[str]:
  """The name of a preset with this architecture (dropout aside), if any."""
  for name, candidate in t5.PRESETS.items():
    if candidate.replace(dropout_rate=cfg.dropout_rate) == cfg:
      return name
  return None
