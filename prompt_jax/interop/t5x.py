"""T5X checkpoints: read the `target` parameters (never the optimizer state) of both formats, and
write parameters (e.g. a prompt) in T5X's legacy format.

Formats, for a checkpoint directory `checkpoint_<step>/`:
  legacy  `checkpoint`: msgpack of {'version': 3, 'optimizer': {'target': params,
          'state': {'step', 'param_states'}}}. Small arrays are inline (flax's ndarray extension);
          large ones are zarr arrays in sibling directories `target.<dotted.path>/`, referenced
          by a tensorstore spec leaf {'driver': 'zarr', 'kvstore': {'driver': 'file'|'gfile'|
          'gcs', 'path': <relative>}, 'metadata': {...}}.
  Orbax   `state/`: an Orbax PyTree (OCDBT) holding T5X's `train_state.state_dict()`, i.e.
          {'target': params, 'state': {'step', 'param_states'}}, beside `_CHECKPOINT_METADATA`
          (what `t5x.checkpoints.OrbaxCheckpointManagerInterface` writes).

With a mesh, every leaf is restored straight into its `NamedSharding` (from the parameters'
logical axes and the partitioner's rules): each host reads only the slices its devices hold.
"""

from __future__ import annotations

import logging
import os
import re
from typing import Any, Callable, Mapping, Optional, Union

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import msgpack
import numpy as np
import orbax.checkpoint as ocp
import tensorstore as ts
from etils import epath
from jax.sharding import Mesh, NamedSharding

from prompt_jax import partitioning
from prompt_jax.models import t5

log = logging.getLogger(__name__)

PROMPT_PATH = "encoder/prompt/prompt/prompt"
MSGPACK_FILE = "checkpoint"
STATE_ITEM = "state"
VERSION = 3
_CHECKPOINT_DIR = re.compile(r"^checkpoint_(\d+)$")

MeshOrPartitioner = Union[None, Mesh, partitioning.Partitioner]


# ------------------------------------------------------------------------- finding a checkpoint


def locate(path: str) -> tuple[str, str]:
  """-> ('legacy', directory holding the msgpack) or ('orbax', the `state` item directory).

  `path` may be the msgpack file, a `checkpoint_<step>` directory, its `state` item, or a
  directory of `checkpoint_<step>` directories (the latest step is taken)."""
  path = os.path.abspath(os.path.expanduser(path))
  if os.path.isfile(path) and os.path.basename(path) == MSGPACK_FILE:
    return "legacy", os.path.dirname(path)
  if not os.path.isdir(path):
    raise FileNotFoundError(f"T5X checkpoint {path!r} does not exist")
  names = set(os.listdir(path))
  if MSGPACK_FILE in names and os.path.isfile(os.path.join(path, MSGPACK_FILE)):
    return "legacy", path
  if STATE_ITEM in names and os.path.isdir(os.path.join(path, STATE_ITEM)):
    return "orbax", os.path.join(path, STATE_ITEM)
  if "_METADATA" in names or "manifest.ocdbt" in names:
    return "orbax", path
  steps = sorted((int(m.group(1)), n) for n in names if (m := _CHECKPOINT_DIR.match(n)))
  if steps:
    return locate(os.path.join(path, steps[-1][1]))
  raise ValueError(f"{path!r} is not a T5X checkpoint: expected a '{MSGPACK_FILE}' file (legacy) "
                   f"or a '{STATE_ITEM}' directory (Orbax), found {sorted(names)[:10]}")


def is_t5x_checkpoint(path: str) -> bool:
  try:
    locate(path)
  except (ValueError, FileNotFoundError):
    return False
  return True


# --------------------------------------------------------------------------- the legacy format


def _is_ts_spec(value: Any) -> bool:
  return isinstance(value, dict) and {"driver", "kvstore"} <= value.keys()


