"""What defines a training run, as the loop records and compares it: the run record
(MODEL_DIR/run.json, `run_record`) and the older checks on a checkpoint's metadata
(`check_resume_compatible`, `check_settings`)."""

from __future__ import annotations

import dataclasses
import json
from typing import Any, Mapping, Optional

from prompt_jax import __version__
from prompt_jax import params as params_lib
from prompt_jax.storage import frozen_models, run_dir
from prompt_jax.training import optimizers
from prompt_jax.training.regimes import Regime


def json_value(value: Any) -> Any:
  return json.loads(json.dumps(value, default=str))


def check_resume_compatible(meta: Mapping[str, Any], current: Mapping[str, Any], step: int,
                            directory: str) -> None:
  """Raise ValueError where the run being resumed was trained from another frozen checkpoint
  or model config than the one configured now (naming the first difference)."""
  saved_path = meta.get("initial_checkpoint_path")
  if "initial_checkpoint_path" in meta and saved_path != current["initial_checkpoint_path"]:
    raise ValueError(
        f"checkpoint step {step} in {directory} was trained from INITIAL_CHECKPOINT_PATH="
        f"{saved_path!r}, this run sets {current['initial_checkpoint_path']!r}; use the same "
        "path, a new MODEL_DIR, or --gin.trainer.train.allow_config_change=True")
  saved_config, config = meta.get("config"), json_value(current["config"])
  if isinstance(saved_config, dict):
    for name in sorted(set(saved_config) | set(config)):
      if saved_config.get(name) != config.get(name):
        raise ValueError(
            f"checkpoint step {step} in {directory} was trained with model config {name}="
            f"{saved_config.get(name)!r}, this run has {config.get(name)!r}; use the same model "
            "gin, a new MODEL_DIR, or --gin.trainer.train.allow_config_change=True")


def check_settings(meta: Mapping[str, Any], current: Mapping[str, Any], directory: str) -> None:
  """Raise ValueError when the checkpoints were written by a regime with other settings."""
  saved, settings = meta.get("settings"), current.get("settings")
  if (saved or settings) and saved != settings:
    raise ValueError(f"checkpoints in {directory!r} were written for {saved}, this run is "
                     f"{settings}; use the same settings or another MODEL_DIR")


def run_record(regime: Regime, initial_checkpoint_path: Optional[str], seed: int) -> dict:
  """What defines a run of `regime` (MODEL_DIR/run.json): the model config (how it executes,
  `run_dir.EXECUTION_FIELDS`, apart: it may change on resume), the prompt hook and its
  settings, the frozen checkpoint (path, a Hub name pinned to its commit, and
  `run_dir.fingerprint`), the data, the optimizer
  (its state's types and, when built by `optimizers`, its hyperparameters: a resume with
  another learning rate is a difference), the trainable parameters' shapes, the regime's
  settings, the seed, and the package version (informative only)."""
  programs = regime.programs
  data = getattr(regime, "dataset_cfg", None)
  frozen_path = initial_checkpoint_path
  resolved = frozen_models.resolve_path(frozen_path) if frozen_path else None
  return {
      **run_dir.model_entries(programs.model),
      "frozen_checkpoint": {"path": frozen_models.recorded_path(frozen_path),
                            "fingerprint": run_dir.fingerprint(resolved)},
      "data": None if data is None else {
          "task": data.mixture_or_task_name, "split": data.split,
          "feature_lengths": dict(data.task_feature_lengths), "batch_size": data.batch_size},
      "optimizer": {"state": optimizer_state_types(regime.abstract_state()),
                    "hyperparameters": optimizers.description(programs.optimizer)},
      "trainable": {name: list(shape) for name, shape in
                    params_lib.shapes(programs.abstract_prompt).items()},
      "trainable_pattern": programs.trainable_pattern,
      "settings": json_value(dict(regime.settings)),
      "seed": int(seed),
      "prompt_jax_version": __version__,
  }


def optimizer_state_types(state: Any) -> list[str]:
  """The names of the optimizer state types in a training state, in tree order (e.g.
  ['FactoredState', ...] for Adafactor, ['ScaleByAdamState', ...] for Adam)."""
  names: list[str] = []

  def walk(node):
    if isinstance(node, tuple) and hasattr(node, "_fields"):
      if type(node).__name__ not in names:
        names.append(type(node).__name__)
      for value in node:
        walk(value)
    elif dataclasses.is_dataclass(node) and not isinstance(node, type):
      for field in dataclasses.fields(node):
        walk(getattr(node, field.name))
    elif isinstance(node, Mapping):
      for value in node.values():
        walk(value)
    elif isinstance(node, (list, tuple)):
      for value in node:
        walk(value)

  walk(state)
  return names
