"""Checkpoints of the trainable state (Orbax); the frozen model is only referenced by path
(`frozen_models` reads it).

Layout of a run directory (MODEL_DIR):
  checkpoints/<step>/state     prompt params, optimizer state, step (Orbax, sharded-aware)
  checkpoints/<step>/meta      JSON: data position, frozen checkpoint path, config summary
  prompts/prompt_<step>.npy    each saved prompt as a plain [length, embed] array
"""

from __future__ import annotations

import dataclasses
import logging
import os
from typing import Any, Mapping, Optional

import flax
import jax
import numpy as np
import orbax.checkpoint as ocp

from prompt_jax import params as params_lib
from prompt_jax.storage import run_dir

log = logging.getLogger(__name__)

# Orbax's words for a saved tree that does not fit the requested one (a configuration mismatch,
# not a damaged file): shapes, or the tree's structure (another method or optimizer).
MISMATCH_SIGNS = ("not compatible with the stored shape", "tree structures do not match",
                  "Dict key mismatch", "Missing keys", "Unexpected keys",
                  "User-provided restore item and on-disk value metadata tree structures")


class CheckpointUnusableError(ValueError):
  """No checkpoint of a run restores to a finite state matching the configured one."""


def best_metric(scores: Mapping[str, float]) -> Optional[tuple[str, bool]]:
  """(name, higher is better) of the validation metric that ranks checkpoints: a mixture's
  average when reported, else the first metric by name; lower is better for losses and
  perplexities. None for no scores."""
  if not scores:
    return None
  averages = sorted(k for k in scores if k.endswith("average"))
  name = averages[0] if averages else sorted(scores)[0]
  return name, not any(word in name for word in ("loss", "perplexity"))