def _read_msgpack(directory: str) -> dict:
  path = os.path.join(directory, MSGPACK_FILE)
  with open(path, "rb") as f:
    data = f.read()
  try:
    contents = flax.serialization.msgpack_restore(data)
  except (ValueError, TypeError, msgpack.UnpackException) as e:
    reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
    raise ValueError(f"{path}: not a readable T5X msgpack checkpoint, truncated or corrupt "
                     f"({reason})") from e
  if not isinstance(contents, dict):
    raise ValueError(f"{directory}/{MSGPACK_FILE} does not hold a T5X state dict")
  return contents


def _legacy_state_dict(contents: dict, directory: str) -> dict:
  """{'target', 'state'} from the msgpack (version >= 2 nests them under 'optimizer')."""
  if "optimizer" in contents:
    version = contents.get("version", 0)
    if version < 2:
      raise ValueError(f"{directory}: T5X checkpoint version {version} is not supported (>= 2)")
    contents = contents["optimizer"]
  if "target" not in contents:
    raise ValueError(f"{directory}/{MSGPACK_FILE} has no 'target' (found {sorted(contents)})")
  return contents


def _absolute_spec(spec: dict, directory: str, dtype) -> dict:
  """A checkpoint's relative tensorstore spec -> one that opens it from `directory`."""
  spec = jax.tree_util.tree_map(lambda x: x, spec)  # a copy
  metadata = spec.get("metadata", {})
  if metadata.get("dtype") == "<u2" or spec.get("dtype") == "uint16":
    raise ValueError(f"{directory}: uint16-encoded bfloat16 arrays (T5X checkpoint version 2) "
                     "are not supported; re-save the checkpoint with T5X version 3")
  kvstore = dict(spec.get("kvstore", {}))
  relative = kvstore.pop("path", None) or spec.pop("path", None)
  if relative is None:
    raise ValueError(f"{directory}: tensorstore spec without a path: {spec}")
  # Local files, whatever the writer's driver ('file', 'gfile', 'gcs' with a dummy bucket).
  kvstore = {"driver": "file", "path": os.path.join(directory, relative)}
  # Only the array is needed; its own .zarray describes chunks and compression.
  opened = {"driver": spec.get("driver", "zarr"), "kvstore": kvstore}
  return {"driver": "cast", "base": opened, "dtype": jnp.dtype(dtype).name}


class _LegacyLeaf:
  """One parameter of a legacy checkpoint: inline array or tensorstore, read on demand."""

  def __init__(self, value: Any, directory: str, dtype):
    self.dtype = np.dtype(dtype)
    self._array, self._store = None, None
    if _is_ts_spec(value):
      self._store = ts.open(_absolute_spec(value, directory, dtype), open=True,
                            read=True).result()
      self.shape = tuple(int(n) for n in self._store.shape)
    else:
      self._array = np.asarray(value)
      self.shape = self._array.shape

  def read(self, index: tuple = ()) -> np.ndarray:
    """The whole array, or the slice `index` (a tuple of slices)."""
    if self._store is not None:
      return np.asarray(self._store[index].read().result() if index else
                        self._store.read().result(), dtype=self.dtype)
    return np.asarray(self._array[index] if index else self._array, dtype=self.dtype)


def _legacy_target(directory: str, dtype) -> dict[str, _LegacyLeaf]:
  state = _legacy_state_dict(_read_msgpack(directory), directory)
  flat = flax.traverse_util.flatten_dict(state["target"], sep="/",
                                         is_leaf=lambda _, v: _is_ts_spec(v))
  return {k: _LegacyLeaf(v, directory, dtype) for k, v in flat.items()}


# ---------------------------------------------------------------------------- the Orbax format


