"""Multi-task prompt methods: shared + task-specific prompts (concat, add) and PEFT's MPT.

Every check compares against an independent computation: the effective prompts written out in
numpy / jnp from the parameters (`_effective`), a plain single prompt (`InputPrompt(Prompt)`)
holding a task's exported row, and jax.grad of per-task losses of that plain model."""

from __future__ import annotations

import flax
import flax.linen as nn
import gin
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from prompt_jax import gin_utils
from prompt_jax import params as params_lib
from prompt_jax.data import pipeline, synthetic
from prompt_jax.models import losses, t5
from prompt_jax.models.encoder_decoder import EncoderDecoderModel
from prompt_jax.partitioning import Partitioner
from prompt_jax.programs import PromptPrograms
from prompt_jax.prompts.base import PLACEMENTS, InputPrompt
from prompt_jax.prompts.mpt import MPTPrompt
from prompt_jax.prompts.multitask_prompts import SharedTaskPrompt
from prompt_jax.prompts.plain import Prompt
from prompt_jax.training import multitask_training, optimizers

DEMO_CHECKPOINT = "builtin:demo_t5_tiny.npz"
TASKS = ("a", "b", "c")
L_IN, L_OUT, EMBED, VOCAB = 12, 4, 64, 384
ROOT = "encoder/prompt/prompt"


def _hook(method, placement="prefix", num_tasks=len(TASKS)):
  if method == "concat":
    return SharedTaskPrompt(num_tasks=num_tasks, length=5, shared_length=2, combine="concat",
                            placement=placement)
  if method == "add":
    return SharedTaskPrompt(num_tasks=num_tasks, length=4, combine="add", placement=placement)
  return MPTPrompt(num_tasks=num_tasks, length=4, rank=2, placement=placement)


METHODS = ("concat", "add", "mpt")
SHARED_LEAF = {"concat": "shared_prompt", "add": "shared_prompt", "mpt": "prompt_embeddings"}
TASK_LEAVES = {"concat": ["task_prompts"], "add": ["task_prompts"],
               "mpt": ["prefix_task_cols", "prefix_task_rows"]}


def _effective(method, p, xp):
  """Every task's prompt [tasks, length, embed] from the method's leaves `p` ({name: array}),
  written out with `xp` (numpy or jax.numpy), one task at a time."""
  if method == "concat":
    shared, tasks = p["shared_prompt"], p["task_prompts"]
    return xp.stack([xp.concatenate([shared, tasks[t]], axis=0) for t in range(len(tasks))])
  if method == "add":
    shared, tasks = p["shared_prompt"], p["task_prompts"]
    return xp.stack([shared + tasks[t] for t in range(len(tasks))])
  shared, cols, rows = p["prompt_embeddings"], p["prefix_task_cols"], p["prefix_task_rows"]
  return xp.stack([shared * (cols[t] @ rows[t]) for t in range(len(cols))])


def _flat(tree) -> dict:
  return flax.traverse_util.flatten_dict(flax.core.unfreeze(tree), sep="/")


def _leaves(prompt_params) -> dict:
  """The hook's leaves by name, from a trainable tree or a hook's own parameter tree."""
  flat = _flat(prompt_params)
  return {path.rsplit("/", 1)[-1]: leaf for path, leaf in flat.items()}


def _random_like(tree, rng, scale=0.5):
  return jax.tree_util.tree_map(
      lambda x: (scale * rng.normal(size=np.shape(x))).astype(np.float32), tree)


def _tokens(rng, rows):
  tokens = rng.integers(3, 259, size=(rows, L_IN)).astype(np.int32)
  for row, n in enumerate(rng.integers(4, L_IN, size=rows)):
    tokens[row, n:] = 0  # different padding per row (suffix placement depends on it)
  return tokens


def _batch(rng, task_ids):
  rows = len(task_ids)
  targets = rng.integers(3, 259, size=(rows, L_OUT)).astype(np.int32)
  targets[:, -1] = 0
  inputs = np.concatenate([np.zeros((rows, 1), np.int32), targets[:, :-1]], axis=1)
  return {"encoder_input_tokens": _tokens(rng, rows), "decoder_input_tokens": inputs,
          "decoder_target_tokens": targets,
          "decoder_loss_weights": (targets > 0).astype(np.int32),
          "prompt_ids": np.asarray(task_ids, np.int32)}


