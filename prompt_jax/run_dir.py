"""The run directory (MODEL_DIR): checked before any work, locked while a run writes to it, and
written atomically so a kill at any moment leaves either the old file or the new one.

The lock is `MODEL_DIR/.lock`, a JSON file with the owner's pid, host and start time, created
with O_EXCL. A second run on the same MODEL_DIR refuses to start, naming the owner; a lock left
by a process that no longer exists (on this host) is taken over with a warning.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import tempfile
import time
from typing import Any, Optional

import numpy as np

log = logging.getLogger(__name__)

LOCK_NAME = ".lock"
SUBDIRS = ("checkpoints", "prompts", "train", "eval")


def check_model_dir(model_dir: Optional[str]) -> str:
  """The absolute MODEL_DIR after checking it can hold a run; writes nothing.

  Raises ValueError naming the path when it is unset, is a file, is not writable (or cannot be
  created), or when one of its run subdirectories is a file."""
  if not model_dir or not isinstance(model_dir, str):
    raise ValueError(f"MODEL_DIR is not set (got {model_dir!r}); pass "
                     "--gin.MODEL_DIR=\"'/path/to/run'\"")
  path = os.path.abspath(os.path.expanduser(model_dir))
  if os.path.exists(path) and not os.path.isdir(path):
    raise ValueError(f"MODEL_DIR {model_dir!r} is a file, not a directory")
  existing = path
  while not os.path.exists(existing):
    parent = os.path.dirname(existing)
    if parent == existing:
      break
    existing = parent
  if not os.path.isdir(existing):
    raise ValueError(f"MODEL_DIR {model_dir!r} cannot be created: {existing!r} is a file")
  if not os.access(existing, os.W_OK | os.X_OK):
    raise ValueError(f"MODEL_DIR {model_dir!r} is not writable ({existing!r} denies write "
                     "access)")
  for name in SUBDIRS:
    sub = os.path.join(path, name)
    if os.path.exists(sub) and not os.path.isdir(sub):
      raise ValueError(f"MODEL_DIR {model_dir!r} holds a file {name!r} where the run keeps its "
                       f"{name} directory; move it or use another MODEL_DIR")
  return path


def _process_alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:  # exists, owned by someone else
    return True
  return True


class RunLock:
  """Exclusive ownership of a MODEL_DIR for one process (use as a context manager).

  Creates MODEL_DIR if needed; on release removes the lock and, when the run wrote nothing,
  the directory it created, so a run refused early leaves no trace."""

  def __init__(self, model_dir: str):
    self.model_dir = os.path.abspath(model_dir)
    self.path = os.path.join(self.model_dir, LOCK_NAME)
    self._created_dir = False
    self._held = False

  def acquire(self) -> RunLock:
    if not os.path.isdir(self.model_dir):
      os.makedirs(self.model_dir, exist_ok=True)
      self._created_dir = True
    record = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time()}
    for _ in range(2):
      try:
        fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
      except FileExistsError:
        self._take_over_if_stale()
        continue
      with os.fdopen(fd, "w") as f:
        json.dump(record, f)
      self._held = True
      return self
    raise ValueError(f"MODEL_DIR {self.model_dir!r} is locked by another run ({self.path}); "
                     "remove the lock file if no run is using it")

  def _take_over_if_stale(self) -> None:
    """Remove the lock of a dead process on this host; raise naming a live owner."""
    try:
      with open(self.path) as f:
        owner = json.load(f)
      pid, host = int(owner["pid"]), str(owner["host"])
    except (OSError, ValueError, KeyError, TypeError):
      owner, pid, host = None, None, None
    if owner is None:
      # Unreadable: a lock being written this instant, or garbage. Only garbage older than a
      # few seconds is taken over.
      try:
        age = time.time() - os.path.getmtime(self.path)
      except FileNotFoundError:
        return
      if age < 5:
        raise ValueError(f"MODEL_DIR {self.model_dir!r} is being locked by another run "
                         f"({self.path})")
      log.warning("taking over the unreadable lock %s", self.path)
    elif host != socket.gethostname():
      raise ValueError(f"MODEL_DIR {self.model_dir!r} is in use by process {pid} on host "
                       f"{host!r} (lock {self.path}); wait for that run to end, or remove the "
                       "lock file if it is dead")
    elif _process_alive(pid) and pid != os.getpid():
      raise ValueError(f"MODEL_DIR {self.model_dir!r} is in use by process {pid} on host "
                       f"{host!r} (lock {self.path}); wait for that run to end or use another "
                       "MODEL_DIR")
    else:
      log.warning("taking over the stale lock %s of process %s on %s, which no longer runs",
                  self.path, pid, host)
    try:
      os.remove(self.path)
    except FileNotFoundError:
      pass

  def release(self) -> None:
    if self._held:
      try:
        os.remove(self.path)
      except FileNotFoundError:
        pass
      self._held = False
    if self._created_dir:
      try:
        os.rmdir(self.model_dir)  # only if the run left it empty
      except OSError:
        pass

  def __enter__(self) -> RunLock:
    return self.acquire()

  def __exit__(self, *exc) -> None:
    self.release()


# ------------------------------------------------------------------------------- atomic writes


def _atomic_replace(path: str, write) -> str:
  directory = os.path.dirname(os.path.abspath(path))
  os.makedirs(directory, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
  try:
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp's 0600 would hide the file from other users
    with os.fdopen(fd, "wb") as f:
      write(f)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise
  return path


def write_json(path: str, value: Any) -> str:
  """`value` as indented JSON at `path`, atomically (a kill leaves the old file or the new)."""
  data = json.dumps(value, indent=2, default=float).encode()
  return _atomic_replace(path, lambda f: f.write(data))


def read_json(path: str) -> Optional[dict]:
  """The JSON object at `path`, or None when it is absent or unreadable (logged)."""
  if not os.path.exists(path):
    return None
  try:
    with open(path) as f:
      value = json.load(f)
  except (OSError, ValueError) as e:
    log.warning("ignoring unreadable %s: %s", path, e)
    return None
  return value if isinstance(value, dict) else None


def write_npy(path: str, array: np.ndarray) -> str:
  """`array` as a `.npy` at `path`, atomically."""
  return _atomic_replace(path, lambda f: np.save(f, array))


def write_npz(path: str, arrays: dict[str, np.ndarray]) -> str:
  """Named arrays as one `.npz` at `path`, atomically."""
  return _atomic_replace(path, lambda f: np.savez(f, **arrays))
