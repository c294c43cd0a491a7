"""The run directory (MODEL_DIR): its layout, its record, its lock and atomic writes.

Layout (the names below are the only spelling of them in the package):
  run.json                     the run record: what defines the run (`run_record`), written
                               before the first step and compared on every resume
  config.gin                   the operative gin config of the command that trained it (CLI)
  checkpoints/<step>/          the trainable state (Orbax, `checkpoints.py`)
  prompts/prompt_<step>.npy    each saved prompt folded to a plain [length, embed] array
  train/, eval/                TensorBoard events; metrics.jsonl every logged metric as JSON
  summary.json                 the final metrics; eval_untrained.json the untrained prompt's
  curves.png                   the training curves (`curves.py`)

The record makes a wrong command harmless: a resume whose configuration differs from run.json
stops before any work with one line naming each difference (`RunMismatchError`), and nothing in
MODEL_DIR is moved or rewritten.

The lock is `MODEL_DIR/.lock`, held with the operating system's advisory lock while a run
writes: a second run on the same MODEL_DIR refuses to start, naming the owner.
"""

from __future__ import annotations

import dataclasses
import fcntl
import functools
import hashlib
import json
import logging
import os
import socket
import tempfile
import time
from typing import Any, Mapping, Optional, Sequence

import numpy as np

log = logging.getLogger(__name__)

LOCK_NAME = ".lock"
RECORD_FILE = "run.json"
CONFIG_FILE = "config.gin"
SUMMARY_FILE = "summary.json"
UNTRAINED_EVAL_FILE = "eval_untrained.json"
CURVES_FILE = "curves.png"
METRICS_FILE = "metrics.jsonl"
CHECKPOINTS_DIR = "checkpoints"
PROMPTS_DIR = "prompts"
SUBDIRS = (CHECKPOINTS_DIR, PROMPTS_DIR, "train", "eval")


def prompt_export_path(model_dir: str, step: int) -> str:
  """MODEL_DIR/prompts/prompt_<step>.npy: the prompt saved at `step`, folded to [length, embed]."""
  return os.path.join(model_dir, PROMPTS_DIR, f"prompt_{int(step)}.npy")


def check_model_dir(model_dir: Optional[str]) -> str:
  """The absolute MODEL_DIR after checking it can hold a run; writes nothing.

  Raises ValueError naming the path when it is unset, is a file, is not writable (or cannot be
  created), when one of its run subdirectories is a file, or when it lies inside another run's
  directory (an ancestor holds a run.json)."""
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
  parent = os.path.dirname(path)
  while parent != os.path.dirname(parent):
    if os.path.isfile(os.path.join(parent, RECORD_FILE)):
      raise ValueError(f"MODEL_DIR {model_dir!r} is inside the run directory {parent!r} (it "
                       f"has a {RECORD_FILE}); use a directory outside it")
    parent = os.path.dirname(parent)
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


def atomic_write(path: str, write) -> str:
  """Call `write(f)` on a temporary file beside `path`, fsync it and rename it to `path`: a kill
  at any moment leaves the old file or the new one. -> `path`."""
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
  return atomic_write(path, lambda f: f.write(data))


def _load_object(path: str) -> tuple[Optional[dict], Optional[str]]:
  """(the JSON object at `path`, None), or (None, why it is not one) for an unreadable file,
  invalid JSON or another JSON value."""
  try:
    with open(path) as f:
      value = json.load(f)
  except (OSError, ValueError) as e:
    return None, str(e).splitlines()[0] if str(e) else type(e).__name__
  if not isinstance(value, dict):
    return None, f"it holds a {type(value).__name__}, not an object"
  return value, None


def read_json(path: str) -> Optional[dict]:
  """The JSON object at `path`, or None when it is absent or unreadable (logged)."""
  if not os.path.exists(path):
    return None
  value, reason = _load_object(path)
  if reason is not None:
    log.warning("ignoring unreadable %s: %s", path, reason)
  return value


def write_npy(path: str, array: np.ndarray) -> str:
  """`array` as a `.npy` at `path`, atomically."""
  return atomic_write(path, lambda f: np.save(f, array))


