"""`prompt-jax <command>`: flag parsing and gin, nothing else.

Gin commands take T5X's flags: `--gin_file` (repeatable), `--gin_bindings` (repeatable),
`--gin.NAME=VALUE` (shorthand for a binding) and `--gin_search_paths` (comma-separated). Other
commands parse their own flags. Errors print one line; set PROMPT_JAX_TRACEBACK=1 for the full
traceback.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
from pathlib import Path
from typing import Callable, Optional, Sequence

# command: (module, function, kind). 'gin' commands call the gin-configured function; 'argv'
# commands receive the remaining arguments.
COMMANDS: dict[str, tuple[str, str, str]] = {
    "train": ("prompt_jax.trainer", "train", "gin"),
    "pretrain": ("prompt_jax.pretrain", "pretrain", "gin"),
    "eval": ("prompt_jax.evaluation", "run_evaluation", "gin"),
    "infer": ("prompt_jax.inference", "infer", "gin"),
    "sweep": ("prompt_jax.sweep", "main", "argv"),
    "plan": ("prompt_jax.plan", "main", "argv"),
    "convert": ("prompt_jax.interop.convert", "main", "argv"),
    "export-prompt": ("prompt_jax.export", "main", "argv"),
    "infer-multitask": ("prompt_jax.multitask", "main", "argv"),
}

USER_ERRORS = (ValueError, FileNotFoundError, KeyError, RuntimeError)


def default_gin_search_paths() -> list[str]:
  """The current directory and the repository's gin_configs/ (when installed from source)."""
  paths = [os.getcwd()]
  repo_configs = Path(__file__).resolve().parent.parent / "gin_configs"
  if repo_configs.is_dir():
    paths += [str(repo_configs.parent), str(repo_configs)]
  return paths


def parse_gin_flags(argv: Sequence[str]) -> argparse.Namespace:
  parser = argparse.ArgumentParser(prog="prompt-jax", add_help=True)
  parser.add_argument("--gin_file", action="append", default=[])
  parser.add_argument("--gin_bindings", action="append", default=[])
  parser.add_argument("--gin_search_paths", default="")
  parser.add_argument("--verbosity", default="warning")
  args, rest = parser.parse_known_args(argv)
  args.gin_bindings = list(args.gin_bindings) + gin_shorthand_bindings(rest, parser)
  return args


def gin_shorthand_bindings(flags: Sequence[str], parser: argparse.ArgumentParser) -> list[str]:
  """T5X's `--gin.NAME=VALUE` flags -> gin bindings `NAME = VALUE`; anything else is an error."""
  bindings = []
  for flag in flags:
    if flag.startswith("--gin.") and "=" in flag:
      name, value = flag[len("--gin."):].split("=", 1)
      bindings.append(f"{name} = {value}")
    else:
      parser.error(f"unrecognised argument {flag!r}")
  return bindings


def configure_gin(gin_files: Sequence[str], gin_bindings: Sequence[str],
                  search_paths: Sequence[str]) -> None:
  """Parse gin files and bindings (after registering our modules for dynamic references)."""
  import gin  # pylint: disable=g-import-not-at-top
  for path in list(search_paths) + default_gin_search_paths():
    if path:
      gin.add_config_file_search_path(path)
  if not gin_files:
    raise ValueError("no --gin_file given")
  gin.parse_config_files_and_bindings(list(gin_files), list(gin_bindings),
                                      finalize_config=False)


def _quiet_gin_search(record: logging.LogRecord) -> bool:
  """Gin logs every search path it tries for an include; keep only real problems."""
  return not str(record.msg).startswith("Path not found")


def _first_line(error: BaseException) -> str:
  text = str(error).strip() or type(error).__name__
  return text.splitlines()[0]


def _load(command: str) -> tuple[Callable, str]:
  module_name, function_name, kind = COMMANDS[command]
  try:
    module = importlib.import_module(module_name)
  except ModuleNotFoundError as e:
    if e.name and module_name.startswith(e.name):
      raise ValueError(f"command {command!r} is not available in this version") from e
    raise
  return getattr(module, function_name), kind


