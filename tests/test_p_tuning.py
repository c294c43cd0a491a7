"""P-tuning (PEFT's PromptEncoder): the MLP and LSTM reparameterisations against NumPy, folding
for serving, training the demo through the CLI, and bad values."""

from __future__ import annotations

import json
import time
from pathlib import Path

import flax
import gin
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from prompt_jax import cli, gin_utils
from prompt_jax import params as params_lib
from prompt_jax.data import pipeline, synthetic  # noqa: F401  (registers demo tasks)
from prompt_jax.models import t5
from prompt_jax.models.encoder_decoder import EncoderDecoderModel
from prompt_jax.partitioning import Partitioner
from prompt_jax.programs import PromptPrograms
from prompt_jax.prompts import p_tuning
from prompt_jax.prompts.base import InputPrompt
from prompt_jax.prompts.p_tuning import PTuningPrompt
from prompt_jax.prompts.plain import Prompt
from prompt_jax.serving import prompt_export
from prompt_jax.storage import frozen_models, metric_writer, prompt_files
from prompt_jax.training import optimizers

GIN_CONFIGS = Path(__file__).resolve().parent.parent / "gin_configs"
TABLE = np.random.default_rng(0).normal(size=(300, 12)).astype(np.float32)
DEMO_CHECKPOINT = "builtin:demo_t5_tiny.npz"
LENGTHS = {"inputs": 64, "targets": 16}
PREFIX = "encoder/prompt/prompt/"
# The brief's command line: model, prompt and run files plus the demo's macros (runs/demo.gin).
TRAIN_FLAGS = [
    f"--gin_file={GIN_CONFIGS}/models/t5_1_1_tiny.gin",
    f"--gin_file={GIN_CONFIGS}/prompts/p_tuning.gin",
    f"--gin_file={GIN_CONFIGS}/runs/prompt_finetune.gin",
    "--gin.MIXTURE_OR_TASK_NAME='demo_sentiment'",
    "--gin.TASK_MODULE='prompt_jax.data.synthetic'",
    f"--gin.INITIAL_CHECKPOINT_PATH='{DEMO_CHECKPOINT}'",
    "--gin.TASK_FEATURE_LENGTHS={'inputs': 64, 'targets': 16}",
    "--gin.PROMPT_LENGTH=10",
    "--gin.DROPOUT_RATE=0.0",
]
MODEL_GIN_FILES = [f"{GIN_CONFIGS}/models/t5_1_1_tiny.gin", f"{GIN_CONFIGS}/prompts/p_tuning.gin"]
MODEL_FLAGS = [f"--gin_file={f}" for f in MODEL_GIN_FILES] + ["--gin.PROMPT_LENGTH=10"]


def _args(batch=2):
  return (jnp.ones((batch, 3), jnp.int32), jnp.zeros((batch, 3, TABLE.shape[1])),
          jnp.asarray(TABLE))


def _flat(tree):
  return flax.traverse_util.flatten_dict(flax.core.unfreeze(tree), sep="/")


def _numpy_params(generator):
  """-> (params, float64 NumPy copies by path); checks every leaf is boxed and replicated."""
  boxed = generator.init(jax.random.key(3), *_args())["params"]
  flat = _flat(boxed)
  assert all(isinstance(v, flax.linen.LogicallyPartitioned) for v in flat.values())
  assert flat["embedding"].names == ("prompt", "prompt_embed")
  for sharding in jax.tree_util.tree_leaves(Partitioner().shardings_for(boxed)):
    assert sharding.is_fully_replicated
  params = params_lib.unbox(boxed)
  return params, {k: np.asarray(v, np.float64) for k, v in _flat(params).items()}


def _sigmoid(x):
  return 1.0 / (1.0 + np.exp(-x))


