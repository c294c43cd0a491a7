"""The T5X glue (prompt_jax/t5x_compat, gin_configs/t5x).

The first tests need only flax/optax. The rest need t5x, which is not on PyPI, and skip without
it; with t5x installed (from github.com/google-research/t5x) the slow ones run stock
`python -m t5x.train` on our gin files and check the checkpoints it writes.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import types
from typing import Mapping

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import traverse_util
from flax.core import meta

from prompt_jax.host_devices import with_device_count
from prompt_jax.models import t5
from prompt_jax.prompts import base, initializers, plain, residual, superpos
from prompt_jax.storage import frozen_models
from prompt_jax.t5x_compat import axes, optim
from tests.conftest import GIN_CONFIGS, REPO_ROOT, shared_fixture

DEMO_PARAMS = REPO_ROOT / "prompt_jax" / "assets" / "demo_t5_tiny.npz"
METHODS = ("plain", "superpos", "residual")


def _t5x_missing() -> str | None:
  try:
    import t5x.models  # noqa: F401  pylint: disable=g-import-not-at-top,unused-import
  except ImportError as e:
    return f"t5x is not importable ({e}); it is not on PyPI: install it from its source"
  return None


def needs_t5x():
  reason = _t5x_missing()
  if reason:
    pytest.skip(reason)


def _prompt(method: str, length: int = 4) -> base.InputPrompt:
  if method == "plain":
    generator = plain.Prompt(length=length)
  elif method == "superpos":
    generator = superpos.SuperPosPrompt(length=length, num_embeddings=8, population_size=300)
  else:
    generator = residual.ResidualPrompt(length=length, bottleneck=8,
                                        init_fn=initializers.sampled_vocabulary(300))
  return base.InputPrompt(prompt=generator)


def _boxed_variables(method: str):
  module = t5.Transformer(t5.preset("tiny"), prompt=_prompt(method))
  tokens = jnp.ones((2, 6), jnp.int32)
  return module.init(jax.random.PRNGKey(0), tokens, tokens[:, :3], tokens[:, :3],
                     enable_dropout=False)


def _flat(tree) -> dict:
  return traverse_util.flatten_dict(flax.core.unfreeze(tree), sep="/")


# ------------------------------------------------------------------------------ without t5x


@pytest.mark.parametrize("method", METHODS)
def test_to_params_axes_keeps_values_and_names(method):
  boxed = _boxed_variables(method)
  converted = axes.to_params_axes(boxed)
  boxed_flat = traverse_util.flatten_dict(boxed["params"], sep="/",
                                          is_leaf=lambda _, x: isinstance(x, meta.Partitioned))
  params = _flat(converted["params"])
  names = _flat(flax.linen.partitioning.get_axis_names(converted["params_axes"]))
  assert set(params) == set(boxed_flat) == set(names)
  for name, leaf in boxed_flat.items():
    np.testing.assert_array_equal(params[name], leaf.unbox())
    assert tuple(names[name]) == tuple(leaf.names), name


def test_to_params_axes_names_a_param_without_axes():
  with pytest.raises(ValueError, match="encoder/bare"):
    axes.to_params_axes({"params": {"encoder": {"bare": jnp.ones(3)}}})


@pytest.mark.parametrize("method", METHODS)
def test_prompt_axis_rules_cover_every_prompt_axis(method):
  boxed = traverse_util.flatten_dict(_boxed_variables(method)["params"], sep="/",
                                     is_leaf=lambda _, x: isinstance(x, meta.Partitioned))
  prompt_axes = {n for k, v in boxed.items() if k.startswith("encoder/prompt/") for n in v.names}
  assert prompt_axes and prompt_axes <= set(axes.prompt_axes())
  assert prompt_axes <= {name for name, _ in axes.prompt_axis_rules()}


def test_trainable_filter_selects_exactly_the_prompt_for_model_param_traversal():
  params = axes.to_params_axes(_boxed_variables("residual"))["params"]
  traversal = traverse_util.ModelParamTraversal(optim.trainable_filter())
  selected = list(traversal.iterate(params))
  expected = [v for k, v in sorted(_flat(params).items()) if k.startswith("encoder/prompt/")]
  assert len(expected) > 2 and len(selected) == len(expected)
  for got, want in zip(selected, expected):
    assert got is want


def test_prompt_only_updates_prompt_as_the_inner_optimizer_and_nothing_else():
  params = axes.to_params_axes(_boxed_variables("superpos"))["params"]
  grads = jax.tree_util.tree_map(
      lambda p: jax.random.normal(jax.random.PRNGKey(p.size), p.shape), params)
  tx = optim.prompt_only(optax.adam(0.1))
  updates, _ = tx.update(grads, tx.init(params), params)
  prompt_updates, _ = optax.adam(0.1).update(grads["encoder"]["prompt"],
                                             optax.adam(0.1).init(params["encoder"]["prompt"]))
  flat_updates = _flat(updates)
  for name, value in flat_updates.items():
    if name.startswith("encoder/prompt/"):
      want = _flat(prompt_updates)[name[len("encoder/prompt/"):]]
      np.testing.assert_allclose(value, want, rtol=1e-6, atol=1e-7)
      assert np.abs(value).max() > 0
    else:
      assert not np.any(np.asarray(value)), name


def test_prompt_only_rejects_a_pattern_that_matches_nothing():
  params = axes.to_params_axes(_boxed_variables("plain"))["params"]
  tx = optim.prompt_only(optax.adam(0.1), pattern="no_such_param")
  with pytest.raises(ValueError, match="no_such_param"):
    tx.init(params)


def _encoder_decoder(method: str, length: int = 4):
  from prompt_jax.models import encoder_decoder  # pylint: disable=g-import-not-at-top
  return encoder_decoder.EncoderDecoderModel(
      t5.Transformer(t5.preset("tiny"), prompt=_prompt(method, length)))


def _expected_fold(method: str, prompt: Mapping) -> np.ndarray:
  """The encoder's prompt, computed independently of the modules."""
  if method == "plain":
    return np.asarray(prompt["prompt"])
  return np.einsum("lm,lmd->ld", np.asarray(prompt["coefficients"]),
                   np.asarray(prompt["embeddings"]))