def _orbax_metadata(state_dir: str) -> dict[str, tuple[int, ...]]:
  """'/'-joined path -> shape of every `target` leaf of a T5X Orbax checkpoint."""
  metadata = ocp.PyTreeCheckpointHandler().metadata(epath.Path(state_dir))
  tree = getattr(metadata, "tree", metadata)
  if "target" not in tree:
    raise ValueError(f"{state_dir}: T5X Orbax state has no 'target' (found {sorted(tree)})")
  flat = flax.traverse_util.flatten_dict(dict(tree["target"]), sep="/")
  return {k: tuple(getattr(v, "shape", ()) or ()) for k, v in flat.items()}


def _orbax_restore(state_dir: str, wanted: dict[str, Any], dtype,
                   shardings: Optional[dict[str, NamedSharding]]) -> dict[str, Any]:
  """Restore only the `target` leaves in `wanted` (path -> ShapeDtypeStruct)."""
  item, restore_args = {}, {}
  for name, shape_dtype in wanted.items():
    if shardings is None:
      item[name] = np.zeros((), dtype)  # only the type matters for a NumPy restore
      restore_args[name] = ocp.RestoreArgs(restore_type=np.ndarray, dtype=dtype)
    else:
      item[name] = jax.ShapeDtypeStruct(shape_dtype.shape, dtype, sharding=shardings[name])
      restore_args[name] = ocp.ArrayRestoreArgs(sharding=shardings[name], dtype=dtype,
                                                global_shape=tuple(shape_dtype.shape))
  unflat = lambda d: {"target": flax.traverse_util.unflatten_dict(d, sep="/")}
  with ocp.PyTreeCheckpointer() as checkpointer:
    restored = checkpointer.restore(
        os.path.abspath(state_dir),
        args=ocp.args.PyTreeRestore(item=unflat(item), restore_args=unflat(restore_args),
                                    partial_restore=True))
  return flax.traverse_util.flatten_dict(restored["target"], sep="/")


def _orbax_step(state_dir: str) -> Optional[int]:
  with ocp.PyTreeCheckpointer() as checkpointer:
    try:
      restored = checkpointer.restore(
          os.path.abspath(state_dir),
          args=ocp.args.PyTreeRestore(item={"state": {"step": np.zeros((), np.int64)}},
                                      restore_args={"state": {"step": ocp.RestoreArgs(
                                          restore_type=np.ndarray)}},
                                      partial_restore=True))
    except (KeyError, ValueError, FileNotFoundError):
      return None
  return int(np.asarray(restored["state"]["step"]))


# ------------------------------------------------------------------------------ public reading


def abstract_params(config: t5.T5Config) -> dict:
  """The model's parameters (no prompt) as boxed ShapeDtypeStructs with logical axes."""
  module = t5.Transformer(config)
  tokens = jnp.ones((1, 2), jnp.int32)
  init = lambda rng: module.init(rng, tokens, tokens, tokens, enable_dropout=False)
  return jax.eval_shape(init, jax.random.key(0))["params"]


def _shardings(boxed: Mapping, mesh_or_partitioner: MeshOrPartitioner) -> Optional[dict]:
  if mesh_or_partitioner is None:
    return None
  if isinstance(mesh_or_partitioner, Mesh):
    specs = nn.get_partition_spec(boxed)
    tree = nn.logical_to_mesh_sharding(specs, mesh_or_partitioner,
                                       partitioning.standard_logical_axis_rules())
  elif isinstance(mesh_or_partitioner, partitioning.Partitioner):
    tree = mesh_or_partitioner.shardings_for(boxed)
  else:
    raise ValueError(f"mesh_or_partitioner must be a jax.sharding.Mesh, a Partitioner or None, "
                     f"got {type(mesh_or_partitioner).__name__}")
  return flax.traverse_util.flatten_dict(flax.core.unfreeze(tree), sep="/")


