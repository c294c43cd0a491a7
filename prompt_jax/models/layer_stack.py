"""Per-layer <-> stacked parameter layouts of the T5 stacks (for `T5Config.scan_layers`).

On disk, T5X, Hugging Face and our checkpoints hold one subtree per block:

  encoder/layers_{i}/attention/query/kernel     [embed, joined_kv]     i = 0 .. n - 1

The scanned model holds one subtree with the blocks stacked on a leading axis:

  encoder/layers/attention/query/kernel         [n, embed, joined_kv]

`stack_layers` converts the first to the second when a checkpoint is loaded into a scanned model,
`unstack_layers` the reverse (to save in T5X's layout). Both leave every other leaf (embeddings,
norms, relative-position biases, the prompt) untouched, and take numpy or jax arrays.
"""

from __future__ import annotations

import re
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

STACKS = ("encoder", "decoder")
_LAYER = re.compile(r"^layers_(\d+)$")


def _stack(leaves):
  """Leaves of every layer -> one leaf [n, ...]: arrays, or ShapeDtypeStructs (whose sharding
  gains an unsharded leading axis, as the "layers" rule maps it)."""
  first = leaves[0]
  if isinstance(first, jax.ShapeDtypeStruct):
    sharding = first.sharding
    if isinstance(sharding, jax.sharding.NamedSharding):
      sharding = jax.sharding.NamedSharding(sharding.mesh,
                                            jax.sharding.PartitionSpec(None, *sharding.spec))
    return jax.ShapeDtypeStruct((len(leaves),) + tuple(first.shape), first.dtype,
                                sharding=sharding)
  if all(isinstance(x, np.ndarray) for x in leaves):
    return np.stack(leaves)
  return jnp.stack(leaves)


def is_stacked(params: Mapping) -> bool:
  """True when a stack of `params` holds `layers` (the scanned layout)."""
  return any("layers" in params.get(stack, {}) for stack in STACKS)


def stack_layers(params: Mapping) -> dict:
  """{encoder, decoder}/layers_{i}/... [shape] -> {encoder, decoder}/layers/... [n, shape].

  Raises ValueError when the indices are not 0 .. n - 1 or the blocks differ in structure or
  shape (the value named)."""
  out = dict(params)
  for stack in STACKS:
    if stack not in params:
      continue
    tree = dict(params[stack])
    indices = sorted(int(m.group(1)) for k in tree if (m := _LAYER.match(k)))
    if not indices:
      continue
    if "layers" in tree:
      raise ValueError(f"{stack} holds both per-layer layers_{{i}} and stacked layers")
    if indices != list(range(len(indices))):
      raise ValueError(f"{stack} layers must be layers_0 .. layers_{len(indices) - 1}, "
                       f"got {[f'layers_{i}' for i in indices]}")
    blocks = [tree.pop(f"layers_{i}") for i in indices]
    structure = jax.tree_util.tree_structure(blocks[0])
    for i, block in enumerate(blocks[1:], 1):
      if jax.tree_util.tree_structure(block) != structure:
        raise ValueError(f"{stack}/layers_{i} has other parameters than {stack}/layers_0")
      for a, b in zip(jax.tree_util.tree_leaves(blocks[0]), jax.tree_util.tree_leaves(block)):
        if tuple(a.shape) != tuple(b.shape):
          raise ValueError(f"{stack}/layers_{i} has a leaf of shape {tuple(b.shape)} where "
                           f"{stack}/layers_0 has {tuple(a.shape)}")
    tree["layers"] = jax.tree_util.tree_map(lambda *xs: _stack(xs), *blocks)
    out[stack] = tree
  return out


def _layer(x, i: int):
  """Layer i of a stacked leaf: an array's row, or a ShapeDtypeStruct without the layers axis
  (its sharding's partition spec loses its first entry, which the layers rule leaves None)."""
  if not isinstance(x, jax.ShapeDtypeStruct):
    return x[i]
  sharding = x.sharding
  if isinstance(sharding, jax.sharding.NamedSharding):
    spec = tuple(sharding.spec) + (None,) * (len(x.shape) - len(sharding.spec))
    sharding = jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec(*spec[1:]))
  return jax.ShapeDtypeStruct(x.shape[1:], x.dtype, sharding=sharding)


def unstack_layers(params: Mapping) -> dict:
  """The inverse of `stack_layers`: {stack}/layers/... [n, shape] -> {stack}/layers_{i}/...
  (arrays or ShapeDtypeStructs, e.g. the abstract tree to read a per-layer checkpoint)."""
  out = dict(params)
  for stack in STACKS:
    if stack not in params or "layers" not in params[stack]:
      continue
    tree = dict(params[stack])
    stacked = tree.pop("layers")
    leaves = jax.tree_util.tree_leaves(stacked)
    n = int(leaves[0].shape[0])
    for i in range(n):
      tree[f"layers_{i}"] = jax.tree_util.tree_map(lambda x, i=i: _layer(x, i), stacked)
    out[stack] = tree
  return out


def as_layout_of(params: Mapping, reference: Mapping) -> Any:
  """`params` converted to the layer layout of `reference` (stacked or per layer)."""
  if is_stacked(reference) and not is_stacked(params):
    return stack_layers(params)
  if is_stacked(params) and not is_stacked(reference):
    return unstack_layers(params)
  return params
