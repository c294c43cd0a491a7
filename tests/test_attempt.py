"""ATTEMPT (attention over frozen source prompts plus a target prompt): the mixed prompt against
NumPy through the model's hook and the whole model, the multi-task variant's per-example
targets, source prompts that never train, reading sources from prompt files, export, gin, bad
values, and the demo converging."""

from __future__ import annotations

import json
import math
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
from prompt_jax.prompts import base, initializers
from prompt_jax.prompts.attempt import AttemptPrompt, SourcePrompts, source_bank
from prompt_jax.prompts.bank import PromptBank
from prompt_jax.storage import frozen_models, prompt_files, run_dir
from prompt_jax.training import optimizers

GIN_CONFIGS = Path(__file__).resolve().parent.parent / "gin_configs"
DEMO_CHECKPOINT = "builtin:demo_t5_tiny.npz"
LENGTHS = {"inputs": 64, "targets": 16}
T, M, D = 3, 4, 64  # source prompts, tokens per prompt, the demo model's width
SOURCES = np.random.default_rng(0).normal(size=(T, M, D)).astype(np.float32)


def _flat(tree):
  return flax.traverse_util.flatten_dict(flax.core.unfreeze(tree), sep="/")


def _model(hook):
  return EncoderDecoderModel(t5.Transformer(t5.preset("tiny"), hook))


@pytest.fixture(scope="module")
def frozen():
  return frozen_models.load_frozen_params(DEMO_CHECKPOINT, t5.preset("tiny"))


@pytest.fixture(scope="module")
def batch():
  cfg = pipeline.DatasetConfig("demo_sentiment", LENGTHS, batch_size=6, split="validation",
                               shuffle=False)
  return {k: jnp.asarray(v) for k, v in next(pipeline.iterate_batches(cfg)).items()}


def _params(hook, frozen, batch, seed=1):
  """The hook's parameters with every term non-trivial: random targets (distinct per task) and
  projections large enough that the attention is far from uniform."""
  table = jnp.asarray(frozen["token_embedder"]["embedding"])
  tokens = batch["encoder_input_tokens"][:1]
  params = params_lib.unbox(hook.init(jax.random.key(0), tokens, table[tokens], table)["params"])
  rng = np.random.default_rng(seed)
  new = {"target_prompts": rng.normal(size=params["target_prompts"].shape),
         "attention": {"down": {"kernel": rng.normal(size=(D, hook.attention_hidden))},
                       "up": {"kernel": rng.normal(size=(hook.attention_hidden, D))}}}
  if hook.layer_norm_affine:
    new["attention"]["layer_norm"] = {"scale": rng.normal(size=D), "bias": rng.normal(size=D)}
  return jax.tree_util.tree_map(lambda x: jnp.asarray(x, jnp.float32), new)


def _np_attempt(params, table, tokens, prompt_ids, temperature, eps=1e-5):
  """NumPy ATTEMPT -> (prompt [b, m, d], attention weights [b, t + 1])."""
  p = {k: np.asarray(v, np.float64) for k, v in _flat(params).items()}
  emb = table[tokens].astype(np.float64)
  pooled = np.where((tokens > 0)[..., None], emb, -np.inf).max(1)
  hidden = pooled @ p["attention/down/kernel"]
  hidden = hidden / (1 + np.exp(-hidden))  # SiLU
  hidden = hidden @ p["attention/up/kernel"]
  h = (hidden - hidden.mean(-1, keepdims=True)) / np.sqrt(hidden.var(-1, keepdims=True) + eps)
  if "attention/layer_norm/scale" in p:
    h = h * p["attention/layer_norm/scale"] + p["attention/layer_norm/bias"]
  sources = SOURCES.astype(np.float64)
  target = p["target_prompts"][np.broadcast_to(prompt_ids, tokens.shape[:1])]  # [b, m, d]
  candidates = np.concatenate([np.broadcast_to(sources, (len(tokens),) + sources.shape),
                               target[:, None]], axis=1)  # [b, t + 1, m, d]
  scores = np.einsum("bjd,bd->bj", candidates.max(2), h) / temperature
  weights = np.exp(scores - scores.max(-1, keepdims=True))
  weights /= weights.sum(-1, keepdims=True)
  return target + np.einsum("bj,bjmd->bmd", weights, candidates), weights