@pytest.mark.parametrize("method", ["plain", "superpos"])
def test_export_folds_the_prompt_of_a_t5x_checkpoint(method, tmp_path):
  from prompt_jax.interop import t5x as t5x_interop  # pylint: disable=g-import-not-at-top
  from prompt_jax.t5x_compat import export_prompt

  variables = axes.to_params_axes(_boxed_variables(method))
  params = jax.tree_util.tree_map(np.asarray, variables["params"])
  path = t5x_interop.save_params(params, str(tmp_path), step=7)
  folded = export_prompt.export_t5x_prompt(_encoder_decoder(method), path)
  np.testing.assert_allclose(folded, _expected_fold(method, params["encoder"]["prompt"]["prompt"]),
                             rtol=1e-5, atol=1e-6)


def test_export_prompt_command_folds_a_t5x_checkpoint(tmp_path, capsys):
  from prompt_jax import cli  # pylint: disable=g-import-not-at-top
  from prompt_jax.interop import t5x as t5x_interop  # pylint: disable=g-import-not-at-top

  variables = axes.to_params_axes(_boxed_variables("plain"))
  params = jax.tree_util.tree_map(np.asarray, variables["params"])
  path = t5x_interop.save_params(params, str(tmp_path), step=7)
  out = tmp_path / "prompt.npy"
  assert cli.main(["export-prompt", f"--gin_search_paths={GIN_CONFIGS}",
                   "--gin_file=models/t5_1_1_tiny.gin", "--gin_file=prompts/uniform.gin",
                   "--gin.PROMPT_LENGTH=4", f"--t5x_checkpoint={path}",
                   f"--output={out}"]) == 0
  np.testing.assert_array_equal(np.load(out), params["encoder"]["prompt"]["prompt"]["prompt"])
  assert str(out) in capsys.readouterr().out


