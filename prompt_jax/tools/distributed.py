"""Multi-host start-up: `jax.distributed.initialize` before anything touches the devices.

`prompt-jax` calls `maybe_initialize()` first thing. It does nothing on one host. On several:

  PROMPT_JAX_MULTIHOST=1      auto-detect the cluster (Cloud TPU VMs/pods, SLURM, Open MPI, GKE)
  PROMPT_JAX_COORDINATOR=host:port PROMPT_JAX_NUM_PROCESSES=N PROMPT_JAX_PROCESS_ID=i
                              explicit (e.g. several GPU nodes without a scheduler)

After it, `jax.devices()` lists every host's devices, the mesh spans them all, each host reads
only its shard of the data (`seqio.ShardInfo(jax.process_index(), jax.process_count())` in
`trainer.train`) and Orbax writes checkpoints collectively.
"""

from __future__ import annotations

import os
from typing import Mapping, Optional

TRUE = ("1", "true", "yes", "auto")


def _int(env: Mapping[str, str], name: str) -> int:
  value = env.get(name, "")
  try:
    return int(value)
  except ValueError:
    raise ValueError(f"{name} must be an integer, got {value!r}") from None


def maybe_initialize(env: Optional[Mapping[str, str]] = None) -> bool:
  """Initialise JAX's multi-process runtime when the environment asks for it; True if it did."""
  env = os.environ if env is None else env
  coordinator = env.get("PROMPT_JAX_COORDINATOR", "")
  if coordinator:
    import jax  # pylint: disable=g-import-not-at-top
    num_processes = _int(env, "PROMPT_JAX_NUM_PROCESSES")
    process_id = _int(env, "PROMPT_JAX_PROCESS_ID")
    if not 0 <= process_id < num_processes:
      raise ValueError(f"PROMPT_JAX_PROCESS_ID must be in [0, {num_processes}), "
                       f"got {process_id}")
    jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes,
                               process_id=process_id)
    return True
  mode = env.get("PROMPT_JAX_MULTIHOST", "").lower()
  if mode in TRUE:
    import jax  # pylint: disable=g-import-not-at-top
    jax.distributed.initialize()
    return True
  if mode not in ("", "0", "false", "no"):
    raise ValueError(f"PROMPT_JAX_MULTIHOST must be 1/auto or 0, got {mode!r}")
  return False
