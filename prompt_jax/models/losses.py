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
  return loss, _metrics(loss, z, logits, targets)


def _metrics(loss: Array, z: Array, logits: Array, targets: Array) -> dict[str, Array]:
  """The summable metrics every training loss reports."""
  real = (targets > 0).astype(jnp.float32)
  correct = (jnp.argmax(logits, axis=-1) == targets).astype(jnp.float32) * real
  return {
      "loss": loss,
      "z_loss": z,
      "cross_ent_loss": loss - z,
      "token_accuracy": jnp.sum(correct) / jnp.maximum(jnp.sum(real), 1.0),
      "nonpadding_tokens": jnp.sum(real),
  }


def grouped_loss_and_metrics(logits: Array, targets: Array, weights: Optional[Array],
                             groups: Array, num_groups: int, z_loss: float,
                             loss_normalizing_factor: Union[None, float, str]):
  """The sum over groups of each group's own normalised loss, as if each group's rows were a
  batch of their own (multi-task training: a group is a task).

  logits [b, t, v], targets [b, t], weights [b, t] or None, groups [b] ints in [0, num_groups).
  Returns (scalar loss = sum_g loss_g, metrics with `group_loss` [num_groups] and
  `group_present` [num_groups] bool); an absent group contributes 0.
  """
  token_loss, token_z_loss = cross_entropy_with_z_loss(logits, targets, z_loss)
  one_hot = jax.nn.one_hot(groups, num_groups, dtype=jnp.float32)  # [b, g]
  rows = jnp.sum(one_hot, axis=0)  # [g]
  _, weights = normalizing_factor_and_weights(loss_normalizing_factor, targets, weights)
  if loss_normalizing_factor is None or isinstance(loss_normalizing_factor, (int, float)):
    factor = None if loss_normalizing_factor is None else jnp.full(
        (num_groups,), float(loss_normalizing_factor), jnp.float32)
  elif loss_normalizing_factor == "NUM_REAL_TARGET_TOKENS":
    factor = jnp.einsum("bg,bt->g", one_hot, weights)
  elif loss_normalizing_factor == "NUM_TOTAL_TARGET_TOKENS":
    factor = rows * targets.shape[1]
  else:  # AVERAGE_PER_SEQUENCE: weights are already per sequence
    factor = rows
  group_loss = jnp.einsum("bg,bt->g", one_hot, token_loss * weights)
  group_z = jnp.einsum("bg,bt->g", one_hot, token_z_loss * weights)
  if factor is not None:
    safe = jnp.where(factor > 0, factor, 1.0)
    group_loss, group_z = group_loss / safe, group_z / safe
  loss, z = jnp.sum(group_loss), jnp.sum(group_z)
  return loss, dict(_metrics(loss, z, logits, targets), group_loss=group_loss,
                    group_present=rows > 0)