# ------------------------------------------------------------------ parameters, forward pass


def test_parameters_axes_and_sources_are_no_parameters():
  table = jnp.asarray(np.random.default_rng(1).normal(size=(30, D)), jnp.float32)
  args = (jnp.ones((2, 3), jnp.int32), jnp.zeros((2, 3, D)), table)
  boxed = AttemptPrompt(SOURCES, num_tasks=2, attention_hidden=8).init(
      jax.random.key(0), *args)["params"]
  flat = _flat(boxed)
  assert {k: v.value.shape for k, v in flat.items()} == {
      "target_prompts": (2, M, D), "attention/down/kernel": (D, 8),
      "attention/up/kernel": (8, D)}
  assert flat["target_prompts"].names == ("prompts", "prompt", "prompt_embed")
  assert flat["attention/down/kernel"].names == ("prompt_embed", "prompt_mlp")
  assert flat["attention/up/kernel"].names == ("prompt_mlp", "prompt_embed")
  for sharding in jax.tree_util.tree_leaves(Partitioner().shardings_for(boxed)):
    assert sharding.is_fully_replicated
  # every target starts as the first source prompt (the reference); N(0, 0.01) projections
  np.testing.assert_array_equal(np.asarray(flat["target_prompts"].value),
                                np.stack([SOURCES[0]] * 2))
  assert 0.005 < float(np.std(np.asarray(flat["attention/up/kernel"].value))) < 0.02
  # with an initialiser, each task's target gets its own draw; LayerNorm scale and bias on request
  boxed = AttemptPrompt(SOURCES, num_tasks=2, target_init=initializers.uniform(),
                        layer_norm_affine=True).init(jax.random.key(0), *args)["params"]
  flat = _flat(boxed)
  targets = np.asarray(flat["target_prompts"].value)
  assert np.abs(targets).max() <= 0.5 and np.abs(targets[0] - targets[1]).max() > 0
  assert flat["attention/layer_norm/scale"].names == ("prompt_embed",)


