"""`prompt-jax convert`: frozen weights into our Orbax format, and prompts between formats.

  prompt-jax convert hf-to-orbax HF_DIR OUT_DIR
  prompt-jax convert t5x-to-orbax T5X_CHECKPOINT OUT_DIR --config t5_1_1_base [--set emb_dim=4 ...]
  prompt-jax convert prompt SRC DST [--to npy|peft|t5x] [--base_model_name_or_path NAME] [--step N]

Prompt formats: `npy` (a [length, embed] .npy file), `peft` (a PEFT PROMPT_TUNING adapter
directory), `t5x` (a T5X checkpoint whose `target/encoder/prompt/prompt/prompt` is the prompt;
written in T5X's legacy format as DST/checkpoint_<step>). The source format is detected; the
destination is `npy` when DST ends in `.npy`, otherwise `--to` names it.
"""

from __future__ import annotations

import argparse
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


def _save_orbax(params, out: str) -> None:
  from prompt_jax import checkpoints  # pylint: disable=g-import-not-at-top
  if os.path.exists(out):
    raise FileExistsError(f"output {out!r} already exists; choose a new directory")
  checkpoints.save_params_orbax(params, out)


def hf_to_orbax(args) -> int:
  from prompt_jax.interop import hf  # pylint: disable=g-import-not-at-top
  config, params = hf.load_t5(args.src)
  _save_orbax(params, args.out)
  print(f"wrote {_count(params):,} parameters to {os.path.abspath(args.out)}\n"
        f"model config: {_describe(config)}")
  return 0


def t5x_to_orbax(args) -> int:
  from prompt_jax.interop import t5x  # pylint: disable=g-import-not-at-top
  config = config_from_flags(args.config, args.set)
  params = t5x.load_params(args.src, config)
  _save_orbax(params, args.out)
  print(f"wrote {_count(params):,} parameters (step {t5x.checkpoint_step(args.src)}) to "
        f"{os.path.abspath(args.out)}")
  return 0


def prompt_format(path: str) -> str:
  """The format of an existing prompt file or directory."""
  from prompt_jax.interop import peft, t5x  # pylint: disable=g-import-not-at-top
  if path.endswith(".npy") and os.path.isfile(path):
    return "npy"
  if peft.is_adapter_dir(path):
    return "peft"
  if t5x.is_t5x_checkpoint(path):
    return "t5x"
  raise ValueError(f"cannot tell the prompt format of {path!r}: expected a .npy file, a PEFT "
                   "adapter directory (adapter_config.json) or a T5X checkpoint")


def read_prompt(path: str) -> np.ndarray:
  """A [length, embed] float32 prompt from any supported format."""
  from prompt_jax.interop import peft, t5x  # pylint: disable=g-import-not-at-top
  fmt = prompt_format(path)
  if fmt == "npy":
    prompt = np.load(path)
    if prompt.ndim != 2:
      raise ValueError(f"prompt file {path!r} must hold a [length, embed] array, got shape "
                       f"{prompt.shape}")
    return prompt
  if fmt == "peft":
    return peft.load_prompt(path)
  return t5x.load_prompt(path)


def write_prompt(prompt: np.ndarray, path: str, fmt: str, *,
                 base_model_name_or_path: Optional[str] = None, step: int = 0) -> str:
  """Write `prompt` in `fmt`; returns the path written."""
  from prompt_jax.interop import peft, t5x  # pylint: disable=g-import-not-at-top
  if fmt == "npy":
    np.save(path, np.asarray(prompt))
    return path
  if fmt == "peft":
    return peft.save_prompt(prompt, path, base_model_name_or_path)
  if fmt == "t5x":
    return t5x.save_prompt(prompt, path, step)
  raise ValueError(f"prompt format must be one of {PROMPT_FORMATS}, got {fmt!r}")


def convert_prompt(args) -> int:
  prompt = read_prompt(args.src)
  fmt = args.to or ("npy" if args.dst.endswith(".npy") else None)
  if fmt is None:
    raise ValueError(f"--to is needed for {args.dst!r} (one of {', '.join(PROMPT_FORMATS)})")
  written = write_prompt(prompt, args.dst, fmt, step=args.step,
                         base_model_name_or_path=args.base_model_name_or_path)
  print(f"wrote a {prompt.shape[0]} x {prompt.shape[1]} prompt ({prompt_format(args.src)} -> "
        f"{fmt}) to {os.path.abspath(written)}")
  return 0


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(prog="prompt-jax convert", description=__doc__.split("\n")[0])
  sub = parser.add_subparsers(dest="command", required=True)

  p = sub.add_parser("hf-to-orbax", help="Hugging Face T5 directory -> Orbax frozen checkpoint")
  p.add_argument("src", help="directory with config.json and model.safetensors (or shards)")
  p.add_argument("out", help="new Orbax checkpoint directory")
  p.set_defaults(run=hf_to_orbax)

  p = sub.add_parser("t5x-to-orbax", help="T5X checkpoint (legacy or Orbax) -> Orbax params")
  p.add_argument("src", help="checkpoint_<step> directory (or its msgpack / state item)")
  p.add_argument("out", help="new Orbax checkpoint directory")
  p.add_argument("--config", required=True, help="T5 preset name, e.g. t5_1_1_base")
  p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                 help="override a T5Config field (repeatable), e.g. --set emb_dim=4")
  p.set_defaults(run=t5x_to_orbax)

  p = sub.add_parser("prompt", help="a prompt between .npy, PEFT and T5X formats")
  p.add_argument("src", help=".npy file, PEFT adapter directory or T5X checkpoint")
  p.add_argument("dst", help="output path (.npy file or directory)")
  p.add_argument("--to", choices=PROMPT_FORMATS, help="output format (default: from dst)")
  p.add_argument("--base_model_name_or_path", default=None,
                 help="recorded in the PEFT adapter config, e.g. google/t5-base-lm-adapt")
  p.add_argument("--step", type=int, default=0, help="step of a written T5X checkpoint")
  p.set_defaults(run=convert_prompt)
  return parser


def main(argv: Sequence[str]) -> int:
  args = build_parser().parse_args(list(argv))
  try:
    return int(args.run(args) or 0)
  except FileExistsError as e:
    raise ValueError(str(e)) from e