def _rows(batch, task):
  keep = batch["prompt_ids"] == task
  return {k: v[keep] for k, v in batch.items() if k != "prompt_ids"}


def _model(hook):
  return EncoderDecoderModel(t5.Transformer(t5.preset("tiny"), hook))


def _hook_params(hook, rng):
  """Random values (not the initialisers') for the hook's own parameters."""
  table = jnp.zeros((VOCAB, EMBED))
  tokens = jnp.ones((1, L_IN), jnp.int32)
  boxed = hook.init(jax.random.key(0), tokens, table[tokens], table)
  return _random_like(nn.meta.unbox(boxed), rng)


def _plain_encoder_input(placement, prompt, tokens, embedded, table):
  plain = InputPrompt(Prompt(prompt.shape[0]), placement)
  return plain.apply({"params": {"prompt": {"prompt": prompt}}}, tokens, embedded, table)


# ------------------------------------------------------------------ (a) forward and export


@pytest.mark.parametrize("placement", PLACEMENTS)
@pytest.mark.parametrize("method", METHODS)
def test_mixed_batch_encoder_input_equals_single_prompt_with_exported_row(method, placement):
  rng = np.random.default_rng(0)
  hook = _hook(method, placement)
  params = _hook_params(hook, rng)
  table = jnp.asarray(rng.normal(size=(VOCAB, EMBED)).astype(np.float32))
  ids = np.array([2, 0, 1, 1, 0, 2, 2], np.int32)
  tokens = _tokens(rng, len(ids))
  embedded = table[tokens]
  exported = np.asarray(hook.apply(params, table, method=hook.export))
  np.testing.assert_allclose(exported, _effective(method, _leaves(params), np), rtol=1e-6,
                             atol=1e-7)
  assert exported.shape == (len(TASKS), hook.length, EMBED)
  mixed, mask = hook.apply(params, tokens, embedded, table, {"prompt_ids": jnp.asarray(ids)})
  np.testing.assert_array_equal(mask, hook.apply(params, tokens, method=hook.input_mask))
  for t in range(len(TASKS)):
    rows = ids == t
    want, want_mask = _plain_encoder_input(placement, exported[t], tokens[rows], embedded[rows],
                                           table)
    np.testing.assert_array_equal(np.asarray(mixed)[rows], np.asarray(want))
    np.testing.assert_array_equal(np.asarray(mask)[rows], np.asarray(want_mask))
  # The tasks' prompts differ, so choosing the wrong row would show above.
  assert not np.allclose(exported[0], exported[1])


@pytest.mark.parametrize("method", METHODS)
def test_model_logits_of_a_mixed_batch_equal_single_prompt_models(method):
  """Through the whole frozen model (the hook reads `prompt_ids` from the batch)."""
  rng = np.random.default_rng(1)
  hook = _hook(method, "suffix")
  model = _model(hook)
  programs = PromptPrograms.for_training(model, optimizers.adafactor(), Partitioner(), L_IN,
                                         L_OUT, 6)
  frozen = programs.load_frozen_params(DEMO_CHECKPOINT)
  prompt_params = _random_like(programs.init_prompt(frozen, jax.random.key(0)), rng)
  batch = _batch(rng, [0, 1, 2, 2, 1, 0])
  logits = model.logits(params_lib.merge_params(prompt_params, frozen), batch)
  exported = programs.export_prompt(prompt_params, frozen)
  plain = _model(InputPrompt(Prompt(hook.length), "suffix"))
  for t in range(len(TASKS)):
    single = {"encoder": {"prompt": {"prompt": {"prompt": jnp.asarray(exported[t])}}}}
    rows = _rows(batch, t)
    want = plain.logits(params_lib.merge_params(single, frozen), rows)
    # 6 rows vs 2: other dot kernels and float32 sums, off by ~1e-6 of the logits' scale (also
    # for small logits; 6e-6 seen at |logit| <= 10, 0.37 of rtol=1e-5, atol=1e-5): 1e-5 of it.
    np.testing.assert_allclose(np.asarray(logits)[batch["prompt_ids"] == t], want, rtol=0,
                               atol=1e-5 * float(np.max(np.abs(want))))


