"""`prompt-jax export-prompt`: fold a trained prompt of any method into a plain [length, embed]
array and write it as `.npy` and in the PEFT prompt-tuning format.

Reparameterised methods (SuperPos-Prompt, Residual) only need their extra parameters while
training: the folded array is exactly what the encoder sees, so it serves with a plain
`Prompt` (e.g. `prompts/from_file.gin`) at zero overhead.

    prompt-jax export-prompt --gin_file=models/t5_1_1_tiny.gin --gin_file=prompts/superpos.gin \
      --model_dir=/tmp/run [--step=300] [--output=prompt.npy] [--peft_dir=peft/] \
      [--base_model_name_or_path=google/t5-base-lm-adapt] [--format=both|npy|peft]

The gin files are the run's model and prompt files (they say which method made the prompt);
the command line builds the model from them and hands it to `main`, which parses no gin. The
frozen checkpoint comes from the run's metadata unless `--initial_checkpoint_path` is given.
"""

from __future__ import annotations

import os
from typing import Any, Mapping, Optional

import jax
import numpy as np

from prompt_jax import params as params_lib
from prompt_jax.interop import peft
from prompt_jax.programs import PromptPrograms
from prompt_jax.prompts import base as prompts_base
from prompt_jax.serving import loading
from prompt_jax.storage import checkpoints, prompt_files


def load_trained_prompt(model_dir: str, step: Optional[int] = None):
  """The trainable parameters saved in MODEL_DIR at `step` (default: latest).

  -> (prompt_params, meta dict, step). Restored as the checkpoint's metadata describes it, on
  one device, so neither the optimizer that trained the prompt nor the devices it was trained
  on need to be configured.
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
    state, meta = manager.restore_on_one_device(step)
  finally:
    manager.close()
  to_host = lambda x: np.asarray(x)
  return jax.tree_util.tree_map(to_host, state["prompt_params"]), meta, step


def fold_prompt(model, prompt_params: Mapping, frozen_params: Mapping) -> np.ndarray:
  """The prompt as the encoder sees it, [length, embed] float32 (via
  `prompt_jax.prompts.base.export_prompt`). Only `token_embedder/embedding` of the frozen
  parameters is read."""
  frozen = {"token_embedder": {"embedding": frozen_params["token_embedder"]["embedding"]}}
  params = params_lib.merge_params(prompt_params, frozen)
  hook = model.module.prompt
  if hook is None:
    raise ValueError("the configured model has no prompt (is a prompt gin file given?)")
  folded = prompts_base.export_prompt(hook, params)
  if folded is None:
    raise ValueError(f"a {type(hook).__name__} prompt (one that depends on the input or lives "
                     "inside the model's layers) has no plain [length, embed] form to export; "
                     "serve it from its run directory (prompt-jax eval/infer --model_dir=...)")
  return np.asarray(folded, dtype=np.float32)


def export_prompt(model, model_dir: str, step: Optional[int] = None,
                  initial_checkpoint_path: Optional[str] = None,
                  random_frozen_model: bool = False) -> tuple[np.ndarray, int]:
  """Fold the prompt saved in `model_dir` at `step` (default latest). -> (prompt, step).

  `model` must be the run's (its record is checked: `loading.check_model_against_run`); the
  frozen checkpoint is the run's unless `initial_checkpoint_path` is given (the same file)."""
  if not os.path.isdir(model_dir):
    raise ValueError(f"--model_dir {model_dir!r} does not exist (or is not a directory)")
  loading.check_model_against_run(model, model_dir)
  prompt_params, _, step = load_trained_prompt(model_dir, step)
  path = loading.frozen_checkpoint_of(model_dir, initial_checkpoint_path,
                                      random_frozen_model=random_frozen_model)
  frozen = PromptPrograms(model).frozen_params(path, jax.random.key(0), random_ok=True)
  return fold_prompt(model, prompt_params, frozen), step


def save_npy(prompt: np.ndarray, path: str) -> str:
  """`prompt` as float32 .npy at `path` ('.npy' added if missing, as np.save does), written
  atomically; a new file only: an existing one, or a path under a file, is a ValueError naming
  it. -> the path written."""
  return prompt_files.write_npy(prompt, path, what="--output")


def save_peft(prompt: np.ndarray, directory: str, base_model_name_or_path: Optional[str]) -> Any:
  kwargs = {} if base_model_name_or_path is None else {
      "base_model_name_or_path": base_model_name_or_path}
  return peft.save_prompt(prompt, directory, **kwargs)


def main(model, model_dir: Optional[str], *, step: Optional[int] = None,
         output: Optional[str] = None, peft_dir: Optional[str] = None,
         base_model_name_or_path: Optional[str] = None,
         initial_checkpoint_path: Optional[str] = None, fmt: str = "both",
         random_frozen_model: bool = False) -> int:
  """`prompt-jax export-prompt`: fold the prompt that `model` (the run's model, e.g. from its
  gin files) trained in `model_dir` at `step` and write it as `fmt` ('both', 'npy' or 'peft')."""
  if fmt not in ("both", "npy", "peft"):
    raise ValueError(f"--format must be both, npy or peft, got {fmt!r}")
  if not model_dir:
    raise ValueError("no run directory: pass --model_dir=/path/to/run")
  prompt, step = export_prompt(model, model_dir, step, initial_checkpoint_path,
                               random_frozen_model)
  export_dir = os.path.join(model_dir, "export")
  if fmt in ("both", "npy"):
    path = save_npy(prompt, output or os.path.join(export_dir, f"prompt_{step}.npy"))
    print(f"wrote {path} {tuple(prompt.shape)}")
  if fmt in ("both", "peft"):
    directory = peft_dir or os.path.join(export_dir, f"peft_{step}")
    save_peft(prompt, directory, base_model_name_or_path)
    print(f"wrote {directory} (PEFT prompt tuning, {prompt.shape[0]} virtual tokens)")
  return 0
