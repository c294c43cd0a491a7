"""The activation dtype 'auto' stands for: bfloat16 where the hardware multiplies bf16 matrices
natively, float32 elsewhere.

bf16 activations are T5X's choice on TPU. On a CPU they pay only with bf16 matrix units: AMX
(Intel Sapphire Rapids and later) or AVX-512 BF16 (Intel Cooper Lake, AMD Zen 4 and later); on an
AVX2-only CPU every bf16 dot is converted to fp32 and back, so fp32 is as fast and more exact
(docs/scale.md has the measurements). GPUs get bf16 from compute capability 8.0 (Ampere) on.
The real-model gin files set `ACTIVATION_DTYPE = 'auto'`; the tiny demo pins 'float32' so its
documented numbers are the same on every machine.
"""

from __future__ import annotations

from typing import Iterable, Optional

AUTO = "auto"
# /proc/cpuinfo flags of bf16 matrix units.
CPU_BF16_MATRIX_FLAGS = ("amx_bf16", "avx512_bf16")
GPU_BF16_MIN_COMPUTE_CAPABILITY = 8.0


def is_auto(requested) -> bool:
  """Whether `requested` (a dtype name, or a dtype object) is 'auto'."""
  return isinstance(requested, str) and requested == AUTO


def resolve(requested: str, platform: str, cpu_flags: Iterable[str] = (),
            gpu_compute_capability: Optional[float] = None) -> str:
  """`requested` unless it is 'auto'; for 'auto', the dtype for `platform` ('cpu', 'gpu',
  'tpu'): bfloat16 on TPU, on GPUs of compute capability >= 8.0 and on CPUs whose `cpu_flags`
  name a bf16 matrix unit; float32 otherwise (and on any other platform)."""
  if not is_auto(requested):
    return requested
  if platform == "tpu":
    return "bfloat16"
  if platform == "gpu":
    capable = (gpu_compute_capability is not None
               and gpu_compute_capability >= GPU_BF16_MIN_COMPUTE_CAPABILITY)
    return "bfloat16" if capable else "float32"
  if platform == "cpu":
    return "bfloat16" if set(cpu_flags) & set(CPU_BF16_MATRIX_FLAGS) else "float32"
  return "float32"  # a platform not measured (e.g. Metal): the exact choice


def cpu_flags(cpuinfo: str = "/proc/cpuinfo") -> tuple[str, ...]:
  """The first CPU's instruction-set flags in the file's order (x86 `flags`, Arm `Features`);
  empty where the file does not exist (not Linux): 'auto' is then float32."""
  try:
    with open(cpuinfo) as f:
      for line in f:
        if line.split(":")[0].strip() in ("flags", "Features"):
          return tuple(line.split(":", 1)[1].split())
  except OSError:
    pass
  return ()


def resolve_for(requested: str, platform: str) -> str:
  """`resolve` for `platform` as found on this host: its CPU flags, and for 'gpu' the compute
  capability of jax's first GPU (none visible: float32)."""
  if not is_auto(requested) or platform != "gpu":
    return resolve(requested, platform, cpu_flags() if platform == "cpu" else ())
  import jax  # pylint: disable=g-import-not-at-top
  try:
    capability = float(jax.devices("gpu")[0].compute_capability)
  except (RuntimeError, AttributeError, ValueError, IndexError):
    capability = None
  return resolve(requested, platform, gpu_compute_capability=capability)


def resolve_here(requested: str) -> str:
  """`resolve_for` jax's default backend in this process."""
  if not is_auto(requested):
    return requested
  import jax  # pylint: disable=g-import-not-at-top
  backend = jax.default_backend()
  return resolve_for(requested, "gpu" if backend in ("cuda", "rocm") else backend)
