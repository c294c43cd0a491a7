"""DePT (short prompt + low-rank update of the input embeddings): the parameter budget, shapes and
axes, the encoder input against NumPy (every placement, packed rows), the two learning rates with
only DePT's parameters trained, what export gives, the gin file, and the demo trained to >= 95%."""

from __future__ import annotations

import json
import math

import flax
import gin
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from prompt_jax import cli, gin_utils
from prompt_jax import params as params_lib
from prompt_jax.data import packing, pipeline, synthetic  # noqa: F401  (registers demo tasks)
from prompt_jax.models import t5
from prompt_jax.models.encoder_decoder import EncoderDecoderModel
from prompt_jax.partitioning import Partitioner
from prompt_jax.programs import PromptPrograms
from prompt_jax.prompts import base, dept
from prompt_jax.prompts.dept import DePTPrompt
from prompt_jax.prompts.plain import Prompt
from prompt_jax.serving import prompt_export
from prompt_jax.training import optimizers
from tests.conftest import GIN_CONFIGS

TABLE = np.random.default_rng(0).normal(size=(300, 16)).astype(np.float32)
DEMO_CHECKPOINT = "builtin:demo_t5_tiny.npz"
MODEL_GIN = [str(GIN_CONFIGS / "models" / "t5_1_1_tiny.gin"),
             str(GIN_CONFIGS / "prompts" / "dept.gin")]
OWN = {"encoder/prompt/prompt/prompt", "encoder/prompt/lora_embedding_a",
       "encoder/prompt/lora_embedding_b"}


def _flat(tree):
  return flax.traverse_util.flatten_dict(flax.core.unfreeze(tree), sep="/")


def _tokens():
  tokens = np.random.default_rng(1).integers(3, 300, (3, 7)).astype(np.int32)
  tokens[1, 4:] = 0  # padding
  tokens[2, 6:] = 0
  return jnp.asarray(tokens)


def _init(hook, tokens=None):
  tokens = _tokens() if tokens is None else tokens
  return jax.jit(hook.init)(jax.random.key(0), tokens, jnp.asarray(TABLE)[tokens],
                            jnp.asarray(TABLE))["params"]


def _with_random_b(params, seed=2):
  """`params` with a non-zero B (it starts at zero), so that the update is exercised."""
  params = flax.core.unfreeze(params)
  b = params["lora_embedding_b"]
  params["lora_embedding_b"] = jnp.asarray(
      np.random.default_rng(seed).normal(size=b.shape), jnp.float32)
  return params


def _numpy_update(params, alpha=dept.DEPT_ALPHA):
  a, b = (np.asarray(params[k], np.float64) for k in ("lora_embedding_a", "lora_embedding_b"))
  return alpha / math.sqrt(a.shape[1]) * a @ b


def _batch(batch_size=8):
  cfg = pipeline.DatasetConfig("demo_sentiment", {"inputs": 64, "targets": 16},
                               batch_size=batch_size, shuffle=False)
  return {k: jnp.asarray(v) for k, v in next(pipeline.iterate_batches(cfg)).items()}


# ------------------------------------------------------------------ budget, shapes, settings


@pytest.mark.parametrize("m,r", [(60, 30), (40, 45)])
def test_the_authors_settings_match_the_plain_prompt_budget(m, r):
  """T5-Base (d=768), s=256, L=100: train.py's r=30 with m=60, the README's m=40 with r=45."""
  assert dept.matched_rank(100, m, 256, 768) == r
  assert dept.parameter_count(m, r, 256, 768) == 100 * 768


