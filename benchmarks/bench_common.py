"""What every benchmark prints about the machine, and the honesty label for its numbers.

Speed ratios are only comparable on a quiet machine. Each benchmark calls `start()` before its
first timed round and `finish(start_load)` after its last: both print the 1-minute load average,
and `finish` prints "UNDER LOAD" when other processes were using the CPU, so that a figure
measured with the cores shared never reaches README or docs unlabelled. What decides it:

- where Linux reports it (/proc/stat), the CPU time the *other* processes used between `start`
  and `finish`: all busy (and hypervisor-stolen) CPU time minus this process's own, as an
  average number of cores; above `QUIET_OTHER_CORES` means someone else ran during the run. This
  is the direct measure: the 1-minute load average lags by about a minute both ways (it still
  shows a job that just ended, e.g. the previous benchmark, and does not yet show one that
  started during the last round);
- elsewhere, the load average: above `QUIET_LOAD` at the start (others ran in the minute
  before), or at the end above what the benchmark alone can add (`cpu_count` busy threads).

Ours runs as `prompt-jax` runs it: imported before jax, this module asks XLA for one host
device per core (`prompt_jax.host_devices`, the CLI's default; $PROMPT_JAX_HOST_DEVICES or a
device count already in XLA_FLAGS wins), so the programs are data-parallel over the CPU's cores;
`describe_machine` prints the device count. On a GPU or TPU host this changes nothing.

Imports only the standard library and jax (no TensorFlow, seqio or tensorflow-datasets), so the
benchmarks run on an accelerator machine with only jax/flax/optax/orbax/numpy installed.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from typing import Optional

from prompt_jax import host_devices

# Too late once jax is imported (e.g. a test importing the scripts): then nothing changes.
host_devices.apply(None, os.environ, jax_started="jax" in sys.modules)

# A benchmark keeps about one core busy while it times one side; a 1-minute load average above
# this at its start (before it has run long enough to raise the average itself) means others ran.
QUIET_LOAD = 0.5
# Average cores used by other processes during the run above which it was not quiet (the kernel
# and an idle session's daemons stay well below it).
QUIET_OTHER_CORES = 0.15

# (wall seconds, busy CPU seconds of the whole machine, CPU seconds of this process) at `start`.
_start_snapshot: Optional[tuple[float, float, float]] = None


def load_average() -> float:
  """The 1-minute load average (nan where the OS does not report one)."""
  return os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")


def _machine_busy_seconds() -> Optional[float]:
  """CPU seconds all cores spent not idle since boot (user, nice, system, irq, softirq, steal);
  None where /proc/stat is unavailable."""
  try:
    with open("/proc/stat") as f:
      fields = f.readline().split()
  except OSError:
    return None
  if not fields or fields[0] != "cpu" or len(fields) < 9:
    return None
  user, nice, system, _, _, irq, softirq, steal = (int(x) for x in fields[1:9])
  # guest time is already counted in user and nice.
  return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def _own_cpu_seconds() -> float:
  t = os.times()
  return t.user + t.system + t.children_user + t.children_system


def _cpu_model() -> str:
  try:
    with open("/proc/cpuinfo") as f:
      return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
  except (OSError, StopIteration):
    return "unknown CPU"


def _commit() -> str:
  try:
    here = os.path.dirname(os.path.abspath(__file__))
    # Read-only: GIT_OPTIONAL_LOCKS=0 keeps `status` from refreshing (locking) the index.
    run = lambda *cmd: subprocess.run(
        ["git", "-C", here, *cmd], check=True, capture_output=True, text=True, timeout=10,
        env=dict(os.environ, GIT_OPTIONAL_LOCKS="0")).stdout.strip()
    commit = run("rev-parse", "--short", "HEAD")
    dirty = run("status", "--porcelain", "--untracked-files=no")
    return commit + (" + uncommitted changes" if dirty else "")
  except (OSError, subprocess.SubprocessError):
    return "unknown commit"


# CPU flags worth naming: the vector and matrix units XLA's CPU compiler can use (x86 SSE4, AVX,
# AVX-512, FMA, F16C, AMX, VNNI, BF16; Arm NEON/ASIMD, SVE, SME, I8MM, BF16).
_FEATURES = re.compile(r"^(sse4|avx|fma|f16c|amx|asimd|neon|sve|sme(\d|_|$)|i8mm|bf16)|vnni|bf16")


def cpu_features() -> str:
  """The vector/matrix instruction-set flags of the first CPU in /proc/cpuinfo (x86 `flags`, Arm
  `Features`), or 'unknown' where there is no such file."""
  from prompt_jax.models import activation_dtype  # pylint: disable=g-import-not-at-top
  flags = activation_dtype.cpu_flags()
  if not flags:
    return "unknown"
  return " ".join(f for f in flags if _FEATURES.search(f)) or "no vector extensions listed"


def describe_machine() -> str:
  """CPU, cores, jax version and backend, commit, date: the first line of every benchmark."""
  import jax  # pylint: disable=g-import-not-at-top
  devices = jax.devices()
  return (f"{_cpu_model()}, {os.cpu_count()} cores, jax {jax.__version__} on "
          f"{len(devices)} x {devices[0].device_kind} ({devices[0].platform}), "
          f"commit {_commit()}, {time.strftime('%Y-%m-%d %H:%M %Z')}")


def start() -> float:
  """Prints the machine and the load average at the start; returns that load."""
  global _start_snapshot
  load = load_average()
  print(describe_machine())
  print(f"CPU vector/matrix features: {cpu_features()}")
  print(f"load average at start: {load:.2f}", flush=True)
  busy = _machine_busy_seconds()
  _start_snapshot = None if busy is None else (time.monotonic(), busy, _own_cpu_seconds())
  return load


def other_cores() -> Optional[float]:
  """Average cores other processes kept busy since `start()` (None if not measurable)."""
  busy = _machine_busy_seconds()
  if _start_snapshot is None or busy is None:
    return None
  wall0, busy0, own0 = _start_snapshot
  wall = time.monotonic() - wall0
  if wall <= 0:
    return None
  others = (busy - busy0) - (_own_cpu_seconds() - own0)
  return max(others, 0.0) / wall


def finish(start_load: float) -> bool:
  """Prints the load average at the end and whether the figures were measured under load.

  Returns True when other processes used at most `QUIET_OTHER_CORES` cores on average since
  `start()`; where that is not measurable, when the load average was at most `QUIET_LOAD` at the
  start and at most what this benchmark alone can make it at the end (`cpu_count` busy threads).
  """
  load = load_average()
  others = other_cores()
  if others is not None:
    quiet = others <= QUIET_OTHER_CORES
    why = f"other processes used {others:.2f} cores on average during the run"
  else:
    quiet = start_load <= QUIET_LOAD and load <= (os.cpu_count() or 1) + QUIET_LOAD
    why = "CPU use of other processes not measurable; judged by the load averages"
  label = ("quiet machine" if quiet
           else "UNDER LOAD: other processes used the CPU; not a README figure")
  print(f"load average at end: {load:.2f} (start {start_load:.2f}); {why}: {label}", flush=True)
  return quiet