def test_each_model_reads_its_prompt_init_embedding_once(tmp_path, monkeypatch):
  """`PromptEncoderDecoderModel` keeps the table it read (T5X initialises more than once); no
  cache outlives the model. Without t5x: models.py is loaded, unregistered, over a stand-in
  `t5x.models.EncoderDecoderModel`."""
  stand_in = types.ModuleType("t5x.models")
  stand_in.EncoderDecoderModel = type("EncoderDecoderModel", (), {
      "__init__": lambda self, *args, **kwargs: None})
  package = types.ModuleType("t5x")
  package.models = stand_in
  monkeypatch.setitem(sys.modules, "t5x", package)
  monkeypatch.setitem(sys.modules, "t5x.models", stand_in)
  spec = importlib.util.spec_from_file_location(
      "_t5x_compat_models_under_test", REPO_ROOT / "prompt_jax" / "t5x_compat" / "models.py")
  models = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(models)
  assert not hasattr(models.read_embedding, "cache_info")  # no process-wide cache

  tables = {}
  for name in ("a", "b"):
    tables[name] = np.full((8, 4), ord(name), np.float32)
    frozen_models.save_params_npz({"token_embedder": {"embedding": tables[name]}},
                                  str(tmp_path / f"{name}.npz"))
  reads = []
  read = models.read_embedding
  monkeypatch.setattr(models, "read_embedding", lambda path: reads.append(path) or read(path))
  first = models.PromptEncoderDecoderModel(prompt_init_checkpoint=str(tmp_path / "a.npz"))
  for _ in range(3):
    np.testing.assert_array_equal(first.prompt_init_embedding(), tables["a"])
  assert reads == [str(tmp_path / "a.npz")]
  second = models.PromptEncoderDecoderModel(prompt_init_checkpoint=str(tmp_path / "a.npz"))
  second.prompt_init_embedding()
  assert len(reads) == 2  # its own read: nothing shared between models
  first.prompt_init_checkpoint = str(tmp_path / "b.npz")
  np.testing.assert_array_equal(first.prompt_init_embedding(), tables["b"])
  assert len(reads) == 3


# --------------------------------------------------------------------------------- with t5x


@pytest.mark.parametrize("size", ["t5_1_1_tiny", "t5_1_1_lm_adapted_base", "t5_1_0_small"])
@pytest.mark.parametrize("method", METHODS)
def test_gin_files_build_the_t5x_model(size, method):
  needs_t5x()
  import gin  # pylint: disable=g-import-not-at-top
  from t5x import optimizers as t5x_optimizers

  from prompt_jax.t5x_compat import models

  gin.clear_config()
  try:
    gin.add_config_file_search_path(str(GIN_CONFIGS))
    gin.parse_config_files_and_bindings(
        [f"t5x/models/{size}.gin", f"t5x/prompts/{method}.gin"], [])
    model = gin.query_parameter("%MODEL").scoped_configurable_fn()
  finally:
    gin.clear_config()
  assert isinstance(model, models.PromptEncoderDecoderModel)
  preset = "tiny" if size == "t5_1_1_tiny" else size
  assert model.module.config == t5.preset(preset, dropout_rate=model.module.config.dropout_rate)
  generator = type(model.module.prompt.prompt)
  assert generator is {"plain": plain.Prompt, "superpos": superpos.SuperPosPrompt,
                       "residual": residual.ResidualPrompt}[method]
  wanted = t5x_optimizers.MultiOptimizer if method == "plain" else t5x_optimizers.OptaxWrapper
  assert isinstance(model.optimizer_def, wanted)