class PromptCheckpointManager:
  """Saves and restores the trainable state of a run every `save_every_steps`, keeping the
  newest `keep` (None: all) and, besides them, the best by validation metric (`best_step`):
  rotation never deletes the best checkpoint.

  Constructing one writes nothing: `checkpoints/` is created by the first save, so reading a
  mistyped MODEL_DIR (eval, export-prompt) leaves no directory behind."""

  def __init__(self, model_dir: str, save_every_steps: int, keep: Optional[int] = 3):
    if save_every_steps < 1:
      raise ValueError(f"checkpoint save_every_steps must be >= 1, got {save_every_steps}")
    if keep is not None and (isinstance(keep, bool) or not isinstance(keep, int) or keep < 1):
      raise ValueError(f"keep_checkpoints must be an integer >= 1 or None (all), got {keep!r}")
    self.model_dir = os.path.abspath(model_dir)
    self.directory = os.path.join(self.model_dir, run_dir.CHECKPOINTS_DIR)
    self.keep = keep
    # Rotation is ours (`rotate`), so that the best checkpoint survives it.
    options = ocp.CheckpointManagerOptions(max_to_keep=None, save_interval_steps=save_every_steps,
                                           create=False, enable_async_checkpointing=False)
    self.manager = ocp.CheckpointManager(
        self.directory, options=options,
        item_handlers={"state": ocp.StandardCheckpointHandler(),
                       "meta": ocp.JsonCheckpointHandler()})

  def latest_step(self) -> Optional[int]:
    return self.manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self.manager.all_steps())

  def save(self, step: int, state: Any, meta: Mapping[str, Any], force: bool = False) -> bool:
    if not all_finite(state):
      raise ValueError(f"refusing to save a non-finite state at step {step}")
    os.makedirs(self.directory, exist_ok=True)
    saved = self.manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(dict(meta))), force=force)
    self.manager.wait_until_finished()
    if saved and self.keep is not None:
      self.rotate()
    return bool(saved)

  def best_step(self, extra: Optional[Mapping[int, Mapping[str, float]]] = None
                ) -> Optional[dict[str, Any]]:
    """{'step', 'metric', 'value'} of the kept checkpoint with the best validation metric (its
    meta's `eval_metrics`, or `extra[step]` for a step evaluated after its save), or None when
    no kept checkpoint was evaluated. Ties go to the earlier step."""
    scored = {}
    for step in self.all_steps():
      scores = (extra or {}).get(step)
      if scores is None:
        try:
          scores = self.restore_meta(step).get("eval_metrics")
        except Exception:  # pylint: disable=broad-except  # unreadable: not a candidate
          scores = None
      if scores:
        scored[step] = scores
    if not scored:
      return None
    name, higher = best_metric(scored[max(scored)])
    candidates = [(step, s[name]) for step, s in sorted(scored.items()) if name in s]
    # max() and min() return the first extreme: of equal scores the earlier step wins
    step, value = (max if higher else min)(candidates, key=lambda c: c[1])
    return {"step": step, "metric": name, "value": value}

  def rotate(self, extra: Optional[Mapping[int, Mapping[str, float]]] = None
             ) -> Optional[dict[str, Any]]:
    """Delete all but the newest `keep` checkpoints and the best one; returns the best
    (`best_step(extra)`). Every save rotates, and the loop again after its final evaluation."""
    best = self.best_step(extra)
    if self.keep is None:
      return best
    steps = sorted(self.all_steps())
    kept = set(steps[-self.keep:])
    if best is not None:
      kept.add(best["step"])
    for step in steps:
      if step not in kept:
        self.manager.delete(step)
    return best

  def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict]:
    """`abstract_state`: a tree of `jax.ShapeDtypeStruct` with shardings, like the saved one.

    A saved state whose shapes differ from `abstract_state` (e.g. another PROMPT_LENGTH) is a
    ValueError naming both shapes."""
    self.check_shapes(step, abstract_state)
    restored = self.manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()))
    return restored["state"], dict(restored["meta"])

  def restore_prompt_params(self, step: int, prompt_structs: Any, replicated: Any) -> Any:
    """Only the prompt parameters of `step`, without knowing the training optimizer: the rest
    of the saved state is read as its metadata describes it (replicated) and dropped.

    `prompt_structs`: ShapeDtypeStructs with shardings of the prompt parameters; a saved prompt
    of another shape is a ValueError naming both shapes."""
    self.check_shapes(step, {"prompt_params": prompt_structs})
    abstract = self._saved_structs(step, replicated)
    abstract["prompt_params"] = prompt_structs
    restored = self.manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract)))
    return restored["state"]["prompt_params"]

  def restore_on_one_device(self, step: int) -> tuple[dict, dict]:
    """(the saved state as a dict of its fields, meta) on this process's first device, however
    many devices saved it (a run trained on 2 host devices is read by a 1-device process)."""
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    restored = self.manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(self._saved_structs(step, device)),
        meta=ocp.args.JsonRestore()))
    return dict(restored["state"]), dict(restored["meta"])

  def _saved_structs(self, step: int, sharding: Any) -> dict:
    """ShapeDtypeStructs of the saved state's leaves (from its metadata), all in `sharding`."""
    saved = self.manager.item_metadata(step)["state"]
    return jax.tree_util.tree_map(
        lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=sharding),
        dict(getattr(saved, "tree", saved)), is_leaf=lambda x: hasattr(x, "shape"))

  def restore_meta(self, step: int) -> dict:
    """Only the JSON metadata of `step` (data position, frozen checkpoint, config)."""
    restored = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
    return dict(restored["meta"])

  def check_shapes(self, step: int, abstract_state: Any) -> None:
    """Raise ValueError naming both shapes where `step`'s saved state differs from
    `abstract_state` (leaves compared by path)."""
    try:
      saved = self.manager.item_metadata(step)["state"]
    except Exception:  # pylint: disable=broad-except
      return  # no readable metadata: the restore itself reports what is wrong
    saved_tree = getattr(saved, "tree", saved)
    if saved_tree is None:
      return
    want = flax.traverse_util.flatten_dict(_as_dict(abstract_state), sep="/")
    got = flax.traverse_util.flatten_dict(_as_dict(saved_tree), sep="/")
    for name, struct in sorted(want.items()):
      shape = getattr(got.get(name), "shape", None)
      if shape is not None and tuple(shape) != tuple(struct.shape):
        raise ValueError(
            f"checkpoint step {step} in {self.directory} holds {name} of shape {tuple(shape)}, "
            f"the configured run expects {tuple(struct.shape)}; use the settings it was "
            "trained with (e.g. PROMPT_LENGTH) or a new MODEL_DIR")

  def restore_latest_good(self, abstract_state: Any) -> Optional[tuple[Any, dict, int]]:
    """(state, meta, step) of the newest checkpoint that restores and is finite, else None when
    there is no checkpoint.

    A checkpoint whose saved tree differs from `abstract_state` (another method, length or
    optimizer) is not a corruption: it raises ValueError at once and nothing is moved. A newer
    checkpoint that fails otherwise (truncated file, missing manifest, non-finite values) is
    reported with the reason and moved aside to MODEL_DIR/unusable_checkpoints/<step> (never
    deleted), so the resumed run can save that step again."""
    steps = sorted(self.all_steps(), reverse=True)
    if not steps:
      return None
    skipped = []
    for step in steps:
      self.check_shapes(step, abstract_state)
      try:
        state, meta = self.restore(step, abstract_state)
        reason = None if all_finite(state) else "it holds NaN or infinite values"
      except ValueError as e:
        if "configured run expects" in str(e):
          raise
        if any(sign in str(e) for sign in MISMATCH_SIGNS):  # a mismatch, not a corruption
          raise ValueError(
              f"checkpoint step {step} in {self.directory} was written by a run with other "
              "settings (another prompt method, prompt length or optimizer: its saved tree "
              "differs from the configured one); nothing was moved. Use the settings it was "
              "trained with or another MODEL_DIR") from e
        reason = _first_line(e)
      except Exception as e:  # pylint: disable=broad-except
        reason = _first_line(e)
      if reason is None:
        return state, meta, step
      moved = self.move_aside(step)
      message = (f"checkpoint step {step} in {self.directory} does not restore ({reason}); "
                 f"moved it to {moved} and trying an older one")
      log.warning(message)
      print(f"warning: {message}", flush=True)
      skipped.append(step)
    raise CheckpointUnusableError(
        f"no checkpoint in {self.directory} restores (tried steps "
        f"{', '.join(map(str, skipped))}; moved to {self.unusable_directory}); use a new "
        "MODEL_DIR or restore them by hand")

  @property
  def unusable_directory(self) -> str:
    return os.path.join(self.model_dir, "unusable_checkpoints")

  def move_aside(self, step: int) -> str:
    """Move `checkpoints/<step>` out of the manager's sight; returns where it went."""
    os.makedirs(self.unusable_directory, exist_ok=True)
    target = os.path.join(self.unusable_directory, str(step))
    suffix = 1
    while os.path.exists(target):
      target = os.path.join(self.unusable_directory, f"{step}.{suffix}")
      suffix += 1
    os.rename(os.path.join(self.directory, str(step)), target)
    self.manager.reload()
    return target

  def close(self):
    self.manager.close()


