"""`prompt-jax export-prompt`: fold a trained prompt of any method into a plain [length, embed]
array and write it as `.npy` and in the PEFT prompt-tuning format.

Reparameterised methods (SuperPos-Prompt, Residual) only need their extra parameters while
training: the folded array is exactly what the encoder sees, so it serves with a plain
`Prompt` (e.g. `prompts/from_file.gin`) at zero overhead.

    prompt-jax export-prompt --gin_file=models/t5_1_1_tiny.gin --gin_file=prompts/superpos.gin \
      --model_dir=/tmp/run [--step=300] [--output=prompt.npy] [--peft_dir=peft/] \
      [--base_model_name_or_path=google/t5-base-lm-adapt] [--format=both|npy|peft]

The gin files are the run's model and prompt files (they say which method made the prompt);
the frozen checkpoint comes from the run's metadata unless `--initial_checkpoint_path` is given.
"""

from __future__ import annotations

import argparse
import logging
import os
from typing import Any, Mapping, Optional, Sequence

import jax
import numpy as np
import orbax.checkpoint as ocp

from prompt_jax import checkpoints
from prompt_jax import params as params_lib


def configured_model(model):
  """Identity; gin binds `model = %MODEL` so that the CLI can build the run's model."""
  return model


def load_trained_prompt(model_dir: str, step: Optional[int] = None):
  """The trainable parameters saved in MODEL_DIR at `step` (default: latest).

  -> (prompt_params, meta dict, step). Restored without a target, so the optimizer that
  trained the prompt does not need to be configured.
  """
  manager = checkpoints.PromptCheckpointManager(model_dir, 1)
  try:
    steps = manager.all_steps()
    if not steps:
      raise ValueError(f"no checkpoint in {manager.directory} (is --model_dir a training run "
                       "directory?)")
    if step is None:
      step = max(steps)
    elif step not in steps:
      raise ValueError(f"--step={step} is not saved in {manager.directory}; saved steps are "
                       f"{sorted(steps)}")
    restored = manager.manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(None), meta=ocp.args.JsonRestore()))
  finally:
    manager.close()
  state = restored["state"]
  prompt_params = state["prompt_params"] if isinstance(state, Mapping) else state.prompt_params
  to_host = lambda x: np.asarray(x)
  return jax.tree_util.tree_map(to_host, prompt_params), dict(restored["meta"]), step


def fold_prompt(model, prompt_params: Mapping, frozen_params: Mapping) -> np.ndarray:
  """The prompt as the encoder sees it, [length, embed] float32 (via `Transformer.export_prompt`).
  Only `token_embedder/embedding` of the frozen parameters is read."""
  frozen = {"token_embedder": {"embedding": frozen_params["token_embedder"]["embedding"]}}
  params = params_lib.merge_params(prompt_params, frozen)
  folded = model.module.apply({"params": params}, method=model.module.export_prompt)
  if folded is None:
    raise ValueError("the configured model has no prompt (is a prompt gin file given?)")
  return np.asarray(folded, dtype=np.float32)


def export_prompt(model, model_dir: str, step: Optional[int] = None,
                  initial_checkpoint_path: Optional[str] = None) -> tuple[np.ndarray, int]:
  """Fold the prompt saved in `model_dir` at `step` (default latest). -> (prompt, step)."""
  prompt_params, meta, step = load_trained_prompt(model_dir, step)
  path = initial_checkpoint_path or meta.get("initial_checkpoint_path")
  if not path:
    raise ValueError(f"the run in {model_dir} records no initial_checkpoint_path (it trained a "
                     "randomly initialised model); pass --initial_checkpoint_path")
  frozen = checkpoints.load_frozen_params(path, model.config)
  return fold_prompt(model, prompt_params, frozen), step


def save_npy(prompt: np.ndarray, path: str) -> str:
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  np.save(path, np.asarray(prompt, np.float32))
  return path


def save_peft(prompt: np.ndarray, directory: str, base_model_name_or_path: Optional[str]) -> Any:
  from prompt_jax.interop import peft  # pylint: disable=g-import-not-at-top
  kwargs = {} if base_model_name_or_path is None else {
      "base_model_name_or_path": base_model_name_or_path}
  return peft.save_prompt(prompt, directory, **kwargs)


def _model_from_gin(argv: Sequence[str]):
  import gin  # pylint: disable=g-import-not-at-top

  from prompt_jax import cli  # pylint: disable=g-import-not-at-top
  logging.getLogger().addFilter(cli._quiet_gin_search)  # gin logs each include path it tries
  gin_args = cli.parse_gin_flags(argv)
  cli.configure_gin(gin_args.gin_file, gin_args.gin_bindings,
                    [p for p in gin_args.gin_search_paths.split(",") if p])
  gin.parse_config(["from __gin__ import dynamic_registration",
                    "from prompt_jax import export",
                    "export.configured_model.model = %MODEL"])
  try:
    model_dir = gin.query_parameter("%MODEL_DIR")
  except ValueError:
    model_dir = None
  return gin.get_configurable(configured_model)(), model_dir


def parse_flags(argv: Sequence[str]):
  parser = argparse.ArgumentParser(prog="prompt-jax export-prompt", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--model_dir", help="training run directory (default: gin MODEL_DIR)")
  parser.add_argument("--step", type=int, help="checkpoint step (default: latest)")
  parser.add_argument("--output", help=".npy path (default MODEL_DIR/export/prompt_<step>.npy)")
  parser.add_argument("--peft_dir", help="PEFT directory (default MODEL_DIR/export/peft_<step>)")
  parser.add_argument("--base_model_name_or_path", help="recorded in the PEFT adapter config")
  parser.add_argument("--initial_checkpoint_path",
                      help="frozen checkpoint (default: the one the run recorded)")
  parser.add_argument("--format", choices=("both", "npy", "peft"), default="both")
  return parser.parse_known_args(argv)


def main(argv: Sequence[str]) -> int:
  args, gin_argv = parse_flags(argv)
  model, gin_model_dir = _model_from_gin(gin_argv)
  model_dir = args.model_dir or gin_model_dir
  if not model_dir:
    raise ValueError("no run directory: pass --model_dir=/path/to/run")
  prompt, step = export_prompt(model, model_dir, args.step, args.initial_checkpoint_path)
  export_dir = os.path.join(model_dir, "export")
  if args.format in ("both", "npy"):
    path = save_npy(prompt, args.output or os.path.join(export_dir, f"prompt_{step}.npy"))
    print(f"wrote {path} {tuple(prompt.shape)}")
  if args.format in ("both", "peft"):
    directory = args.peft_dir or os.path.join(export_dir, f"peft_{step}")
    save_peft(prompt, directory, args.base_model_name_or_path)
    print(f"wrote {directory} (PEFT prompt tuning, {prompt.shape[0]} virtual tokens)")
  return 0
