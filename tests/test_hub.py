"""Frozen models by Hugging Face Hub name (`hf://OWNER/NAME[@REVISION]`), offline: a Hub cache
laid out as huggingface_hub lays it (`models--OWNER--NAME/{blobs,refs,snapshots}`) from the tiny
HF T5 1.1 fixture plus T5's spiece.model, found through HF_HUB_CACHE with HF_HUB_OFFLINE=1."""

from __future__ import annotations

import hashlib
import json
import os
import shutil

import flax
import gin
import numpy as np
import pytest
import seqio
import tensorflow as tf
from safetensors.numpy import load_file, save_file

from prompt_jax.data import metrics, synthetic
from prompt_jax.interop import hf
from prompt_jax.storage import frozen_models, hub
from tests.cli_harness import assert_one_line_error, run_cli
from tests.conftest import GIN_CONFIGS, shared_fixture

REPO = "prompt-jax-test/t5-tiny-v1_1"
NAME = f"hf://{REPO}"
MAIN = "0123456789abcdef0123456789abcdef01234567"  # refs/main
TAGGED = "fedcba9876543210fedcba9876543210fedcba98"  # refs/v1 (a tag) and nothing else
MODEL_GIN = "models/hf/from_checkpoint.gin"
FIXTURE_PARAMETERS = 57_984  # ../shared/fixtures/README.md: 52 tensors, 57,984 values


def _fixture_files() -> dict[str, bytes]:
  model = shared_fixture("hf_t5_tiny_v1_1")
  spiece = shared_fixture("t5_spiece.model")
  files = {n: (model / n).read_bytes() for n in ("config.json", "generation_config.json",
                                                 "model.safetensors")}
  files["spiece.model"] = spiece.read_bytes()
  return files


def add_snapshot(cache, repo: str, commit: str, files: dict[str, bytes], ref: str = None) -> str:
  """One commit of `repo` in a Hub cache as huggingface_hub writes it: contents in
  `blobs/<hash>`, `snapshots/<commit>/<file>` relative symlinks to them, `refs/<ref>` holding
  the commit."""
  folder = cache / ("models--" + repo.replace("/", "--"))
  snapshot = folder / "snapshots" / commit
  (folder / "blobs").mkdir(parents=True, exist_ok=True)
  snapshot.mkdir(parents=True)
  for name, content in files.items():
    blob = folder / "blobs" / hashlib.sha256(content).hexdigest()
    blob.write_bytes(content)
    os.symlink(os.path.relpath(blob, snapshot), snapshot / name)
  if ref:
    (folder / "refs" / ref).parent.mkdir(parents=True, exist_ok=True)
    (folder / "refs" / ref).write_text(commit)
  return os.path.realpath(snapshot)


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
  """An offline Hub cache holding REPO at MAIN (refs/main) and TAGGED (tag v1)."""
  files = _fixture_files()
  cache = tmp_path / "hub"
  add_snapshot(cache, REPO, MAIN, files, ref="main")
  add_snapshot(cache, REPO, TAGGED, files, ref="v1")
  monkeypatch.setenv("HF_HUB_CACHE", str(cache))
  monkeypatch.setenv("HF_HUB_OFFLINE", "1")
  return cache


def _snapshot(cache, commit: str) -> str:
  return os.path.realpath(cache / ("models--" + REPO.replace("/", "--")) / "snapshots" / commit)


def _flat(params) -> dict:
  return flax.traverse_util.flatten_dict(flax.core.unfreeze(params), sep="/")


# --------------------------------------------------------------------------------- resolution


