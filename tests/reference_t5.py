"""An independent float64 NumPy T5 forward pass, written from the T5 paper's description and
T5X's masking conventions, used to check the Flax model numerically."""

from __future__ import annotations

import math

import numpy as np


def rms_norm(x, scale, eps=1e-6):
  return scale * x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps)


def bucket(rel, bidirectional, num_buckets, max_distance):
  """rel = key_pos - query_pos (python int) -> bucket id."""
  n = -rel
  ret = 0
  if bidirectional:
    num_buckets //= 2
    if n < 0:
      ret += num_buckets
    n = abs(n)
  else:
    n = max(n, 0)
  max_exact = num_buckets // 2
  if n < max_exact:
    return ret + n
  val = max_exact + int(math.log(n / max_exact) / math.log(max_distance / max_exact)
                        * (num_buckets - max_exact))
  return ret + min(val, num_buckets - 1)


def rel_bias(table, q_len, k_len, bidirectional, num_buckets, max_distance):
  """table [heads, buckets] -> [heads, q, k]."""
  ids = np.array([[bucket(k - q, bidirectional, num_buckets, max_distance)
                   for k in range(k_len)] for q in range(q_len)])
  return table[:, ids]


def attention(p, xq, xkv, bias, mask, heads, head_dim, prefix=None):
  """p: {'query','key','value','out'} kernels; mask [q, k] bool; prefix: None or (keys,
  values) [p, heads, head_dim], extra key/value positions in front of the projected ones with
  bias 0 and never masked (prefix tuning)."""
  def split(x):
    return x.reshape(x.shape[0], heads, head_dim).transpose(1, 0, 2)
  q = split(xq @ p["query"]["kernel"])
  k = split(xkv @ p["key"]["kernel"])
  v = split(xkv @ p["value"]["kernel"])
  if bias is None:
    bias = np.zeros((heads, q.shape[1], k.shape[1]))
  if prefix is not None:
    pk, pv = (np.asarray(x, np.float64).transpose(1, 0, 2) for x in prefix)
    k, v = np.concatenate([pk, k], axis=1), np.concatenate([pv, v], axis=1)
    n = pk.shape[1]
    bias = np.concatenate([np.zeros(bias.shape[:-1] + (n,)), np.broadcast_to(
        bias, (heads, q.shape[1], bias.shape[-1]))], axis=-1)
    mask = np.concatenate([np.ones((mask.shape[0], n), bool), mask], axis=1)
  logits = q @ k.transpose(0, 2, 1)
  logits = logits + bias
  logits = np.where(mask[None], logits, -1e10)
  logits = logits - logits.max(-1, keepdims=True)
  w = np.exp(logits)
  w = w / w.sum(-1, keepdims=True)
  out = (w @ v).transpose(1, 0, 2).reshape(xq.shape[0], heads * head_dim)
  return out @ p["out"]["kernel"]


def gelu_tanh(x):
  return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x ** 3)))


def mlp(p, x, activations):
  if len(activations) == 1:
    h = x @ p["wi"]["kernel"]
    return (np.maximum(h, 0) if activations[0] == "relu" else gelu_tanh(h)) @ p["wo"]["kernel"]
  h0 = gelu_tanh(x @ p["wi_0"]["kernel"])
  h1 = x @ p["wi_1"]["kernel"]
  return (h0 * h1) @ p["wo"]["kernel"]


def forward(params, cfg, enc_embedded, enc_mask, dec_tokens, dec_valid, prefixes=None):
  """One example. enc_embedded [l, d] (prompt already inserted), enc_mask [l] bool,
  dec_tokens [t], dec_valid [t] bool -> logits [t, vocab]. T5X masking: padded queries and keys
  are both masked. prefixes: {"encoder" | "decoder_self" | "decoder_cross": (keys, values)
  [layers, p, heads, head_dim]} attention prefixes (see `attention`)."""
  prefixes = prefixes or {}
  layer_prefix = lambda kind, i: None if kind not in prefixes else (
      prefixes[kind][0][i], prefixes[kind][1][i])
  p = {k: v for k, v in params.items()}
  f64 = lambda t: {k: f64(v) if isinstance(v, dict) else np.asarray(v, np.float64)
                   for k, v in t.items()}
  p = f64(p)
  H, D = cfg.num_heads, cfg.head_dim
  nb, md = cfg.relative_attention_num_buckets, cfg.relative_attention_max_distance
  x = np.asarray(enc_embedded, np.float64)
  L = x.shape[0]
  enc = p["encoder"]
  bias = rel_bias(enc["relpos_bias"]["rel_embedding"], L, L, True, nb, md)
  mask = enc_mask[:, None] & enc_mask[None, :]
  for i in range(cfg.num_encoder_layers):
    lp = enc[f"layers_{i}"]
    y = rms_norm(x, lp["pre_attention_layer_norm"]["scale"])
    x = x + attention(lp["attention"], y, y, bias, mask, H, D, layer_prefix("encoder", i))
    y = rms_norm(x, lp["pre_mlp_layer_norm"]["scale"])
    x = x + mlp(lp["mlp"], y, cfg.mlp_activations)
  encoded = rms_norm(x, enc["encoder_norm"]["scale"])

  dec = p["decoder"]
  emb = p["token_embedder"]["embedding"]
  y = emb[np.asarray(dec_tokens)]
  T = y.shape[0]
  dbias = rel_bias(dec["relpos_bias"]["rel_embedding"], T, T, False, nb, md)
  causal = np.tril(np.ones((T, T), bool)) & dec_valid[:, None] & dec_valid[None, :]
  cross = dec_valid[:, None] & enc_mask[None, :]
  for i in range(cfg.num_decoder_layers):
    lp = dec[f"layers_{i}"]
    z = rms_norm(y, lp["pre_self_attention_layer_norm"]["scale"])
    y = y + attention(lp["self_attention"], z, z, dbias, causal, H, D,
                      layer_prefix("decoder_self", i))
    z = rms_norm(y, lp["pre_cross_attention_layer_norm"]["scale"])
    y = y + attention(lp["encoder_decoder_attention"], z, encoded, None, cross, H, D,
                      layer_prefix("decoder_cross", i))
    z = rms_norm(y, lp["pre_mlp_layer_norm"]["scale"])
    y = y + mlp(lp["mlp"], z, cfg.mlp_activations)
  y = rms_norm(y, dec["decoder_norm"]["scale"])
  if cfg.logits_via_embedding:
    return y @ emb.T / np.sqrt(cfg.emb_dim)
  return y @ dec["logits_dense"]["kernel"]