def _model(method: str, prompt_init_checkpoint=None):
  import seqio  # pylint: disable=g-import-not-at-top
  from t5x import adafactor

  from prompt_jax.t5x_compat import models

  vocabulary = seqio.PassThroughVocabulary(size=384)
  return models.PromptEncoderDecoderModel(
      module=t5.Transformer(t5.preset("tiny"), prompt=_prompt(method)),
      input_vocabulary=vocabulary, output_vocabulary=vocabulary,
      optimizer_def=adafactor.Adafactor(), prompt_init_checkpoint=prompt_init_checkpoint)


SHAPES = {"encoder_input_tokens": (2, 6), "decoder_input_tokens": (2, 3)}


def test_initial_variables_carry_params_axes_for_every_param():
  needs_t5x()
  variables = _model("superpos").get_initial_variables(jax.random.PRNGKey(0), SHAPES)
  params = _flat(variables["params"])
  names = _flat(flax.linen.partitioning.get_axis_names(variables["params_axes"]))
  assert set(params) == set(names)
  assert tuple(names["encoder/prompt/prompt/embeddings"]) == (
      "prompt", "superpos_basis", "prompt_embed")


@pytest.mark.parametrize("method,leaf", [("residual", "prompt"), ("superpos", "embeddings")])
def test_prompt_is_initialised_from_the_checkpoint_embedding(method, leaf):
  needs_t5x()
  table = np.load(DEMO_PARAMS)["token_embedder/embedding"]
  rows = {row.tobytes() for row in table}

  def prompt_rows(checkpoint):
    variables = _model(method, checkpoint).get_initial_variables(jax.random.PRNGKey(1), SHAPES)
    value = np.asarray(variables["params"]["encoder"]["prompt"]["prompt"][leaf], np.float32)
    return value.reshape(-1, table.shape[1])

  from_checkpoint = prompt_rows(str(DEMO_PARAMS))
  assert all(row.tobytes() in rows for row in from_checkpoint)
  # Without it, T5X's fresh random model supplies the table: none of the real rows.
  assert not any(row.tobytes() in rows for row in prompt_rows(None))


def test_kv_cache_decoding_matches_teacher_forcing():
  needs_t5x()
  model = _model("plain")
  params = model.get_initial_variables(jax.random.PRNGKey(0), SHAPES)["params"]
  batch = {"encoder_input_tokens": jnp.array([[5, 6, 7, 1, 0, 0], [8, 9, 1, 0, 0, 0]]),
           "decoder_input_tokens": jnp.zeros((2, 4), jnp.int32)}
  decodes, _ = model.predict_batch_with_aux(params, batch, num_decodes=1)
  # Greedy-consistent: teacher-forcing the beam's output reproduces its argmax at each step.
  targets = jnp.asarray(decodes)
  shifted = jnp.concatenate([jnp.zeros((2, 1), jnp.int32), targets[:, :-1]], axis=1)
  logits = model.module.apply({"params": params}, batch["encoder_input_tokens"], shifted,
                              targets, enable_dropout=False)
  assert decodes.shape == (2, 4)
  first = np.asarray(jnp.argmax(logits[:, 0], -1))
  np.testing.assert_array_equal(first, np.asarray(targets[:, 0]))


# ------------------------------------------------------------- stock `python -m t5x.train`


def _run(args, log_path, devices: int = 1):
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", JAX_PLATFORMS="cpu",
             XLA_FLAGS=with_device_count(os.environ.get("XLA_FLAGS", ""), devices))
  with open(log_path, "w") as log:
    proc = subprocess.run([sys.executable, *args], cwd=REPO_ROOT, env=env, stdout=log,
                          stderr=subprocess.STDOUT, timeout=900, check=False)
  if proc.returncode:
    with open(log_path) as log:
      tail = log.read()[-3000:]
    raise AssertionError(f"{' '.join(args[:3])} failed ({proc.returncode}):\n{tail}")


@pytest.fixture(scope="module")
def initial_t5x_checkpoint(tmp_path_factory):
  needs_t5x()
  out = tmp_path_factory.mktemp("t5x_init")
  _run(["-m", "prompt_jax.t5x_compat.write_checkpoint", f"--params={DEMO_PARAMS}",
        "--preset=tiny", f"--output_dir={out}"], out / "log.txt")
  return out / "checkpoint_0"


