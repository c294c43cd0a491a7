"""Prompt files: reading a prompt from every source the commands accept, and writing one.

A prompt is a float32 array [length, embed]; a prompt bank (a multi-task run's export, an
ensemble) is [num_prompts, length, embed]. A *prompt source* is one of:

  FILE.npy             a .npy file holding [length, embed] (or a bank, where a bank is taken)
  FILE.npy#ROW         row ROW of a bank file [N, length, embed], 0 <= ROW < N
  ADAPTER_DIR          a PEFT prompt-tuning adapter directory (adapter_config.json + safetensors;
                       read by `interop.peft.load_prompt`, written by `interop.peft.save_prompt`)
  MODEL_DIR            a run directory: its latest export MODEL_DIR/prompts/prompt_<step>.npy
  MODEL_DIR@STEP       a run directory's export at step STEP (refused, naming the exported
                       steps, when STEP was not exported)
  MODEL_DIR[@STEP]#ROW row ROW of a run directory's bank export (a multi-task run)

A source that exists as written is always a path, so file names holding '#' or '@' still work.
Every bad source is a one-line ValueError or FileNotFoundError naming it: missing, not a
prompt, wrong rank, non-finite values, row out of range, step not exported.

Layout names come from `run_dir`; writes are atomic (`run_dir.write_npy`). The PEFT format is
`interop.peft`'s (which reads it with `interop.hf`'s JSON and safetensors readers, so importing
this module imports jax and flax through `models.t5`).
"""

from __future__ import annotations

import dataclasses
import os
import re
from typing import Optional, Sequence

import jax.numpy as jnp
import numpy as np

from prompt_jax.interop import peft
from prompt_jax.prompts.initializers import PromptInit
from prompt_jax.storage import output_paths, run_dir

_EXPORT_NAME = re.compile(r"prompt_(\d+)\.npy")
_MAX_DIGITS = 18  # an int64 step or row


class UnknownSourceError(ValueError):
  """An existing directory that is neither a PEFT adapter directory nor a run directory."""


# ------------------------------------------------------------------------------- array checks


def _shape_label(ndim: int) -> str:
  return {2: "prompt length, model emb_dim",
          3: "number of prompts, prompt length, model emb_dim"}.get(ndim, "")


def check_prompt_array(array, source: str, expected_shape: Optional[Sequence[int]] = None, *,
                       allow_bank: bool = False) -> np.ndarray:
  """A prompt array read from `source` (a file name, for messages), checked -> float32.

  Raises ValueError naming `source` for: anything but a NumPy array, a non-floating dtype
  (integers, bool, complex, objects), a rank other than 2 ([length, embed]; 3 for a bank's
  [num_prompts, length, embed] when `allow_bank`), an empty dimension, a shape other than
  `expected_shape`, and NaN or infinite values (how many, and where the first is)."""
  if not isinstance(array, np.ndarray):
    raise ValueError(f"prompt file {source!r} holds a {type(array).__name__}, not a .npy array")
  if array.dtype.fields is not None or not np.issubdtype(array.dtype, np.floating):
    raise ValueError(f"prompt file {source!r} has dtype {array.dtype}; a prompt must be floating "
                     "point (e.g. float32)")
  shape = tuple(int(n) for n in array.shape)
  if expected_shape is not None:
    expected = tuple(int(n) for n in expected_shape)
    if shape != expected:
      label = _shape_label(len(expected))
      raise ValueError(f"prompt file {source!r} has shape {shape}, expected {expected}"
                       + (f" ({label})" if label else ""))
  else:
    ranks = (2, 3) if allow_bank else (2,)
    if array.ndim not in ranks:
      what = "[length, embed] or a bank's [num_prompts, length, embed]" if allow_bank else (
          "[length, embed]")
      raise ValueError(f"prompt file {source!r} must hold {what}, got shape {shape}")
  if 0 in shape:
    raise ValueError(f"prompt file {source!r} has shape {shape}: a prompt needs at least one "
                     "token and one embedding column")
  finite = np.isfinite(array)
  if not finite.all():
    bad = int(array.size - np.count_nonzero(finite))
    first = tuple(int(i) for i in np.argwhere(~finite)[0])
    raise ValueError(f"prompt file {source!r} has {bad} non-finite value"
                     f"{'s' if bad != 1 else ''} (NaN or inf); the first is "
                     f"{array[first]} at index {list(first)}")
  return array.astype(np.float32)


