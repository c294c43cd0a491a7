"""Mesh, logical axis rules and shardings: the one place that decides how arrays are laid out.

Every parameter is created with logical axis names; the rules here map them onto the mesh axes
(`data`, `model`), as T5X's partitioner does:

  * the frozen T5's axes (`vocab`, `embed`, `heads`, `joined_kv`, `mlp`, `relpos_buckets`, ...):
    T5X's standard 1-D model-parallel rules, `T5X_LOGICAL_AXIS_RULES`;
  * the prompt axes: declared by the prompt files that create them (`LOGICAL_AXIS_RULES` in
    `prompt_jax/prompts/*.py`, collected by `prompt_jax.prompts.logical_axis_rules()`), all
    replicated. This file names no prompt method; a new method brings its own rules.

The rules are composed on demand (`standard_logical_axis_rules()`, called when a `Partitioner`
is built without rules), so importing this module imports no prompt method.

A logical name that no rule names is replicated (flax's `logical_to_mesh_axes` leaves such a
dimension unsharded), so an axis only needs a rule here to be *split*; a prompt hook defined
outside `prompt_jax/prompts` works without one.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from prompt_jax import prompts

LogicalAxisRules = Sequence[tuple[str, Optional[str]]]

# T5X's `standard_logical_axis_rules()` for 1-D model parallelism.
T5X_LOGICAL_AXIS_RULES: tuple[tuple[str, Optional[str]], ...] = (
    ("batch", "data"),
    ("vocab", "model"),
    ("embed", None),
    ("mlp", "model"),
    ("heads", "model"),
    ("kv", None),
    ("joined_kv", "model"),
    ("relpos_buckets", None),
    ("abspos_buckets", None),
    ("length", None),
    ("layers", None),
    ("stack", None),
    ("mlp_activations", None),
)


def standard_logical_axis_rules(additional_rules: Optional[LogicalAxisRules] = None
                                ) -> tuple[tuple[str, Optional[str]], ...]:
  """T5X's rules for the frozen model, then the prompt axes' rules, then `additional_rules`
  (as T5X's function of this name; gin: `logical_axis_rules =
  @partitioning.standard_logical_axis_rules()`)."""
  return (T5X_LOGICAL_AXIS_RULES + prompts.logical_axis_rules()
          + tuple(tuple(rule) for rule in additional_rules or ()))


@dataclasses.dataclass(frozen=True)
class Partitioner:
  """A (data, model) device mesh and the logical axis rules that lay arrays out on it.

  Attributes:
    num_partitions: size of the `model` axis; the `data` axis takes the remaining devices.
    logical_axis_rules: (logical name, mesh axis or None) pairs; None (default):
      `standard_logical_axis_rules()`.
  """

  num_partitions: int = 1
  logical_axis_rules: Optional[LogicalAxisRules] = None
  devices: Optional[Sequence[Any]] = None

  def __post_init__(self):
    devices = list(self.devices) if self.devices is not None else jax.devices()
    if self.num_partitions < 1 or len(devices) % self.num_partitions:
      raise ValueError(f"Partitioner.num_partitions={self.num_partitions} must divide the "
                       f"{len(devices)} available devices")
    rules = (standard_logical_axis_rules() if self.logical_axis_rules is None
             else self.logical_axis_rules)
    object.__setattr__(self, "devices", tuple(devices))
    object.__setattr__(self, "logical_axis_rules", tuple(tuple(r) for r in rules))

  def fit_batch(self, batch_size: int) -> Partitioner:
    """A partitioner whose data axis divides `batch_size`: this one when it does; on CPU host
    devices (their number is a speed choice, `prompt-jax --host_devices`), one over the most of
    them that divides it (at least one data shard); else a ValueError naming both numbers."""
    if batch_size % self.data_parallel_size == 0:
      return self
    if any(d.platform != "cpu" for d in self.devices) or jax.process_count() > 1:
      raise ValueError(f"batch size {batch_size} is not divisible by the data-parallel size "
                       f"{self.data_parallel_size}")
    data = max(d for d in range(1, self.data_parallel_size + 1) if batch_size % d == 0)
    return dataclasses.replace(self, devices=self.devices[:data * self.num_partitions])

  @property
  def mesh(self) -> Mesh:
    data = len(self.devices) // self.num_partitions
    grid = np.asarray(self.devices).reshape(data, self.num_partitions)
    return Mesh(grid, ("data", "model"))

  @property
  def data_parallel_size(self) -> int:
    return len(self.devices) // self.num_partitions

  def sharding(self, spec: PartitionSpec) -> NamedSharding:
    return NamedSharding(self.mesh, spec)

  def replicated(self) -> NamedSharding:
    return NamedSharding(self.mesh, PartitionSpec())

  def data_sharding(self, ndim: int) -> NamedSharding:
    """[batch, ...] arrays split over the data axis."""
    return NamedSharding(self.mesh, PartitionSpec("data", *([None] * (ndim - 1))))

  def logical_to_mesh(self, logical_specs) -> Any:
    """A tree of logical PartitionSpecs (e.g. from `nn.get_partition_spec`) -> NamedShardings."""
    return nn.logical_to_mesh_sharding(logical_specs, self.mesh, self.logical_axis_rules)

  def shardings_for(self, boxed_tree) -> Any:
    """Shardings for a tree whose leaves may carry `nn.LogicallyPartitioned` metadata."""
    specs = nn.get_partition_spec(boxed_tree)
    return self.logical_to_mesh(specs)

  def axis_rules(self):
    """Context manager that lets `nn.with_logical_constraint` inside the model see the rules."""
    return nn.logical_axis_rules(self.logical_axis_rules)
