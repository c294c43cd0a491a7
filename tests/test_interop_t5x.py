"""T5X checkpoints: the real legacy checkpoint written by T5X
(../shared/fixtures/t5x_t5_1_1_tiny_legacy/checkpoint_3) loads with every leaf equal to the raw
msgpack/zarr contents (decoded here independently, with msgpack + gzip + NumPy); T5X's Orbax
layout (written here the way `t5x.checkpoints.OrbaxCheckpointManagerInterface` does) loads too;
shape errors name the path; sharded restores put each leaf in its sharding."""

from __future__ import annotations

import gzip
import itertools
import json
import os
import subprocess
import sys
import textwrap

import flax.linen as nn
import jax
import jax.numpy as jnp
import msgpack
import numpy as np
import orbax.checkpoint as ocp
import pytest

from prompt_jax.host_devices import with_device_count
from prompt_jax.interop import t5x
from prompt_jax.models import t5
from prompt_jax.storage import frozen_models
from tests.conftest import REPO_ROOT, shared_fixture

LEGACY = "t5x_t5_1_1_tiny_legacy/checkpoint_3"


def tiny_config() -> t5.T5Config:
  """prompt_tuning/configs/test/t5_1_1_tiny.gin: T5 1.1 base with these overrides."""
  return t5.preset("t5_1_1_base", emb_dim=4, num_heads=2, head_dim=2, mlp_dim=8,
                   num_encoder_layers=2, num_decoder_layers=2,
                   relative_attention_num_buckets=4, relative_attention_max_distance=8)


# ------------------------------------------------------ an independent reader of the raw files


def _ext_hook(code, data):
  if code == 1:  # flax's ndarray extension: msgpack (shape, dtype name, raw bytes)
    shape, dtype, buffer = msgpack.unpackb(data)
    return np.frombuffer(buffer, dtype=dtype).reshape(shape)
  return msgpack.ExtType(code, data)