def _orbax_shapes(checkpoint_dir) -> dict:
  """'/'-joined path -> shape of every array T5X saved (None for a leaf saved as None)."""
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  from etils import epath

  metadata = ocp.PyTreeCheckpointHandler().metadata(epath.Path(checkpoint_dir) / "state")
  flat = traverse_util.flatten_dict(dict(getattr(metadata, "tree", metadata)), sep="/")
  return {k: getattr(v, "shape", None) for k, v in flat.items()}


@pytest.mark.slow
@pytest.mark.parametrize("method", METHODS)
def test_stock_t5x_train_tunes_only_the_prompt(method, initial_t5x_checkpoint, tmp_path):
  from prompt_jax.interop import t5x as t5x_interop  # pylint: disable=g-import-not-at-top

  # Residual runs with num_partitions=2 on 4 CPU devices. Stock T5X ignores num_partitions on
  # CPU (partitioning.default_mesh returns get_cpu_mesh(): data = processes, model = local
  # devices), so its mesh is data 1 x model 4, and the `model` split asserted below is 4-way.
  devices, partitions = (4, 2) if method == "residual" else (1, 1)
  model_dir = tmp_path / "run"
  _run(["-m", "t5x.train", f"--gin_search_paths={GIN_CONFIGS}",
        "--gin_file=t5x/models/t5_1_1_tiny.gin", f"--gin_file=t5x/prompts/{method}.gin",
        f"--gin.partitioning.PjitPartitioner.num_partitions={partitions}",
        "--gin_file=t5x/runs/demo.gin", f"--gin.MODEL_DIR='{model_dir}'",
        f"--gin.INITIAL_CHECKPOINT_PATH='{initial_t5x_checkpoint}'", "--gin.TRAIN_STEPS=6",
        "--gin.EVAL_PERIOD=6", "--gin.utils.SaveCheckpointConfig.period=6",
        "--gin.utils.SaveCheckpointConfig.keep=None", "--gin.PROMPT_OPTIMIZER_LEARNING_RATE=0.3"],
       tmp_path / "train.log", devices)
  first, last = model_dir / "checkpoint_0", model_dir / "checkpoint_6"
  assert first.is_dir() and last.is_dir()

  # Frozen parameters: exactly the initial checkpoint's, read back by our own loader.
  demo = np.load(DEMO_PARAMS)
  for checkpoint in (first, last):
    assert t5x_interop.checkpoint_step(str(checkpoint)) == int(checkpoint.name.split("_")[1])
    loaded = _flat(t5x_interop.load_params(str(checkpoint), t5.preset("tiny")))
    assert set(loaded) == set(demo.files)
    for name in demo.files:
      np.testing.assert_array_equal(np.asarray(loaded[name]), demo[name], err_msg=name)

  # The prompt is in the checkpoints and changed; optimizer state exists only for it.
  shapes = _orbax_shapes(last)
  prompt_names = sorted(k[len("target/"):] for k in shapes
                        if k.startswith("target/encoder/prompt/"))
  assert prompt_names
  changed = [not np.array_equal(t5x_interop.load_prompt(str(first), name),
                                t5x_interop.load_prompt(str(last), name))
             for name in prompt_names]
  assert any(changed), prompt_names
  # (Scalars such as Adam's step count aside.)
  state_arrays = [k for k, shape in shapes.items()
                  if k.startswith("state/param_states/") and shape]
  assert state_arrays and all("/encoder/prompt/" in k for k in state_arrays), state_arrays

  # T5X laid the variables out with our axes: MLP kernels split over `model`, prompt replicated.
  info = (model_dir / "model-info.txt").read_text()
  mlp = "partition spec (None, 'model')"
  assert any(line.startswith("Variable encoder/layers_0/mlp/wi_0/kernel ") and mlp in line
             for line in info.splitlines()), info[:2000]
  assert all(line.rstrip().endswith(("(None,)", "(None, None)", "(None, None, None)"))
             for line in info.splitlines() if line.startswith("Variable encoder/prompt/"))

  # The documented export folds the trained prompt into what the encoder sees.
  exported = tmp_path / "prompt.npy"
  prompt_file = {"plain": "uniform", "superpos": "superpos", "residual": "residual"}[method]
  _run(["-m", "prompt_jax.cli", "export-prompt", f"--gin_search_paths={GIN_CONFIGS}",
        "--gin_file=models/t5_1_1_tiny.gin", f"--gin_file=prompts/{prompt_file}.gin",
        "--gin.PROMPT_LENGTH=10", f"--t5x_checkpoint={last}", f"--output={exported}"],
       tmp_path / "export.log")
  folded = np.load(exported)
  assert folded.shape == (10, 64) and np.all(np.isfinite(folded))
  if method != "residual":
    stored = {name.split("/")[-1]: t5x_interop.load_prompt(str(last), name)
              for name in prompt_names}
    np.testing.assert_allclose(folded, _expected_fold(method, stored), rtol=1e-5, atol=1e-6)

  # Stock T5X's inference evaluation (seqio accuracy) improves over the untrained prompt.
  with open(model_dir / "inference_eval" / "demo_sentiment-metrics.jsonl") as f:
    accuracy = {r["step"]: r["accuracy"] for r in map(json.loads, f)}
  assert accuracy[6] > accuracy[0] and accuracy[6] >= 90, accuracy