def read_npy(path: str) -> np.ndarray:
  """`np.load(path)` of a `.npy` file (no pickles, no `.npz`) with one-line errors naming `path`;
  the array itself is not checked (see `check_prompt_array`)."""
  try:
    with open(path, "rb") as f:
      magic = f.read(6)
  except FileNotFoundError as e:
    raise FileNotFoundError(f"prompt file {path!r} does not exist") from e
  except IsADirectoryError as e:
    raise ValueError(f"prompt file {path!r} is a directory, not a .npy file") from e
  if magic.startswith(b"PK\x03\x04"):
    raise ValueError(f"prompt file {path!r} is a .npz archive, not a .npy array")
  if magic != b"\x93NUMPY":
    raise ValueError(f"prompt file {path!r} is not a .npy file (it lacks the .npy header; "
                     f"first bytes {magic!r})")
  try:
    return np.load(path, allow_pickle=False)
  except (ValueError, EOFError, OSError) as e:
    reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
    raise ValueError(f"prompt file {path!r} is not a readable .npy array ({reason})") from e


# ------------------------------------------------------------------------------- sources


@dataclasses.dataclass(frozen=True)
class _Source:
  kind: str                # 'npy' (a file), 'peft' (an adapter directory), 'run' (a run export)
  path: str                # the file to read (for 'peft': the adapter directory)
  row: str = ""            # the '#ROW' text, unparsed
  step: Optional[int] = None  # the run export's step ('run' only)


def _short(text: str) -> str:
  return text if len(text) <= 30 else f"{text[:20]}... ({len(text)} characters)"


def exported_steps(model_dir: str) -> dict[int, str]:
  """{step: MODEL_DIR/prompts/prompt_<step>.npy} of every prompt the run exported."""
  directory = os.path.join(model_dir, run_dir.PROMPTS_DIR)
  try:
    names = os.listdir(directory)
  except OSError:
    return {}
  steps = {}
  for name in names:
    match = _EXPORT_NAME.fullmatch(name)
    if match and len(match.group(1)) <= _MAX_DIGITS:
      steps[int(match.group(1))] = run_dir.prompt_export_path(model_dir, int(match.group(1)))
  return steps


def _split(source: str) -> tuple[str, str, str]:
  """`PATH[@STEP][#ROW]` -> (PATH, STEP, ROW) ('' for a part not given); a source that exists
  as written is a path."""
  if os.path.lexists(source):
    return source, "", ""
  path, row = source, ""
  if "#" in source:
    path, _, row = source.rpartition("#")
  step = ""
  if not os.path.lexists(path):
    head, sep, tail = path.rpartition("@")
    if sep and head and "/" not in tail:
      path, step = head, tail
  return path, step, row


def _resolve(source: str) -> _Source:
  """The file (or adapter directory) `source` names; one-line errors naming `source`."""
  if not isinstance(source, str) or not source:
    raise ValueError(f"a prompt source must be a path, got {source!r}")
  path, step_text, row = _split(source)
  if not os.path.exists(path):
    raise FileNotFoundError(f"prompt source {source!r} does not exist")
  if not os.path.isdir(path):
    if step_text:
      raise ValueError(f"prompt source {source!r}: '@<step>' selects an export of a run "
                       f"directory, and {path!r} is a file")
    return _Source("npy", path, row)
  if peft.is_adapter_dir(path):
    if step_text or row:
      raise ValueError(f"prompt source {source!r}: '@<step>' and '#<row>' do not apply to a PEFT "
                       "adapter directory")
    return _Source("peft", path)
  steps = exported_steps(path)
  is_run = steps or any(os.path.exists(os.path.join(path, name)) for name in (
      run_dir.PROMPTS_DIR, run_dir.RECORD_FILE, run_dir.CHECKPOINTS_DIR))
  if not is_run:
    raise UnknownSourceError(
        f"cannot tell the prompt format of {source!r}: it is a directory, but neither a PEFT "
        f"adapter directory ({peft.CONFIG_FILE}) nor a run directory with "
        f"{run_dir.PROMPTS_DIR}/prompt_<step>.npy")
  if not steps:
    raise FileNotFoundError(f"prompt source {source!r}: the run directory has no "
                            f"{run_dir.PROMPTS_DIR}/prompt_<step>.npy export yet")
  if not step_text:
    step = max(steps)
  elif step_text.isascii() and step_text.isdigit() and len(step_text) <= _MAX_DIGITS:
    step = int(step_text)
    if step not in steps:
      raise ValueError(f"prompt source {source!r}: step {step} was not exported; the run "
                       f"directory has prompts for steps {sorted(steps)}")
  else:
    raise ValueError(f"prompt source {source!r}: '@<step>' needs a step number, got "
                     f"{_short(step_text)!r}")
  return _Source("run", steps[step], row, step)


