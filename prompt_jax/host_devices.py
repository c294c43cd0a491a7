"""How many XLA host (CPU) devices a process asks for, decided before jax starts.

XLA:CPU runs one compiled program's ops on few threads at a time, so on a multi-core CPU one
program leaves cores idle. `--xla_force_host_platform_device_count=N` (an XLA flag, read once,
when jax creates its CPU backend) splits the CPU into N devices; `Partitioner()` puts every
device on the mesh's data axis, so each program splits its batch over them and N shards compute
at the same time. `prompt-jax` asks for one device per usable core by default (`--host_devices`,
$PROMPT_JAX_HOST_DEVICES); docs/scale.md has the measurements behind that. The flag only shapes
the CPU backend: on a GPU or TPU host, programs run on the accelerators as before.

This module imports no jax (it must run before jax does) and reads no process state itself:
`apply` changes the environment mapping it is given (`prompt_jax.cli`, which owns the process,
and the benchmarks pass `os.environ`).
"""

from __future__ import annotations

import os
from typing import Optional

ENV = "PROMPT_JAX_HOST_DEVICES"
DEVICE_COUNT_FLAG = "--xla_force_host_platform_device_count"
AUTO = "auto"
# 'auto' never asks for more devices than this: one device per core is measured on 2 cores
# only (docs/scale.md); beyond 8, per-device batches of the shipped configs (32 rows) get small.
MAX_AUTO_DEVICES = 8


def usable_cores() -> int:
  """The cores this process may run on (its CPU affinity where the OS tells, else all)."""
  try:
    return len(os.sched_getaffinity(0))
  except AttributeError:  # not on Linux
    return os.cpu_count() or 1


def parse_count(text: str, source: str) -> Optional[int]:
  """'auto' -> None (decide from the cores), an integer >= 1 -> itself; `source` (the flag or
  variable it came from) names it in the error."""
  text = text.strip()
  if text.lower() == AUTO:
    return None
  try:
    count = int(text)
  except ValueError:
    count = 0
  if count < 1:
    raise ValueError(f"{source} must be 'auto' or an integer >= 1, got {text!r}")
  return count


def auto_count(cores: int) -> int:
  """One host device per usable core, at most MAX_AUTO_DEVICES."""
  return max(1, min(cores, MAX_AUTO_DEVICES))


def with_device_count(xla_flags: str, count: int) -> str:
  """`xla_flags` (an XLA_FLAGS value) asking for `count` host devices instead of any count it
  asked for before; its other flags are kept."""
  kept = [f for f in xla_flags.split() if not f.startswith(f"{DEVICE_COUNT_FLAG}=")]
  return " ".join([*kept, f"{DEVICE_COUNT_FLAG}={count}"])


def requested_count(xla_flags: str) -> Optional[int]:
  """The host device count `xla_flags` asks for, or None."""
  for flag in xla_flags.split():
    if flag.startswith(f"{DEVICE_COUNT_FLAG}="):
      return int(flag.partition("=")[2])
  return None


def xla_flags_with_host_devices(requested: Optional[str], environ) -> Optional[tuple[str, int]]:
  """(new XLA_FLAGS value, device count) for a process about to start jax, or None to leave
  XLA_FLAGS as it is.

  `requested` is the `--host_devices` value (None: not given), then $PROMPT_JAX_HOST_DEVICES;
  'auto' or nothing is `auto_count(usable_cores())`. With neither given, a device count already
  in XLA_FLAGS is the user's choice and stays."""
  source = "--host_devices"
  if requested is None and environ.get(ENV, "").strip():
    requested, source = environ[ENV], f"${ENV}"
  flags = environ.get("XLA_FLAGS", "")
  already = requested_count(flags)
  if requested is None and already is not None:
    return None
  count = parse_count(requested, source) if requested is not None else None
  count = auto_count(usable_cores()) if count is None else count
  if already == count:
    return None
  return with_device_count(flags, count), count


def apply(requested: Optional[str], environ, jax_started: bool) -> Optional[int]:
  """Sets environ['XLA_FLAGS'] as `xla_flags_with_host_devices` says, before jax starts; the
  count set, or None when XLA_FLAGS stays. Once jax has started (`jax_started`) its devices are
  fixed: nothing changes, and an explicit `requested` is a ValueError saying so."""
  if jax_started:
    if requested is not None:
      raise ValueError(f"--host_devices={requested}: jax is already imported in this process, "
                       "so its devices are fixed; set XLA_FLAGS before importing jax instead")
    return None
  change = xla_flags_with_host_devices(requested, environ)
  if change is None:
    return None
  environ["XLA_FLAGS"], count = change
  return count
