"""The devices a plan compiles for, acquired without running a program: the compile-only devices
of a TPU slice (libtpu's description, no TPU needed), deviceless GPUs (the XLA GPU compiler, no
GPU needed), or this host's devices, else fake CPU devices in a child process.

Nothing here changes a process-wide setting: those a compile-only plan needs before jax touches
a device (`jax_platforms`, `XLA_FLAGS`, the environment libtpu reads when it starts) are returned
by `process_settings` for the caller (the command line) to set.
"""

from __future__ import annotations

import dataclasses
import os
import re
import subprocess
import sys
from importlib import metadata
from typing import Any, Mapping, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import mesh_utils, topologies
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from prompt_jax import host_devices as host_devices_lib
from prompt_jax.tools.topology import TPU_GENERATIONS, Topology

_CHILD_ENV = "PROMPT_JAX_PLAN_CHILD"
_TRITON_GEMM_FLAG = "--xla_gpu_enable_triton_gemm"


# ------------------------------------------------------------------------------ process settings


@dataclasses.dataclass(frozen=True)
class ProcessSettings:
  """What the process must set before `tpu_devices` / `gpu_devices` (the library never does)."""

  jax_platforms: Optional[str] = None  # for jax.config.update("jax_platforms", ...); None: keep
  xla_flags: Optional[str] = None  # the new value of XLA_FLAGS; None: keep
  # Set while the slice is described (`tpu_devices`), removed after: libtpu reads them when it
  # starts. Only the variables the environment lacks.
  libtpu_environ: Mapping[str, str] = dataclasses.field(default_factory=dict)


def process_settings(topology: Optional[Topology], gpu_target_config: Optional[str],
                     environ: Mapping[str, str]) -> ProcessSettings:
  """The settings for compiling for `topology` (a TPU slice) or `gpu_target_config` (GPUs), in a
  process whose environment is `environ`; none for this host's devices or fake CPU devices.
  First the one-line ValueError of `check_libtpu` / `check_gpu_compiler` when the compiler is
  missing (before anything is set)."""
  # The plan runs nothing: without this jax would also try to open this host's TPU runtime, or
  # look for a GPU.
  platforms = None if "JAX_PLATFORMS" in environ else "cpu"
  if topology is not None:
    check_libtpu()
    defaults = libtpu_environment(topology)
    return ProcessSettings(jax_platforms=platforms, libtpu_environ={
        k: v for k, v in defaults.items() if k not in environ})
  if gpu_target_config is not None:
    check_gpu_compiler()
    flags = environ.get("XLA_FLAGS", "")
    return ProcessSettings(jax_platforms=platforms, xla_flags=(
        None if _TRITON_GEMM_FLAG[2:] in flags else f"{flags} {_TRITON_GEMM_FLAG}=false".strip()))
  return ProcessSettings()


def libtpu_environment(topology: Topology) -> dict[str, str]:
  """What libtpu reads when it starts and would otherwise complain about on a host that is no
  TPU VM; ALLOW_MULTIPLE_LIBTPU_LOAD lets it load beside a process that holds this host's TPU (a
  training run, or a test process): the plan only compiles."""
  return {"TPU_ACCELERATOR_TYPE": topology.accelerator_type,
          "TPU_WORKER_HOSTNAMES": "localhost", "TPU_SKIP_MDS_QUERY": "1",
          "ALLOW_MULTIPLE_LIBTPU_LOAD": "1"}


# ------------------------------------------------------------------------------ TPU slices


def check_libtpu() -> str:
  """The installed libtpu version when it is the one the installed jax asks for; else a
  ValueError (one line) saying what to install."""
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
  try:  # packaging is optional
    from packaging.requirements import Requirement  # pylint: disable=g-import-not-at-top
    return Requirement(requirement).specifier.contains(version, prereleases=True)
  except ImportError:
    match = re.fullmatch(r"libtpu\s*==\s*([\w.]+?)(\.\*)?", requirement.strip())
    if not match:
      return True
    want = match.group(1)
    return version == want or (bool(match.group(2)) and version.startswith(want + "."))


def tpu_devices(topology: Topology) -> list:
  """The compile-only devices of a TPU slice (libtpu's description, no TPU needed). The caller
  sets `process_settings(topology, ...)` first."""
  check_libtpu()
  devices = topologies.get_topology_desc(
      topology_name=topology.name,
      platform="tpu", chip_config_name=TPU_GENERATIONS[topology.generation].chip_config,
      chips_per_host_bounds=topology.chips_per_host_bounds, num_slices=1).devices
  return list(devices)


def mesh_ordered(devices: Sequence[Any], data: int, model: int) -> list:
  """`devices` in the order that makes a (data, model) grid follow the chips' torus (as
  `mesh_utils.create_device_mesh` lays it out), flattened; the given order if it cannot."""
  try:
    return list(mesh_utils.create_device_mesh((data, model), list(devices)).reshape(-1))
  except (ValueError, NotImplementedError, AssertionError, KeyError):
    return list(devices)


_HBM_MESSAGE = re.compile(r"available HBM \(([\d.]+)([KMGT])\)")


def usable_hbm(device) -> Optional[float]:
  """Bytes of HBM the TPU compiler lets one program of `device`'s chip use, read from its own
  out-of-memory message for a program far too large (about a second); None if not found."""
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
  with no GPU and no driver present. Up to 8 GPUs per host. The caller sets
  `process_settings(None, target_config_path, ...)` first: without a GPU the compiler cannot
  pick Triton GEMM tiles from a target config alone ("Couldn't find output tile sizes"), so its
  XLA_FLAGS turn Triton GEMMs off (cuBLAS GEMMs need the same buffers)."""
  check_gpu_compiler()
  try:
    with open(target_config_path) as f:
      target_config = f.read()
  except OSError as e:
    raise ValueError(f"--gpu_target_config {target_config_path!r}: {e.strerror}") from None
  per_host = min(count, 8)
  if count % per_host:
    raise ValueError(f"a GPU mesh of {count} devices is not whole hosts of {per_host} GPUs")
  try:
    description = topologies.get_topology_desc(
        "cuda", platform="cuda", target_config=target_config,
        topology=f"1x{count // per_host}x{per_host}")
  except Exception as e:  # pylint: disable=broad-except
    raise ValueError(f"--gpu_target_config {target_config_path!r}: the XLA GPU compiler "
                     f"refused it: {str(e).splitlines()[0]}") from None
  return list(description.devices)


# --------------------------------------------------------------------- fake CPU devices (no TPU)


def host_devices(platform: str, needed: int, argv: Sequence[str]):
  """Real devices of `platform` if there are enough, else fake CPU devices: when this process
  has too few, `prompt-jax plan <argv>` runs again in a child process whose environment (only)
  asks XLA for `needed` CPU devices."""
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
  flags = host_devices_lib.with_device_count(os.environ.get("XLA_FLAGS", ""), needed)
  env = dict(os.environ, XLA_FLAGS=flags, JAX_PLATFORMS="cpu", **{_CHILD_ENV: "1"})
  proc = subprocess.run([sys.executable, "-m", "prompt_jax.cli", "plan", *argv], env=env,
                        check=False)
  raise SystemExit(proc.returncode)


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
