"""`prompt-jax convert`: frozen weights into our Orbax format, and prompts between formats.

  prompt-jax convert hf-to-orbax HF_DIR OUT_DIR
  prompt-jax convert t5x-to-orbax T5X_CHECKPOINT OUT_DIR --config t5_1_1_base [--set emb_dim=4 ...]
  prompt-jax convert prompt SRC DST [--to npy|peft|t5x] [--base_model_name_or_path NAME] [--step N]

Prompt formats: `npy` (a [length, embed] .npy file), `peft` (a PEFT PROMPT_TUNING adapter
directory), `t5x` (a T5X checkpoint whose `target/encoder/prompt/prompt/prompt` is the prompt;
written in T5X's legacy format as DST/checkpoint_<step>). SRC is a T5X checkpoint or any prompt
source of `prompt_jax.storage.prompt_files` (also `FILE.npy#ROW`, a run directory `MODEL_DIR` or
`MODEL_DIR@STEP`), its format detected; the destination is `npy` when DST ends in `.npy`,
otherwise `--to` names it.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Optional, Sequence

import jax
import numpy as np

from prompt_jax.interop import hf, peft, t5x
from prompt_jax.models import t5
from prompt_jax.storage import frozen_models, output_paths, prompt_files

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
  preset = hf.matching_preset(config)
  return f"{config}" + (f"\n(the architecture of preset {preset!r})" if preset else "")


def _count(params) -> int:
  return int(sum(np.size(x) for x in jax.tree_util.tree_leaves(params)))


def _refuse_existing_orbax(out: str) -> None:
  output_paths.check_parent(out, "output")
  if os.path.lexists(out):
    raise FileExistsError(f"output {out!r} already exists; choose a new directory")


def _save_orbax(params, out: str) -> None:
  _refuse_existing_orbax(out)
  frozen_models.save_params_orbax(params, out)


def hf_to_orbax(args) -> int:
  _refuse_existing_orbax(args.out)  # before reading a possibly large model
  config, params = hf.load_t5(args.src)
  _save_orbax(params, args.out)
  print(f"wrote {_count(params):,} parameters to {os.path.abspath(args.out)}\n"
        f"model config: {_describe(config)}")
  return 0


def t5x_to_orbax(args) -> int:
  config = config_from_flags(args.config, args.set)
  _refuse_existing_orbax(args.out)
  params = t5x.load_params(args.src, config)
  _save_orbax(params, args.out)
  print(f"wrote {_count(params):,} parameters (step {t5x.checkpoint_step(args.src)}) to "
        f"{os.path.abspath(args.out)}")
  return 0


def _t5x_checkpoint(path: str) -> bool:
  return os.path.isdir(path) and t5x.is_t5x_checkpoint(path)


def prompt_format(path: str) -> str:
  """The format of a prompt source: 't5x' for a T5X checkpoint, else `prompt_files.source_format`
  ('npy' for a file or `FILE.npy#ROW`, 'peft', 'run' for `MODEL_DIR[@STEP]`)."""
  if _t5x_checkpoint(path):
    return "t5x"
  try:
    return prompt_files.source_format(path)
  except prompt_files.UnknownSourceError as e:
    raise ValueError(f"cannot tell the prompt format of {path!r}: expected a .npy file "
                     "(FILE.npy#ROW for a bank's row), a PEFT adapter directory "
                     "(adapter_config.json), a run directory (MODEL_DIR or MODEL_DIR@STEP) or a "
                     "T5X checkpoint") from e


def read_prompt(path: str) -> np.ndarray:
  """A [length, embed] float32 prompt from a T5X checkpoint or any prompt source of
  `prompt_files` (`FILE.npy`, `FILE.npy#ROW`, PEFT adapter directory, `MODEL_DIR[@STEP]`), checked
  by `prompt_files.check_prompt_array` (floating point, finite, two-dimensional)."""
  if _t5x_checkpoint(path):
    return prompt_files.check_prompt_array(t5x.load_prompt(path), path)
  prompt_format(path)  # an unknown directory: the message lists every format
  return prompt_files.read_prompt(path)


def output_path(path: str, fmt: str) -> str:
  """The path `write_prompt` writes for `path` in `fmt` (np.save adds a missing '.npy')."""
  return path if fmt != "npy" or path.endswith(".npy") else path + ".npy"


def refuse_existing(path: str) -> None:
  """Raise ValueError if `path` exists (an empty directory is fine): outputs are never
  overwritten; or if it lies under a file."""
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
  if fmt not in PROMPT_FORMATS:
    raise ValueError(f"prompt format must be one of {PROMPT_FORMATS}, got {fmt!r}")
  refuse_existing(output_path(path, fmt))
  if fmt == "npy":
    return prompt_files.write_npy(prompt, output_path(path, fmt), what="output")
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
