"""Analytic FLOPs of a prompt-tuning train step, from the frozen model's matmul weights: 4 x
(encoder matmul weights x encoder tokens + (decoder matmul weights + logits weights) x decoder
tokens) plus the attention scores. No compile: shapes only.
"""

from __future__ import annotations

import flax


def matmul_weights(abstract_frozen, logits_via_embedding: bool) -> dict[str, int]:
  """Frozen matmul weight counts: encoder, decoder (without logits) and logits."""
  flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(abstract_frozen), sep="/")
  counts = {"encoder": 0, "decoder": 0, "logits": 0}
  for path, leaf in flat.items():
    if path.endswith("logits_dense/kernel"):
      counts["logits"] += leaf.size
    elif path.endswith("/kernel"):
      counts[path.split("/")[0]] += leaf.size
  if logits_via_embedding:
    counts["logits"] = flat["token_embedder/embedding"].size
  return counts


def analytic_flops(weights: dict[str, int], config, batch: int, encoder_length: int,
                   target_length: int) -> dict[str, float]:
  """Prompt-tuning FLOPs per step: 4N per token (forward + activation half of the backward).

  `encoder_length` includes the prompt. Attention scores (QK^T and weights x V, 4 x joined_kv
  FLOPs per query-key pair forward) are counted separately, doubled for the backward too."""
  matmul = 4.0 * (weights["encoder"] * batch * encoder_length
                  + (weights["decoder"] + weights["logits"]) * batch * target_length)
  joined = config.num_heads * config.head_dim
  pairs = (config.num_encoder_layers * encoder_length ** 2
           + config.num_decoder_layers * (target_length ** 2 + target_length * encoder_length))
  attention = 2.0 * 4.0 * joined * batch * pairs
  return {"matmul": matmul, "attention": attention, "total": matmul + attention}
