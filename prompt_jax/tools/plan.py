"""`prompt-jax plan`: what the programs of a prompt-tuning run cost per device, without a weight.

    prompt-jax plan --gin_file=runs/scale_xxl.gin --mesh=2x4 --topology=v5e:2x4
    prompt-jax plan --gin_file=runs/demo.gin --mesh=4x2 --platform=tpu     (not a TPU plan)

The training config (the command line parses its gin and passes the objects in) gives the model,
batch, feature lengths, optimizer, axis rules and `frozen_dtype`; the programs of
`PromptPrograms` (train step, eval step, score, predict) are lowered on a (data, model) mesh from
`jax.ShapeDtypeStruct`s that carry their `NamedSharding`s and compiled ahead of time.

With `--topology` (e.g. `v5e:2x4`, `v4:2x2x2`, `v5p:2x2x1`, `v6e:2x4`, `v5e:4x4`) the devices
are those of that TPU slice as libtpu describes it (`jax.experimental.topologies`), on any host,
with no TPU attached, and the compiler is the TPU compiler: its memory analysis is what the slice
would allocate, and a program that does not fit is its own RESOURCE_EXHAUSTED error (as in
MaxText's `train_compile.py`). libtpu is the optional extra `pip install -e ".[tpu]"`.

Without `--topology` the devices are the machine's own of `--platform` when there are enough,
else fake CPU devices (`--xla_force_host_platform_device_count`, in a child process): then the
byte counts are the XLA *CPU* compiler's, not a TPU plan (docs/scale.md shows how far apart).

Printed per program and device: argument, output, temporary and generated-code bytes, the
compiler's peak, whether it fits the chip, XLA's FLOPs and the time they take at the chip's peak;
for the train step also the analytic prompt-tuning count 4 x (encoder matmul weights x encoder
tokens + (decoder matmul weights + logits weights) x decoder tokens) plus attention scores.
`--max_batch` searches (doubling, then bisection) for the largest global batch whose train step
the TPU compiler fits.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import subprocess
import sys
import time
from importlib import metadata
from typing import Any, Optional, Sequence

# Per-chip HBM (GiB, nominal) and peak dense bf16 FLOP/s of common accelerators. For TPUs the
# fit is judged by the TPU compiler itself (its usable HBM is a little less: see `usable_hbm`).
CHIPS = {
    "v4": (32, 275e12),
    "v5e": (16, 197e12),
    "v5p": (95, 459e12),
    "v6e": (32, 918e12),
    "h100": (80, 989e12),
    "a100": (80, 312e12),
}
DEFAULT_CHIP = {"tpu": "v5e", "gpu": "h100", "cpu": None}
PROGRAMS = ("train", "eval", "score", "predict")
_CHILD_ENV = "PROMPT_JAX_PLAN_CHILD"
_DEVICE_COUNT_FLAG = "--xla_force_host_platform_device_count"
MAX_BATCH_LIMIT = 1 << 16  # --max_batch stops doubling here


# ------------------------------------------------------------------------------ TPU topologies


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


def parse_mesh(mesh: str) -> tuple[int, int]:
  """'4x2' -> (4, 2)."""
  parts = mesh.lower().split("x")
  if len(parts) != 2 or not all(p.isdigit() and int(p) > 0 for p in parts):
    raise ValueError(f"--mesh must be DATAxMODEL with positive integers, e.g. 4x2; got {mesh!r}")
  return int(parts[0]), int(parts[1])


def parse_programs(programs: Optional[str], topology: Optional[Topology]) -> tuple[str, ...]:
  """'train,predict' -> ('train', 'predict'); None -> all programs for a TPU topology, else the
  train step alone (a fake-CPU compile is slow and only a stand-in)."""
  if programs is None:
    return PROGRAMS if topology is not None else ("train",)
  names = tuple(p.strip() for p in programs.split(",") if p.strip())
  unknown = [p for p in names if p not in PROGRAMS]
  if not names or unknown:
    raise ValueError(f"--programs must be a comma-separated subset of {','.join(PROGRAMS)}; "
                     f"got {programs!r}")
  return tuple(p for p in PROGRAMS if p in names)


def check_libtpu() -> str:
  """The installed libtpu version when it is the one the installed jax asks for; else a
  ValueError (one line) saying what to install."""
  import jax  # pylint: disable=g-import-not-at-top
  install = f'pip install "jax[tpu]=={jax.__version__}"'
  try:
    have = metadata.version("libtpu")
  except metadata.PackageNotFoundError:
    raise ValueError(f"--topology needs the TPU compiler (libtpu), which is not installed; "
                     f"{install} (or pip install -e \".[tpu]\")") from None
  wanted = [r.split(";")[0].strip() for r in metadata.requires("jax") or []
            if r.replace(" ", "").startswith("libtpu") and "tpu" in r.split(";", 1)[-1]]
  if wanted and not _satisfies(have, wanted[0]):
    raise ValueError(f"libtpu {have} does not match jax {jax.__version__}, which needs "
                     f"{wanted[0]}; {install}")
  return have


def _satisfies(version: str, requirement: str) -> bool:
  """Whether `version` meets a requirement such as 'libtpu==0.0.42.*'."""
  try:
    from packaging.requirements import Requirement  # pylint: disable=g-import-not-at-top
    return Requirement(requirement).specifier.contains(version, prereleases=True)
  except ImportError:
    match = re.fullmatch(r"libtpu\s*==\s*([\w.]+?)(\.\*)?", requirement.strip())
    if not match:
      return True
    want = match.group(1)
    return version == want or (bool(match.group(2)) and version.startswith(want + "."))


def tpu_devices(topology: Topology) -> list:
  """The compile-only devices of a TPU slice (libtpu's description, no TPU needed)."""
  check_libtpu()
  import jax  # pylint: disable=g-import-not-at-top
  from jax.experimental import topologies  # pylint: disable=g-import-not-at-top
  if "JAX_PLATFORMS" not in os.environ:
    # The plan runs nothing: without this jax would also try to open this host's TPU runtime.
    jax.config.update("jax_platforms", "cpu")
  # libtpu reads these when it starts; set (for that moment only) what it would otherwise
  # complain about on a host that is no TPU VM, and let it load beside a process that holds
  # this host's TPU (a training run, or a test process): the plan only compiles.
  defaults = {"TPU_ACCELERATOR_TYPE": topology.accelerator_type,
              "TPU_WORKER_HOSTNAMES": "localhost", "TPU_SKIP_MDS_QUERY": "1",
              "ALLOW_MULTIPLE_LIBTPU_LOAD": "1"}
  added = [k for k in defaults if k not in os.environ]
  os.environ.update({k: defaults[k] for k in added})
  try:
    devices = topologies.get_topology_desc(
        topology_name=topology.name,
        platform="tpu", chip_config_name=TPU_GENERATIONS[topology.generation].chip_config,
        chips_per_host_bounds=topology.chips_per_host_bounds, num_slices=1).devices
  finally:
    for k in added:
      os.environ.pop(k, None)
  return list(devices)


def mesh_ordered(devices: Sequence[Any], data: int, model: int) -> list:
  """`devices` in the order that makes a (data, model) grid follow the chips' torus (as
  `mesh_utils.create_device_mesh` lays it out), flattened; the given order if it cannot."""
  from jax.experimental import mesh_utils  # pylint: disable=g-import-not-at-top
  try:
    return list(mesh_utils.create_device_mesh((data, model), list(devices)).reshape(-1))
  except (ValueError, NotImplementedError, AssertionError, KeyError):
    return list(devices)


_HBM_MESSAGE = re.compile(r"available HBM \(([\d.]+)([KMGT])\)")


def usable_hbm(device) -> Optional[float]:
  """Bytes of HBM the TPU compiler lets one program of `device`'s chip use, read from its own
  out-of-memory message for a program far too large (about a second); None if not found."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from jax.sharding import Mesh, NamedSharding, PartitionSpec  # pylint: disable=g-import-not-at-top
  sharding = NamedSharding(Mesh(np.array([device]), ("x",)), PartitionSpec())
  x = jax.ShapeDtypeStruct((1 << 20,), jnp.float32, sharding=sharding)
  try:  # 512 GiB of temporaries
    jax.jit(lambda x: jnp.cumsum(jnp.broadcast_to(x, (1 << 17, 1 << 20)), 0).sum(0)).lower(
        x).compile()
  except Exception as e:  # pylint: disable=broad-except
    match = _HBM_MESSAGE.search(str(e))
    if match:
      return float(match.group(1)) * 1024 ** "KMGT".index(match.group(2)) * 1024
  return None


# ------------------------------------------------------------ GPUs, without a GPU (deviceless)


def check_gpu_compiler() -> str:
  """The installed jax-cuda12-plugin version (the XLA GPU compiler jax loads); else a one-line
  ValueError saying what to install."""
  import jax  # pylint: disable=g-import-not-at-top
  install = (f'pip install "jax-cuda12-plugin=={jax.__version__}" '
             f'"jax-cuda12-pjrt=={jax.__version__}"')
  try:
    have = metadata.version("jax-cuda12-plugin")
  except metadata.PackageNotFoundError:
    raise ValueError(f"--gpu_target_config needs the XLA GPU compiler (jax-cuda12-plugin), "
                     f"which is not installed; {install} (or pip install -e \".[gpu-plan]\")"
                     ) from None
  if have != jax.__version__:
    raise ValueError(f"jax-cuda12-plugin {have} does not match jax {jax.__version__}; {install}")
  return have


def gpu_devices(target_config_path: str, count: int) -> list:
  """`count` compile-only GPUs described by an XLA GpuTargetConfigProto text file (e.g. XLA's
  xla/backends/gpu/target_config/specs/h100_sxm.txtpb): the XLA GPU compiler compiles for them
  with no GPU and no driver present. Up to 8 GPUs per host."""
  check_gpu_compiler()
  try:
    with open(target_config_path) as f:
      target_config = f.read()
  except OSError as e:
    raise ValueError(f"--gpu_target_config {target_config_path!r}: {e.strerror}") from None
  per_host = min(count, 8)
  if count % per_host:
    raise ValueError(f"a GPU mesh of {count} devices is not whole hosts of {per_host} GPUs")
  # Without a GPU the compiler cannot pick Triton GEMM tiles from a target config alone
  # ("Couldn't find output tile sizes"); its cuBLAS GEMMs need the same buffers.
  flags = os.environ.get("XLA_FLAGS", "")
  if "xla_gpu_enable_triton_gemm" not in flags:
    os.environ["XLA_FLAGS"] = f"{flags} --xla_gpu_enable_triton_gemm=false".strip()
  import jax  # pylint: disable=g-import-not-at-top
  from jax.experimental import topologies  # pylint: disable=g-import-not-at-top
  if "JAX_PLATFORMS" not in os.environ:
    jax.config.update("jax_platforms", "cpu")  # compile only: do not look for a GPU
  try:
    description = topologies.get_topology_desc(
        "cuda", platform="cuda", target_config=target_config,
        topology=f"1x{count // per_host}x{per_host}")
  except Exception as e:  # pylint: disable=broad-except
    raise ValueError(f"--gpu_target_config {target_config_path!r}: the XLA GPU compiler "
                     f"refused it: {str(e).splitlines()[0]}") from None
  return list(description.devices)


# --------------------------------------------------------------------- fake CPU devices (no TPU)


def fake_device_flags(xla_flags: str, count: int) -> str:
  """`xla_flags` (an XLA_FLAGS value) asking for `count` fake CPU devices instead of any count it
  asked for before; its other flags are kept."""
  kept = [f for f in xla_flags.split() if not f.startswith(f"{_DEVICE_COUNT_FLAG}=")]
  return " ".join([*kept, f"{_DEVICE_COUNT_FLAG}={count}"])


def _devices_for(platform: str, needed: int, argv: Sequence[str]):
  """Real devices of `platform` if there are enough, else fake CPU devices: when this process
  has too few, `prompt-jax plan <argv>` runs again in a child process whose environment (only)
  asks XLA for `needed` CPU devices."""
  import jax  # pylint: disable=g-import-not-at-top
  if platform != "cpu":
    try:
      real = jax.devices(platform)
    except RuntimeError:
      real = []
    if len(real) >= needed:
      return real[:needed], False
  cpus = jax.devices("cpu")
  if len(cpus) >= needed:
    return cpus[:needed], platform != "cpu"
  if os.environ.get(_CHILD_ENV):
    raise RuntimeError(f"could not create {needed} fake CPU devices (have {len(cpus)})")
  env = dict(os.environ, XLA_FLAGS=fake_device_flags(os.environ.get("XLA_FLAGS", ""), needed),
             JAX_PLATFORMS="cpu", **{_CHILD_ENV: "1"})
  proc = subprocess.run([sys.executable, "-m", "prompt_jax.cli", "plan", *argv], env=env,
                        check=False)
  raise SystemExit(proc.returncode)


@dataclasses.dataclass(frozen=True)
class Request:
  """The command line's plan flags, checked (no jax import, no device touched)."""

  data: int
  model: int
  topology: Optional[Topology]
  platform: str
  chip: Optional[str]
  programs: tuple[str, ...]
  max_batch: bool = False
  gpu_target_config: Optional[str] = None


def request(*, mesh: str, topology: Optional[str] = None, platform: str = "cpu",
            chip: Optional[str] = None, programs: Optional[str] = None,
            max_batch: bool = False, gpu_target_config: Optional[str] = None) -> Request:
  """Check the flags together; a one-line ValueError for the first that is wrong."""
  data, model = parse_mesh(mesh)
  if gpu_target_config is not None:
    if topology is not None:
      raise ValueError("--gpu_target_config (GPUs) and --topology (a TPU slice) exclude each "
                       "other")
    if platform not in ("cpu", "gpu"):
      raise ValueError(f"--gpu_target_config describes GPUs; it cannot be planned for "
                       f"--platform={platform}")
    if max_batch:
      raise ValueError("--max_batch needs --topology: the XLA GPU compiler does not refuse a "
                       "program that needs more memory than the GPU has")
    chip = chip or DEFAULT_CHIP["gpu"]
    return Request(data, model, None, "gpu", chip, parse_programs(programs, None), False,
                   gpu_target_config)
  if platform not in DEFAULT_CHIP:
    raise ValueError(f"--platform must be one of {sorted(DEFAULT_CHIP)}, got {platform!r}")
  if chip is not None and chip not in CHIPS:
    raise ValueError(f"--chip must be one of {sorted(CHIPS)}, got {chip!r}")
  slice_ = None
  if topology is not None:
    slice_ = parse_topology(topology)
    if chip is not None and chip != slice_.generation:
      raise ValueError(f"--chip={chip} contradicts --topology={topology} (a "
                       f"{slice_.generation} slice); leave --chip out")
    if platform not in ("cpu", "tpu"):
      raise ValueError(f"--topology is a TPU slice; it cannot be planned for --platform="
                       f"{platform}")
    if data * model != slice_.chips:
      raise ValueError(f"--mesh={mesh} has {data * model} devices but --topology={topology} "
                       f"has {slice_.chips} chips; use a DATAxMODEL whose product is "
                       f"{slice_.chips}")
    platform, chip = "tpu", slice_.generation
  elif max_batch:
    raise ValueError("--max_batch needs --topology: only the TPU compiler says what does not "
                     "fit (the CPU compiler never runs out of memory)")
  return Request(data, model, slice_, platform, chip or DEFAULT_CHIP[platform],
                 parse_programs(programs, slice_), max_batch)


@dataclasses.dataclass(frozen=True)
class Target:
  """What is planned for: the devices, whether they are fake CPU stand-ins, and the chip."""

  devices: tuple
  data: int
  model: int
  topology: Optional[Topology] = None
  platform: str = "tpu"
  chip: Optional[str] = None
  fake: bool = False
  gpu_target_config: Optional[str] = None


def target(req: Request, reexec_argv: Sequence[str] = ()) -> Target:
  """The devices a plan compiles for. With a topology: the TPU slice's (libtpu's description).
  Else this machine's `platform` devices, or fake CPU devices (this may run
  `prompt-jax plan <reexec_argv>` again in a child process and exit with its code)."""
  if req.topology is not None:
    devices = tpu_devices(req.topology)
    if len(devices) != req.topology.chips:
      raise RuntimeError(f"libtpu describes {req.topology.name} with {len(devices)} devices, "
                         f"expected {req.topology.chips} (one per chip)")
    return Target(tuple(mesh_ordered(devices, req.data, req.model)), req.data, req.model,
                  req.topology, "tpu", req.chip)
  if req.gpu_target_config is not None:
    devices = gpu_devices(req.gpu_target_config, req.data * req.model)
    return Target(tuple(devices), req.data, req.model, None, "gpu", req.chip, False,
                  req.gpu_target_config)
  devices, fake = _devices_for(req.platform, req.data * req.model, reexec_argv)
  return Target(tuple(devices), req.data, req.model, None, req.platform, req.chip, fake)


# ------------------------------------------------------------------------------------ counting


def matmul_weights(abstract_frozen, logits_via_embedding: bool) -> dict[str, int]:
  """Frozen matmul weight counts: encoder, decoder (without logits) and logits."""
  import flax  # pylint: disable=g-import-not-at-top
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


def check_divisible(abstract, shardings, mesh_shape) -> None:
  """Every sharded dimension must divide evenly over its mesh axes (say which one does not)."""
  import jax  # pylint: disable=g-import-not-at-top
  for (path, leaf), sharding in zip(jax.tree_util.tree_leaves_with_path(abstract),
                                    jax.tree_util.tree_leaves(shardings)):
    for dim, axes in zip(leaf.shape, sharding.spec):
      parts = 1
      for axis in (axes if isinstance(axes, tuple) else (axes,)):
        parts *= mesh_shape[axis] if axis else 1
      if dim % parts:
        name = "/".join(str(getattr(k, "key", k)) for k in path)
        raise ValueError(f"{name} {tuple(leaf.shape)}: dimension {dim} does not split over "
                         f"{parts} devices of mesh axis {axes!r}; pick a model-axis size that "
                         f"divides the number of heads and the MLP width")


def _cost(compiled) -> dict:
  cost = compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else {}
  return dict(cost or {})


def out_of_memory(error: BaseException) -> Optional[str]:
  """The compiler's out-of-memory message as one line (None if `error` is something else)."""
  text = str(error)
  if "RESOURCE_EXHAUSTED" not in text and "Ran out of memory" not in text:
    return None
  lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
  first = next((line for line in lines if "RESOURCE_EXHAUSTED" in line), lines[0])
  if not re.search(r"\d", first):  # keep the line with the numbers
    first = next((f"{first} {line}" for line in lines if re.search(r"\d+(\.\d+)?[KMGT]", line)),
                 first)
  return first


# ------------------------------------------------------------------------------------ compiling


def _memory(compiled, tpu: bool) -> dict[str, int]:
  m = compiled.memory_analysis()
  memory = {
      "arguments": int(m.argument_size_in_bytes),
      "outputs": int(m.output_size_in_bytes),
      "aliased": int(m.alias_size_in_bytes),
      "temporaries": int(m.temp_size_in_bytes),
      "generated_code": int(m.generated_code_size_in_bytes),
  }
  # What is live at once: the TPU compiler reports it; the CPU compiler's figure leaves out
  # its temporaries, so there the sum of the buffers stands in (donated outputs reuse inputs).
  memory["total"] = (memory["arguments"] + memory["outputs"] - memory["aliased"]
                     + memory["temporaries"])
  peak = int(getattr(m, "peak_memory_in_bytes", 0) or 0) if tpu else 0
  memory["peak"] = peak or memory["total"]
  return memory


class Planner:
  """Lowers and compiles the programs of one `PromptPrograms` for batches of any size."""

  def __init__(self, programs, input_length: int, target_length: int):
    self.programs = programs
    self.tpu = programs.partitioner.devices[0].platform == "tpu"
    self.input_length, self.target_length = input_length, target_length

  def batch_structs(self, batch_size: int, keys: Optional[Sequence[str]] = None) -> dict:
    import jax  # pylint: disable=g-import-not-at-top
    import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
    shaped = self.programs.model.dummy_batch(batch_size, self.input_length, self.target_length)
    partitioner = self.programs.partitioner
    return {k: jax.ShapeDtypeStruct(v.shape, jnp.int32,
                                    sharding=partitioner.data_sharding(len(v.shape)))
            for k, v in shaped.items() if keys is None or k in keys}

  def lower(self, name: str, batch_size: int):
    import jax  # pylint: disable=g-import-not-at-top

    from prompt_jax import programs as programs_lib  # pylint: disable=g-import-not-at-top
    p = self.programs
    if name == "train":
      rng = jax.eval_shape(lambda: jax.random.key(0))
      rng = jax.ShapeDtypeStruct(rng.shape, rng.dtype, sharding=p.partitioner.replicated())
      return p.train_step_fn.lower(p.abstract_state(), p.frozen_structs(),
                                   self.batch_structs(batch_size), rng)
    if name == "eval":
      return p.eval_step_fn.lower(p.prompt_structs(), p.frozen_structs(),
                                  self.batch_structs(batch_size))
    if name == "score":  # the features `PromptPrograms.score` passes
      keys = getattr(programs_lib, "SCORE_KEYS", None)
      return p.score_fn.lower(p.prompt_structs(), p.frozen_structs(),
                              self.batch_structs(batch_size, keys))
    if name == "predict":
      keys = getattr(programs_lib, "PREDICT_KEYS", None)
      return p.predict_fn.lower(p.prompt_structs(), p.frozen_structs(),
                                self.batch_structs(batch_size, keys), self.target_length)
    raise ValueError(f"unknown program {name!r}; one of {PROGRAMS}")

  def compile(self, name: str, batch_size: int) -> dict:
    """{'memory', 'flops_per_device', 'cost_model_seconds', 'compile_seconds'} or, when the
    compiler runs out of memory, {'out_of_memory': its message, 'compile_seconds'};
    'compile_seconds' counts tracing and lowering too, 'lower_seconds' those alone."""
    start = time.perf_counter()
    lowered = self.lower(name, batch_size)
    lower_seconds = time.perf_counter() - start
    try:
      compiled = lowered.compile()
    except Exception as e:  # pylint: disable=broad-except
      message = out_of_memory(e)
      if message is None:
        raise
      return {"out_of_memory": message, "compile_seconds": time.perf_counter() - start,
              "lower_seconds": lower_seconds}
    seconds = time.perf_counter() - start
    cost = _cost(compiled)
    estimate = cost.get("optimal_seconds")  # XLA:TPU's own estimate; it overflows at 11B
    return {"memory": _memory(compiled, self.tpu),
            "flops_per_device": float(cost.get("flops", "nan")),
            "cost_model_seconds": estimate if estimate and estimate > 0 else None,
            "compile_seconds": seconds, "lower_seconds": lower_seconds}

  def max_batch(self, start: int, log=print) -> dict:
    """The largest global batch (a multiple of the data-parallel size) whose train step the
    compiler fits: double from `start` until it does not fit, then bisect."""
    unit = self.programs.partitioner.data_parallel_size
    probes = []

    def fits(batch: int) -> bool:
      result = self.compile("train", batch)
      ok = "out_of_memory" not in result
      probes.append({"batch": batch, "fits": ok, "compile_seconds": result["compile_seconds"],
                     "peak": result.get("memory", {}).get("peak"),
                     "out_of_memory": result.get("out_of_memory")})
      log(f"  batch {batch:6d}: " + (f"fits, peak {_size(result['memory']['peak']).strip()}"
                                     if ok else "does NOT fit") +
          f" ({result['compile_seconds']:.0f} s)")
      return ok

    batch = max(unit, -(-start // unit) * unit)
    if fits(batch):
      low, high = batch, None
      while high is None and low < MAX_BATCH_LIMIT:
        if fits(low * 2):
          low *= 2
        else:
          high = low * 2
    else:
      low, high = 0, batch
      while low == 0 and high > unit:
        half = max(unit, (high // 2) // unit * unit)
        if fits(half):
          low = half
        else:
          high = half
    while high is not None and high - low > unit:
      mid = (low + high) // 2 // unit * unit
      if mid in (low, high):
        break
      if fits(mid):
        low = mid
      else:
        high = mid
    return {"max_batch": low, "first_not_fitting": high, "unit": unit, "probes": probes,
            "limit_reached": high is None}


def build_plan(programs, target_: Target, *, batch_size: int, input_length: int,
               target_length: int, names: Sequence[str] = ("train",),
               max_batch: bool = False, log=print) -> dict:
  """Compile `names` of `programs` (a `PromptPrograms` on `target_`'s mesh) -> the plan."""
  import jax  # pylint: disable=g-import-not-at-top
  check_divisible(programs.abstract_frozen, programs.frozen_shardings,
                  programs.partitioner.mesh.shape)
  if batch_size % target_.data:
    raise ValueError(f"batch size {batch_size} is not divisible by the data-parallel size "
                     f"{target_.data} of --mesh={target_.data}x{target_.model}")
  planner = Planner(programs, input_length, target_length)
  model = programs.model
  shaped_batch = model.dummy_batch(batch_size, input_length, target_length)
  module = model.module
  encoder_length = jax.eval_shape(
      lambda: module.apply({"params": {}}, shaped_batch["encoder_input_tokens"],
                           method=module.encoder_mask)).shape[1]
  weights = matmul_weights(programs.abstract_frozen, model.config.logits_via_embedding)
  flops = analytic_flops(weights, model.config, batch_size, encoder_length, target_length)
  num_devices = len(target_.devices)
  topology = target_.topology
  chip = target_.chip
  hbm = peak_flops = None
  if chip:
    hbm, peak_flops = CHIPS[chip][0] * 2 ** 30, CHIPS[chip][1]
  usable = usable_hbm(target_.devices[0]) if topology is not None else None

  compiled = {}
  for name in names:
    log(f"compiling the {name} program ...")
    result = planner.compile(name, batch_size)
    if "memory" in result:
      result["flops_total"] = result["flops_per_device"] * num_devices
      if topology is not None:
        result["fits"] = True  # the TPU compiler refuses what does not fit
      elif hbm:
        result["fits"] = result["memory"]["peak"] <= hbm
      if model.config.scan_layers:
        # XLA's cost analysis counts a while loop's body once, not once per layer: a scanned
        # model's XLA FLOPs are far below its step's (the analytic count below is not).
        result["xla_flops_count_one_layer_per_stack"] = True
      elif peak_flops:
        result["seconds_at_peak"] = result["flops_per_device"] / peak_flops
    else:
      result["fits"] = False
    compiled[name] = result

  import jaxlib  # pylint: disable=g-import-not-at-top
  plan = {
      "mesh": {"data": target_.data, "model": target_.model},
      "platform": target_.platform,
      "compiled_for": ("TPU compiler" if topology is not None else
                       "XLA GPU compiler (deviceless)" if target_.gpu_target_config else
                       "fake CPU devices" if target_.fake else target_.devices[0].platform),
      "gpu_target_config": target_.gpu_target_config,
      "device_kind": target_.devices[0].device_kind,
      "tpu_plan": topology is not None or target_.devices[0].platform == "tpu",
      "topology": None if topology is None else {
          "name": topology.name, "accelerator_type": topology.accelerator_type,
          "chips": topology.chips, "hosts": topology.hosts,
          "device_kind": target_.devices[0].device_kind,
          "libtpu": metadata.version("libtpu")},
      "jax": jax.__version__, "jaxlib": jaxlib.__version__,
      "chip": chip,
      "chip_memory_gib": None if chip is None else CHIPS[chip][0],
      "usable_hbm_bytes": usable,
      "chip_peak_flops": peak_flops,
      "config": {"batch_size": batch_size, "inputs": input_length, "targets": target_length,
                 "encoder_length": int(encoder_length),
                 "activation_dtype": model.config.dtype,
                 "frozen_dtype": str(programs.frozen_dtype or "float32"),
                 "remat_policy": model.config.remat_policy,
                 "scan_layers": bool(model.config.scan_layers)},
      "params": programs.param_counts(),
      "matmul_weights": weights,
      "programs": compiled,
      "analytic_train_flops": flops,
  }
  train = compiled.get("train")
  if train is not None:  # the train step's numbers at the top level, as before
    plan["compile_seconds"] = train["compile_seconds"]
    if "memory" in train:
      plan["bytes_per_device"] = train["memory"]
      plan["flops_per_step"] = {
          "analytic_matmul": flops["matmul"], "analytic_attention": flops["attention"],
          "analytic_total": flops["total"], "xla_per_device": train["flops_per_device"],
          "xla_total": train["flops_total"]}
    if "fits" in train:
      plan["fits"] = train["fits"]
    if peak_flops:
      plan["ideal_step_seconds"] = flops["total"] / (peak_flops * num_devices)
  if max_batch:
    if topology is None:
      raise ValueError("max_batch needs a TPU topology (the CPU compiler never runs out of "
                       "memory)")
    log("searching the largest global batch whose train step fits ...")
    plan["max_batch"] = planner.max_batch(batch_size, log=log)
  return plan


# ------------------------------------------------------------------------------------ printing


def _duration(seconds: float) -> str:
  if seconds >= 1:
    return f"{seconds:.2f} s"
  if seconds >= 1e-3:
    return f"{seconds * 1e3:.1f} ms"
  return f"{seconds * 1e6:.0f} us"


def _size(n: Optional[float]) -> str:
  if n is None:
    return f"{'-':>10}"
  if n >= 2 ** 30:
    return f"{n / 2 ** 30:6.2f} GiB"
  if n >= 2 ** 20:
    return f"{n / 2 ** 20:6.1f} MiB"
  return f"{n / 2 ** 10:6.1f} KiB"


_TITLES = {"train": "train step", "eval": "eval step", "score": "score", "predict": "predict"}

# Remat policies from the least activation memory to the most (docs/scale.md's plan table:
# XXL on v5e-8 fits with the first two, not with the last two).
REMAT_BY_MEMORY = ("full", "dots_with_no_batch_dims_saveable", "dots_saveable", "none")


def fit_hint(remat_policy: str) -> str:
  """What to change when the train step does not fit: remat policies that keep less than
  `remat_policy`, a smaller batch, a wider model axis or a bigger slice."""
  leaner = REMAT_BY_MEMORY[:REMAT_BY_MEMORY.index(remat_policy)]
  options = [f"--gin.REMAT_POLICY='{p}'" for p in leaner]
  options += ["a smaller --gin.BATCH_SIZE (--max_batch finds the largest that fits)",
              "a wider model axis (--mesh=DATAxMODEL)", "a slice with more HBM per chip"]
  return "to fit, try: " + "; ".join(options)


def format_plan(plan: dict) -> str:
  c, p = plan["config"], plan["params"]
  mesh = plan["mesh"]
  topo = plan.get("topology")
  where = f"mesh {mesh['data']}x{mesh['model']} (data x model)"
  if topo:
    head = (f"TPU plan: {topo['name']} ({topo['accelerator_type']}: {topo['chips']} chips of "
            f"{topo['device_kind']}, {topo['hosts']} host{'s' if topo['hosts'] > 1 else ''}), "
            f"{where}; compiled by the TPU compiler (libtpu {topo['libtpu']}, jax {plan['jax']})")
  else:
    head = (f"{where} on {plan['compiled_for']} (planned for {plan['platform']}"
            f"{' ' + plan['chip'] if plan['chip'] else ''})")
  lines = [head]
  compiler = "GPU" if plan.get("gpu_target_config") else "CPU"
  if plan.get("gpu_target_config"):
    lines.append(f"GPU plan: {plan['device_kind']} x {mesh['data'] * mesh['model']} (from "
                 f"{plan['gpu_target_config']}), compiled by the XLA GPU compiler without a GPU; "
                 f"fit against {plan['chip']}'s {plan['chip_memory_gib']} GiB; no speed is "
                 "measured")
  elif not plan["tpu_plan"]:
    lines.append("NOT a TPU plan: these are the XLA CPU compiler's buffers; for the TPU "
                 "compiler's, install libtpu (pip install -e \".[tpu]\") and pass "
                 "--topology=v5e:2x4 (or another slice)")
  lines += [
      f"batch {c['batch_size']}, inputs {c['inputs']} (+prompt -> encoder {c['encoder_length']}),"
      f" targets {c['targets']}; activations {c['activation_dtype']}, frozen weights "
      f"{c['frozen_dtype']}, remat {c['remat_policy']}"
      f"{', scanned layers' if c.get('scan_layers') else ''}",
      f"parameters: frozen {p['frozen']:,}  trainable {p['trainable']:,}",
  ]
  programs = plan["programs"]
  names = list(programs)
  width = 13
  row = lambda label, cells: f"  {label:<20}" + "".join(f"{x:>{width}}" for x in cells)
  lines.append(f"  {'per device':<20}" + "".join(f"{_TITLES[n]:>{width}}" for n in names))
  ok = {n: r for n, r in programs.items() if "memory" in r}
  for key, label in (("arguments", "arguments"), ("outputs", "outputs"),
                     ("aliased", "  of them donated"), ("temporaries", "temporaries"),
                     ("generated_code", "generated code"), ("peak", "peak")):
    lines.append(row(label, [_size(ok[n]["memory"][key]).strip() if n in ok else "-"
                             for n in names]))
  chip = plan["chip"]
  if chip:
    lines.append(row(f"fits a {chip} chip", ["yes" if r.get("fits") else "NO"
                                              for r in programs.values()]))
  lines.append(row("FLOPs (whole mesh)", [
      f"{ok[n]['flops_total']:.3g}" if n in ok and ok[n]["flops_total"] == ok[n]["flops_total"]
      else "-" for n in names]))  # the deviceless GPU compiler gives no cost analysis: NaN
  if plan.get("chip_peak_flops"):
    lines.append(row("at 100% of peak", [
        _duration(ok[n]["seconds_at_peak"]) if ok.get(n, {}).get("seconds_at_peak", 0) > 0
        else "-" for n in names]))
  if any(r.get("xla_flops_count_one_layer_per_stack") for r in ok.values()):
    lines.append("scanned layers: XLA's FLOPs count one layer per stack (a loop body once), so "
                 "they and the time at peak are left out; the analytic count below is whole")
  lines.append(row("compile", [f"{r['compile_seconds']:.1f} s" for r in programs.values()]))
  lines.append(row("  of it tracing+lowering", [
      f"{r['lower_seconds']:.1f} s" if "lower_seconds" in r else "-" for r in programs.values()]))
  if chip:
    usable = plan.get("usable_hbm_bytes")
    peak = f"{plan['chip_peak_flops'] / 1e12:.0f} TFLOP/s bf16 per chip"
    if topo:
      of = f"{usable / 2 ** 30:.2f} GiB usable of " if usable else ""
      lines.append(f"fit: the TPU compiler's own verdict ({of}{plan['chip_memory_gib']} GiB HBM "
                   f"per {chip} chip); time at peak: XLA's FLOPs at {peak}, a bound, not a "
                   "measurement")
    else:
      lines.append(f"fit: the {compiler} compiler's peak against {plan['chip_memory_gib']} GiB "
                   f"per {chip} chip; time: XLA's FLOPs at {peak}")
  if "flops_per_step" in plan:
    f = plan["flops_per_step"]
    line = (f"train step analytic FLOPs: 4N matmul {f['analytic_matmul']:.4g} + attention "
            f"scores {f['analytic_attention']:.4g} = {f['analytic_total']:.4g}")
    if "ideal_step_seconds" in plan:
      line += f" -> {_duration(plan['ideal_step_seconds'])} at 100% of peak"
    lines.append(line)
    if "fits" in plan and chip and not topo:  # the sentence tests and scripts look for
      verdict = "fits" if plan["fits"] else "does NOT fit"
      lines.append(f"{verdict} in {plan['chip_memory_gib']} GiB per {chip} chip (by the "
                   f"{compiler} compiler's bytes)")
  for name, r in programs.items():
    if "out_of_memory" in r:
      lines.append(f"{_TITLES[name]} does NOT fit: {r['out_of_memory']}")
  if "out_of_memory" in programs.get("train", {}):
    lines.append(fit_hint(c["remat_policy"]))
  if "max_batch" in plan:
    m = plan["max_batch"]
    if m["max_batch"] == 0:
      lines.append(f"largest batch that fits: none (not even {m['unit']}, one example per "
                   "data shard)")
    else:
      more = (f"; {m['first_not_fitting']} does not" if m["first_not_fitting"] else
              f" (the search stops at {MAX_BATCH_LIMIT})")
      lines.append(f"largest global batch whose train step fits: {m['max_batch']} (a multiple of "
                   f"{m['unit']}, the data-parallel size){more}; {len(m['probes'])} compiles")
  return "\n".join(lines)


# ------------------------------------------------------------------------------------ the command


def main(*, model, target: Target, batch_size: int, input_length: int, target_length: int,
         optimizer=None, logical_axis_rules=None, trainable_pattern: Optional[str] = None,
         frozen_dtype: Optional[str] = None, programs: Sequence[str] = ("train",),
         max_batch: bool = False, json_path: Optional[str] = None) -> int:
  """`prompt-jax plan` on configured objects (the command line parses the gin config): plan
  `programs` of `model` on `target` (see `target()`), print the table, write `json_path`.
  Exit code 1 when a program does not fit (the compiler's message is printed)."""
  from prompt_jax import params as params_lib  # pylint: disable=g-import-not-at-top
  from prompt_jax import partitioning  # pylint: disable=g-import-not-at-top
  from prompt_jax.programs import PromptPrograms  # pylint: disable=g-import-not-at-top
  from prompt_jax.training import optimizers  # pylint: disable=g-import-not-at-top
  partitioner = partitioning.Partitioner(
      num_partitions=target.model, devices=target.devices,
      logical_axis_rules=(logical_axis_rules if logical_axis_rules is not None else
                          partitioning.standard_logical_axis_rules()))
  built = PromptPrograms(
      model, partitioner, optimizer if optimizer is not None else optimizers.adafactor(),
      trainable_pattern or params_lib.DEFAULT_TRAINABLE_PATTERN, frozen_dtype,
      batch_size=batch_size, input_length=input_length, target_length=target_length)
  log = lambda message: print(message, file=sys.stderr, flush=True)
  plan = build_plan(built, target, batch_size=batch_size, input_length=input_length,
                    target_length=target_length, names=programs, max_batch=max_batch, log=log)
  print(format_plan(plan), flush=True)
  if json_path:
    with open(json_path, "w") as f:
      json.dump(plan, f, indent=2, default=str)
  failed = [n for n, r in plan["programs"].items() if "out_of_memory" in r]
  if failed:
    where = plan["topology"]["name"] if plan.get("topology") else plan["platform"]
    print(f"error: the {_TITLES[failed[0]]} does not fit {where} at batch {batch_size}: "
          f"{plan['programs'][failed[0]]['out_of_memory']}", file=sys.stderr)
    return 1
  return 0
