"""What every serving command starts from: the programs and frozen model a run was trained
with (checked against its record), and the prompt to serve from any prompt source."""

from __future__ import annotations

import logging
import os
from typing import Any, Optional

import jax
import numpy as np

from prompt_jax import params as params_lib
from prompt_jax.models.encoder_decoder import EncoderDecoderModel
from prompt_jax.partitioning import Partitioner
from prompt_jax.programs import PromptPrograms
from prompt_jax.storage import checkpoints, frozen_models, prompt_files, run_dir

log = logging.getLogger(__name__)


def prompt_params_from_array(programs, prompt: np.ndarray):
  """A prompt array (a [length, embed] `.npy` export, or a bank's [num_prompts, length, embed])
  as the programs' prompt parameter tree.

  Only for methods whose trainable parameters are that one array (Lester et al.'s, a bank)."""
  prompt = np.asarray(prompt, np.float32)
  shapes = params_lib.shapes(programs.abstract_prompt)
  if len(shapes) != 1 or next(iter(shapes.values())) != prompt.shape:
    raise ValueError(f"prompt array of shape {prompt.shape} does not fit the configured prompt "
                     f"parameters {shapes}; restore from MODEL_DIR instead")
  tree = jax.tree_util.tree_map(lambda leaf: prompt.astype(leaf.dtype), programs.abstract_prompt)
  return frozen_models.device_put_tree(tree, programs.prompt_shardings)


def load_prompt_params(programs, frozen_params, *, model_dir: Optional[str] = None,
                       prompt_path: Optional[str] = None, step: Optional[int] = None,
                       seed: int = 0):
  """The prompt to evaluate and its step: from `prompt_path`, any prompt source of
  `prompt_files` (a [length, embed] or bank `.npy`, `FILE.npy#ROW`, a PEFT adapter directory, a
  run directory `MODEL_DIR[@STEP]`; its step is `prompt_files.step_of`, else 0), else MODEL_DIR's
  checkpoint (`step`, default the latest), else a freshly initialised (untrained) prompt."""
  if prompt_path:
    prompt = prompt_files.read_prompt(prompt_path, allow_bank=True)
    if step is None:
      step = prompt_files.step_of(prompt_path)
    return prompt_params_from_array(programs, prompt), 0 if step is None else step
  if model_dir:
    if not os.path.isdir(model_dir):
      raise ValueError(f"MODEL_DIR {model_dir!r} does not exist (or is not a directory); "
                       "check the path or set PROMPT_PATH")
    manager = checkpoints.PromptCheckpointManager(model_dir, 1, None)
    try:
      steps = manager.all_steps()
      if not steps:
        raise ValueError(f"no checkpoint in {manager.directory}; train first or set "
                         "PROMPT_PATH")
      step = max(steps) if step is None else step
      if step not in steps:
        raise ValueError(f"no checkpoint for step {step} in {manager.directory}; have {steps}")
      prompt = manager.restore_prompt_params(step, programs.prompt_structs(),
                                             programs.partitioner.replicated())
    finally:
      manager.close()
    return prompt, step
  log.warning("neither MODEL_DIR nor PROMPT_PATH is set: evaluating an untrained prompt")
  return programs.init_prompt(frozen_params, jax.random.key(seed)), 0


RANDOM_FROZEN_HINT = ("set INITIAL_CHECKPOINT_PATH, or score a randomly initialised frozen "
                      "model on purpose with --gin.RANDOM_FROZEN_MODEL=True")


def recorded_frozen_checkpoint(model_dir: str) -> tuple[Optional[str], Optional[str]]:
  """(path, fingerprint) of the frozen checkpoint a run in MODEL_DIR was trained on: from its
  record (run.json), else its latest checkpoint's metadata (runs written before records);
  (None, None) when neither names one."""
  record = run_dir.read_record(model_dir)
  if record is not None:
    frozen = record.get("frozen_checkpoint") or {}
    return frozen.get("path"), frozen.get("fingerprint")
  manager = checkpoints.PromptCheckpointManager(model_dir, 1, None)
  try:
    steps = manager.all_steps()
    meta = manager.restore_meta(max(steps)) if steps else {}
  finally:
    manager.close()
  return meta.get("initial_checkpoint_path"), None