def test_names_and_revisions_resolve_to_their_snapshots(hub_cache):
  assert os.path.realpath(frozen_models.resolve_path(NAME)) == _snapshot(hub_cache, MAIN)
  assert os.path.realpath(frozen_models.resolve_path(f"{NAME}@main")) == _snapshot(hub_cache,
                                                                                   MAIN)
  assert os.path.realpath(frozen_models.resolve_path(f"{NAME}@v1")) == _snapshot(hub_cache,
                                                                                 TAGGED)
  assert os.path.realpath(frozen_models.resolve_path(f"{NAME}@{TAGGED}")) == _snapshot(
      hub_cache, TAGGED)
  # a run records the commit: the same files whatever refs/main says later
  assert frozen_models.recorded_path(NAME) == f"{NAME}@{MAIN}"
  assert frozen_models.recorded_path(f"{NAME}@v1") == f"{NAME}@{TAGGED}"
  assert frozen_models.recorded_path("builtin:demo_t5_tiny.npz") == "builtin:demo_t5_tiny.npz"
  assert hub.parse(f"{NAME}@refs/pr/3") == (REPO, "refs/pr/3")
  assert hub.parse("hf://t5-small") == ("t5-small", None)


def test_parameters_equal_those_of_the_fixture_directory(hub_cache):
  directory = shared_fixture("hf_t5_tiny_v1_1")
  config, _ = hf.load_t5(str(directory))
  from_hub = _flat(frozen_models.load_frozen_params(NAME, config))
  direct = _flat(frozen_models.load_frozen_params(str(directory), config))
  assert sorted(from_hub) == sorted(direct) and len(direct) == 52
  for name, value in direct.items():
    np.testing.assert_array_equal(from_hub[name], value, err_msg=name)
  assert sum(v.size for v in from_hub.values()) == FIXTURE_PARAMETERS


def test_config_and_vocabulary_come_from_the_checkpoint(hub_cache):
  expected, _ = hf.load_t5(str(shared_fixture("hf_t5_tiny_v1_1")))
  model = frozen_models.checkpoint_model(NAME)
  assert model.config == expected
  assert os.path.realpath(model.path) == _snapshot(hub_cache, MAIN)
  assert isinstance(model.vocabulary, seqio.SentencePieceVocabulary)
  assert model.vocabulary.encode("positive") == [1465]
  # 32,000 pieces; T5's 100 sentinels do not fit the fixture's 128 embedding rows
  assert model.vocabulary.vocab_size == 32000
  # a local directory works the same; no spiece.model: no vocabulary
  local = frozen_models.checkpoint_model(str(shared_fixture("hf_t5_tiny_v1_1")))
  assert local.config == expected and local.vocabulary is None
  # formats without config.json carry neither
  builtin = frozen_models.checkpoint_model("builtin:demo_t5_tiny.npz")
  assert builtin.config is None and builtin.vocabulary is None
  assert os.path.isfile(builtin.path)
  # the run's settings on top of config.json's architecture
  config = frozen_models.checkpoint_t5_config(NAME, dropout_rate=0.2, dtype="bfloat16",
                                              scan_layers=True)
  assert config == expected.replace(dropout_rate=0.2, dtype="bfloat16", scan_layers=True)
  assert frozen_models.checkpoint_t5_config(NAME).dropout_rate == expected.dropout_rate


@pytest.mark.parametrize("tie,lm_head", [(True, None), (True, "different"), (True, "equal"),
                                         (False, None)])
def test_output_layer_convention_matches_load_t5(tmp_path, tie, lm_head):
  """`logits_via_embedding` is read from config.json and the output tensors' names (values only
  when both exist), with load_t5's rule; checked against load_t5 itself."""
  source = shared_fixture("hf_t5_tiny_v1_1")
  tensors = load_file(str(source / "model.safetensors"))
  config = json.loads((source / "config.json").read_text())
  config["tie_word_embeddings"] = tie
  if lm_head is None:
    del tensors["lm_head.weight"]
  elif lm_head == "equal":
    tensors["lm_head.weight"] = tensors["shared.weight"].copy()
  save_file(tensors, str(tmp_path / "model.safetensors"))
  (tmp_path / "config.json").write_text(json.dumps(config))
  expected, _ = hf.load_t5(str(tmp_path))
  assert frozen_models.checkpoint_model(str(tmp_path)).config == expected
  assert expected.logits_via_embedding == (tie and lm_head != "different")


