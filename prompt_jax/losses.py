"""T5X's token cross-entropy with z-loss and loss normalisation."""

from __future__ import annotations

from typing import Optional, Union

import jax
import jax.numpy as jnp

Array = jax.Array

# T5X's `SpecialLossNormalizingFactor` names.
NORMALIZERS = ("NUM_REAL_TARGET_TOKENS", "NUM_TOTAL_TARGET_TOKENS", "AVERAGE_PER_SEQUENCE")


def cross_entropy_with_z_loss(logits: Array, targets: Array, z_loss: float):
  """Per-token loss [b, t] and z-loss [b, t] for float logits [b, t, v] and int targets [b, t].

  loss = logsumexp(logits) - logits[target] + z_loss * logsumexp(logits)^2, as in T5X.
  """
  logits = logits.astype(jnp.float32)
  log_z = jax.nn.logsumexp(logits, axis=-1)
  target_logit = jnp.take_along_axis(logits, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]
  total_z_loss = z_loss * jnp.square(log_z)
  return log_z - target_logit + total_z_loss, total_z_loss


def normalizing_factor_and_weights(
    normalizer: Union[None, float, str], targets: Array, weights: Optional[Array]):
  """T5X `get_loss_normalizing_factor_and_weights`: (factor or None, weights [b, t])."""
  if weights is None:
    weights = (targets > 0).astype(jnp.float32)
  weights = weights.astype(jnp.float32)
  if normalizer is None or isinstance(normalizer, (int, float)):
    return normalizer, weights
  if normalizer == "NUM_REAL_TARGET_TOKENS":
    return jnp.sum(weights), weights
  if normalizer == "NUM_TOTAL_TARGET_TOKENS":
    return jnp.asarray(targets.size, jnp.float32), weights
  if normalizer == "AVERAGE_PER_SEQUENCE":
    per_sequence = jnp.sum(weights, axis=-1, keepdims=True)
    weights = weights / jnp.maximum(per_sequence, 1.0)
    return jnp.asarray(targets.shape[0], jnp.float32), weights
  raise ValueError(f"loss_normalizing_factor must be None, a number or one of {NORMALIZERS}, "
                   f"got {normalizer!r}")


def loss_and_metrics(logits: Array, targets: Array, weights: Optional[Array], z_loss: float,
                     loss_normalizing_factor: Union[None, float, str]):
  """Scalar training loss and a dict of summable metrics for one batch."""
  token_loss, token_z_loss = cross_entropy_with_z_loss(logits, targets, z_loss)
  factor, weights = normalizing_factor_and_weights(loss_normalizing_factor, targets, weights)
  loss = jnp.sum(token_loss * weights)
  z = jnp.sum(token_z_loss * weights)
  if factor is not None:
    loss, z = loss / factor, z / factor
  real = (targets > 0).astype(jnp.float32)
  correct = (jnp.argmax(logits, axis=-1) == targets).astype(jnp.float32) * real
  return loss, {
      "loss": loss,
      "z_loss": z,
      "cross_ent_loss": loss - z,
      "token_accuracy": jnp.sum(correct) / jnp.maximum(jnp.sum(real), 1.0),
      "nonpadding_tokens": jnp.sum(real),
  }
