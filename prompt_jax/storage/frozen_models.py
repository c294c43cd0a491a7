"""The frozen model's parameters from every format: a `.npz`, an Orbax directory, a T5X
checkpoint, a Hugging Face directory, a Hugging Face Hub name (`hf://OWNER/NAME[@REVISION]`,
`hub`) or `builtin:<name>` (a model shipped in the package); checked against the configured
model's shapes and stacked for scanned layers. A Hugging Face checkpoint also carries its
architecture (config.json) and vocabulary (spiece.model): `checkpoint_model`.
"""

from __future__ import annotations

import importlib.resources
import logging
import os
import zipfile
import zlib
from typing import TYPE_CHECKING, Any, Mapping, NamedTuple, Optional

import flax
import jax
import numpy as np
import orbax.checkpoint as ocp
from safetensors import SafetensorError, safe_open

from prompt_jax.interop import hf, t5x
from prompt_jax.models import layer_stack, t5
from prompt_jax.storage import hub, run_dir

if TYPE_CHECKING:  # annotations only: seqio is imported where a vocabulary is made
  import seqio

log = logging.getLogger(__name__)

BUILTIN_PREFIX = "builtin:"


def resolve_path(path: str) -> str:
  """The local path of a frozen checkpoint: `builtin:<name>` names a model shipped in the
  package (`prompt_jax/assets/<name>`), `hf://OWNER/NAME[@REVISION]` a Hugging Face Hub model
  (its snapshot directory in the Hub cache, downloaded if needed: `hub.snapshot_dir`); other
  paths are returned as given."""
  if not isinstance(path, (str, os.PathLike)) or not str(path):
    raise ValueError(f"INITIAL_CHECKPOINT_PATH must be a path, got {path!r}")
  path = os.fspath(path)
  if hub.is_hub_name(path):
    return hub.snapshot_dir(path)
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


def recorded_path(path: Optional[str]) -> Optional[str]:
  """How a run records its frozen checkpoint: a Hub name pinned to the commit it resolves to
  (`hf://OWNER/NAME@<commit>`: a resume or `eval --model_dir` finds the same files however the
  branch moves); any other path as given."""
  return hub.pinned_name(path) if hub.is_hub_name(path) else path


class CheckpointModel(NamedTuple):
  """What a frozen checkpoint says about itself (`checkpoint_model`)."""

  config: Optional[t5.T5Config]  # from config.json (its dropout_rate included)
  vocabulary: Optional[seqio.Vocabulary]  # its spiece.model
  path: str  # the local path (`resolve_path`)


def checkpoint_model(path: str) -> CheckpointModel:
  """(T5Config, vocabulary, local path) of a frozen checkpoint. A Hugging Face directory or Hub
  name carries its architecture (config.json, as `interop.hf.load_t5` derives it, without
  reading the weights) and, when it holds one, its SentencePiece vocabulary (spiece.model, with
  T5's 100 sentinel ids when the embedding has room for them); other formats (`.npz`, Orbax,
  T5X, `builtin:`) give (None, None, local path)."""
  local = resolve_path(path)
  if _format_of(local) != "hf":
    return CheckpointModel(None, None, local)
  config = _config_json_t5(local, path)
  return CheckpointModel(config, _spiece_vocabulary(local, config, path), local)


def checkpoint_t5_config(path: Optional[str], dropout_rate: Optional[float] = None,
                         dtype: str = "float32", remat_policy: str = "none",
                         scan_layers: bool = False) -> t5.T5Config:
  """The T5Config of the Hugging Face checkpoint `path` (a directory or `hf://` name: its
  config.json) with the run's settings; `dropout_rate` None keeps config.json's. The
  `t5.Transformer.config` of gin_configs/models/hf/from_checkpoint.gin."""
  if not path:
    raise ValueError("models/hf/from_checkpoint.gin takes the architecture from the frozen "
                     "checkpoint's config.json: set INITIAL_CHECKPOINT_PATH to hf://OWNER/NAME "
                     "or a Hugging Face model directory")
  local = resolve_path(path)
  if _format_of(local) != "hf":
    raise ValueError(f"INITIAL_CHECKPOINT_PATH {path!r} has no config.json to take the "
                     "architecture from (not a Hugging Face model); use a model gin file from "
                     "models/ (e.g. models/t5_1_1_base.gin) instead")
  changes: dict[str, Any] = {"dtype": dtype, "remat_policy": remat_policy,
                             "scan_layers": scan_layers}
  if dropout_rate is not None:
    changes["dropout_rate"] = dropout_rate
  return _config_json_t5(local, path).replace(**changes)


