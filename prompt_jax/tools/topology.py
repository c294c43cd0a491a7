"""Accelerators and TPU slices a plan is made for, as data: per-chip HBM and peak FLOP/s
(`CHIPS`), TPU generations, slice names (`--topology=v5e:2x4`) and Cloud TPU accelerator types
(`v5litepod-8`). Pure parsing: no jax, no device.
"""

from __future__ import annotations

import dataclasses

# Per-chip HBM (GiB, nominal) and peak dense bf16 FLOP/s of common accelerators. For TPUs the
# fit is judged by the TPU compiler itself (its usable HBM is a little less: see
# `plan_devices.usable_hbm`).
CHIPS = {
    "v4": (32, 275e12),
    "v5e": (16, 197e12),
    "v5p": (95, 459e12),
    "v6e": (32, 918e12),
    "h100": (80, 989e12),
    "a100": (80, 312e12),
}
# The chip a --platform is compared with when --chip is not given.
DEFAULT_CHIP = {"tpu": "v5e", "gpu": "h100", "cpu": None}


@dataclasses.dataclass(frozen=True)
class TpuGeneration:
  """How libtpu and Cloud TPU describe a generation's slices (libtpu's topology names are
  `<generation>:<grid>`, e.g. v5e:2x4, v5p:2x2x1)."""

  chip_config: str  # 'megacore': one device per chip (both TensorCores); 'default': one core
  ndim: int  # 2-D (v5e, v6e) or 3-D (v4, v5p) torus
  cloud_name: str  # Cloud TPU accelerator type prefix
  cores_in_cloud_name: int  # v4-8 and v5p-8 count TensorCores (4 chips); v5litepod-8 chips


TPU_GENERATIONS = {
    "v4": TpuGeneration("megacore", 3, "v4", 2),
    "v5e": TpuGeneration("default", 2, "v5litepod", 1),
    "v5p": TpuGeneration("megacore", 3, "v5p", 2),
    "v6e": TpuGeneration("default", 2, "v6e", 1),
}
# v5e and v6e slices of up to 8 chips exist as one host (1x1, 2x2, 2x4); larger slices, and
# every v4 and v5p slice, have 4 chips (2x2x1) per host.
_SINGLE_HOST_2D = {(1, 1), (2, 2), (2, 4)}


@dataclasses.dataclass(frozen=True)
class Topology:
  """A TPU slice: generation ('v5e') and chip grid ((2, 4))."""

  generation: str
  dims: tuple[int, ...]

  @property
  def name(self) -> str:
    return f"{self.generation}:{'x'.join(map(str, self.dims))}"

  @property
  def chips(self) -> int:
    n = 1
    for d in self.dims:
      n *= d
    return n

  @property
  def chips_per_host_bounds(self) -> tuple[int, int, int]:
    if TPU_GENERATIONS[self.generation].ndim == 2 and self.dims in _SINGLE_HOST_2D:
      return (*self.dims, 1)
    return (2, 2, 1)

  @property
  def hosts(self) -> int:
    per_host = 1
    for d in self.chips_per_host_bounds:
      per_host *= d
    return self.chips // per_host

  @property
  def accelerator_type(self) -> str:
    """The Cloud TPU name of the slice, e.g. v5litepod-8, v4-16."""
    g = TPU_GENERATIONS[self.generation]
    return f"{g.cloud_name}-{self.chips * g.cores_in_cloud_name}"

  @property
  def hbm_gib(self) -> float:
    return CHIPS[self.generation][0]

  @property
  def peak_flops(self) -> float:
    return CHIPS[self.generation][1]


# The chip grids Cloud TPU builds for a given number of chips (its accelerator types, e.g.
# v4-32 = 16 chips = 2x2x4, v5litepod-16 = 4x4).
_STANDARD_GRIDS = {
    2: {1: (1, 1), 4: (2, 2), 8: (2, 4), 16: (4, 4), 32: (4, 8), 64: (8, 8), 128: (8, 16),
        256: (16, 16)},
    3: {4: (2, 2, 1), 8: (2, 2, 2), 16: (2, 2, 4), 32: (2, 4, 4), 64: (4, 4, 4),
        128: (4, 4, 8), 256: (4, 8, 8), 512: (8, 8, 8)},
}


def topology_of_accelerator(accelerator_type: str) -> Topology:
  """A Cloud TPU accelerator type ('v4-32', 'v5litepod-16', 'v5p-8', 'v6e-8') -> the slice it
  creates (v4:2x2x4, v5e:4x4, v5p:2x2x1, v6e:2x4); the inverse of `Topology.accelerator_type`."""
  prefix, _, count = accelerator_type.strip().lower().rpartition("-")
  by_cloud_name = {g.cloud_name: name for name, g in TPU_GENERATIONS.items()}
  if prefix not in by_cloud_name or not count.isdigit():
    raise ValueError(f"--topology {accelerator_type!r} is neither GENERATION:GRID (e.g. "
                     f"v5e:2x4) nor a Cloud TPU accelerator type ("
                     f"{', '.join(f'{g.cloud_name}-N' for g in TPU_GENERATIONS.values())})")
  generation = by_cloud_name[prefix]
  g = TPU_GENERATIONS[generation]
  chips, remainder = divmod(int(count), g.cores_in_cloud_name)
  grids = _STANDARD_GRIDS[g.ndim]
  if remainder or chips not in grids:
    raise ValueError(f"TPU accelerator type {accelerator_type!r}: Cloud TPU builds "
                     f"{g.cloud_name}-N for N in "
                     f"{', '.join(str(c * g.cores_in_cloud_name) for c in grids)}")
  return Topology(generation, grids[chips])


def parse_topology(topology: str) -> Topology:
  """'v5e:2x4' -> Topology('v5e', (2, 4)); a Cloud TPU accelerator type ('v5litepod-8') gives
  the slice it creates. A one-line ValueError naming what is wrong."""
  if ":" not in topology and "-" in topology:
    return topology_of_accelerator(topology)
  generation, sep, grid = topology.strip().lower().partition(":")
  if not sep or generation not in TPU_GENERATIONS:
    raise ValueError(f"--topology must be GENERATION:GRID with GENERATION one of "
                     f"{', '.join(TPU_GENERATIONS)}, e.g. v5e:2x4 or v4:2x2x2; got {topology!r}")
  parts = grid.split("x")
  ndim = TPU_GENERATIONS[generation].ndim
  example = "2x4 or 4x4" if ndim == 2 else "2x2x1 or 2x2x4"
  if len(parts) != ndim or not all(p.isdigit() and int(p) > 0 for p in parts):
    raise ValueError(f"--topology {topology!r}: a {generation} slice is a {ndim}-D grid of "
                     f"chips, e.g. {generation}:{example}")
  dims = tuple(int(p) for p in parts)
  result = Topology(generation, dims)
  if not (ndim == 2 and dims in _SINGLE_HOST_2D):
    bounds = result.chips_per_host_bounds
    if any(d % b for d, b in zip(dims, bounds)):
      raise ValueError(f"--topology {topology!r}: a multi-host {generation} slice has "
                       f"{'x'.join(map(str, bounds[:ndim]))} chips per host, so its grid must "
                       f"be a multiple of that, e.g. {generation}:{example}")
  return result