def _numpy_lstm_direction(p, prefix, x, reverse):
  """One direction of one layer; gates i, f, g, o: input kernels `i?` (no bias), recurrent
  kernels `h?` with the gate's bias, as flax's LSTM cells define them. x [L, in] -> [L, h]."""
  hidden = p[f"{prefix}/hi/kernel"].shape[0]
  h, c = np.zeros(hidden), np.zeros(hidden)
  out = np.zeros((x.shape[0], hidden))
  steps = range(x.shape[0] - 1, -1, -1) if reverse else range(x.shape[0])
  for t in steps:
    z = {g: x[t] @ p[f"{prefix}/i{g}/kernel"] + h @ p[f"{prefix}/h{g}/kernel"]
         + p[f"{prefix}/h{g}/bias"] for g in "ifgo"}
    c = _sigmoid(z["f"]) * c + _sigmoid(z["i"]) * np.tanh(z["g"])
    h = _sigmoid(z["o"]) * np.tanh(c)
    out[t] = h
  return out


# ------------------------------------------------------------------------ (1) numerics


def test_mlp_matches_numpy():
  generator = PTuningPrompt(5, "MLP", hidden_size=7)
  params, p = _numpy_params(generator)
  assert params_lib.shapes(params) == {
      "embedding": (5, 12), "mlp_head_0/kernel": (12, 7), "mlp_head_0/bias": (7,),
      "mlp_head_1/kernel": (7, 7), "mlp_head_1/bias": (7,), "mlp_head_2/kernel": (7, 12),
      "mlp_head_2/bias": (12,)}
  out = np.asarray(generator.apply({"params": params}, *_args()))
  relu = lambda x: np.maximum(x, 0.0)
  x = relu(p["embedding"] @ p["mlp_head_0/kernel"] + p["mlp_head_0/bias"])
  x = relu(x @ p["mlp_head_1/kernel"] + p["mlp_head_1/bias"])
  expected = x @ p["mlp_head_2/kernel"] + p["mlp_head_2/bias"]
  assert out.shape == (2, 5, 12)
  np.testing.assert_allclose(out[0], expected, rtol=0, atol=1e-5)
  np.testing.assert_array_equal(out[0], out[1])
  # PyTorch-style init: biases are not zero, so every term above is exercised
  assert min(np.abs(p[k]).max() for k in p if k.endswith("bias")) > 1e-3


@pytest.mark.parametrize("num_layers", [1, 2])
def test_lstm_matches_numpy(num_layers):
  hidden = 5  # 2h = 10 differs from d = 12, so the layer shapes cannot be confused
  generator = PTuningPrompt(6, "LSTM", hidden_size=hidden, num_layers=num_layers, dropout=0.3)
  params, p = _numpy_params(generator)
  x = p["embedding"]
  for k in range(num_layers):
    assert p[f"lstm_head/layer_{k}_forward/ii/kernel"].shape == (12 if k == 0 else 10, hidden)
    x = np.concatenate([
        _numpy_lstm_direction(p, f"lstm_head/layer_{k}_forward", x, reverse=False),
        _numpy_lstm_direction(p, f"lstm_head/layer_{k}_backward", x, reverse=True)], axis=-1)
  x = np.maximum(x @ p["mlp_head_0/kernel"] + p["mlp_head_0/bias"], 0.0)
  expected = x @ p["mlp_head_1/kernel"] + p["mlp_head_1/bias"]
  # no dropout rng (evaluation, export): dropout between layers is off
  out = np.asarray(generator.apply({"params": params}, *_args()))
  assert out.shape == (2, 6, 12)
  np.testing.assert_allclose(out[0], expected, rtol=0, atol=1e-5)
  dropped = np.asarray(generator.apply({"params": params}, *_args(),
                                       rngs={"dropout": jax.random.key(1)}))
  if num_layers == 1:  # torch applies LSTM dropout between layers only
    np.testing.assert_array_equal(dropped, out)
  else:
    assert np.abs(dropped - out).max() > 1e-4


def test_hidden_size_defaults_to_emb_dim_and_mlp_ignores_num_layers():
  params = PTuningPrompt(4).init(jax.random.key(0), *_args())["params"]
  assert params_lib.shapes(params_lib.unbox(params))["mlp_head_1/kernel"] == (12, 12)
  with pytest.warns(UserWarning, match="num_layers=3 is ignored"):
    PTuningPrompt(4, "MLP", num_layers=3)


# -------------------------------------------------------------- (4) bad values