def test_missing_unknown_and_out_of_range_prompt_ids():
  rng = np.random.default_rng(2)
  hook = _hook("concat")
  params = _hook_params(hook, rng)
  table = jnp.asarray(rng.normal(size=(VOCAB, EMBED)).astype(np.float32))
  tokens = _tokens(rng, 3)
  with pytest.raises(ValueError, match="needs prompt_ids"):
    hook.apply(params, tokens, table[tokens], table, None)
  with pytest.raises(ValueError, match=r"reads only the batch feature prompt_ids, got \['x'\]"):
    hook.apply(params, tokens, table[tokens], table, {"prompt_ids": jnp.zeros(3, jnp.int32),
                                                      "x": jnp.zeros(3)})
  out, _ = hook.apply(params, tokens, table[tokens], table,
                      {"prompt_ids": jnp.asarray([0, 3, 1], jnp.int32)})
  out = np.asarray(out)
  assert np.isnan(out[1, :hook.length]).all() and np.isfinite(out[[0, 2]]).all()
  # A hook of one task needs no ids.
  single = _hook("mpt", num_tasks=1)
  one = _hook_params(single, rng)
  got, _ = single.apply(one, tokens, table[tokens], table, None)
  np.testing.assert_allclose(np.asarray(got)[:, :single.length],
                             np.broadcast_to(_effective("mpt", _leaves(one), np)[0],
                                             (3, single.length, EMBED)), rtol=1e-6)


def test_configuration_errors_name_the_values():
  with pytest.raises(ValueError, match=r"SHARED_PROMPT_LENGTH \(3\) must equal PROMPT_LENGTH "
                                       r"\(4\)"):
    SharedTaskPrompt(num_tasks=2, length=4, shared_length=3, combine="add")
  with pytest.raises(ValueError, match=r"SHARED_PROMPT_LENGTH \(4\) < PROMPT_LENGTH \(4\)"):
    SharedTaskPrompt(num_tasks=2, length=4, shared_length=4, combine="concat")
  with pytest.raises(ValueError, match="combine must be one of"):
    SharedTaskPrompt(num_tasks=2, length=4, combine="mul")
  with pytest.raises(ValueError, match="num_tasks .* got 0"):
    MPTPrompt(num_tasks=0, length=4)
  with pytest.raises(ValueError, match="rank .* got 0"):
    MPTPrompt(num_tasks=2, length=4, rank=0)
  with pytest.raises(ValueError, match="placement must be one of"):
    MPTPrompt(num_tasks=2, length=4, placement="middle")
  hook = MPTPrompt(num_tasks=2, length=6, max_encoder_length=16)
  table = jnp.zeros((VOCAB, EMBED))
  tokens = jnp.ones((1, 11), jnp.int32)
  with pytest.raises(ValueError, match=r"prompt length 6 \+ inputs length 11 = 17"):
    hook.init(jax.random.key(0), tokens, table[tokens], table)


# -------------------------------------------------------------------- (b) per-task leaves


@pytest.mark.parametrize("method", METHODS)
def test_task_leaf_paths_marks_exactly_the_per_task_leaves(method):
  model = _model(_hook(method))
  paths = multitask_training.task_leaf_paths(model)
  assert paths == sorted(f"{ROOT}/{name}" for name in TASK_LEAVES[method])
  boxed = model.init_abstract(model.dummy_batch(1, 8, 8))
  trainable, _ = params_lib.split_params(boxed)
  flat = _flat(trainable)
  assert sorted(set(flat) - set(paths)) == [f"{ROOT}/{SHARED_LEAF[method]}"]
  for path in paths:  # one row per task
    assert flat[path].value.shape[0] == len(TASKS)


# ------------------------------------------------------------------- (c) N tasks in one step


def _independent_task_grads(method, hook, frozen, batch, prompt_params, z_loss, normalizer):
  """jax.grad, for each task alone, of the plain single-prompt model's loss on that task's rows
  with the prompt written out from the method's parameters (`_effective`)."""
  plain = _model(InputPrompt(Prompt(hook.length), hook.placement))

  def alone(p, t, rows):
    prompt = _effective(method, _leaves(p), jnp)[t]
    single = {"encoder": {"prompt": {"prompt": {"prompt": prompt}}}}
    logits = plain.logits(params_lib.merge_params(single, frozen), rows)
    return losses.loss_and_metrics(logits, rows["decoder_target_tokens"],
                                   rows["decoder_loss_weights"], z_loss, normalizer)[0]

  return [jax.grad(alone)(prompt_params, t, _rows(batch, t)) for t in range(len(TASKS))]


