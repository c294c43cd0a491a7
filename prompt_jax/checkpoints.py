"""Checkpoints: the trainable state (Orbax) and the frozen model (referenced by path, never
re-saved).

Layout of a run directory (MODEL_DIR):
  checkpoints/<step>/state     prompt params, optimizer state, step (Orbax, sharded-aware)
  checkpoints/<step>/meta      JSON: data position, frozen checkpoint path, config summary
  prompts/prompt_<step>.npy    each saved prompt as a plain [length, embed] array
"""

from __future__ import annotations

import importlib.resources
import logging
import os
from typing import Any, Mapping, Optional

import flax
import jax
import numpy as np
import orbax.checkpoint as ocp

log = logging.getLogger(__name__)

BUILTIN_PREFIX = "builtin:"


class PromptCheckpointManager:
  """Saves and restores the trainable state of a run every `save_every_steps`, keeping `keep`."""

  def __init__(self, model_dir: str, save_every_steps: int, keep: Optional[int] = 3):
    if save_every_steps < 1:
      raise ValueError(f"checkpoint save_every_steps must be >= 1, got {save_every_steps}")
    self.model_dir = os.path.abspath(model_dir)
    self.directory = os.path.join(self.model_dir, "checkpoints")
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, save_interval_steps=save_every_steps,
                                           create=True, enable_async_checkpointing=False)
    self.manager = ocp.CheckpointManager(self.directory, options=options,
                                         item_names=("state", "meta"))

  def latest_step(self) -> Optional[int]:
    return self.manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self.manager.all_steps())

  def save(self, step: int, state: Any, meta: Mapping[str, Any], force: bool = False) -> bool:
    saved = self.manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(dict(meta))), force=force)
    self.manager.wait_until_finished()
    return bool(saved)

  def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict]:
    """`abstract_state`: a tree of `jax.ShapeDtypeStruct` with shardings, like the saved one."""
    restored = self.manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()))
    return restored["state"], dict(restored["meta"])

  def close(self):
    self.manager.close()


def export_prompt_npy(prompt: np.ndarray, model_dir: str, step: int) -> str:
  """Write a [length, embed] prompt as MODEL_DIR/prompts/prompt_<step>.npy; returns the path."""
  directory = os.path.join(model_dir, "prompts")
  os.makedirs(directory, exist_ok=True)
  path = os.path.join(directory, f"prompt_{step}.npy")
  np.save(path, np.asarray(prompt, dtype=np.float32))
  return path


# ------------------------------------------------------------------------- frozen model loading


def resolve_path(path: str) -> str:
  """`builtin:<name>` names a model shipped in the package (`prompt_jax/assets/<name>`)."""
  if path.startswith(BUILTIN_PREFIX):
    name = path[len(BUILTIN_PREFIX):]
    resolved = importlib.resources.files("prompt_jax") / "assets" / name
    if not resolved.is_file() and not resolved.is_dir():
      raise ValueError(f"no built-in checkpoint {name!r} in prompt_jax/assets")
    return str(resolved)
  return path


def save_params_npz(params: Mapping, path: str) -> None:
  """A parameter tree as one `.npz` with '/'-joined T5X names (small models only)."""
  flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(params), sep="/")
  np.savez(path, **{k: np.asarray(v) for k, v in flat.items()})


def load_params_npz(path: str) -> dict:
  with np.load(path) as data:
    return flax.traverse_util.unflatten_dict({k: data[k] for k in data.files}, sep="/")


def save_params_orbax(params: Mapping, path: str) -> None:
  """A frozen parameter tree as an Orbax checkpoint directory (sharded arrays welcome)."""
  with ocp.StandardCheckpointer() as checkpointer:
    checkpointer.save(os.path.abspath(path), params)


def load_params_orbax(path: str, abstract_params: Optional[Mapping] = None) -> dict:
  """Restore an Orbax parameter tree; with `abstract_params` (ShapeDtypeStructs with
  shardings) every host reads only its own shards."""
  with ocp.StandardCheckpointer() as checkpointer:
    return checkpointer.restore(os.path.abspath(path), abstract_params)


