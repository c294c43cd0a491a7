"""Optimizers for the trainable (prompt) parameters, configured from gin.

`adamw` is decoupled-weight-decay Adam (Loshchilov & Hutter) whose weight decay can be limited to
the parameters whose '/'-joined path matches a regex, e.g. SuperPos-Prompt decays its
coefficients p' and not its embedding copies E:

    optimizers.adamw.weight_decay_pattern = r'(^|/)coefficients$'

Paths are relative to the trainable tree, e.g. `encoder/prompt/prompt/coefficients`.
"""

from __future__ import annotations

import re
from typing import Any, Optional

import jax
import optax

# SuperPos-Prompt: weight decay on the coefficients p' only (arXiv 2406.05279).
SUPERPOS_DECAY_PATTERN = r"(^|/)coefficients$"


def _key_name(key) -> str:
  for attr in ("key", "name", "idx"):
    if hasattr(key, attr):
      return str(getattr(key, attr))
  return str(key)


def leaf_paths(tree: Any) -> Any:
  """A tree like `tree` whose leaves are their '/'-joined paths."""
  return jax.tree_util.tree_map_with_path(
      lambda path, _: "/".join(_key_name(k) for k in path), tree)


def path_mask(pattern: Optional[str]):
  """-> mask(params) -> tree of bools, True where the leaf's path matches `pattern`.

  `None` selects every leaf. A pattern that selects nothing is an error (raised when the mask
  first sees the parameters), since it would silently switch weight decay off.
  """
  if pattern is None:
    return lambda params: jax.tree_util.tree_map(lambda _: True, params)
  try:
    regex = re.compile(pattern)
  except re.error as e:
    raise ValueError(f"weight_decay_pattern {pattern!r} is not a valid regex: {e}") from e

  def mask(params):
    paths = leaf_paths(params)
    selected = jax.tree_util.tree_map(lambda p: bool(regex.search(p)), paths)
    if not any(jax.tree_util.tree_leaves(selected)):
      raise ValueError(f"weight_decay_pattern {pattern!r} matches no trainable parameter; "
                       f"the trainable paths are {sorted(jax.tree_util.tree_leaves(paths))}")
    return selected

  return mask


def adamw(learning_rate: float = 0.01, weight_decay: float = 1e-5, b1: float = 0.9,
          b2: float = 0.999, eps: float = 1e-8, weight_decay_pattern: Optional[str] = None,
          clipping_threshold: Optional[float] = None) -> optax.GradientTransformation:
  """AdamW with a constant learning rate (SuperPos-Prompt defaults: lr 0.01, weight decay 1e-5).

  Args:
    weight_decay_pattern: regex over trainable parameter paths that receive weight decay;
      None decays every trainable parameter.
    clipping_threshold: clip the global gradient norm to this value first (None: no clipping).
  """
  if learning_rate <= 0:
    raise ValueError(f"adamw learning_rate must be > 0, got {learning_rate}")
  if weight_decay < 0:
    raise ValueError(f"adamw weight_decay must be >= 0, got {weight_decay}")
  if clipping_threshold is not None and clipping_threshold <= 0:
    raise ValueError(f"adamw clipping_threshold must be > 0 or None, got {clipping_threshold}")
  optimizer = optax.adamw(learning_rate, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay,
                          mask=path_mask(weight_decay_pattern))
  if clipping_threshold is None:
    return optimizer
  return optax.chain(optax.clip_by_global_norm(clipping_threshold), optimizer)