def _read_zarr(directory: str) -> np.ndarray:
  meta = json.loads(open(os.path.join(directory, ".zarray")).read())
  assert meta["compressor"] == {"id": "gzip", "level": 1} and meta["order"] == "C"
  shape, chunks = meta["shape"], meta["chunks"]
  out = np.zeros(shape, np.dtype(meta["dtype"]))
  grid = [range(-(-s // c)) for s, c in zip(shape, chunks)]
  for index in itertools.product(*grid):
    name = os.path.join(directory, ".".join(map(str, index)))
    chunk = np.frombuffer(gzip.decompress(open(name, "rb").read()), meta["dtype"]).reshape(chunks)
    region = tuple(slice(i * c, min((i + 1) * c, s)) for i, c, s in zip(index, chunks, shape))
    out[region] = chunk[tuple(slice(0, r.stop - r.start) for r in region)]
  return out


def raw_checkpoint(directory: str) -> tuple[dict, dict]:
  """-> (msgpack contents, {'a/b/c': array} of `target` with zarr leaves decoded)."""
  with open(os.path.join(directory, "checkpoint"), "rb") as f:
    contents = msgpack.unpackb(f.read(), ext_hook=_ext_hook, strict_map_key=False)
  flat = {}

  def walk(prefix, node):
    if isinstance(node, dict) and "driver" not in node:
      for key, value in node.items():
        walk(f"{prefix}/{key}" if prefix else key, value)
    elif isinstance(node, dict):
      assert node["kvstore"]["path"] == "target." + prefix.replace("/", ".")
      flat[prefix] = _read_zarr(os.path.join(directory, node["kvstore"]["path"]))
    else:
      flat[prefix] = np.asarray(node)

  walk("", contents["optimizer"]["target"])
  return contents, flat


def _flat(tree) -> dict:
  return {"/".join(k.key for k in path): np.asarray(v)
          for path, v in jax.tree_util.tree_leaves_with_path(tree)}


# ----------------------------------------------------------------- the real legacy checkpoint


def test_legacy_checkpoint_leaves_equal_the_raw_files():
  path = str(shared_fixture(LEGACY))
  contents, raw = raw_checkpoint(path)
  params = _flat(t5x.load_params(path, tiny_config()))
  assert len(raw) == len(params) == 52
  assert sum(v.size for v in params.values()) == 257_856
  for name, value in raw.items():
    assert params[name].dtype == np.float32 and params[name].shape == value.shape, name
    assert params[name].tobytes() == value.astype(np.float32).tobytes(), name
  # The optimizer state is there, and ignored.
  assert contents["version"] == 3 and "param_states" in contents["optimizer"]["state"]
  assert int(contents["optimizer"]["state"]["step"]) == t5x.checkpoint_step(path) == 3


def test_legacy_checkpoint_forward_pass_is_finite():
  path = str(shared_fixture(LEGACY))
  cfg = tiny_config()
  params = frozen_models.load_frozen_params(path, cfg)  # the trainer's entry point
  tokens = np.array([[37, 423, 5, 1, 0, 0], [99, 1, 0, 0, 0, 0]], np.int32)
  dec = np.array([[0, 12, 7], [0, 3, 0]], np.int32)
  logits = t5.Transformer(cfg).apply({"params": params}, tokens, dec, dec, enable_dropout=False)
  assert logits.shape == (2, 3, 32128) and np.isfinite(np.asarray(logits)).all()
  assert float(np.std(np.asarray(logits))) > 0


def test_loading_into_the_wrong_config_names_the_path_and_both_shapes():
  path = str(shared_fixture(LEGACY))
  with pytest.raises(ValueError, match=r"decoder/layers_0/encoder_decoder_attention/key/kernel "
                                       r"has shape \(4, 4\), the model config expects \(4, 8\)"):
    t5x.load_params(path, tiny_config().replace(head_dim=4))
  with pytest.raises(ValueError, match=r"lacks the parameter 'decoder/layers_0/mlp/wi/kernel'"):
    t5x.load_params(path, tiny_config().replace(mlp_activations=("relu",)))
  with pytest.raises(ValueError, match=r"does not define.*'decoder/logits_dense/kernel' with "
                                       r"shape \(4, 32128\)"):
    t5x.load_params(path, tiny_config().replace(logits_via_embedding=True))


def test_the_msgpack_file_and_the_parent_directory_are_accepted():
  path = shared_fixture(LEGACY)
  a = _flat(t5x.load_params(str(path / "checkpoint"), tiny_config()))
  b = _flat(t5x.load_params(str(path.parent), tiny_config()))  # latest checkpoint_<step>
  assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
  assert frozen_models._format_of(str(path / "checkpoint")) == "t5x"
  assert frozen_models._format_of(str(path)) == "t5x"


# ------------------------------------------------------------------------ T5X's Orbax layout


def write_t5x_orbax(directory: str, target: dict, step: int) -> str:
  """As T5X's OrbaxCheckpointManagerInterface: item 'state' = PyTreeCheckpointHandler(OCDBT)
  holding train_state.state_dict() = {'target', 'state': {'step', 'param_states'}}."""
  options = ocp.CheckpointManagerOptions(step_prefix="checkpoint", create=True,
                                         enable_async_checkpointing=False)
  manager = ocp.CheckpointManager(directory, options=options, item_handlers={
      "state": ocp.PyTreeCheckpointHandler(use_ocdbt=True)})
  param_states = jax.tree_util.tree_map(lambda x: {"v": np.full_like(x, 7.0),
                                                   "v_row": np.zeros(1, np.float32)}, target)
  state_dict = {"target": target, "state": {"step": np.asarray(step, np.int32),
                                            "param_states": param_states}}
  manager.save(step, args=ocp.args.Composite(state=ocp.args.PyTreeSave(state_dict)))
  manager.wait_until_finished()
  manager.close()
  return os.path.join(directory, f"checkpoint_{step}")


@pytest.fixture
def random_params():
  cfg = t5.preset("tiny")
  rng = np.random.default_rng(0)
  params = jax.tree_util.tree_map(lambda s: rng.normal(size=s.shape).astype(np.float32),
                                  nn.unbox(t5x.abstract_params(cfg)))
  return cfg, params


def test_t5x_orbax_layout_loads_target_only(tmp_path, random_params):
  cfg, params = random_params
  prompt = np.arange(8 * 64, dtype=np.float32).reshape(8, 64)
  target = jax.tree_util.tree_map(lambda x: x, params)
  target["encoder"] = dict(target["encoder"], prompt={"prompt": {"prompt": prompt}})
  checkpoint_dir = write_t5x_orbax(str(tmp_path / "run"), target, step=11)
  assert sorted(os.listdir(checkpoint_dir))[:2] == ["_CHECKPOINT_METADATA", "commit_success.txt"]
  for path in (checkpoint_dir, os.path.join(checkpoint_dir, "state"), str(tmp_path / "run")):
    assert frozen_models._format_of(path) == "t5x", path
    loaded = _flat(frozen_models.load_frozen_params(path, cfg))
    want = _flat(params)
    assert loaded.keys() == want.keys()
    for name in want:
      assert loaded[name].tobytes() == want[name].tobytes(), name
  assert t5x.checkpoint_step(checkpoint_dir) == 11
  np.testing.assert_array_equal(t5x.load_prompt(checkpoint_dir), prompt)
  with pytest.raises(ValueError, match=r": decoder/layers_0/mlp/wi_0/kernel has shape \(64, 128\), "
                                       r"the model config expects \(64, 256\)"):
    t5x.load_params(checkpoint_dir, cfg.replace(mlp_dim=256))


# ------------------------------------------------------------------------------------ writing


def test_written_legacy_checkpoint_matches_t5x_layout_and_reads_back(tmp_path, random_params):
  cfg, params = random_params
  directory = t5x.save_params(params, str(tmp_path), step=5)
  assert os.path.basename(directory) == "checkpoint_5"
  contents, raw = raw_checkpoint(directory)  # the independent reader used on T5X's own files
  assert contents["version"] == 3 and int(contents["optimizer"]["state"]["step"]) == 5
  assert os.path.isdir(os.path.join(directory, "target.encoder.layers_1.mlp.wi_0.kernel"))
  want = _flat(params)
  assert raw.keys() == want.keys()
  for name in want:
    assert raw[name].tobytes() == want[name].tobytes(), name
  loaded = _flat(t5x.load_params(directory, cfg))
  for name in want:
    assert loaded[name].tobytes() == want[name].tobytes(), name


def test_prompt_checkpoint_round_trip_with_the_released_prompt(tmp_path):
  released = np.load(shared_fixture("prompt_t5_1_1_lm100k_base_sst2.npy"))
  directory = t5x.save_prompt(released, str(tmp_path), step=1000)
  _, raw = raw_checkpoint(directory)
  assert list(raw) == [t5x.PROMPT_PATH]
  assert raw[t5x.PROMPT_PATH].tobytes() == released.tobytes()
  assert t5x.load_prompt(str(tmp_path)).tobytes() == released.tobytes()
  with pytest.raises(ValueError, match="has no 'encoder/prompt/prompt/prompt'; its prompt "
                                       "parameters are none"):
    t5x.load_prompt(str(shared_fixture(LEGACY)))


# ---------------------------------------------------------------------------- sharded restore

_SHARDED = textwrap.dedent("""
  import json, sys
  import numpy as np
  import jax
  from prompt_jax.interop import t5x
  from prompt_jax.partitioning import Partitioner
  from tests.test_interop_t5x import tiny_config
  from prompt_jax.models import t5
  legacy, orbax_dir = sys.argv[1], sys.argv[2]
  reads = []
  original = t5x._LegacyLeaf.read
  def recording_read(self, index=()):
    reads.append((self.shape, [(s.start, s.stop) for s in index]))
    return original(self, index)
  t5x._LegacyLeaf.read = recording_read
  partitioner = Partitioner(num_partitions=2)
  out = {}
  for name, path, cfg in (("legacy", legacy, tiny_config()),
                          ("orbax", orbax_dir, t5.preset("tiny"))):
    host = t5x.load_params(path, cfg)
    reads.clear()
    sharded = t5x.load_params(path, cfg, partitioner)
    if name == "legacy":
      out["embedding_reads"] = [r for shape, r in reads if shape == (32128, 4)]
    same = jax.tree_util.tree_all(jax.tree_util.tree_map(
        lambda a, b: bool(np.array_equal(np.asarray(a), b)), sharded, host))
    emb = sharded["token_embedder"]["embedding"]
    out[name] = {"same": same, "spec": list(emb.sharding.spec),
                 "shard_shapes": sorted({tuple(s.data.shape) for s in emb.addressable_shards})}
  print(json.dumps(out))
""")


def test_sharded_restore_reads_slices_into_named_shardings(tmp_path, random_params):
  legacy = str(shared_fixture(LEGACY))
  _, params = random_params
  orbax_dir = write_t5x_orbax(str(tmp_path / "run"), params, step=1)
  env = dict(os.environ, XLA_FLAGS=with_device_count(os.environ.get("XLA_FLAGS", ""), 8),
             JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO_ROOT))
  result = subprocess.run([sys.executable, "-c", _SHARDED, legacy, orbax_dir], env=env,
                          capture_output=True, text=True, timeout=300, cwd=REPO_ROOT)
  assert result.returncode == 0, result.stderr[-3000:]
  out = json.loads(result.stdout.strip().splitlines()[-1])
  for name, rows in (("legacy", 32128), ("orbax", 384)):
    assert out[name]["same"], name
    assert out[name]["spec"] == ["model", None], out[name]
    assert out[name]["shard_shapes"] == [[rows // 2, out[name]["shard_shapes"][0][1]]], out[name]
  # 8 devices hold 2 distinct halves of the embedding: 2 reads of half the table each (replicas
  # share a read), never the whole table.
  assert sorted(r[0] for r in out["embedding_reads"]) == [[0, 16064], [16064, 32128]], out


def test_bfloat16_checkpoint_is_cast_to_float32(tmp_path, random_params):
  """T5X version 3 stores bfloat16 natively (zarr dtype 'bfloat16'); we restore float32."""
  cfg, params = random_params
  bf16 = jax.tree_util.tree_map(lambda x: x.astype(jnp.bfloat16), params)
  directory = t5x.save_params(bf16, str(tmp_path), step=2)
  meta = json.loads(open(os.path.join(directory, "target.token_embedder.embedding",
                                      ".zarray")).read())
  assert meta["dtype"] == "bfloat16"
  loaded = _flat(t5x.load_params(directory, cfg))
  for name, value in _flat(bf16).items():
    assert loaded[name].dtype == np.float32
    np.testing.assert_array_equal(loaded[name], value.astype(np.float32), err_msg=name)