def read_prompt(source: str, *, allow_bank: bool = False) -> np.ndarray:
  """The float32 prompt [length, embed] of `source` (any form in the module docstring); with
  `allow_bank`, a bank [num_prompts, length, embed] too (a file or run export without '#ROW').

  Checked by `check_prompt_array` (floating point, rank, non-empty, finite); every error is one
  line naming `source`."""
  resolved = _resolve(source)
  if resolved.kind == "peft":
    return peft.load_prompt(resolved.path)
  array = read_npy(resolved.path)
  row = resolved.row
  if row:
    label = source[:len(source) - len(row)] + _short(row)
    valid = row.isascii() and row.isdigit() and len(row) <= _MAX_DIGITS
    if array.ndim != 3 or not valid or int(row) >= array.shape[0]:
      raise ValueError(f"prompt source {label!r}: '#<row>' needs a [N, length, embed] bank "
                       f"export and 0 <= row < N; got shape {array.shape} and row "
                       f"{_short(row)!r}")
    return check_prompt_array(array[int(row)], label)
  if array.ndim == 3 and not allow_bank:
    raise ValueError(f"prompt source {source!r} must hold [length, embed], got shape "
                     f"{array.shape} (a bank export needs '#<row>')")
  return check_prompt_array(array, source, allow_bank=allow_bank)


def source_format(source: str) -> str:
  """'npy' (a file, also `FILE.npy#ROW`), 'peft' or 'run' (a run directory's export); raises as
  `read_prompt` does for a source that names nothing readable."""
  return _resolve(source).kind


def run_record_of(source: str) -> Optional[dict]:
  """The record (run.json) of the run that exported `source`: a run directory, or a file in a
  run's prompts/ folder; None for other sources and runs without a record."""
  resolved = _resolve(source)
  if resolved.kind == "peft":
    return None
  prompts_dir = os.path.dirname(os.path.abspath(resolved.path))
  if os.path.basename(prompts_dir) != run_dir.PROMPTS_DIR:
    return None
  return run_dir.read_record(os.path.dirname(prompts_dir))


def source_files(source: str) -> list[str]:
  """The files `read_prompt(source)` reads ([] when it would fail to find them): the .npy of
  `FILE.npy[#ROW]`, a PEFT adapter directory's files, a run directory's selected export."""
  try:
    resolved = _resolve(source)
  except (ValueError, OSError):
    return []
  if resolved.kind == "peft":
    return [os.path.join(resolved.path, name) for name in sorted(os.listdir(resolved.path))
            if os.path.isfile(os.path.join(resolved.path, name))]
  return [resolved.path]


def step_of(source: str) -> Optional[int]:
  """The training step `source` names: STEP of `MODEL_DIR@STEP`, a run directory's latest
  export, or the <step> of a file named prompt_<step>.npy (a run's or `export-prompt`'s
  export); None otherwise (or when the source names nothing readable)."""
  try:
    resolved = _resolve(source)
  except (ValueError, OSError):
    return None
  if resolved.step is not None:
    return resolved.step
  match = _EXPORT_NAME.fullmatch(os.path.basename(resolved.path))
  return int(match.group(1)) if match and resolved.kind == "npy" else None


# ------------------------------------------------------------------------------- writing


def write_npy(prompt, path: str, *, overwrite: bool = False, what: str = "--output") -> str:
  """`prompt` ([length, embed], or a bank [num_prompts, length, embed]) as float32 .npy at
  `path` ('.npy' added if missing, as np.save does), written atomically. An existing file is
  refused unless `overwrite`, as is a path under a file (ValueError naming `what` and the
  path). -> the path written."""
  path = output_paths.check_output_path(
      output_paths.npy_path(path), what,
      exists_hint=None if overwrite else output_paths.EXISTING_NPY_HINT)
  array = np.asarray(prompt, np.float32)
  if array.ndim not in (2, 3):
    raise ValueError(f"{what} {path!r}: a prompt is [length, embed] (a bank [num_prompts, "
                     f"length, embed]), got shape {array.shape}")
  return run_dir.write_npy(path, array)


def from_array(path: str, bank_mean: bool = False) -> PromptInit:
  """A prompt initialiser (`initializers.PromptInit`) starting from the prompt saved at `path`,
  e.g. a released prompt: any prompt source of this module (`FILE.npy`, `FILE.npy#ROW`, a PEFT
  adapter directory, a run directory `MODEL_DIR[@STEP]`); its shape must match exactly.

  `bank_mean=True` reads a bank `[num_prompts, length, embed]` (e.g. a multi-task run's
  prompts/prompt_<step>.npy) and starts from the mean of its prompts (SPoT's transfer from
  several source tasks)."""
  array = read_prompt(path, allow_bank=bank_mean)
  if bank_mean:
    if array.ndim != 3:
      raise ValueError(f"{path}: bank_mean needs a bank [num_prompts, length, embed], got shape "
                       f"{array.shape}")
    array = array.mean(axis=0)

  def init(rng, shape, embedding_table=None):
    del rng, embedding_table
    return jnp.asarray(check_prompt_array(array, path, shape))

  return init
