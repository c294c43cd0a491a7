"""SMoP (sparse mixture of prompts): the routed prompt against NumPy through the model's hook and
the whole model, per-example routing in a mixed batch, the router perturbation in training steps
only, training only the method's parameters, export, gin, bad values, and the demo converging."""

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
from prompt_jax.prompts import base
from prompt_jax.prompts.bank import PromptBank
from prompt_jax.prompts.smop import SMoPPrompt
from prompt_jax.storage import frozen_models
from prompt_jax.training import optimizers

GIN_CONFIGS = Path(__file__).resolve().parent.parent / "gin_configs"
DEMO_CHECKPOINT = "builtin:demo_t5_tiny.npz"
LENGTHS = {"inputs": 64, "targets": 16}
K, M = 3, 4  # prompts, tokens per prompt


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


def _routing_params(hook, frozen, batch, scale=30.0):
  """The hook's initial parameters with a router that sends the first K examples of `batch`
  to different prompts: column j is (centred) example j's mean embedding."""
  table = np.asarray(frozen["token_embedder"]["embedding"])
  tokens = np.asarray(batch["encoder_input_tokens"])
  params = params_lib.unbox(hook.init(jax.random.key(0), batch["encoder_input_tokens"][:1],
                                      jnp.asarray(table[tokens[:1]]), jnp.asarray(table))["params"])
  pooled = _np_mean_pool(table, tokens)[:K]
  params["router"]["kernel"] = jnp.asarray(scale * (pooled - pooled.mean(0)).T, jnp.float32)
  return params


def _np_mean_pool(table, tokens):
  emb = table[tokens].astype(np.float64)
  mask = (tokens > 0)[..., None]
  return (emb * mask).sum(1) / np.maximum(mask.sum(1), 1)


def _np_prompts(params, table, tokens, top_k=1):
  """NumPy SMoP without perturbation -> (prompt [b, m, d], probabilities [b, k])."""
  prompts = np.asarray(params["prompts"], np.float64)
  logits = _np_mean_pool(table, tokens) @ np.asarray(params["router"]["kernel"], np.float64)
  probs = np.exp(logits - logits.max(-1, keepdims=True))
  probs /= probs.sum(-1, keepdims=True)
  order = np.argsort(-probs, axis=-1)[:, :top_k]
  out = np.stack([sum(probs[i, j] * prompts[j] for j in order[i]) for i in range(len(tokens))])
  return out, probs


# ------------------------------------------------------------------ parameters, forward pass


def test_parameters_axes_and_replication():
  hook = SMoPPrompt(K, M)
  table = jnp.zeros((20, 16))
  boxed = hook.init(jax.random.key(0), jnp.ones((2, 3), jnp.int32), jnp.zeros((2, 3, 16)),
                    table)["params"]
  flat = _flat(boxed)
  assert {k: v.value.shape for k, v in flat.items()} == {"prompts": (K, M, 16),
                                                         "router/kernel": (16, K)}
  assert flat["prompts"].names == ("prompt_experts", "prompt", "prompt_embed")
  assert flat["router/kernel"].names == ("prompt_embed", "prompt_experts")
  for sharding in jax.tree_util.tree_leaves(Partitioner().shardings_for(boxed)):
    assert sharding.is_fully_replicated
  kernel = np.asarray(flat["router/kernel"].value)  # orthogonal init, as the reference
  np.testing.assert_allclose(kernel.T @ kernel, np.eye(K), atol=1e-5)