@pytest.mark.parametrize("kwargs,message", [
    ({"length": 0}, r"PTuningPrompt.length \(PROMPT_LENGTH\) must be an integer >= 1, got 0"),
    ({"hidden_size": 0}, "PTuningPrompt.hidden_size must be an integer >= 1, got 0"),
    ({"num_layers": 0, "reparameterization_type": "LSTM"},
     "PTuningPrompt.num_layers must be an integer >= 1, got 0"),
    ({"reparameterization_type": "GRU"},
     r"reparameterization_type must be one of \('MLP', 'LSTM'\), got 'GRU'"),
    ({"dropout": 1.0}, r"PTuningPrompt.dropout must be a number in \[0, 1\), got 1.0"),
])
def test_bad_values_are_rejected(kwargs, message):
  with pytest.raises(ValueError, match=message):
    PTuningPrompt(**kwargs)


def test_peft_normal_embedding_init():
  embedding = np.asarray(PTuningPrompt(50, init_fn=p_tuning.normal()).init(
      jax.random.key(0), *_args())["params"]["embedding"].value)
  assert abs(embedding.std() - 1.0) < 0.1 and abs(embedding.mean()) < 0.1
  with pytest.raises(ValueError, match="stddev > 0, got 0.0"):
    p_tuning.normal(0.0)


def test_bad_value_from_gin_names_it():
  gin.clear_config()
  try:
    with pytest.raises(ValueError, match="got 'mlp'"):
      gin_utils.model_from_gin(MODEL_GIN_FILES, ["P_TUNING_TYPE = 'mlp'"])
  finally:
    gin.clear_config()


# ---------------------------------------------- training with the frozen model untouched


def test_lstm_trains_only_prompt_parameters():
  """Gradients reach every P-tuning parameter (LSTM with dropout between layers); frozen
  parameters are bit-identical after training steps."""
  generator = PTuningPrompt(4, "LSTM", hidden_size=8, dropout=0.1)
  model = EncoderDecoderModel(t5.Transformer(t5.preset("tiny"), InputPrompt(generator)))
  # no weight decay: a parameter changes only if its gradient is non-zero
  pt = PromptPrograms.for_training(model, optimizers.adamw(0.01, weight_decay=0.0), Partitioner(),
                             64, 16, 8)
  assert not any("prompt" in k for k in _flat(pt.abstract_frozen))
  frozen = pt.load_frozen_params(DEMO_CHECKPOINT)
  frozen_before = jax.tree_util.tree_map(np.array, frozen)
  state = pt.init_state(frozen, jax.random.key(0))
  own = {PREFIX + k for k in _flat(generator.init(jax.random.key(0), *_args())["params"])}
  assert set(_flat(state.prompt_params)) == own
  before = jax.tree_util.tree_map(np.array, state.prompt_params)
  batch = next(pipeline.iterate_batches(pipeline.DatasetConfig(
      "demo_sentiment", LENGTHS, batch_size=8, shuffle=False)))
  for _ in range(2):
    state, metrics = pt.train_step(state, frozen, batch, jax.random.key(1))
    assert float(metrics["grad_norm"]) > 0
  for path, leaf in _flat(before).items():
    assert np.abs(leaf - np.asarray(_flat(state.prompt_params)[path])).max() > 0, path
  for path, leaf in _flat(frozen_before).items():
    np.testing.assert_array_equal(leaf, np.asarray(_flat(frozen)[path]), err_msg=path)


# ----------------------------------- (3) the demo trains from gin; (2) export serves exactly


@pytest.fixture(scope="module")
def cli_run(tmp_path_factory):
  """30 AdamW steps of the default (MLP) P-tuning on the demo via `prompt-jax train`."""
  model_dir = tmp_path_factory.mktemp("p_tuning_run")
  gin.clear_config()
  started = time.perf_counter()
  code = cli.main(["train", *TRAIN_FLAGS, f"--gin.MODEL_DIR='{model_dir}'",
                   "--gin.TRAIN_STEPS=30", "--gin.BATCH_SIZE=16", "--gin.CHECKPOINT_PERIOD=30",
                   "--gin.trainer.train.eval_dataset_cfg=None",
                   "--gin.trainer.train.log_every_steps=1",
                   "--gin.trainer.train.optimizer=%PROMPT_OPTIMIZER"])
  print(f"prompt-jax train: {time.perf_counter() - started:.1f} s")
  gin.clear_config()
  assert code == 0
  return model_dir