def _format_of(path: str) -> str:
  if path.endswith(".npz"):
    return "npz"
  if os.path.isdir(path):
    names = set(os.listdir(path))
    if "config.json" in names and any(n.endswith(".safetensors") or n.endswith(
        ".safetensors.index.json") for n in names):
      return "hf"
    if "checkpoint" in names and not os.path.isdir(os.path.join(path, "checkpoint")):
      return "t5x"
    if "_CHECKPOINT_METADATA" in names and any(n.startswith("target") or n == "state"
                                               for n in names):
      return "t5x"
    # T5X's `state` item itself, or a T5X checkpoints directory (`checkpoint_<step>/...`).
    parent = os.path.dirname(os.path.abspath(path))
    if os.path.basename(os.path.abspath(path)) == "state" and os.path.exists(
        os.path.join(parent, "_CHECKPOINT_METADATA")):
      return "t5x"
    if any(n.startswith("checkpoint_") and n[len("checkpoint_"):].isdigit() for n in names):
      return "t5x"
    return "orbax"
  if os.path.basename(path) == "checkpoint" and os.path.isfile(path):
    return "t5x"  # the msgpack file of a legacy T5X checkpoint
  raise ValueError(f"INITIAL_CHECKPOINT_PATH {path!r} is neither a .npz file nor a directory")


def load_frozen_params(path: str, config, abstract_params: Optional[Mapping] = None,
                       partitioner=None) -> dict:
  """Frozen T5 parameters from `path`: a `.npz`, our Orbax directory, a T5X checkpoint or a
  Hugging Face directory. With `abstract_params`, shapes are checked against it and only the
  leaves it names are returned.

  Orbax and T5X checkpoints are read shard by shard when `abstract_params` carry shardings
  (Orbax) or a `partitioner` is given (T5X): each host reads only its own slices."""
  path = resolve_path(path)
  fmt = _format_of(path)
  if fmt == "npz":
    params = load_params_npz(path)
  elif fmt == "orbax":
    params = load_params_orbax(path, abstract_params)
  elif fmt == "t5x":
    from prompt_jax.interop import t5x  # pylint: disable=g-import-not-at-top
    params = t5x.load_params(path, config, partitioner)
  else:
    from prompt_jax.interop import hf  # pylint: disable=g-import-not-at-top
    hf_config, params = hf.load_t5(path)
    if hf_config != config:
      log.warning("Hugging Face config %s differs from the configured %s", hf_config, config)
  if abstract_params is not None:
    params = select_checked(params, abstract_params, path)
  return params


def select_checked(params: Mapping, abstract_params: Mapping, source: str) -> dict:
  """The leaves of `params` that `abstract_params` names, after checking their shapes: raise at
  the first missing or mis-shaped path (naming both shapes); extra leaves are logged, dropped."""
  got = flax.traverse_util.flatten_dict(flax.core.unfreeze(params), sep="/")
  want = flax.traverse_util.flatten_dict(flax.core.unfreeze(abstract_params), sep="/")
  missing = sorted(want.keys() - got.keys())
  if missing:
    raise ValueError(f"checkpoint {source!r} lacks {len(missing)} parameters, first "
                     f"{missing[0]!r}")
  for name in sorted(want):
    if tuple(got[name].shape) != tuple(want[name].shape):
      raise ValueError(f"checkpoint {source!r}: {name} has shape {tuple(got[name].shape)}, "
                       f"the model config expects {tuple(want[name].shape)}")
  extra = sorted(got.keys() - want.keys())
  if extra:
    log.warning("checkpoint %s has %d parameters the model does not use, e.g. %s", source,
                len(extra), extra[0])
  return flax.traverse_util.unflatten_dict({k: got[k] for k in want}, sep="/")


def device_put_tree(params: Mapping, shardings: Any) -> Any:
  return jax.tree_util.tree_map(lambda x, s: jax.device_put(np.asarray(x) if not isinstance(
      x, jax.Array) else x, s), params, shardings)