# The suffix placement runs in the default suite for every method; prefix is slow (~30-45 s each).
@pytest.mark.parametrize("placement", [pytest.param("prefix", marks=pytest.mark.slow), "suffix"])
@pytest.mark.parametrize("method", METHODS)
def test_one_multitask_step_sums_task_gradients_on_shared_and_keeps_task_rows_apart(
    method, placement):
  rng = np.random.default_rng(3)
  hook = _hook(method, placement)
  model = _model(hook)
  paths = multitask_training.task_leaf_paths(model)
  lr = 0.05
  multi = PromptPrograms.for_training(model, optimizers.per_task(optax.sgd(lr), paths),
                                      Partitioner(), L_IN, L_OUT, 6)
  frozen = multi.load_frozen_params(DEMO_CHECKPOINT)
  regime = multitask_training.MultiTaskTuning(multi, None, TASKS, paths)
  params = _random_like(multi.init_prompt(frozen, jax.random.key(0)), rng)
  batch = _batch(rng, [0, 1, 2, 0, 1, 2])

  grads = jax.grad(lambda p: regime.loss(p, frozen, batch, None)[0])(params)
  alone = _independent_task_grads(method, hook, frozen, batch, params, model.z_loss,
                                  model.loss_normalizing_factor)
  got, each = _leaves(grads), [_leaves(g) for g in alone]
  shared = SHARED_LEAF[method]
  total = {name: sum(g[name] for g in each) for name in got}
  scale = max(float(np.max(np.abs(v))) for v in total.values())
  for name in got:
    np.testing.assert_allclose(got[name], total[name], rtol=1e-5, atol=1e-5 * scale,
                               err_msg=name)
  for t in range(len(TASKS)):  # every task contributes to the shared prompt's sum
    assert np.max(np.abs(each[t][shared])) > 1e-3 * scale
    for name in TASK_LEAVES[method]:  # and task t's rows get task t's gradient only
      np.testing.assert_allclose(got[name][t], each[t][name][t], rtol=1e-5, atol=1e-5 * scale)

  # One step (SGD, so the update is -lr * gradient): shared moves by the sum, rows by their own.
  before = _leaves(jax.tree_util.tree_map(np.array, params))
  state = multi.state_from_prompt(params)
  state, metrics = regime.step_fn(state, frozen, multi.shard_batch(batch), jax.random.key(1))
  after = _leaves(jax.tree_util.tree_map(np.asarray, state.prompt_params))
  for name in after:
    # after - before also carries the rounding of `after` (|p| <= ~2) to float32: 2^-24 * |p|,
    # 6e-8, a third of the gradient's 1e-5 * lr * scale here, and the same on any CPU.
    np.testing.assert_allclose(after[name] - before[name], -lr * total[name], rtol=1e-4,
                               atol=1e-5 * lr * scale + 2.0 ** -24 * np.max(np.abs(after[name])),
                               err_msg=name)
  assert float(metrics["grad_norm"]) == pytest.approx(
      float(optax.global_norm(list(total.values()))), rel=1e-5)

  # A batch without task 2: task 2's rows stay exactly as they were, the shared prompt moves.
  absent = _batch(rng, [0, 1, 0, 1, 1, 0])
  state, metrics = regime.step_fn(state, frozen, multi.shard_batch(absent), jax.random.key(1))
  final = _leaves(jax.tree_util.tree_map(np.asarray, state.prompt_params))
  assert float(metrics["loss/c"]) == 0.0
  for name in TASK_LEAVES[method]:
    np.testing.assert_array_equal(final[name][2], after[name][2])
    assert not np.allclose(final[name][:2], after[name][:2])
  assert not np.allclose(final[shared], after[shared])


# ------------------------------------------------------------------------- (d) MPT's export