def test_shapes_parameter_count_axes_and_init():
  # d=16, s=8, L=10, m=3: r = floor(7 * 16 / 24) = 4, 144 parameters of the budget's 160
  hook = DePTPrompt(Prompt(3), max_input_length=8, budget_length=10)
  boxed = _init(hook)
  params = params_lib.unbox(boxed)
  assert params_lib.shapes(params) == {"prompt/prompt": (3, 16), "lora_embedding_a": (8, 4),
                                       "lora_embedding_b": (4, 16)}
  assert params_lib.count(params) == dept.parameter_count(3, 4, 8, 16) == 144 <= 10 * 16
  assert {k: v.names for k, v in _flat(boxed).items()} == {
      "prompt/prompt": ("prompt", "prompt_embed"),
      "lora_embedding_a": ("prompt_position", "prompt_rank"),
      "lora_embedding_b": ("prompt_rank", "prompt_embed")}
  for sharding in jax.tree_util.tree_leaves(Partitioner().shardings_for(boxed)):
    assert sharding.is_fully_replicated
  # the authors' init: A ~ U[-1/sqrt(r), 1/sqrt(r)] (kaiming_uniform, a=sqrt(5)), B = 0
  a = np.asarray(params["lora_embedding_a"])
  assert np.abs(a).max() <= 1 / math.sqrt(4) and a.std() > 0.1
  assert not np.any(np.asarray(params["lora_embedding_b"]))


@pytest.mark.parametrize("kwargs,message", [
    ({}, "DePTPrompt needs rank, or budget_length .* got neither"),
    ({"budget_length": 3}, r"DePTPrompt.budget_length \(PROMPT_LENGTH\) L=3 must exceed the "
                           "soft prompt length m=3"),
    ({"rank": 0}, "DePTPrompt.rank must be an integer >= 1, got 0"),
    ({"rank": 2, "max_input_length": 0}, "DePTPrompt.max_input_length must be an integer >= 1, "
                                         "got 0"),
    ({"rank": 2, "alpha": 0}, "DePTPrompt.alpha must be a number > 0, got 0"),
    ({"rank": 2, "placement": "middle"}, "DePTPrompt.placement must be one of"),
])
def test_bad_settings_are_rejected_naming_the_value(kwargs, message):
  with pytest.raises(ValueError, match=message):
    DePTPrompt(Prompt(3), **kwargs)


def test_a_budget_too_small_for_rank_one_and_too_long_inputs_are_refused():
  with pytest.raises(ValueError, match=r"budget L=4 tokens leaves rank .* = floor\(\(4 - 3\) \* "
                                       r"16 / \(64 \+ 16\)\) = 0 < 1"):
    _init(DePTPrompt(Prompt(3), max_input_length=64, budget_length=4))
  with pytest.raises(ValueError, match="inputs of 7 tokens exceed DePTPrompt.max_input_length=6"):
    _init(DePTPrompt(Prompt(3), max_input_length=6, rank=2))


# ------------------------------------------------------------------ the hook against NumPy


def _numpy_encoder_input(params, tokens, placement):
  """[P ; E + update] placed as `placement` does, float64."""
  prompt = np.asarray(params["prompt"]["prompt"], np.float64)
  tokens = np.asarray(tokens)
  embedded = TABLE[tokens].astype(np.float64) + _numpy_update(params)[:tokens.shape[1]]
  rows = []
  for example, row in zip(tokens, embedded):
    start = {"prefix": 0, "prefix_after_bos": 1, "suffix": int(np.sum(example > 0))}[placement]
    rows.append(np.concatenate([row[:start], prompt, row[start:]]))
  return np.stack(rows)


