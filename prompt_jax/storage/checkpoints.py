"""Checkpoints: the trainable state (Orbax) and the frozen model (referenced by path, never
re-saved).

Layout of a run directory (MODEL_DIR):
  checkpoints/<step>/state     prompt params, optimizer state, step (Orbax, sharded-aware)
  checkpoints/<step>/meta      JSON: data position, frozen checkpoint path, config summary
  prompts/prompt_<step>.npy    each saved prompt as a plain [length, embed] array
"""

from __future__ import annotations

import dataclasses
import importlib.resources
import logging
import os
import zipfile
import zlib
from typing import Any, Mapping, Optional

import flax
import jax
import numpy as np
import orbax.checkpoint as ocp

from prompt_jax import params as params_lib
from prompt_jax.models import layer_stack
from prompt_jax.storage import run_dir

log = logging.getLogger(__name__)

BUILTIN_PREFIX = "builtin:"


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
    saved = self.manager.item_metadata(step)["state"]
    abstract = jax.tree_util.tree_map(
        lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=replicated),
        dict(getattr(saved, "tree", saved)), is_leaf=lambda x: hasattr(x, "shape"))
    abstract["prompt_params"] = prompt_structs
    restored = self.manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract)))
    return restored["state"]["prompt_params"]

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


# ------------------------------------------------------------------------- frozen model loading


def resolve_path(path: str) -> str:
  """`builtin:<name>` names a model shipped in the package (`prompt_jax/assets/<name>`)."""
  if not isinstance(path, (str, os.PathLike)) or not str(path):
    raise ValueError(f"INITIAL_CHECKPOINT_PATH must be a path, got {path!r}")
  path = os.fspath(path)
  if path.startswith(BUILTIN_PREFIX):
    name = path[len(BUILTIN_PREFIX):]
    resolved = importlib.resources.files("prompt_jax") / "assets" / name
    if not resolved.is_file() and not resolved.is_dir():
      shipped = sorted(p.name for p in (importlib.resources.files("prompt_jax") / "assets")
                       .iterdir())
      raise ValueError(f"no built-in checkpoint {name!r} in prompt_jax/assets; shipped: "
                       f"{', '.join(shipped) or 'none'}")
    return str(resolved)
  return path


def save_params_npz(params: Mapping, path: str) -> None:
  """A parameter tree as one `.npz` with '/'-joined T5X names (small models only), written
  atomically (a kill leaves the old file or the new one)."""
  flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(params), sep="/")
  run_dir.write_npz(path, {k: np.asarray(v) for k, v in flat.items()})


def load_params_npz(path: str) -> dict:
  """The parameter tree of a `.npz` written by `save_params_npz`; a missing, truncated or
  corrupt file raises one line naming it."""
  try:
    with open(path, "rb") as f:
      magic = f.read(6)
  except FileNotFoundError as e:
    raise FileNotFoundError(f"checkpoint {path!r} does not exist") from e
  if magic == b"\x93NUMPY":
    raise ValueError(f"checkpoint {path!r} holds a single .npy array, not a .npz archive of "
                     "named parameters")
  if not magic.startswith(b"PK"):
    raise ValueError(f"checkpoint {path!r} is not a .npz archive (first bytes {magic!r}); "
                     "truncated, corrupt or another format")
  try:
    data = np.load(path, allow_pickle=False)
  except (ValueError, OSError, EOFError, zipfile.BadZipFile) as e:
    raise ValueError(f"checkpoint {path!r} is not a readable .npz archive, truncated or corrupt "
                     f"({_reason(e)})") from e
  with data:
    try:
      flat = {k: data[k] for k in data.files}
    except (ValueError, OSError, EOFError, KeyError, zipfile.BadZipFile, zlib.error) as e:
      raise ValueError(f"checkpoint {path!r} is truncated or corrupt ({_reason(e)})") from e
  if not flat:
    raise ValueError(f"checkpoint {path!r} is an empty .npz archive (no parameters)")
  return flax.traverse_util.unflatten_dict(flat, sep="/")


def _reason(error: BaseException) -> str:
  """The first line of an exception from a reader, for a one-line message."""
  return (str(error).strip().splitlines() or [type(error).__name__])[0]


def save_params_orbax(params: Mapping, path: str) -> None:
  """A frozen parameter tree as an Orbax checkpoint directory (sharded arrays welcome)."""
  with ocp.StandardCheckpointer() as checkpointer:
    checkpointer.save(os.path.abspath(path), params)


def load_params_orbax(path: str, abstract_params: Optional[Mapping] = None) -> dict:
  """Restore an Orbax parameter tree; with `abstract_params` (ShapeDtypeStructs with
  shardings) every host reads only its own shards."""
  with ocp.StandardCheckpointer() as checkpointer:
    return checkpointer.restore(os.path.abspath(path), abstract_params)


ORBAX_MARKERS = ("_METADATA", "_CHECKPOINT_METADATA", "manifest.ocdbt", "checkpoint",
                 "_sharding")


def _format_of(path: str) -> str:
  if not os.path.exists(path):
    raise FileNotFoundError(f"INITIAL_CHECKPOINT_PATH {path!r} does not exist")
  if path.endswith(".npz") and not os.path.isdir(path):
    return "npz"
  if os.path.isdir(path):
    names = set(os.listdir(path))
    if not names:
      raise ValueError(f"INITIAL_CHECKPOINT_PATH {path!r} is an empty directory, not a "
                       "checkpoint")
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
    if "config.json" in names:
      return "hf"  # `hf.read_tensors` says which weights are missing
    if not names & set(ORBAX_MARKERS):
      raise ValueError(f"INITIAL_CHECKPOINT_PATH {path!r} is not a checkpoint directory: no "
                       "Orbax metadata (_METADATA, manifest.ocdbt), T5X checkpoint or Hugging "
                       f"Face config.json; found {sorted(names)[:10]}")
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
  # Files hold T5X's per-layer layout (`layers_{i}`); a scanned model (config.scan_layers)
  # gets its blocks stacked after reading (`layer_stack`). Orbax directories may hold either.
  per_layer_config = None if config is None else config.replace(scan_layers=False)
  if fmt == "npz":
    params = load_params_npz(path)
  elif fmt == "orbax":
    on_disk = abstract_params
    if abstract_params is not None:  # read in the checkpoint's layout, convert below
      on_disk = layer_stack.as_layout_of(abstract_params, _orbax_tree(path))
    params = load_params_orbax(path, on_disk)
  elif fmt == "t5x":
    from prompt_jax.interop import t5x  # pylint: disable=g-import-not-at-top
    params = t5x.load_params(path, per_layer_config, partitioner)
  else:
    from prompt_jax.interop import hf  # pylint: disable=g-import-not-at-top
    hf_config, params = hf.load_t5(path)
    if hf_config != per_layer_config:
      log.warning("Hugging Face config %s differs from the configured %s", hf_config, config)
  if abstract_params is not None:
    params = layer_stack.as_layout_of(params, abstract_params)
    params = select_checked(params, abstract_params, path)
  elif config is not None and config.scan_layers:
    params = layer_stack.stack_layers(params)
  return params


def _orbax_tree(path: str) -> Mapping:
  """The nested parameter names of an Orbax checkpoint (from its metadata, no array read)."""
  with ocp.StandardCheckpointer() as checkpointer:
    metadata = checkpointer.metadata(os.path.abspath(path)).item_metadata
  return getattr(metadata, "tree", metadata)


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