@pytest.mark.parametrize("num_tasks,affine", [(1, False), (3, True)])
def test_forward_matches_numpy_through_the_model_hook(frozen, batch, num_tasks, affine):
  """The hook the model calls, on the demo's embedded validation inputs, equals NumPy (fp32,
  1e-5); with several tasks each example mixes with its own task's target."""
  model = _model(AttemptPrompt(SOURCES, num_tasks=num_tasks, attention_hidden=16,
                               temperature=4.0, layer_norm_affine=affine))
  hook = model.module.prompt
  params = _params(hook, frozen, batch)
  table = np.asarray(frozen["token_embedder"]["embedding"])
  tokens = np.asarray(batch["encoder_input_tokens"])
  ids = np.arange(len(tokens)) % num_tasks
  features = {"prompt_ids": jnp.asarray(ids, jnp.int32)} if num_tasks > 1 else None
  embedded, mask = hook.apply({"params": params}, jnp.asarray(tokens), jnp.asarray(table[tokens]),
                              jnp.asarray(table), features)
  expected, weights = _np_attempt(params, table, tokens, ids, 4.0)
  assert weights.max() - weights.min() > 0.3  # far from a uniform mixture
  np.testing.assert_allclose(np.asarray(embedded[:, :M]), expected, rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(np.asarray(embedded[:, M:]), table[tokens])
  np.testing.assert_array_equal(np.asarray(mask), np.concatenate(
      [np.ones((len(tokens), M), bool), tokens > 0], axis=1))


def test_default_temperature_is_width_times_e(frozen, batch):
  table = jnp.asarray(frozen["token_embedder"]["embedding"])
  tokens = batch["encoder_input_tokens"]
  default = AttemptPrompt(SOURCES, attention_hidden=16)
  params = _params(default, frozen, batch)
  run = lambda hook: np.asarray(hook.apply({"params": params}, tokens, table[tokens], table)[0])
  explicit = AttemptPrompt(SOURCES, attention_hidden=16, temperature=D * math.e)
  np.testing.assert_array_equal(run(default), run(explicit))
  expected, _ = _np_attempt(params, np.asarray(table), np.asarray(tokens), 0, D * math.e)
  np.testing.assert_allclose(run(default)[:, :M], expected, rtol=1e-5, atol=1e-5)


def test_whole_model_equals_a_bank_holding_the_numpy_prompts(frozen, batch):
  model = _model(AttemptPrompt(SOURCES, attention_hidden=16, temperature=4.0))
  params = _params(model.module.prompt, frozen, batch)
  table = np.asarray(frozen["token_embedder"]["embedding"])
  expected, _ = _np_attempt(params, table, np.asarray(batch["encoder_input_tokens"]), 0, 4.0)
  logits = jax.jit(model.logits)(params_lib.merge_params(
      {"encoder": {"prompt": params}}, frozen), batch)
  n = len(expected)
  bank = _model(PromptBank(n, M))
  bank_params = params_lib.merge_params(
      {"encoder": {"prompt": {"prompt": {"prompts": jnp.asarray(expected, jnp.float32)}}}}, frozen)
  want = jax.jit(bank.logits)(bank_params, dict(batch, prompt_ids=jnp.arange(n)))
  np.testing.assert_allclose(np.asarray(logits), np.asarray(want), rtol=0,
                             atol=1e-5 * float(np.abs(want).max()))


def test_multitask_mixed_batch_and_padding(frozen, batch):
  """A row of a mixed-task batch equals the same example alone with its task id; extra padding
  changes nothing (the max-pool skips padding); several tasks need prompt_ids."""
  hook = AttemptPrompt(SOURCES, num_tasks=2, attention_hidden=16, temperature=4.0)
  params = _params(hook, frozen, batch)
  table = jnp.asarray(frozen["token_embedder"]["embedding"])
  tokens = batch["encoder_input_tokens"]
  ids = jnp.asarray([0, 1, 1, 0, 1, 0], jnp.int32)
  apply = jax.jit(lambda t, i: hook.apply({"params": params}, t, table[t], table,
                                          {"prompt_ids": i})[0])
  together = np.asarray(apply(tokens, ids))
  for i in range(len(tokens)):
    np.testing.assert_allclose(together[i], np.asarray(apply(tokens[i:i + 1], ids[i:i + 1]))[0],
                               rtol=1e-6, atol=1e-6)
  other = np.asarray(apply(tokens, 1 - ids))
  assert np.abs(other[:, :M] - together[:, :M]).max() > 1e-2
  padded = jnp.pad(tokens, ((0, 0), (0, 5)))
  np.testing.assert_allclose(np.asarray(apply(padded, ids))[:, :M], together[:, :M], rtol=1e-6,
                             atol=1e-6)
  with pytest.raises(ValueError, match=r"AttemptPrompt of 2 tasks needs prompt_ids"):
    hook.apply({"params": params}, tokens, table[tokens], table)


# ------------------------------------------------------------------ training, export


def test_trains_target_and_attention_only(frozen, batch):
  """Trainable: the target prompt and W_down, W_up. The sources are constants (in no parameter
  tree), the frozen model stays bit-identical, every trainable leaf moves."""
  hook = AttemptPrompt(SOURCES, attention_hidden=16)
  model = _model(hook)
  pt = PromptPrograms.for_training(model, optimizers.adamw(0.3, weight_decay=0.0), Partitioner(),
                                   64, 16, 6)
  frozen_dev = pt.load_frozen_params(DEMO_CHECKPOINT)
  frozen_before = jax.tree_util.tree_map(np.array, frozen_dev)
  state = pt.init_state(frozen_dev, jax.random.key(0))
  assert set(_flat(state.prompt_params)) == {
      "encoder/prompt/target_prompts", "encoder/prompt/attention/down/kernel",
      "encoder/prompt/attention/up/kernel"}
  assert pt.param_counts()["trainable"] == M * D + 2 * D * 16
  assert not any("prompt" in k for k in _flat(pt.abstract_frozen))
  sources_before = hook.source_prompts.array.copy()

  grads = _flat(jax.jit(jax.grad(lambda p: model.loss_fn(
      params_lib.merge_params(p, frozen_dev), batch, None)[0]))(state.prompt_params))
  for path, g in grads.items():
    assert np.all(np.isfinite(g)) and np.linalg.norm(g) > 1e-9, path

  before = jax.tree_util.tree_map(np.array, state.prompt_params)
  for step in range(2):
    state, metrics = pt.train_step(state, frozen_dev, batch, jax.random.key(step))
    assert np.isfinite(float(metrics["loss"]))
  for path, leaf in _flat(before).items():
    assert np.abs(leaf - np.asarray(_flat(state.prompt_params)[path])).max() > 0, path
  for path, leaf in _flat(frozen_before).items():
    np.testing.assert_array_equal(leaf, np.asarray(_flat(frozen_dev)[path]), err_msg=path)
  np.testing.assert_array_equal(model.module.prompt.source_prompts.array, sources_before)


def test_multitask_gradient_reaches_only_present_tasks(frozen, batch):
  model = _model(AttemptPrompt(SOURCES, num_tasks=2, attention_hidden=16, temperature=4.0))
  params = {"encoder": {"prompt": _params(model.module.prompt, frozen, batch)}}
  task_0 = dict(batch, prompt_ids=jnp.zeros(len(batch["encoder_input_tokens"]), jnp.int32))
  grads = _flat(jax.jit(jax.grad(lambda p: model.loss_fn(
      params_lib.merge_params(p, frozen), task_0, None)[0]))(params))
  targets = np.asarray(grads["encoder/prompt/target_prompts"])
  assert np.linalg.norm(targets[0]) > 1e-9
  np.testing.assert_array_equal(targets[1], 0.0)
  assert np.linalg.norm(np.asarray(grads["encoder/prompt/attention/down/kernel"])) > 1e-9


def test_export_is_none_and_the_record_fingerprints_the_sources(frozen, batch):
  model = _model(AttemptPrompt(SOURCES, attention_hidden=16))
  params = {"encoder": {"prompt": _params(model.module.prompt, frozen, batch)}}
  assert base.export_prompt(model.module.prompt, params_lib.merge_params(params, frozen)) is None
  described = run_dir.describe(model.module.prompt)["source_prompts"]
  assert described == {"type": "SourcePrompts", "shape": [T, M, D],
                       "sha256": source_bank(SOURCES.copy()).sha256}
  assert source_bank(SOURCES.copy()) == model.module.prompt.source_prompts
  assert source_bank(SOURCES + 1).sha256 != described["sha256"]
  hash(model.module.prompt)  # a Linen module's fields must hash


# ------------------------------------------------------------------ source prompts


def test_source_bank_reads_prompt_files(tmp_path):
  one, bank = SOURCES[0], SOURCES[1:]
  np.save(tmp_path / "one.npy", one)
  np.save(tmp_path / "bank.npy", bank)
  reader = lambda source: prompt_files.read_prompt(source, allow_bank=True)
  read = source_bank([str(tmp_path / "one.npy"), str(tmp_path / "bank.npy")], reader)
  assert isinstance(read, SourcePrompts) and read.shape == (T, M, D)
  np.testing.assert_array_equal(read.array, SOURCES)
  np.testing.assert_array_equal(
      source_bank([f"{tmp_path / 'bank.npy'}#1", one], reader).array, np.stack([SOURCES[2], one]))
  np.testing.assert_array_equal(source_bank(one).array, one[None])
  assert source_bank(read) is read


@pytest.mark.parametrize("sources,message", [
    ([], "at least one source prompt, got an empty list"),
    ([np.zeros((4, D)), np.zeros((5, D))], r"share one \[length, embed\], got \[\(4, 64\), "
     r"\(5, 64\)\]"),
    (np.zeros((4, D), np.int32), "source prompt 0 must be a non-empty float"),
    ([np.zeros((4, D)), np.full((4, D), np.nan)], "source prompt 1 has non-finite values"),
    (["/no/such.npy"], "source prompt 0 is the path '/no/such.npy'; pass arrays or a reader"),
])
def test_bad_sources_are_rejected(sources, message):
  with pytest.raises(ValueError, match=message):
    source_bank(sources)


@pytest.mark.parametrize("kwargs,message", [
    ({"source_prompts": None}, r"AttemptPrompt.source_prompts must be set"),
    ({"num_tasks": 0}, r"AttemptPrompt.num_tasks must be an integer >= 1, got 0"),
    ({"attention_hidden": 2.5}, r"AttemptPrompt.attention_hidden must be an integer >= 1, "
     r"got 2.5"),
    ({"temperature": 0.0}, r"AttemptPrompt.temperature must be a finite number > 0, got 0.0"),
    ({"layer_norm_affine": "yes"}, r"AttemptPrompt.layer_norm_affine must be True or False"),
    ({"placement": "middle"}, r"AttemptPrompt.placement must be one of .*, got 'middle'"),
])
def test_bad_settings_are_rejected(kwargs, message):
  with pytest.raises(ValueError, match=message):
    AttemptPrompt(**{"source_prompts": SOURCES, **kwargs})


def test_width_mismatch_is_refused(frozen, batch):
  hook = AttemptPrompt(SOURCES[..., :16])
  table = jnp.asarray(frozen["token_embedder"]["embedding"])
  tokens = batch["encoder_input_tokens"]
  with pytest.raises(ValueError, match=r"have width 16, the model's embeddings 64"):
    hook.init(jax.random.key(0), tokens, table[tokens], table)


# ------------------------------------------------------------------ gin


def _gin_model(bindings):
  return gin_utils.model_from_gin([f"{GIN_CONFIGS}/models/t5_1_1_tiny.gin",
                                   f"{GIN_CONFIGS}/prompts/attempt.gin"], bindings)[0]


def test_gin_file_reads_the_sources_and_builds_the_defaults(tmp_path):
  np.save(tmp_path / "one.npy", SOURCES[0])
  np.save(tmp_path / "bank.npy", SOURCES[1:])
  gin.clear_config()
  try:
    model = _gin_model([f"ATTEMPT_SOURCES = ['{tmp_path}/one.npy', '{tmp_path}/bank.npy']"])
    hook = model.module.prompt
    assert isinstance(hook, AttemptPrompt)
    np.testing.assert_array_equal(hook.source_prompts.array, SOURCES)
    assert (hook.num_tasks, hook.attention_hidden, hook.temperature, hook.target_init,
            hook.layer_norm_affine, hook.placement) == (1, 100, None, None, False, "prefix")
    shapes = params_lib.shapes(params_lib.unbox(model.init_abstract(model.dummy_batch(1, 8, 4))))
    assert {k: v for k, v in shapes.items() if "prompt" in k} == {
        "encoder/prompt/target_prompts": (1, M, D),
        "encoder/prompt/attention/down/kernel": (D, 100),
        "encoder/prompt/attention/up/kernel": (100, D)}
    gin.clear_config()
    with pytest.raises(ValueError, match="ATTEMPT_SOURCES is required but not set"):
      _gin_model([])
    gin.clear_config()
    with pytest.raises(FileNotFoundError, match="does not exist"):
      _gin_model([f"ATTEMPT_SOURCES = ['{tmp_path}/missing.npy']"])
  finally:
    gin.clear_config()


# ------------------------------------------------------------------ convergence


@pytest.mark.slow
def test_demo_converges(tmp_path):
  """`prompt-jax train` on the demo with prompts/attempt.gin: three random source prompts of 10
  tokens (two files, one of them a bank), the paper's AdamW lr 0.3: validation accuracy
  >= 95%."""
  rng = np.random.default_rng(3)
  np.save(tmp_path / "source.npy", rng.uniform(-0.5, 0.5, (10, D)).astype(np.float32))
  np.save(tmp_path / "bank.npy", rng.uniform(-0.5, 0.5, (2, 10, D)).astype(np.float32))
  gin.clear_config()
  started = time.perf_counter()
  code = cli.main(["train", f"--gin_file={GIN_CONFIGS}/runs/demo.gin",
                   f"--gin_file={GIN_CONFIGS}/prompts/attempt.gin",
                   f"--gin.ATTEMPT_SOURCES=['{tmp_path}/source.npy', '{tmp_path}/bank.npy']",
                   f"--gin.MODEL_DIR='{tmp_path / 'run'}'", "--gin.TRAIN_STEPS=60",
                   "--gin.EVAL_PERIOD=0", "--gin.CHECKPOINT_PERIOD=60",
                   "--gin.trainer.train.optimizer=%PROMPT_OPTIMIZER"])
  gin.clear_config()
  assert code == 0
  summary = json.loads((tmp_path / "run" / "summary.json").read_text())
  before = summary["eval_untrained"]["accuracy"]
  after = summary["eval_trained"]["accuracy"]
  print(f"ATTEMPT demo: accuracy {before:.2f} -> {after:.2f} in "
        f"{time.perf_counter() - started:.1f} s")
  assert after >= 95.0, (before, after)