def write_npz(path: str, arrays: dict[str, np.ndarray]) -> str:
  """Named arrays as one `.npz` at `path`, atomically."""
  return atomic_write(path, lambda f: np.savez(f, **arrays))


# ------------------------------------------------------------------------------- the record


class RunMismatchError(ValueError):
  """A command's configuration contradicts the record of the run in MODEL_DIR."""


def describe(value: Any) -> Any:
  """A JSON description of a configured object: a Linen module or dataclass as its type and
  fields (recursively; `parent` and `name` left out), a function or class by its qualified
  name, a `functools.partial` as its function and arguments."""
  if isinstance(value, (str, int, float, bool)) or value is None:
    return value
  if isinstance(value, functools.partial):
    return {"type": describe(value.func), **{f"arg{i}": describe(a) for i, a in enumerate(
        value.args)}, **{k: describe(v) for k, v in sorted(value.keywords.items())}}
  if dataclasses.is_dataclass(value) and not isinstance(value, type):
    fields = {f.name: getattr(value, f.name, None) for f in dataclasses.fields(value)
              if f.name not in ("parent", "name") and not f.name.startswith("_")}
    return {"type": type(value).__name__, **{k: describe(v) for k, v in fields.items()}}
  if isinstance(value, Mapping):
    return {str(k): describe(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [describe(v) for v in value]
  if callable(value) and hasattr(value, "__qualname__"):
    return f"{getattr(value, '__module__', '')}.{value.__qualname__}".lstrip(".")
  if hasattr(value, "dtype") and hasattr(value, "shape") and not getattr(value, "shape", ()):
    return describe(value.item())  # a numpy or jax scalar
  return type(value).__name__


def model_entries(model: Any) -> dict[str, Any]:
  """The record entries of an `EncoderDecoderModel`: `model` (its T5Config, but for
  `EXECUTION_FIELDS`), `execution` (those) and `prompt` (its prompt hook, `describe`d)."""
  config = json.loads(json.dumps(dataclasses.asdict(model.config), default=str))
  return {"model": {k: v for k, v in config.items() if k not in EXECUTION_FIELDS},
          "execution": {k: v for k, v in config.items() if k in EXECUTION_FIELDS},
          "prompt": describe(getattr(model.module, "prompt", None))}


def fingerprint(path: Optional[str]) -> Optional[str]:
  """A fingerprint of a frozen checkpoint that survives copying: a file's size and the SHA-256
  of its first and last MiB; a directory's file names and sizes. None for no path or a path
  that does not exist (its loader reports that)."""
  if not path or not os.path.exists(path):
    return None
  digest = hashlib.sha256()
  if os.path.isfile(path):
    size = os.path.getsize(path)
    with open(path, "rb") as f:
      digest.update(f.read(1 << 20))
      if size > 2 << 20:
        f.seek(-(1 << 20), os.SEEK_END)
        digest.update(f.read(1 << 20))
    return f"file of {size} bytes, sha256 {digest.hexdigest()[:16]}"
  count = total = 0
  for root, dirs, files in os.walk(path):
    dirs.sort()
    for name in sorted(files):
      size = os.path.getsize(os.path.join(root, name))
      digest.update(f"{os.path.relpath(os.path.join(root, name), path)}:{size}\n".encode())
      count, total = count + 1, total + size
  return f"directory of {count} files, {total} bytes, sha256 {digest.hexdigest()[:16]}"


def read_record(model_dir: str) -> Optional[dict]:
  """MODEL_DIR/run.json, or None for a directory without one (not a run, or written before
  records existed). A run.json that is not a JSON object is a ValueError: a damaged record
  must not pass for no record."""
  path = os.path.join(model_dir, RECORD_FILE)
  if not os.path.exists(path):
    return None
  value, reason = _load_object(path)
  if reason is not None:
    raise ValueError(f"MODEL_DIR {model_dir!r} has a damaged {RECORD_FILE} ({reason}); restore "
                     f"it, or remove it: every checkpoint keeps a copy of the record")
  return value


def _flat(tree: Any, prefix: str = "") -> dict[str, Any]:
  if isinstance(tree, Mapping) and tree:
    out = {}
    for key, value in tree.items():
      out.update(_flat(value, f"{prefix}.{key}" if prefix else str(key)))
    return out
  return {prefix: tree}


def record_differences(saved: Mapping[str, Any], current: Mapping[str, Any],
                       keys: Optional[Sequence[str]] = None) -> list[tuple[str, Any, Any]]:
  """(name, saved value, current value) of every leaf that differs, for the top-level `keys`
  (default: all). A value recorded on one side only counts as a difference."""
  keys = sorted(set(saved) | set(current)) if keys is None else keys
  differences = []
  for key in keys:
    a, b = _flat(saved.get(key), key), _flat(current.get(key), key)
    for name in sorted(set(a) | set(b)):
      if a.get(name) != b.get(name):
        differences.append((name, a.get(name), b.get(name)))
  return differences


def format_differences(differences: Sequence[tuple[str, Any, Any]], limit: int = 4) -> str:
  """'holds a run with a, b; this command configures a', b'' for the first `limit`
  differences, types and names (another method, another optimizer) first."""
  shown = sorted(differences, key=lambda d: not d[0].endswith(("type", ".name")))[:limit]
  more = f" (and {len(differences) - limit} more)" if len(differences) > limit else ""
  held = ", ".join(f"{name}={old!r}" for name, old, _ in shown)
  wanted = ", ".join(f"{name}={new!r}" for name, _, new in shown)
  return f"holds a run with {held}; this command configures {wanted}{more}"


# Model config fields that say how the model executes, not what it computes: recorded apart
# ("execution"), free to change between a run's resumes and its evaluation.
EXECUTION_FIELDS = ("dtype", "remat_policy", "scan_layers")

# Record entries that define a run: a resume must match them all.
DEFINING = ("model", "prompt", "frozen_checkpoint", "data", "optimizer", "trainable",
            "settings", "seed")


def check_record(model_dir: str, current: Mapping[str, Any], *, keys: Sequence[str] = DEFINING,
                 allow_flag: str = "--gin.trainer.train.allow_config_change=True",
                 saved: Optional[Mapping[str, Any]] = None) -> None:
  """Raise RunMismatchError naming each difference between MODEL_DIR's record (or `saved`, a
  checkpoint's copy of it) and `current` for `keys`; nothing when there is no record."""
  saved = read_record(model_dir) if saved is None else saved
  if saved is None:
    return
  differences = record_differences(saved, current, keys)
  if differences:
    raise RunMismatchError(
        f"MODEL_DIR {model_dir!r} {format_differences(differences)}; nothing was changed. Use "
        f"the settings it was trained with (its {CONFIG_FILE}), another MODEL_DIR, or "
        f"{allow_flag}")


def write_record(model_dir: str, record: Mapping[str, Any], step: int,
                 saved: Optional[Mapping[str, Any]]) -> None:
  """Write MODEL_DIR/run.json (atomically). The record the run had, `saved` (run.json as read
  under the lock, or a checkpoint's copy when run.json is missing; None for a new run), is never
  lost: where `record` differs (a resume allowed to change the config), run.json takes
  `record`'s values and its `changes` list each difference (from, to) with the step it took
  effect."""
  path = os.path.join(model_dir, RECORD_FILE)
  if saved is None:
    write_json(path, dict(record))
    return
  differences = record_differences(saved, record, DEFINING)
  if differences:
    changes = list(saved.get("changes", []))
    changes.append({"step": int(step), "changed": [
        {"name": n, "from": a, "to": b} for n, a, b in differences]})
    write_json(path, dict(record, changes=changes))  # the values now in force; history kept
  elif not os.path.exists(path):
    write_json(path, dict(saved))


def write_config(model_dir: str, config_text: str, step: int) -> None:
  """Write MODEL_DIR/config.gin; a different existing one (a resume allowed to change it) is
  kept as config_until_step<step>.gin."""
  path = os.path.join(model_dir, CONFIG_FILE)
  if os.path.exists(path):
    with open(path) as f:
      if f.read() == config_text:
        return
    kept = os.path.join(model_dir, f"config_until_step{int(step)}.gin")
    suffix = 1
    while os.path.exists(kept):
      kept = os.path.join(model_dir, f"config_until_step{int(step)}.{suffix}.gin")
      suffix += 1
    os.replace(path, kept)
  atomic_write(path, lambda f: f.write(config_text.encode()))