def test_sentinels_are_added_when_the_embedding_has_room(tmp_path):
  source = shared_fixture("hf_t5_tiny_v1_1")
  config = json.loads((source / "config.json").read_text())
  config["vocab_size"] = 32128  # T5's padded table: 32,000 pieces + 100 sentinels fit
  (tmp_path / "config.json").write_text(json.dumps(config))
  shutil.copy(source / "model.safetensors", tmp_path)
  shutil.copy(shared_fixture("t5_spiece.model"), tmp_path / "spiece.model")
  vocabulary = frozen_models.checkpoint_model(str(tmp_path)).vocabulary
  assert vocabulary.vocab_size == 32100
  assert vocabulary.encode("positive") == [1465]


# --------------------------------------------------------------------------------- gin


def _parse(bindings):
  gin.clear_config()
  gin.add_config_file_search_path(str(GIN_CONFIGS))
  gin.parse_config_files_and_bindings(
      [str(GIN_CONFIGS / MODEL_GIN), str(GIN_CONFIGS / "prompts" / "uniform.gin")], bindings,
      finalize_config=False)


def test_model_gin_builds_the_checkpoint_architecture_and_vocabulary(hub_cache):
  expected, _ = hf.load_t5(str(shared_fixture("hf_t5_tiny_v1_1")))
  try:
    _parse([f"INITIAL_CHECKPOINT_PATH = '{NAME}'", "SCAN_LAYERS = True",
            "ACTIVATION_DTYPE = 'bfloat16'", "DROPOUT_RATE = 0.0"])
    config = gin.get_configurable(frozen_models.checkpoint_t5_config)()
    assert config == expected.replace(scan_layers=True, dtype="bfloat16", dropout_rate=0.0)
    vocabulary = gin.get_configurable(frozen_models.checkpoint_vocabulary)()
    assert vocabulary.encode("positive") == [1465]
    # without INITIAL_CHECKPOINT_PATH the model file says what it needs
    _parse(["INITIAL_CHECKPOINT_PATH = None"])
    with pytest.raises(ValueError, match="set INITIAL_CHECKPOINT_PATH"):
      gin.get_configurable(frozen_models.checkpoint_t5_config)()
  finally:
    gin.clear_config()


# --------------------------------------------------------------------------------- errors


def test_a_repository_missing_from_the_offline_cache_is_one_line(hub_cache):
  with pytest.raises(FileNotFoundError) as info:
    frozen_models.resolve_path("hf://prompt-jax-test/absent")
  message = str(info.value)
  assert len(message.splitlines()) == 1
  for part in ("hf://prompt-jax-test/absent", "HF_HUB_OFFLINE", str(hub_cache)):
    assert part in message, message
  with pytest.raises(FileNotFoundError, match="at revision 'v2'"):
    frozen_models.resolve_path(f"{NAME}@v2")


def test_checkpoint_errors_name_the_value(hub_cache):
  files = _fixture_files()
  bert = dict(files, **{"config.json": json.dumps({"model_type": "bert"}).encode()})
  add_snapshot(hub_cache, "prompt-jax-test/bert", MAIN, bert, ref="main")
  no_weights = {k: v for k, v in files.items() if k != "model.safetensors"}
  add_snapshot(hub_cache, "prompt-jax-test/no-weights", MAIN, no_weights, ref="main")
  cases = [("hf://prompt-jax-test/bert", ValueError, "is not a T5: config.json model_type is "
            "'bert'"),
           ("hf://prompt-jax-test/no-weights", FileNotFoundError, "has no safetensors weights"),
           ("hf://owner--x/name", ValueError, "is not a Hugging Face Hub model name"),
           ("hf://a/b/c", ValueError, "is not a Hugging Face Hub model name"),
           ("hf://", ValueError, "is not a Hugging Face Hub model name")]
  for name, error, text in cases:
    with pytest.raises(error) as info:
      frozen_models.load_frozen_params(name, None)
    message = str(info.value)
    assert len(message.splitlines()) == 1 and name in message and text in message, message