@pytest.mark.slow
def test_stock_t5x_train_restores_a_checkpoint_written_by_t5x_in_2022(tmp_path):
  """The prompt-tuning repository's T5X test checkpoint (legacy format, with Adafactor state)."""
  needs_t5x()
  checkpoint = shared_fixture("t5x_t5_1_1_tiny_legacy/checkpoint_3")
  model_dir = tmp_path / "run"
  _run(["-m", "t5x.train", f"--gin_search_paths={GIN_CONFIGS}",
        "--gin_file=t5x/models/t5_1_1_tiny.gin", "--gin_file=t5x/prompts/plain.gin",
        "--gin_file=t5x/runs/demo.gin", f"--gin.MODEL_DIR='{model_dir}'",
        f"--gin.INITIAL_CHECKPOINT_PATH='{checkpoint}'", "--gin.TRAIN_STEPS=5",
        "--gin.EVAL_PERIOD=5", "--gin.utils.SaveCheckpointConfig.period=5",
        "--gin.t5.T5Config.vocab_size=32128", "--gin.t5.T5Config.emb_dim=4",
        "--gin.t5.T5Config.num_heads=2", "--gin.t5.T5Config.head_dim=2",
        "--gin.t5.T5Config.mlp_dim=8", "--gin.t5.T5Config.relative_attention_num_buckets=4",
        "--gin.t5.T5Config.relative_attention_max_distance=8",
        "--gin.__main__.train.run_eval_before_training=False",
        "--gin.__main__.train.infer_eval_dataset_cfg=None"], tmp_path / "train.log")
  from prompt_jax.interop import t5x as t5x_interop  # pylint: disable=g-import-not-at-top
  config = t5.T5Config(vocab_size=32128, emb_dim=4, num_heads=2, head_dim=2, mlp_dim=8,
                       num_encoder_layers=2, num_decoder_layers=2,
                       relative_attention_num_buckets=4, relative_attention_max_distance=8)
  original = _flat(t5x_interop.load_params(str(checkpoint), config))
  tuned = _flat(t5x_interop.load_params(str(model_dir / "checkpoint_5"), config))
  for name, value in original.items():
    np.testing.assert_array_equal(np.asarray(tuned[name]), np.asarray(value), err_msg=name)
  assert t5x_interop.load_prompt(str(model_dir / "checkpoint_5")).shape == (10, 4)