def checkpoint_vocabulary(path: Optional[str]) -> seqio.Vocabulary:
  """The SentencePiece vocabulary (spiece.model) of the Hugging Face checkpoint `path`: the
  `VOCABULARY` of gin_configs/models/hf/from_checkpoint.gin."""
  vocabulary = checkpoint_model(path).vocabulary if path else None
  if vocabulary is None:
    raise ValueError(f"INITIAL_CHECKPOINT_PATH {path!r} has no spiece.model to be VOCABULARY; "
                     "bind VOCABULARY yourself (e.g. --gin.VOCABULARY=@seqio.ByteVocabulary())")
  return vocabulary


def _config_json_t5(directory: str, source: str) -> t5.T5Config:
  """`interop.hf.load_t5`'s T5Config of a Hugging Face directory, from config.json and the
  names (rarely the values) of the output-layer tensors."""
  values = hf.read_json(os.path.join(directory, "config.json"), "a JSON object of T5 settings")
  try:
    return hf.t5_config(values, _logits_via_embedding(directory, values))
  except ValueError as e:
    raise ValueError(f"{source!r}: {e}") from e


def _logits_via_embedding(directory: str, values: Mapping) -> bool:
  """`load_t5`'s rule: the output is scaled (`scale_decoder_outputs`) and `lm_head.weight` is
  absent or equal to `shared.weight`. Only those two tensors are read, and only when needed."""
  if not hf.scales_decoder_outputs(dict(values)):
    return False
  files = _tensor_files(directory)
  if "lm_head.weight" not in files:
    return True
  if "shared.weight" not in files:
    return False
  return bool(np.array_equal(_read_tensor(files["lm_head.weight"], "lm_head.weight"),
                             _read_tensor(files["shared.weight"], "shared.weight")))


def _tensor_files(directory: str) -> dict[str, str]:
  """Tensor name -> the safetensors file holding it (from the shard index or the file's
  header); empty when the directory has no safetensors weights."""
  index = os.path.join(directory, "model.safetensors.index.json")
  single = os.path.join(directory, "model.safetensors")
  if os.path.exists(index):
    weight_map = hf.read_json(index).get("weight_map")
    if not isinstance(weight_map, dict):
      raise ValueError(f"{index}: expected a 'weight_map' object of tensor name -> shard file")
    return {name: os.path.join(directory, str(file)) for name, file in weight_map.items()}
  if not os.path.exists(single):
    return {}
  try:
    with safe_open(single, framework="numpy") as f:
      return dict.fromkeys(f.keys(), single)
  except (SafetensorError, OSError, ValueError) as e:
    raise ValueError(f"{single}: not a readable safetensors file, truncated or corrupt "
                     f"({_reason(e)})") from e


def _read_tensor(file: str, name: str) -> np.ndarray:
  try:
    with safe_open(file, framework="numpy") as f:
      return f.get_tensor(name)
  except (SafetensorError, OSError, ValueError, TypeError) as e:
    raise ValueError(f"{file}: cannot read tensor {name!r} ({_reason(e)})") from e


T5_SENTINELS = 100  # the extra ids T5's tokenizers add after the SentencePiece pieces


def _spiece_vocabulary(directory: str, config: t5.T5Config,
                       source: str) -> Optional[seqio.SentencePieceVocabulary]:
  # seqio (and TensorFlow with it) is imported here, not at the top: the speed benchmarks load
  # this module through `programs` on machines without TensorFlow or seqio
  # (tests/test_benchmark_imports.py), and only a Hugging Face checkpoint needs a vocabulary.
  import sentencepiece  # pylint: disable=g-import-not-at-top
  import seqio  # pylint: disable=g-import-not-at-top
  path = os.path.join(directory, "spiece.model")
  if not os.path.isfile(path):
    return None
  try:
    pieces = sentencepiece.SentencePieceProcessor(model_file=path).get_piece_size()
  except (RuntimeError, OSError, ValueError) as e:
    raise ValueError(f"{source!r}: {path} is not a SentencePiece model ({_reason(e)})") from e
  extra_ids = T5_SENTINELS if pieces + T5_SENTINELS <= config.vocab_size else 0
  return seqio.SentencePieceVocabulary(path, extra_ids=extra_ids)


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
    params = t5x.load_params(path, per_layer_config, partitioner)
  else:
    hf_config, params = hf.load_t5(path)
    if config is not None and _architecture(hf_config) != _architecture(config):
      log.warning("Hugging Face config %s differs from the configured %s", hf_config, config)
  if abstract_params is not None:
    params = layer_stack.as_layout_of(params, abstract_params)
    params = select_checked(params, abstract_params, path)
  elif config is not None and config.scan_layers:
    params = layer_stack.stack_layers(params)
  return params


def _architecture(config: t5.T5Config) -> t5.T5Config:
  """`config` without the run's settings (dropout, activation dtype, remat, layer layout)."""
  return config.replace(dropout_rate=0.0, dtype="float32", remat_policy="none",
                        scan_layers=False)


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