@pytest.fixture(scope="module")
def validation_batch():
  cfg = pipeline.DatasetConfig("demo_sentiment", LENGTHS, batch_size=32, split="validation",
                               shuffle=False)
  return {k: jnp.asarray(v) for k, v in next(pipeline.iterate_batches(cfg)).items()}


def test_demo_trains_and_exports(cli_run, validation_batch, tmp_path):
  summary = json.loads((cli_run / "summary.json").read_text())
  assert summary["step"] == 30
  # a step's logged loss is the loss before its update: step 1 is the untrained prompt's
  losses = [value for _, value in metric_writer.read_scalars(str(cli_run / "train"))["loss"]]
  assert len(losses) == 30
  first, last = losses[0], float(np.mean(losses[-5:]))
  assert last < 0.5 * first
  trained, meta, step = prompt_export.load_trained_prompt(str(cli_run))
  assert step == 30 and meta["initial_checkpoint_path"] == DEMO_CHECKPOINT
  # only the P-tuning parameters were trained and saved (13,120 = 10*64 + 3*64*64 + 3*64)
  flat = _flat(trained)
  assert all(k.startswith(PREFIX) for k in flat) and len(flat) == 7
  assert params_lib.count(trained) == 13_120

  gin.clear_config()
  model, _ = gin_utils.model_from_gin(MODEL_GIN_FILES, ["PROMPT_LENGTH = 10"])
  gin.clear_config()
  generator = model.module.prompt.prompt
  assert isinstance(generator, PTuningPrompt)
  assert (generator.reparameterization_type, generator.hidden_size, generator.num_layers) == (
      "MLP", None, 2)
  frozen = frozen_models.load_frozen_params(DEMO_CHECKPOINT, model.config)
  loss_after = float(jax.jit(model.loss_fn)(params_lib.merge_params(trained, frozen),
                                             validation_batch, None)[0])
  print(f"training loss: step 1 (the untrained prompt) {first:.4f} -> steps 26-30 {last:.4f}; "
        f"validation loss of the trained prompt {loss_after:.4f}")
  assert loss_after < 0.05  # the floor is about 0.014 (mostly z-loss)

  # export-prompt: the fold, written as .npy and PEFT, serves with the same logits
  out, peft_dir = tmp_path / "prompt.npy", tmp_path / "peft"
  code = cli.main(["export-prompt", *MODEL_FLAGS, f"--model_dir={cli_run}", f"--output={out}",
                   f"--peft_dir={peft_dir}", "--base_model_name_or_path=demo/t5-tiny"])
  gin.clear_config()
  assert code == 0
  folded = np.load(out)
  assert folded.shape == (10, 64) and folded.dtype == np.float32
  np.testing.assert_array_equal(folded, np.load(cli_run / "prompts" / "prompt_30.npy"))
  from prompt_jax.interop import peft
  np.testing.assert_array_equal(peft.load_prompt(str(peft_dir)), folded)
  # the fold is the MLP of the embedding, not the embedding itself
  assert np.abs(folded - np.asarray(flat[PREFIX + "embedding"])).max() > 1e-2

  plain = EncoderDecoderModel(t5.Transformer(
      t5.preset("tiny"), InputPrompt(Prompt(10, prompt_files.from_array(str(out))))))
  plain_params = params_lib.unbox(jax.jit(plain.init_missing)(jax.random.key(0), frozen,
                                                              validation_batch))
  plain_logits = np.asarray(jax.jit(plain.logits)(plain_params, validation_batch))
  p_tuning_logits = np.asarray(jax.jit(model.logits)(params_lib.merge_params(trained, frozen),
                                                     validation_batch))
  difference = np.abs(plain_logits - p_tuning_logits).max()
  print(f"export: max |logit difference| {difference:.3g}")
  assert difference <= 1e-6