@pytest.mark.parametrize("placement", base.PLACEMENTS)
def test_hook_output_matches_numpy_for_every_placement(placement):
  """Input token j gets update row j wherever the prompt goes (it is added before insertion)."""
  hook = DePTPrompt(Prompt(3), placement, max_input_length=9, rank=2)
  tokens = _tokens()
  params = _with_random_b(params_lib.unbox(_init(hook, tokens)))
  embedded, mask = hook.apply({"params": params}, tokens, jnp.asarray(TABLE)[tokens],
                              jnp.asarray(TABLE))
  np.testing.assert_allclose(np.asarray(embedded), _numpy_encoder_input(params, tokens, placement),
                             rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(np.asarray(mask), np.asarray(base.prompt_mask(tokens, 3,
                                                                               placement)))


def test_packed_rows_give_every_example_its_unpacked_input():
  """Slot q >= m of a packed example is its text token q - m and gets update row q - m; the
  prompt slots hold the prompt and padding is untouched."""
  m = 3
  lengths = [5, 3, 7, 4, 2]
  rng = np.random.default_rng(4)
  examples = [{"encoder_input_tokens": rng.integers(3, 300, n).astype(np.int32),
               "decoder_target_tokens": np.ones(1, np.int32)} for n in lengths]
  (batch,) = packing.pack_examples(examples, 3, 16, 4, m, slot_id=base.PROMPT_SLOT_ID)
  hook = DePTPrompt(Prompt(m), max_input_length=13, rank=2)  # rows of 16 = 3 slots + 13
  unpacked_tokens = np.zeros((len(lengths), 7), np.int32)
  for i, example in enumerate(examples):
    unpacked_tokens[i, :lengths[i]] = example["encoder_input_tokens"]
  params = _with_random_b(params_lib.unbox(_init(hook, jnp.asarray(unpacked_tokens))))
  unpacked = _numpy_encoder_input(params, unpacked_tokens, "prefix")

  tokens = jnp.asarray(batch["encoder_input_tokens"])
  features = {k: jnp.asarray(batch[k]) for k in base.PACKED_FEATURES}
  embedded, mask = hook.apply({"params": params}, tokens, jnp.asarray(TABLE)[tokens],
                              jnp.asarray(TABLE), features)
  embedded, segments = np.asarray(embedded), batch["encoder_segment_ids"]
  np.testing.assert_array_equal(np.asarray(mask), segments > 0)
  seen = 0
  for r in range(segments.shape[0]):
    for s in range(1, segments[r].max() + 1):
      text = batch["encoder_input_tokens"][r][segments[r] == s][m:]
      (i,) = [i for i, ex in enumerate(examples)
              if np.array_equal(ex["encoder_input_tokens"], text)]
      np.testing.assert_allclose(embedded[r][segments[r] == s], unpacked[i, :m + lengths[i]],
                                 rtol=1e-5, atol=1e-5)
      seen += 1
    np.testing.assert_array_equal(embedded[r][segments[r] == 0],
                                  TABLE[batch["encoder_input_tokens"][r][segments[r] == 0]])
  assert seen == len(examples) and max(segments.max(axis=1)) >= 2  # rows hold several examples


# ------------------------------------------------ training: two learning rates, frozen model


LOW_RANK_LR, PROMPT_LR = 5e-3, 0.3


@pytest.fixture(scope="module")
def trained():
  """DePT (m=4, s=64, r=3) on the demo's frozen model with the two-learning-rate AdamW of
  prompts/dept.gin: (model, programs, states after 0, 1 and 2 steps, frozen before, frozen)."""
  model = EncoderDecoderModel(t5.Transformer(t5.preset("tiny"), DePTPrompt(
      Prompt(4), max_input_length=64, rank=3)))
  optimizer = optimizers.split_by_path(
      dept.LOW_RANK_PATTERN, optimizers.adamw(LOW_RANK_LR, clipping_threshold=1.0),
      optimizers.adamw(PROMPT_LR, clipping_threshold=1.0), names=("low_rank", "prompt"))
  pt = PromptPrograms.for_training(model, optimizer, Partitioner(), 64, 16, 8)
  frozen = pt.load_frozen_params(DEMO_CHECKPOINT)
  frozen_before = jax.tree_util.tree_map(np.array, frozen)
  state = pt.init_state(frozen, jax.random.key(0))
  states = [jax.tree_util.tree_map(np.array, state)]
  for _ in range(2):
    state, metrics = pt.train_step(state, frozen, _batch(), jax.random.key(1))
    assert np.isfinite(float(metrics["grad_norm"])) and float(metrics["grad_norm"]) > 0
    states.append(jax.tree_util.tree_map(np.array, state))
  return model, pt, states, frozen_before, frozen


def test_only_dept_parameters_train_each_at_its_learning_rate(trained):
  """Trainable: the soft prompt, A and B, each with AdamW state in its group; the frozen model
  has neither gradient nor state and is bit-identical after the steps. The first AdamW step
  moves a parameter by about its learning rate: the prompt ~0.3, B ~5e-3; A not yet (B = 0
  gives it a zero gradient), then ~5e-3 at the second step."""
  _, pt, states, frozen_before, frozen = trained
  assert not any("prompt" in k for k in _flat(pt.abstract_frozen))
  assert set(_flat(states[0].prompt_params)) == OWN
  groups = states[0].opt_state.inner_states
  assert set(groups) == {"low_rank", "prompt"}
  shapes = {tuple(x.shape) for x in jax.tree_util.tree_leaves(states[0].opt_state)}
  assert shapes <= {(4, 64), (64, 3), (3, 64), ()}, shapes
  step = [{k: np.abs(np.asarray(leaf) - np.asarray(_flat(before.prompt_params)[k])).max()
           for k, leaf in _flat(later.prompt_params).items()}
          for before, later in zip(states, states[1:])]
  assert 0.5 * PROMPT_LR < step[0]["encoder/prompt/prompt/prompt"] <= 1.01 * PROMPT_LR
  assert 0.5 * LOW_RANK_LR < step[0]["encoder/prompt/lora_embedding_b"] <= 1.01 * LOW_RANK_LR
  assert step[0]["encoder/prompt/lora_embedding_a"] < 1e-6
  assert 0.5 * LOW_RANK_LR < step[1]["encoder/prompt/lora_embedding_a"] <= 1.01 * LOW_RANK_LR
  for path, leaf in _flat(frozen_before).items():
    np.testing.assert_array_equal(leaf, np.asarray(_flat(frozen)[path]), err_msg=path)


def test_encoder_input_matches_numpy_and_what_export_gives(trained):
  """Through the real model: the hook's encoder input = [P ; E + (alpha/sqrt(r)) A[:l] @ B]
  (NumPy, float64). `export` is None (no plain prompt), so the CLI refuses; `export_parts`
  folds both pieces, and the untrained DePT (B = 0) feeds the encoder its prompt part exactly."""
  model, pt, states, _, frozen = trained
  tokens = _batch()["encoder_input_tokens"]
  capture = jax.jit(lambda p, x: model.module.apply(
      {"params": p}, x, method=model.module.encode, enable_dropout=False,
      capture_intermediates=True, mutable=["intermediates"])[1]["intermediates"])
  trained_prompt = flax.core.unfreeze(states[-1].prompt_params)
  prompt_params = trained_prompt["encoder"]["prompt"]
  prompt_params["lora_embedding_b"] = _with_random_b(prompt_params)["lora_embedding_b"]
  params = params_lib.merge_params(trained_prompt, frozen)
  embedded, mask = capture(params, tokens)["encoder"]["prompt"]["__call__"][0]
  p = {"prompt": {"prompt": prompt_params["prompt"]["prompt"]},
       **{k: prompt_params[k] for k in ("lora_embedding_a", "lora_embedding_b")}}
  update = _numpy_update(p)
  table = np.asarray(frozen["token_embedder"]["embedding"], np.float64)
  batch, length = tokens.shape
  expected = np.concatenate([np.broadcast_to(np.asarray(p["prompt"]["prompt"], np.float64),
                                             (batch, 4, 64)),
                             table[np.asarray(tokens)] + update[:length]], axis=1)
  assert np.abs(update).max() > 0.1  # the update is a visible part of the input
  np.testing.assert_allclose(np.asarray(embedded), expected, rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(
      np.asarray(mask), np.concatenate([np.ones((batch, 4), bool), tokens > 0], axis=1))

  assert pt.export_prompt(trained_prompt, frozen) is None
  assert base.export_prompt(model.module.prompt, params) is None
  with pytest.raises(ValueError, match="DePTPrompt prompt .* has no plain"):
    prompt_export.fold_prompt(model, trained_prompt, frozen)
  hook = model.module.prompt
  parts = hook.apply({"params": params["encoder"]["prompt"]},
                     params["token_embedder"]["embedding"], method=hook.export_parts)
  np.testing.assert_array_equal(np.asarray(parts["prompt"]), p["prompt"]["prompt"])
  np.testing.assert_allclose(np.asarray(parts["embedding_update"]), update, rtol=1e-5, atol=1e-5)

  untrained = states[0].prompt_params  # B = 0: the short prompt alone, unchanged embeddings
  embedded, _ = capture(params_lib.merge_params(untrained, frozen),
                        tokens)["encoder"]["prompt"]["__call__"][0]
  prompt = np.asarray(untrained["encoder"]["prompt"]["prompt"]["prompt"])
  np.testing.assert_array_equal(np.asarray(embedded)[:, :4],
                                np.broadcast_to(prompt, (batch, 4, 64)))
  np.testing.assert_array_equal(np.asarray(embedded)[:, 4:], table[np.asarray(tokens)])


# ------------------------------------------------------------------------------ gin and demo


def test_gin_file_builds_the_authors_defaults_and_two_learning_rates():
  gin.clear_config()
  try:
    model, _ = gin_utils.model_from_gin(MODEL_GIN)
    optimizer = gin.query_parameter("%PROMPT_OPTIMIZER").scoped_configurable_fn()
  finally:
    gin.clear_config()
  hook = model.module.prompt
  assert (type(hook), hook.length, hook.max_input_length, hook.rank, hook.budget_length,
          hook.alpha, hook.placement) == (DePTPrompt, 60, 256, None, 100, 8.0, "prefix")
  shapes = params_lib.unbox(model.init_abstract(model.dummy_batch(1, 8, 4)))
  trainable, _ = params_lib.split_params(shapes)
  # the tiny model's d=64: r = floor(40 * 64 / 320) = 8, exactly the budget 100 * 64
  assert params_lib.shapes(trainable) == {"encoder/prompt/prompt/prompt": (60, 64),
                                          "encoder/prompt/lora_embedding_a": (256, 8),
                                          "encoder/prompt/lora_embedding_b": (8, 64)}
  assert params_lib.count(trainable) == 100 * 64
  settings = optimizers.description(optimizer)
  assert (settings["name"], settings["pattern"], settings["names"]) == (
      "split_by_path", dept.LOW_RANK_PATTERN, ["low_rank", "prompt"])
  assert (settings["matched"]["learning_rate"], settings["rest"]["learning_rate"]) == (5e-3, 0.3)
  for side in ("matched", "rest"):
    assert (settings[side]["name"], settings[side]["weight_decay"],
            settings[side]["clipping_threshold"]) == ("adamw", 1e-5, 1.0)
  gin_utils.check([*MODEL_GIN, str(GIN_CONFIGS / "runs" / "superpos_finetune.gin")],
                  ["MODEL_DIR = '/tmp/unused'", "MIXTURE_OR_TASK_NAME = 'demo_sentiment'"],
                  roots=["trainer.train"])


def test_demo_reaches_95_percent_validation_accuracy(tmp_path):
  """runs/demo.gin with prompts/dept.gin at the demo's budget L=10 (m=6, s=64 -> r=2: 6*64 +
  64*2 + 2*64 = 640 parameters, the plain prompt's) and its two learning rates: >= 95%
  greedy-decoded accuracy on demo_sentiment's validation split."""
  gin.clear_config()
  try:
    code = cli.main([
        "train", f"--gin_file={GIN_CONFIGS}/runs/demo.gin",
        f"--gin_file={GIN_CONFIGS}/prompts/dept.gin", "--gin.PROMPT_LENGTH=10",
        "--gin.DEPT_PROMPT_LENGTH=6", "--gin.DEPT_MAX_INPUT_LENGTH=64",
        "--gin.trainer.train.optimizer=%PROMPT_OPTIMIZER", f"--gin.MODEL_DIR='{tmp_path}'",
        "--gin.TRAIN_STEPS=60", "--gin.EVAL_PERIOD=0", "--gin.CHECKPOINT_PERIOD=60"])
  finally:
    gin.clear_config()
  assert code == 0
  summary = json.loads((tmp_path / "summary.json").read_text())
  before, after = summary["eval_untrained"]["accuracy"], summary["eval_trained"]["accuracy"]
  print(f"DePT demo: validation accuracy {before:.2f} -> {after:.2f} after 60 steps")
  assert after >= 95.0, (before, after)
  record = json.loads((tmp_path / "run.json").read_text())
  assert record["trainable"] == {"encoder/prompt/prompt/prompt": [6, 64],
                                 "encoder/prompt/lora_embedding_a": [64, 2],
                                 "encoder/prompt/lora_embedding_b": [2, 64]}
  assert not (tmp_path / "prompts").exists()  # no plain prompt to export
