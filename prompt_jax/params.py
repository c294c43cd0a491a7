"""The trainable/frozen split of a parameter tree.

Trainable parameters are the leaves whose '/'-joined path matches `trainable_pattern` (by
default any path with a `prompt` component, i.e. everything a prompt hook creates). Everything
else is frozen: it is an ordinary argument of the train step, never differentiated, never in the
optimizer state.
"""

from __future__ import annotations

import re
from typing import Any, Mapping

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

DEFAULT_TRAINABLE_PATTERN = r"(^|/)prompt(/|$)"


def _flat(tree) -> dict[str, Any]:
  return flax.traverse_util.flatten_dict(flax.core.unfreeze(tree), sep="/")


def split_params(params: Mapping, trainable_pattern: str = DEFAULT_TRAINABLE_PATTERN):
  """params -> (trainable, frozen), two nested dicts that partition the leaves."""
  pattern = re.compile(trainable_pattern)
  trainable, frozen = {}, {}
  for path, leaf in _flat(params).items():
    (trainable if pattern.search(path) else frozen)[path] = leaf
  unflat = lambda d: flax.traverse_util.unflatten_dict(d, sep="/") if d else {}
  return unflat(trainable), unflat(frozen)


def merge_params(trainable: Mapping, frozen: Mapping) -> dict:
  """Inverse of `split_params`; the two trees must not share a path."""
  flat_trainable, flat_frozen = _flat(trainable), _flat(frozen)
  both = flat_trainable.keys() & flat_frozen.keys()
  if both:
    raise ValueError(f"trainable and frozen parameters overlap at {sorted(both)[:3]}")
  return flax.traverse_util.unflatten_dict({**flat_frozen, **flat_trainable}, sep="/")


def unbox(tree):
  """Strip `nn.LogicallyPartitioned` boxes, leaving plain arrays (or ShapeDtypeStructs)."""
  return nn.unbox(tree)


def count(tree) -> int:
  return int(sum(x.size for x in jax.tree_util.tree_leaves(tree)))


def shapes(tree) -> dict[str, tuple]:
  return {k: tuple(v.shape) for k, v in _flat(tree).items()}


def tree_all_finite(tree: Any) -> jax.Array:
  """A scalar bool: every floating leaf of `tree` is finite (traceable: use inside jit)."""
  leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree_util.tree_leaves(tree)
            if hasattr(x, "dtype") and jnp.issubdtype(x.dtype, jnp.inexact)]
  return jnp.all(jnp.stack(leaves)) if leaves else jnp.array(True)


def tree_max_abs(tree: Any) -> jax.Array:
  """A float32 scalar: the largest |value| over the floating leaves of `tree` (0 for none;
  traceable)."""
  leaves = [jnp.max(jnp.abs(x)).astype(jnp.float32) for x in jax.tree_util.tree_leaves(tree)
            if hasattr(x, "dtype") and jnp.issubdtype(x.dtype, jnp.inexact) and x.size]
  return jnp.max(jnp.stack(leaves)) if leaves else jnp.array(0.0, jnp.float32)


def check_same_shapes(tree: Any, reference: Any, what: str = "parameters") -> None:
  """Raise ValueError naming the first path whose presence or shape in `tree` differs from
  `reference` (both parameter trees)."""
  got, want = shapes(tree), shapes(reference)
  for path in sorted(got.keys() | want.keys()):
    if got.get(path) != want.get(path):
      raise ValueError(f"{what}: {path} has shape {got.get(path)}, expected {want.get(path)}"
                       if path in got and path in want else
                       f"{what}: {path} is {'missing' if path in want else 'unexpected'}")


def leading_size(tree: Any, what: str) -> int:
  """N, the leading axis shared by every leaf of a prompt bank's `tree` ([N, ...] leaves);
  a ValueError naming each leaf's shape when they differ or one has no axis."""
  sizes = {int(np.shape(leaf)[0]) if np.ndim(leaf) else None
           for leaf in jax.tree_util.tree_leaves(tree)}
  if len(sizes) != 1 or None in sizes:
    paths = {jax.tree_util.keystr(p): np.shape(x)
             for p, x in jax.tree_util.tree_leaves_with_path(tree)}
    raise ValueError(f"a prompt bank needs every {what} leaf to have the same leading prompt "
                     f"axis [num_prompts, ...]; got shapes {paths}")
  return sizes.pop()
