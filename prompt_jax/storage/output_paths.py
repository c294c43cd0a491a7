"""Checks on a file the command line is asked to write, made before any work is done.

`check_output_path(path, what)` raises a one-line ValueError naming `path` (and the flag `what`
it came from) when the file cannot be written where asked: the path is empty, is a directory,
or one of its parent "directories" is a file (`check_parent`, which output directories use too);
with `exists_hint` an existing file is refused as well (the hint says what to do instead, e.g.
"pass --overwrite to replace it"). `same_file` compares two paths as the file system sees them
(symlinks and relative paths resolved)."""

from __future__ import annotations

import os
from typing import Optional


def same_file(a: str, b: str) -> bool:
  """Whether paths `a` and `b` name the same file (an existing file by inode, else by
  resolved path)."""
  try:
    if os.path.exists(a) and os.path.exists(b):
      return os.path.samefile(a, b)
  except OSError:
    pass
  return os.path.realpath(a) == os.path.realpath(b)


def check_parent(path: str, what: str) -> None:
  """ValueError naming `what` and `path` if the nearest existing ancestor of `path` is not a
  directory (so neither a file nor a directory can be created at `path`)."""
  parent = os.path.dirname(os.path.abspath(path))
  while not os.path.exists(parent) and os.path.dirname(parent) != parent:
    parent = os.path.dirname(parent)
  if os.path.exists(parent) and not os.path.isdir(parent):
    raise ValueError(f"{what} {path!r} cannot be written: {parent!r} is a file, not a "
                     "directory")


def check_output_path(path, what: str, *, exists_hint: Optional[str] = None) -> str:
  """`path` if a file can be written there, else ValueError naming `what` and `path`.

  Refused: a non-string or empty path, a directory, a path whose nearest existing ancestor is
  not a directory (e.g. `a.txt/out.jsonl`), and, when `exists_hint` is given, an existing
  file."""
  if not isinstance(path, str) or not path:
    raise ValueError(f"{what} must be a file path, got {path!r}")
  if os.path.isdir(path):
    raise ValueError(f"{what} {path!r} is a directory; give a file path")
  check_parent(path, what)
  if exists_hint is not None and os.path.lexists(path):
    raise ValueError(f"{what} {path!r} already exists; {exists_hint}")
  return path


EXISTING_NPY_HINT = "choose another --output or delete the file"


def npy_path(path: str) -> str:
  """The file `np.save(path, ...)` writes: `path` with '.npy' added unless it ends so."""
  return path if path.endswith(".npy") else path + ".npy"
