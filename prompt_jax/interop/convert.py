"""`prompt-jax convert`: frozen weights into our Orbax format, and prompts between formats.

  prompt-jax convert hf-to-orbax HF_DIR OUT_DIR
  prompt-jax convert t5x-to-orbax T5X_CHECKPOINT OUT_DIR --config t5_1_1_base [--set emb_dim=4 ...]
  prompt-jax convert prompt SRC DST [--to npy|peft|t5x] [--base_model_name_or_path NAME] [--step N]

Prompt formats: `npy` (a [length, embed] .npy file; as a source also `FILE.npy#ROW`, row ROW
of a prompt bank's [N, length, embed] export, as `prompt-jax infer-multitask` takes), `peft`
(a PEFT PROMPT_TUNING adapter directory), `t5x` (a T5X checkpoint whose
`target/encoder/prompt/prompt/prompt` is the prompt; written in T5X's legacy format as
DST/checkpoint_<step>). The source format is detected; the destination is `npy` when DST ends
in `.npy`, otherwise `--to` names it.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Optional, Sequence

import numpy as np

PROMPT_FORMATS = ("npy", "peft", "t5x")


def _parse_value(text: str):
  for cast in (int, float):
    try:
      return cast(text)
    except ValueError:
      pass
  if text.lower() in ("true", "false"):
    return text.lower() == "true"
  if "," in text:
    return tuple(t for t in text.split(",") if t)
  return text


def config_from_flags(preset: str, settings: Sequence[str]):
  """A T5Config from a preset name and `field=value` overrides."""
  from prompt_jax.models import t5  # pylint: disable=g-import-not-at-top
  fields = {f.name for f in dataclasses.fields(t5.T5Config)}
  overrides = {}
  for setting in settings:
    if "=" not in setting:
      raise ValueError(f"--set takes FIELD=VALUE, got {setting!r}")
    name, value = setting.split("=", 1)
    if name not in fields:
      raise ValueError(f"--set: T5Config has no field {name!r}; expected one of {sorted(fields)}")
    overrides[name] = _parse_value(value)
    if name == "mlp_activations" and isinstance(overrides[name], str):
      overrides[name] = (overrides[name],)
  return t5.preset(preset, **overrides)


def _describe(config) -> str:
  from prompt_jax.interop import hf  # pylint: disable=g-import-not-at-top
  preset = hf.matching_preset(config)
  return f"{config}" + (f"\n(the architecture of preset {preset!r})" if preset else "")


def _count(params) -> int:
  import jax  # pylint: disable=g-import-not-at-top
  return int(sum(np.size(x) for x in jax.tree_util.tree_leaves(params)))


def _refuse_existing_orbax(out: str) -> None:
  from prompt_jax import output_paths  # pylint: disable=g-import-not-at-top
  output_paths.check_parent(out, "output")
  if os.path.lexists(out):
    raise FileExistsError(f"output {out!r} already exists; choose a new directory")


def _save_orbax(params, out: str) -> None:
  from prompt_jax import checkpoints  # pylint: disable=g-import-not-at-top
  _refuse_existing_orbax(out)
  checkpoints.save_params_orbax(params, out)


def hf_to_orbax(args) -> int:
  from prompt_jax.interop import hf  # pylint: disable=g-import-not-at-top
  _refuse_existing_orbax(args.out)  # before reading a possibly large model
  config, params = hf.load_t5(args.src)
  _save_orbax(params, args.out)
  print(f"wrote {_count(params):,} parameters to {os.path.abspath(args.out)}\n"
        f"model config: {_describe(config)}")
  return 0


def t5x_to_orbax(args) -> int:
  from prompt_jax.interop import t5x  # pylint: disable=g-import-not-at-top
  config = config_from_flags(args.config, args.set)
  _refuse_existing_orbax(args.out)
  params = t5x.load_params(args.src, config)
  _save_orbax(params, args.out)
  print(f"wrote {_count(params):,} parameters (step {t5x.checkpoint_step(args.src)}) to "
        f"{os.path.abspath(args.out)}")
  return 0


def _bank_row_source(path: str) -> bool:
  """Whether `path` is `FILE.npy#ROW` (a row of a prompt bank) rather than a file of that name
  (parsed as `prompt-jax infer-multitask` parses its prompt sources)."""
  from prompt_jax.prompts import initializers  # pylint: disable=g-import-not-at-top
  file, row = initializers.split_prompt_source(path)
  return bool(row) and file.endswith(".npy")


def prompt_format(path: str) -> str:
  """The format of an existing prompt file or directory (`FILE.npy#ROW`: npy)."""
  from prompt_jax.interop import peft, t5x  # pylint: disable=g-import-not-at-top
  if path.endswith(".npy") and os.path.isfile(path) or _bank_row_source(path):
    return "npy"
  if peft.is_adapter_dir(path):
    return "peft"
  if t5x.is_t5x_checkpoint(path):
    return "t5x"
  raise ValueError(f"cannot tell the prompt format of {path!r}: expected a .npy file, a PEFT "
                   "adapter directory (adapter_config.json) or a T5X checkpoint")


def read_prompt(path: str) -> np.ndarray:
  """A [length, embed] float32 prompt from any supported format (or `FILE.npy#ROW`), checked by
  `initializers.check_prompt_array` (floating point, finite, two-dimensional)."""
  from prompt_jax.interop import peft, t5x  # pylint: disable=g-import-not-at-top
  from prompt_jax.prompts import initializers  # pylint: disable=g-import-not-at-top
  if _bank_row_source(path):  # the row parser of multi-task serving's prompt sources
    return initializers.load_prompt_source(path)
  if not os.path.exists(path):
    raise FileNotFoundError(f"prompt source {path!r} does not exist")
  fmt = prompt_format(path)
  if fmt == "npy":
    return initializers.load_prompt_array(path)
  if fmt == "peft":
    return peft.load_prompt(path)
  return initializers.check_prompt_array(t5x.load_prompt(path), path)


def output_path(path: str, fmt: str) -> str:
  """The path `write_prompt` writes for `path` in `fmt` (np.save adds a missing '.npy')."""
  return path if fmt != "npy" or path.endswith(".npy") else path + ".npy"


def refuse_existing(path: str) -> None:
  """Raise ValueError if `path` exists (an empty directory is fine): outputs are never
  overwritten; or if it lies under a file."""
  from prompt_jax import output_paths  # pylint: disable=g-import-not-at-top
  output_paths.check_parent(path, "output")
  if os.path.isdir(path) and not os.listdir(path):
    return
  if os.path.lexists(path):
    kind = "directory" if os.path.isdir(path) else "file"
    raise ValueError(f"output {path!r} already exists ({kind}); choose a new path, convert never "
                     "overwrites")


def write_prompt(prompt: np.ndarray, path: str, fmt: str, *,
                 base_model_name_or_path: Optional[str] = None, step: int = 0) -> str:
  """Write `prompt` in `fmt` to a new `path` (an existing one is refused); returns the path
  written."""
  from prompt_jax.interop import peft, t5x  # pylint: disable=g-import-not-at-top
  if fmt not in PROMPT_FORMATS:
    raise ValueError(f"prompt format must be one of {PROMPT_FORMATS}, got {fmt!r}")
  refuse_existing(output_path(path, fmt))
  if fmt == "npy":
    path = output_path(path, fmt)
    np.save(path, np.asarray(prompt))
    return path
  if fmt == "peft":
    return peft.save_prompt(prompt, path, base_model_name_or_path)
  return t5x.save_prompt(prompt, path, step)


def convert_prompt(args) -> int:
  fmt = args.to or ("npy" if args.dst.endswith(".npy") else None)
  if fmt is None:
    raise ValueError(f"--to is needed for {args.dst!r} (one of {', '.join(PROMPT_FORMATS)})")
  refuse_existing(output_path(args.dst, fmt))  # before reading anything
  prompt = read_prompt(args.src)
  written = write_prompt(prompt, args.dst, fmt, step=args.step,
                         base_model_name_or_path=args.base_model_name_or_path)
  print(f"wrote a {prompt.shape[0]} x {prompt.shape[1]} prompt ({prompt_format(args.src)} -> "
        f"{fmt}) to {os.path.abspath(written)}")
  return 0


ACTIONS = {"hf-to-orbax": hf_to_orbax, "t5x-to-orbax": t5x_to_orbax, "prompt": convert_prompt}


def main(args) -> int:
  """`prompt-jax convert <action>`: `args.action` is one of ACTIONS, the other attributes are
  that action's flags (src, out/dst, config, set, to, base_model_name_or_path, step)."""
  if args.action not in ACTIONS:
    raise ValueError(f"convert action must be one of {sorted(ACTIONS)}, got {args.action!r}")
  try:
    return int(ACTIONS[args.action](args) or 0)
  except FileExistsError as e:
    raise ValueError(str(e)) from e