def check_shapes(found: Mapping[str, tuple], wanted: Mapping[str, tuple], source: str,
                 ignore: Callable[[str], bool] = lambda name: False) -> None:
  """Raise ValueError at the first (sorted) path that is missing, extra or mis-shaped."""
  for name in sorted(wanted):
    if name not in found:
      raise ValueError(f"T5X checkpoint {source!r} lacks the parameter {name!r} (shape "
                       f"{tuple(wanted[name])} in the model config)")
    if tuple(found[name]) != tuple(wanted[name]):
      raise ValueError(f"T5X checkpoint {source!r}: {name} has shape {tuple(found[name])}, the "
                       f"model config expects {tuple(wanted[name])}")
  extra = sorted(k for k in found.keys() - wanted.keys() if not ignore(k))
  if extra:
    raise ValueError(f"T5X checkpoint {source!r} has {len(extra)} parameters the model config "
                     f"does not define, first {extra[0]!r} with shape {tuple(found[extra[0]])}")


def _is_prompt(name: str) -> bool:
  return re.search(r"(^|/)prompt(/|$)", name) is not None


def load_params(path: str, config: t5.T5Config, mesh_or_partitioner: MeshOrPartitioner = None,
                *, dtype=jnp.float32) -> dict:
  """The frozen T5 parameters (T5X names) of a T5X checkpoint, legacy or Orbax.

  Only `target` is read; a prompt in it (`encoder/prompt/...`) is skipped (see `load_prompt`).
  Every shape is checked against `config` first. Without `mesh_or_partitioner` the leaves are
  NumPy arrays; with one they are `jax.Array`s in the parameters' shardings, each host reading
  only its own shards."""
  kind, directory = locate(path)
  boxed = abstract_params(config)
  wanted = flax.traverse_util.flatten_dict(nn.unbox(boxed), sep="/")
  shardings = _shardings(boxed, mesh_or_partitioner)
  if kind == "legacy":
    leaves = _legacy_target(directory, dtype)
    check_shapes({k: v.shape for k, v in leaves.items()},
                 {k: v.shape for k, v in wanted.items()}, directory, _is_prompt)
    if shardings is None:
      flat = {name: leaves[name].read() for name in wanted}
    else:
      flat = {name: _sharded_array(leaves[name], shardings[name]) for name in wanted}
  else:
    check_shapes(_orbax_metadata(directory), {k: v.shape for k, v in wanted.items()}, directory,
                 _is_prompt)
    flat = _orbax_restore(directory, wanted, jnp.dtype(dtype), shardings)
  return flax.traverse_util.unflatten_dict(flat, sep="/")


def _sharded_array(leaf: _LegacyLeaf, sharding: NamedSharding) -> jax.Array:
  """A global jax.Array whose addressable shards are read one slice at a time (replicas of the
  same slice are read once)."""
  cache: dict[str, np.ndarray] = {}

  def read(index: tuple) -> np.ndarray:
    key = repr(index)
    if key not in cache:
      cache[key] = leaf.read(index)
    return cache[key]

  return jax.make_array_from_callback(leaf.shape, sharding, read)


def checkpoint_step(path: str) -> Optional[int]:
  """The training step a T5X checkpoint was written at (None if it records none)."""
  kind, directory = locate(path)
  if kind == "legacy":
    step = _legacy_state_dict(_read_msgpack(directory), directory).get("state", {}).get("step")
    return None if step is None else int(np.asarray(step))
  return _orbax_step(directory)