def test_without_huggingface_hub_the_error_says_what_to_install(hub_cache, monkeypatch):
  monkeypatch.setitem(__import__("sys").modules, "huggingface_hub", None)
  monkeypatch.setenv("HF_HUB_CACHE", str(hub_cache / "elsewhere"))  # not resolved before
  with pytest.raises(RuntimeError) as info:
    frozen_models.resolve_path(NAME)
  assert str(info.value) == f'{NAME} needs huggingface_hub: pip install "prompt_jax[hub]"'


# --------------------------------------------------------------------------------- end to end


class SevenBitVocabulary(seqio.ByteVocabulary):
  """Bytes 0-124 as ids 3-127: the synthetic sentences' ASCII fits the fixture's 128 rows (the
  byte vocabulary's 259 ids do not)."""

  def __init__(self):
    super().__init__()
    self._byte_size = 125


TASK = "hub_test_sentiment"


def register_task() -> None:
  if TASK in seqio.TaskRegistry.names():
    return
  features = {k: seqio.Feature(SevenBitVocabulary(), add_eos=True) for k in ("inputs", "targets")}

  def dataset_fn(split, shuffle_files, seed=None):
    del shuffle_files, seed
    examples = synthetic.make_examples(split)[:64]
    return tf.data.Dataset.from_tensor_slices({"inputs": [e["sentence"] for e in examples],
                                               "targets": [e["sentiment"] for e in examples]})

  seqio.TaskRegistry.add(
      TASK, source=seqio.FunctionDataSource(dataset_fn, splits=["train", "validation"]),
      preprocessors=[seqio.preprocessors.tokenize, seqio.preprocessors.append_eos],
      output_features=features, metric_fns=[metrics.accuracy])


register_task()  # TASK_MODULE = 'tests.test_hub'


def _train(model_dir, name, capsys):
  return run_cli(["train", f"--gin_file={MODEL_GIN}", "--gin_file=prompts/uniform.gin",
                  "--gin_file=runs/prompt_finetune.gin", f"--gin.MODEL_DIR='{model_dir}'",
                  f"--gin.INITIAL_CHECKPOINT_PATH='{name}'",
                  f"--gin.MIXTURE_OR_TASK_NAME='{TASK}'", "--gin.TASK_MODULE='tests.test_hub'",
                  "--gin.TASK_FEATURE_LENGTHS={'inputs': 48, 'targets': 16}",
                  "--gin.PROMPT_LENGTH=3", "--gin.BATCH_SIZE=4", "--gin.TRAIN_STEPS=2",
                  "--gin.CHECKPOINT_PERIOD=2", "--gin.DROPOUT_RATE=0.0",
                  "--gin.trainer.train.eval_dataset_cfg=None"], capsys)


def test_train_by_hub_name_end_to_end(hub_cache, tmp_path, capsys, monkeypatch):
  """`prompt-jax train` with models/hf/from_checkpoint.gin and an hf:// name: the fixture's
  model (57,984 parameters, not the demo's 246,784) is trained, and run.json pins the commit; a
  resume after refs/main moved to another commit is refused, naming both."""
  model_dir = tmp_path / "run"
  result = _train(model_dir, NAME, capsys)
  assert result.code == 0, result.err[-3000:]
  assert f"model: {FIXTURE_PARAMETERS:,} frozen parameters, 96 trainable" in result.out, result.out
  record = json.loads((model_dir / "run.json").read_text())
  assert record["frozen_checkpoint"]["path"] == f"{NAME}@{MAIN}"
  assert record["frozen_checkpoint"]["fingerprint"]
  assert record["model"]["emb_dim"] == 32 and record["model"]["vocab_size"] == 128
  assert (model_dir / "prompts" / "prompt_2.npy").exists()

  # refs/main moves to another commit (a copy of the cache: a name resolves once per process
  # and cache), so the same name now means another model
  moved = tmp_path / "moved_hub"
  shutil.copytree(hub_cache, moved, symlinks=True)
  (moved / ("models--" + REPO.replace("/", "--")) / "refs" / "main").write_text(TAGGED)
  monkeypatch.setenv("HF_HUB_CACHE", str(moved))
  result = _train(model_dir, NAME, capsys)
  assert_one_line_error(result, [f"{NAME}@{MAIN}", f"{NAME}@{TAGGED}"])