@pytest.mark.parametrize("top_k", [1, 2])
def test_forward_matches_numpy_through_the_model_hook(frozen, batch, top_k):
  """The hook the model calls, on the demo's embedded validation inputs, equals NumPy (fp32,
  1e-5): each example's prompt is its routed prompt scaled by its router probability."""
  model = _model(SMoPPrompt(K, M, top_k=top_k))
  hook = model.module.prompt
  params = _routing_params(hook, frozen, batch)
  table = np.asarray(frozen["token_embedder"]["embedding"])
  tokens = np.asarray(batch["encoder_input_tokens"])
  embedded, mask = hook.apply({"params": params}, jnp.asarray(tokens),
                              jnp.asarray(table[tokens]), jnp.asarray(table))
  expected, probs = _np_prompts(params, table, tokens, top_k)
  assert len(set(probs.argmax(-1)[:K])) == K  # the router really splits the batch
  np.testing.assert_allclose(np.asarray(embedded[:, :M]), expected, rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(np.asarray(embedded[:, M:]), table[tokens])
  np.testing.assert_array_equal(np.asarray(mask), np.concatenate(
      [np.ones((len(tokens), M), bool), tokens > 0], axis=1))


def test_whole_model_equals_a_bank_holding_the_numpy_prompts(frozen, batch):
  """The SMoP model's logits equal those of a prompt bank whose row j is NumPy's prompt of
  example j (so the model sees exactly the routed, scaled prompts)."""
  model = _model(SMoPPrompt(K, M))
  params = _routing_params(model.module.prompt, frozen, batch)
  table = np.asarray(frozen["token_embedder"]["embedding"])
  expected, _ = _np_prompts(params, table, np.asarray(batch["encoder_input_tokens"]))
  logits = jax.jit(model.logits)(params_lib.merge_params(
      {"encoder": {"prompt": params}}, frozen), batch)
  n = len(expected)
  bank = _model(PromptBank(n, M))
  bank_params = params_lib.merge_params(
      {"encoder": {"prompt": {"prompt": {"prompts": jnp.asarray(expected, jnp.float32)}}}}, frozen)
  want = jax.jit(bank.logits)(bank_params, dict(batch, prompt_ids=jnp.arange(n)))
  np.testing.assert_allclose(np.asarray(logits), np.asarray(want), rtol=0,
                             atol=1e-5 * float(np.abs(want).max()))


def test_mixed_batch_routes_each_example_on_its_own(frozen, batch):
  """A row of a mixed batch equals the same example alone, and extra padding changes nothing
  (the mean pool skips padding)."""
  hook = SMoPPrompt(K, M)
  params = _routing_params(hook, frozen, batch)
  table = jnp.asarray(frozen["token_embedder"]["embedding"])
  tokens = batch["encoder_input_tokens"]
  apply = jax.jit(lambda t: hook.apply({"params": params}, t, table[t], table)[0])
  together = np.asarray(apply(tokens))
  _, probs = _np_prompts(params, np.asarray(table), np.asarray(tokens))
  assert len(set(probs.argmax(-1))) >= 2
  for i in range(len(tokens)):
    alone = np.asarray(apply(tokens[i:i + 1]))
    np.testing.assert_allclose(together[i], alone[0], rtol=1e-6, atol=1e-6)
  padded = jnp.pad(tokens, ((0, 0), (0, 7)))
  np.testing.assert_allclose(np.asarray(apply(padded))[:, :M], together[:, :M], rtol=1e-6,
                             atol=1e-6)


def test_router_perturbation_only_in_training_steps(frozen, batch):
  """The `dropout` rng (present in training steps only) perturbs the routing; without it the
  hook is deterministic; the noise is relative (zero logits stay zero) and s=0 turns it off."""
  table = jnp.asarray(frozen["token_embedder"]["embedding"])
  tokens = batch["encoder_input_tokens"]

  def run(hook, params, rng=None):
    rngs = None if rng is None else {"dropout": jax.random.key(rng)}
    return np.asarray(hook.apply({"params": params}, tokens, table[tokens], table, rngs=rngs)[0])

  hook = SMoPPrompt(K, M)
  params = _routing_params(hook, frozen, batch, scale=3.0)
  evaluated = run(hook, params)
  np.testing.assert_array_equal(evaluated, run(hook, params))
  trained_1, trained_2 = run(hook, params, 1), run(hook, params, 2)
  assert np.abs(trained_1 - evaluated).max() > 1e-3
  assert np.abs(trained_1 - trained_2).max() > 1e-3
  np.testing.assert_array_equal(run(SMoPPrompt(K, M, router_noise=0.0), params, 1), evaluated)
  zero = dict(params, router={"kernel": jnp.zeros_like(params["router"]["kernel"])})
  np.testing.assert_array_equal(run(hook, zero, 1), run(hook, zero))


# ------------------------------------------------------------------ training, export


def test_trains_only_its_parameters_and_the_gate_trains_the_router(frozen, batch):
  """Trainable: exactly `prompts` and `router/kernel`. The router gets its gradient through
  the gate; a prompt no example chose gets none. Frozen parameters stay bit-identical."""
  model = _model(SMoPPrompt(K, M))
  pt = PromptPrograms.for_training(model, optimizers.adafactor(0.5), Partitioner(), 64, 16, 6)
  frozen_dev = pt.load_frozen_params(DEMO_CHECKPOINT)
  frozen_before = jax.tree_util.tree_map(np.array, frozen_dev)
  state = pt.init_state(frozen_dev, jax.random.key(0))
  assert set(_flat(state.prompt_params)) == {"encoder/prompt/prompts",
                                             "encoder/prompt/router/kernel"}
  assert pt.param_counts()["trainable"] == K * M * 64 + 64 * K

  params = {"encoder": {"prompt": _routing_params(model.module.prompt, frozen, batch)}}
  half = {k: v[:2] for k, v in batch.items()}  # examples 0 and 1: prompts 0 and 1 only
  grads = _flat(jax.jit(jax.grad(
      lambda p: model.loss_fn(params_lib.merge_params(p, frozen), half, None)[0]))(params))
  router = np.asarray(grads["encoder/prompt/router/kernel"])
  prompts = np.asarray(grads["encoder/prompt/prompts"])
  assert np.all(np.isfinite(router)) and np.linalg.norm(router) > 1e-7
  assert np.linalg.norm(prompts[0]) > 1e-7 and np.linalg.norm(prompts[1]) > 1e-7
  np.testing.assert_array_equal(prompts[2], 0.0)

  before = jax.tree_util.tree_map(np.array, state.prompt_params)
  for step in range(2):
    state, metrics = pt.train_step(state, frozen_dev, batch, jax.random.key(step))
    assert np.isfinite(float(metrics["loss"]))
  for path, leaf in _flat(before).items():
    assert np.abs(leaf - np.asarray(_flat(state.prompt_params)[path])).max() > 0, path
  for path, leaf in _flat(frozen_before).items():
    np.testing.assert_array_equal(leaf, np.asarray(_flat(frozen_dev)[path]), err_msg=path)


def test_export_is_none(frozen, batch):
  model = _model(SMoPPrompt(K, M))
  params = {"encoder": {"prompt": _routing_params(model.module.prompt, frozen, batch)}}
  assert base.export_prompt(model.module.prompt, params_lib.merge_params(params, frozen)) is None


# ------------------------------------------------------------------ settings, gin


@pytest.mark.parametrize("kwargs,message", [
    ({"num_prompts": 0}, r"SMoPPrompt.num_prompts must be an integer >= 1, got 0"),
    ({"length": 0}, r"SMoPPrompt.length \(PROMPT_LENGTH\) must be an integer >= 1, got 0"),
    ({"top_k": 5}, r"SMoPPrompt.top_k must be <= num_prompts=4, got 5"),
    ({"top_k": 0}, r"SMoPPrompt.top_k must be an integer >= 1, got 0"),
    ({"router_noise": -1.0}, r"SMoPPrompt.router_noise must be a finite number >= 0, got -1.0"),
    ({"placement": "middle"}, r"SMoPPrompt.placement must be one of .*, got 'middle'"),
])
def test_bad_settings_are_rejected(kwargs, message):
  with pytest.raises(ValueError, match=message):
    SMoPPrompt(**kwargs)


def test_batch_features_are_refused(frozen, batch):
  hook = SMoPPrompt(K, M)
  params = _routing_params(hook, frozen, batch)
  table = jnp.asarray(frozen["token_embedder"]["embedding"])
  tokens = batch["encoder_input_tokens"]
  with pytest.raises(ValueError, match=r"reads no batch feature, got \['prompt_ids'\]"):
    hook.apply({"params": params}, tokens, table[tokens], table,
               {"prompt_ids": jnp.zeros(len(tokens), jnp.int32)})


def test_gin_file_builds_the_paper_defaults():
  gin.clear_config()
  try:
    model, _ = gin_utils.model_from_gin([f"{GIN_CONFIGS}/models/t5_1_1_tiny.gin",
                                         f"{GIN_CONFIGS}/prompts/smop.gin"])
    hook = model.module.prompt
    assert isinstance(hook, SMoPPrompt)
    assert (hook.num_prompts, hook.length, hook.router_noise, hook.top_k, hook.placement) == (
        4, 5, 1.0, 1, "prefix")
    shapes = params_lib.shapes(params_lib.unbox(model.init_abstract(model.dummy_batch(1, 8, 4))))
    assert shapes["encoder/prompt/prompts"] == (4, 5, 64)
    assert shapes["encoder/prompt/router/kernel"] == (64, 4)
    optimizer = gin.query_parameter("%PROMPT_OPTIMIZER")
    assert optimizer.scoped_selector == "smop/optimizers.adafactor"
    gin.clear_config()
    with pytest.raises(ValueError, match="SMoPPrompt.top_k must be <= num_prompts=2, got 3"):
      gin_utils.model_from_gin([f"{GIN_CONFIGS}/models/t5_1_1_tiny.gin",
                                f"{GIN_CONFIGS}/prompts/smop.gin"],
                               ["SMOP_NUM_PROMPTS = 2", "SMOP_TOP_K = 3"])
  finally:
    gin.clear_config()


# ------------------------------------------------------------------ convergence


@pytest.mark.slow
def test_demo_converges(tmp_path):
  """`prompt-jax train` on the demo with prompts/smop.gin (4 prompts of 5 tokens, the paper's
  Adafactor lr 0.5): validation accuracy >= 95%."""
  gin.clear_config()
  started = time.perf_counter()
  code = cli.main(["train", f"--gin_file={GIN_CONFIGS}/runs/demo.gin",
                   f"--gin_file={GIN_CONFIGS}/prompts/smop.gin",
                   f"--gin.MODEL_DIR='{tmp_path}'", "--gin.TRAIN_STEPS=60",
                   "--gin.EVAL_PERIOD=0", "--gin.CHECKPOINT_PERIOD=60",
                   "--gin.trainer.train.optimizer=%PROMPT_OPTIMIZER"])
  gin.clear_config()
  assert code == 0
  summary = json.loads((tmp_path / "summary.json").read_text())
  before = summary["eval_untrained"]["accuracy"]
  after = summary["eval_trained"]["accuracy"]
  print(f"SMoP demo: accuracy {before:.2f} -> {after:.2f} in "
        f"{time.perf_counter() - started:.1f} s")
  assert after >= 95.0, (before, after)
  assert not (tmp_path / "prompts").exists() or not list((tmp_path / "prompts").glob("*.npy"))