def load_prompt(path: str, name: Optional[str] = None) -> np.ndarray:
  """The prompt of a T5X prompt-tuning checkpoint (`target/encoder/prompt/prompt/prompt`), or
  the `target` leaf `name`, as a float32 array.

  Without `name`, a checkpoint that holds other prompt parameters too (a reparameterised method
  such as Residual or SuperPos, or deep prompts) logs a warning: the raw prompt is not what the
  encoder sees; `prompt-jax export-prompt --t5x_checkpoint=...` (without it for our own
  runs) folds it."""
  warn = name is None
  name = PROMPT_PATH if name is None else name
  kind, directory = locate(path)
  if kind == "legacy":
    leaves = _legacy_target(directory, np.float32)
    names = list(leaves)
  else:
    shapes = _orbax_metadata(directory)
    names = list(shapes)
  if name not in names:
    prompts = sorted(k for k in names if _is_prompt(k))
    raise ValueError(f"T5X checkpoint {directory!r} has no {name!r}; its prompt parameters "
                     f"are {prompts or 'none'}")
  others = sorted(k for k in names if k != name and k.startswith("encoder/prompt/"))
  if warn and others:
    log.warning("T5X checkpoint %s holds %d prompt parameters besides %s (e.g. %s): the prompt "
                "is reparameterised (Residual, SuperPos, deep prompts), so the raw prompt read "
                "here is not what the encoder sees. Fold it with `prompt-jax export-prompt "
                "--t5x_checkpoint=...` (without --t5x_checkpoint for a prompt_jax run "
                "directory).", directory, len(others), name, others[0])
  if kind == "legacy":
    return leaves[name].read()
  wanted = {name: jax.ShapeDtypeStruct(shapes[name], np.float32)}
  return np.asarray(_orbax_restore(directory, wanted, np.dtype(np.float32), None)[name])


# ------------------------------------------------------------------------------------- writing


def save_params(params: Mapping, directory: str, step: int, *, inline_max_size: int = 256,
                param_states: Optional[Mapping] = None) -> str:
  """Write `params` (T5X names) as a legacy T5X checkpoint `directory/checkpoint_<step>/`.

  Arrays with more than `inline_max_size` values go to zarr directories `target.<dotted.path>`
  (their own dtype, e.g. `<f4` or `bfloat16`; gzip level 1), as T5X writes them; smaller ones
  are inline in the msgpack.
  `param_states`: optional optimizer state to record (T5X's `state/param_states`); by default an
  empty dict. Returns the checkpoint directory."""
  if step < 0:
    raise ValueError(f"save_params: step must be >= 0, got {step}")
  checkpoint_dir = os.path.join(os.path.abspath(directory), f"checkpoint_{int(step)}")
  os.makedirs(checkpoint_dir, exist_ok=True)
  flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(params), sep="/")
  target: dict[str, Any] = {}
  for name, value in flat.items():
    array = np.asarray(value)
    if array.size <= inline_max_size or array.ndim == 0:
      target[name] = array
      continue
    relative = "target." + name.replace("/", ".")
    dtype = "bfloat16" if array.dtype == jnp.bfloat16 else array.dtype.str
    metadata = {"chunks": list(array.shape), "compressor": {"id": "gzip", "level": 1},
                "dtype": dtype, "shape": list(array.shape)}
    store = ts.open({"driver": "zarr",
                     "kvstore": {"driver": "file", "path": os.path.join(checkpoint_dir, relative)},
                     "metadata": metadata}, create=True, delete_existing=True).result()
    store.write(array).result()
    target[name] = {"driver": "zarr", "dtype": array.dtype.name,
                    "kvstore": {"driver": "file", "path": relative}, "metadata": metadata}
  contents = {"version": VERSION, "optimizer": {
      "target": flax.traverse_util.unflatten_dict(target, sep="/"),
      "state": {"step": np.asarray(step, np.int32),
                "param_states": dict(param_states or {})}}}
  with open(os.path.join(checkpoint_dir, MSGPACK_FILE), "wb") as f:
    f.write(flax.serialization.msgpack_serialize(contents))
  return checkpoint_dir


def save_prompt(prompt: np.ndarray, directory: str, step: int = 0,
                name: str = PROMPT_PATH) -> str:
  """Write a [length, embed] prompt as `target/encoder/prompt/prompt/prompt` of a legacy T5X
  checkpoint `directory/checkpoint_<step>/`; returns that directory."""
  prompt = np.asarray(prompt, dtype=np.float32)
  if prompt.ndim != 2:
    raise ValueError(f"save_prompt: prompt must be [length, embed], got shape {prompt.shape}")
  return save_params(flax.traverse_util.unflatten_dict({name: prompt}, sep="/"), directory, step)
