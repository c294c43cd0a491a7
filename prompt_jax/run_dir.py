"""The run directory (MODEL_DIR): checked before any work, locked while a run writes to it, and
written atomically so a kill at any moment leaves either the old file or the new one.

The lock is `MODEL_DIR/.lock`, a JSON file with the owner's pid, host and start time, created
with O_EXCL. A second run on the same MODEL_DIR refuses to start, naming the owner; a lock left
by a process that no longer exists (on this host) is taken over with a warning.
"""

from __future__ import annotations

import fcntl
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


class RunLock:
  """Exclusive ownership of a MODEL_DIR for one process (use as a context manager).

  The operating system's advisory lock (`fcntl.flock`) on MODEL_DIR/.lock: the kernel grants it
  to one process at a time and drops it when the process dies, so there is no stale lock to
  take over and no window in which two processes both hold it. The file records the holder
  (pid, host, start time) for the refusal message. Creates MODEL_DIR if needed; on release
  removes the lock file and, when the run wrote nothing, the directory it created, so a run
  refused early leaves no trace."""

  def __init__(self, model_dir: str):
    self.model_dir = os.path.abspath(model_dir)
    self.path = os.path.join(self.model_dir, LOCK_NAME)
    self._created_dir = False
    self._fd: Optional[int] = None

  def acquire(self) -> RunLock:
    if not os.path.isdir(self.model_dir):
      os.makedirs(self.model_dir, exist_ok=True)
      self._created_dir = True
    while True:
      fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
      try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
      except BlockingIOError:
        holder = self._holder(fd)
        os.close(fd)
        self._refuse(holder)
      # A holder that released between our open and our flock unlinked the file first: our lock
      # is then on a file nobody else will open, so try again on the path's current file.
      try:
        same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
      except FileNotFoundError:
        same = False
      if same:
        break
      os.close(fd)
    record = json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                         "started": time.time()}).encode()
    os.ftruncate(fd, 0)
    os.pwrite(fd, record, 0)
    os.fsync(fd)
    self._fd = fd
    return self

  @staticmethod
  def _holder(fd: int) -> Optional[dict]:
    try:
      owner = json.loads(os.pread(fd, 4096, 0).decode())
      return {"pid": int(owner["pid"]), "host": str(owner["host"])}
    except (OSError, ValueError, KeyError, TypeError):
      return None  # the holder is writing its record this instant

  def _refuse(self, holder: Optional[dict]) -> None:
    who = (f"process {holder['pid']} on host {holder['host']!r}" if holder else
           "another process")
    raise ValueError(f"MODEL_DIR {self.model_dir!r} is in use by {who} (lock {self.path}); "
                     "wait for that run to end or use another MODEL_DIR")

  def release(self) -> None:
    if self._fd is not None:
      try:
        os.remove(self.path)  # before unlocking: a waiter then sees a replaced file and retries
      except FileNotFoundError:
        pass
      os.close(self._fd)
      self._fd = None
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