def test_mpt_export_folds_shared_times_low_rank_product_per_task():
  rng = np.random.default_rng(4)
  hook = MPTPrompt(num_tasks=4, length=6, rank=3)
  params = _hook_params(hook, rng)
  table = jnp.zeros((VOCAB, EMBED))
  folded = np.asarray(hook.apply(params, table, method=hook.export))
  p = {k: np.asarray(v, np.float64) for k, v in _leaves(params).items()}
  assert p["prefix_task_cols"].shape == (4, 6, 3) and p["prefix_task_rows"].shape == (4, 3, EMBED)
  for t in range(4):
    low_rank = np.zeros((6, EMBED))
    for k in range(3):  # the rank-3 product as a sum of outer products
      low_rank += np.outer(p["prefix_task_cols"][t, :, k], p["prefix_task_rows"][t, k])
    np.testing.assert_allclose(folded[t], p["prompt_embeddings"] * low_rank, rtol=1e-5,
                               atol=1e-6)


def test_mpt_initialisation_is_pefts():
  """PEFT: shared prompt N(0, 1) (`prompt_tuning_init='RANDOM'`), both factors N(0, 0.02^2);
  tasks draw different factors."""
  hook = MPTPrompt(num_tasks=8, length=50, rank=4)
  table = jnp.zeros((VOCAB, EMBED))
  tokens = jnp.ones((1, 2), jnp.int32)
  p = _leaves(nn.meta.unbox(hook.init(jax.random.key(5), tokens, table[tokens], table)))
  assert np.std(p["prompt_embeddings"]) == pytest.approx(1.0, rel=0.05)
  for name in ("prefix_task_cols", "prefix_task_rows"):
    assert np.std(p[name]) == pytest.approx(hook.factor_stddev, rel=0.05)
    assert abs(np.mean(p[name])) < 0.1 * hook.factor_stddev
    assert not np.allclose(p[name][0], p[name][1])


# ------------------------------------------------------------------------------- (e) gin, runs


@pytest.mark.parametrize("gin_file,bindings,kind", [
    ("prompts/multitask_shared.gin", [], SharedTaskPrompt),
    ("prompts/multitask_shared.gin", ["PROMPT_COMBINE = 'add'", "SHARED_PROMPT_LENGTH = None"],
     SharedTaskPrompt),
    ("prompts/mpt.gin", ["MPT_RANK = 2"], MPTPrompt),
])
def test_gin_file_after_the_multitask_run_file_gives_the_hook(gin_file, bindings, kind):
  gin.clear_config()
  try:
    model, _ = gin_utils.model_from_gin(["runs/multitask_demo.gin", gin_file], bindings)
    hook = model.module.prompt
    assert isinstance(hook, kind)
    assert hook.num_tasks == gin.query_parameter("%NUM_TASKS")
    assert hook.length == gin.query_parameter("%PROMPT_LENGTH")
    abstract = model.init_abstract(model.dummy_batch(1, 8, 8))
    flat = _flat(params_lib.split_params(abstract)[0])
    paths = multitask_training.task_leaf_paths(model)
    assert paths and all(flat[p].value.shape[0] == hook.num_tasks for p in paths)
  finally:
    gin.clear_config()


@pytest.mark.parametrize("method", ["concat", "mpt"])
def test_train_multitask_trains_each_method_and_writes_task_prompts(method, tmp_path):
  lengths = {"inputs": 48, "targets": 6}
  train = pipeline.DatasetConfig(synthetic.MULTITASK_MIXTURE, lengths, batch_size=8)
  model = _model(_hook(method))
  summary = multitask_training.train_multitask(
      model=model, model_dir=str(tmp_path), train_steps=3, train_dataset_cfg=train,
      initial_checkpoint_path=DEMO_CHECKPOINT, checkpoint_every_steps=1, keep_checkpoints=None,
      log_every_steps=1)
  names = summary["tasks"]
  assert sorted(names) == sorted(synthetic.MULTITASK_TASKS)
  assert np.isfinite(summary["train"]["loss"])
  first = np.load(tmp_path / "prompts" / "prompt_1.npy")
  last = np.load(tmp_path / "prompts" / "prompt_3.npy")
  assert last.shape == (len(names), model.module.prompt.length, EMBED)
  for t, task in enumerate(names):
    prompt = np.load(tmp_path / "prompts" / f"{task}.npy")
    np.testing.assert_array_equal(prompt, last[t])
    assert np.isfinite(prompt).all() and not np.allclose(prompt, first[t])