def _as_dict(tree: Any) -> dict:
  """A state tree (dataclasses, optax namedtuples, dicts) as nested dicts keyed by path names,
  so saved metadata and abstract states compare leaf by leaf."""
  if hasattr(tree, "shape") and hasattr(tree, "dtype"):  # arrays, structs, ArrayMetadata
    return tree
  if isinstance(tree, Mapping):
    return {str(k): _as_dict(v) for k, v in tree.items()}
  if dataclasses.is_dataclass(tree) and not isinstance(tree, type):
    return {f.name: _as_dict(getattr(tree, f.name)) for f in dataclasses.fields(tree)}
  if isinstance(tree, tuple) and hasattr(tree, "_fields"):
    return {name: _as_dict(getattr(tree, name)) for name in tree._fields}
  if isinstance(tree, (list, tuple)):
    return {str(i): _as_dict(v) for i, v in enumerate(tree)}
  return tree


def all_finite(tree: Any) -> bool:
  """True when every floating leaf of `tree` is finite; reduced on the devices, so it works for
  arrays sharded across hosts."""
  return bool(jax.jit(params_lib.tree_all_finite)(tree))


def _first_line(error: BaseException) -> str:
  text = str(error).strip() or type(error).__name__
  return f"{type(error).__name__}: {text.splitlines()[0][:300]}"


def export_prompt_npy(prompt: np.ndarray, model_dir: str, step: int) -> str:
  """Write a [length, embed] prompt as MODEL_DIR/prompts/prompt_<step>.npy (atomically);
  returns the path."""
  path = run_dir.prompt_export_path(model_dir, step)
  return run_dir.write_npy(path, np.asarray(prompt, dtype=np.float32))