def frozen_checkpoint_of(model_dir: Optional[str], initial_checkpoint_path: Optional[str], *,
                         random_frozen_model: bool = False,
                         allow_config_change: bool = False) -> Optional[str]:
  """The frozen checkpoint to serve a run with: `initial_checkpoint_path` when given (refused,
  `run_dir.RunMismatchError`, when MODEL_DIR was trained on another file, unless
  `allow_config_change`), else the one MODEL_DIR records. None (a randomly initialised frozen
  model) only with `random_frozen_model`; otherwise no checkpoint is a ValueError."""
  recorded, recorded_fingerprint = (None, None)
  if model_dir and os.path.isdir(model_dir):
    recorded, recorded_fingerprint = recorded_frozen_checkpoint(model_dir)
  if initial_checkpoint_path:
    given = run_dir.fingerprint(frozen_models.resolve_path(initial_checkpoint_path))
    # (a path that does not exist is left to the loader, which says so)
    if recorded and initial_checkpoint_path != recorded and given and not allow_config_change:
      if given != recorded_fingerprint:
        raise run_dir.RunMismatchError(
            f"MODEL_DIR {model_dir!r} was trained on the frozen checkpoint {recorded!r}, "
            f"INITIAL_CHECKPOINT_PATH is {initial_checkpoint_path!r}"
            f"{' (another file)' if recorded_fingerprint else ''}; leave it unset to use the "
            "run's, or pass --gin.ALLOW_CONFIG_CHANGE=True")
    return initial_checkpoint_path
  if recorded:
    return recorded
  if random_frozen_model:
    log.warning("no frozen checkpoint: the frozen model is randomly initialised "
                "(RANDOM_FROZEN_MODEL)")
    return None
  where = f"MODEL_DIR {model_dir!r} records none" if model_dir else "no MODEL_DIR is set"
  raise ValueError(f"no frozen checkpoint: INITIAL_CHECKPOINT_PATH is not set and {where}; "
                   f"{RANDOM_FROZEN_HINT}")


def check_model_against_run(model: EncoderDecoderModel, model_dir: Optional[str]) -> None:
  """Raise `run_dir.RunMismatchError` naming each difference when `model` (its T5 config and
  prompt hook) is not the one MODEL_DIR's record says the run trained."""
  if model_dir and os.path.isdir(model_dir):
    run_dir.check_record(model_dir, run_dir.model_entries(model), keys=("model", "prompt"),
                         allow_flag="--gin.ALLOW_CONFIG_CHANGE=True")


def build_programs(model: EncoderDecoderModel, initial_checkpoint_path: Optional[str],
                   partitioner: Optional[Partitioner] = None,
                   trainable_pattern: str = params_lib.DEFAULT_TRAINABLE_PATTERN,
                   seed: int = 0, *, model_dir: Optional[str] = None,
                   random_frozen_model: bool = False,
                   allow_config_change: bool = False) -> tuple[PromptPrograms, Any]:
  """The model's programs (no optimizer: nothing here trains) and its frozen parameters.

  With `model_dir`, the model must be the one its run trained and the frozen checkpoint
  defaults to the run's (`check_model_against_run`, `frozen_checkpoint_of`, both relaxed by
  `allow_config_change`); without any checkpoint the frozen model is random only with
  `random_frozen_model`."""
  if not allow_config_change:
    check_model_against_run(model, model_dir)
  programs = PromptPrograms(model, partitioner, trainable_pattern=trainable_pattern)
  path = frozen_checkpoint_of(model_dir, initial_checkpoint_path,
                              random_frozen_model=random_frozen_model,
                              allow_config_change=allow_config_change)
  return programs, programs.frozen_params(path, jax.random.key(seed), random_ok=True)