def run_gin_command(function: Callable, argv: Sequence[str]):
  import gin  # pylint: disable=g-import-not-at-top
  args = parse_gin_flags(argv)
  logging.basicConfig(level=args.verbosity.upper(), format="%(levelname)s %(name)s: %(message)s")
  for handler in logging.getLogger().handlers:
    handler.addFilter(_quiet_gin_search)
  if logging.getLogger().level > logging.INFO:
    logging.getLogger("absl").setLevel(logging.ERROR)  # seqio's advisory warnings
  configure_gin(args.gin_file, args.gin_bindings,
                [p for p in args.gin_search_paths.split(",") if p])
  if function.__name__ == "train":
    try:
      model_dir = gin.query_parameter("%MODEL_DIR")
    except ValueError:
      model_dir = None
    if not model_dir:
      raise ValueError("MODEL_DIR is not set; pass --gin.MODEL_DIR=\"'/path/to/run'\"")
  result = gin.get_configurable(train_function_override(function))()
  if isinstance(result, dict):
    print_summary(result)
  return result


def train_function_override(function: Callable) -> Callable:
  """For `train`: the function bound to the gin macro TRAIN_FN when the config defines one
  (e.g. `TRAIN_FN = @spt_training.train_spt`), else `function` itself."""
  import gin  # pylint: disable=g-import-not-at-top
  if function.__name__ != "train":
    return function
  try:
    reference = gin.query_parameter("%TRAIN_FN")
  except ValueError:
    return function
  configurable = getattr(reference, "configurable", None)
  if configurable is None:
    raise ValueError(f"TRAIN_FN must be a function reference such as "
                     f"@spt_training.train_spt, got {reference!r}")
  return configurable.wrapped


def print_summary(summary: dict) -> None:
  """The final result table of a run."""
  before, after = summary.get("eval_untrained"), summary.get("eval_trained")
  if after:
    print("\nvalidation metric        untrained prompt   trained prompt")
    for name in sorted(after):
      b = f"{before[name]:16.2f}" if before and name in before else f"{'-':>16}"
      print(f"{name:24} {b}   {after[name]:14.2f}")
  train = summary.get("train") or {}
  if "loss" in train:
    print(f"final training loss {train['loss']:.4f} at step {summary.get('step')}; "
          f"run directory {summary.get('model_dir')}")


def main(argv: Optional[Sequence[str]] = None) -> int:
  argv = list(sys.argv[1:] if argv is None else argv)
  if not argv or argv[0] in ("-h", "--help"):
    print("usage: prompt-jax {" + ",".join(COMMANDS) + "} [flags]\n"
          "  gin commands take --gin_file=..., --gin.NAME=VALUE, --gin_search_paths=...")
    return 0 if argv else 2
  command, rest = argv[0], argv[1:]
  if command == "infer" and rest and not any(a.startswith("--gin") for a in rest):
    # `prompt-jax infer --inputs=x.jsonl --prompt=task=path ...` serves several tasks, each with
    # its own prompt, in mixed batches; with gin flags it is single-task inference.
    command = "infer-multitask"
  if command not in COMMANDS:
    print(f"error: unknown command {command!r}; expected one of {', '.join(COMMANDS)}",
          file=sys.stderr)
    return 2
  try:
    from prompt_jax import distributed  # pylint: disable=g-import-not-at-top
    distributed.maybe_initialize()  # multi-host runs: before anything touches the devices
    function, kind = _load(command)
    if kind == "gin":
      run_gin_command(function, rest)
    else:
      return int(function(rest) or 0)
  except USER_ERRORS as e:
    if os.environ.get("PROMPT_JAX_TRACEBACK"):
      raise
    print(f"error: {_first_line(e)}", file=sys.stderr)
    return 1
  return 0


if __name__ == "__main__":
  sys.exit(main())
