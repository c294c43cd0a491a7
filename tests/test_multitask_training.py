"""Multi-task prompt tuning: N tasks in one run train exactly like N single-task runs on the
same examples; mixture batches, tasks.json, per-task exports and evaluation, resume."""

from __future__ import annotations

import json
import shutil

import jax
import numpy as np
import pytest

from prompt_jax.data import mixtures, pipeline, synthetic
from prompt_jax.interop import peft
from prompt_jax.models import losses, t5
from prompt_jax.models.encoder_decoder import EncoderDecoderModel
from prompt_jax.partitioning import Partitioner
from prompt_jax.programs import PromptPrograms
from prompt_jax.prompts import initializers
from prompt_jax.prompts.bank import PromptBank
from prompt_jax.serving import loading, multitask_evaluation
from prompt_jax.storage import prompt_files
from prompt_jax.training import multitask_training, optimizers

# Values compared against tolerances: CI runs these again under another CPU instruction set.
pytestmark = pytest.mark.numerics

DEMO_CHECKPOINT = "builtin:demo_t5_tiny.npz"
TASKS = ("a", "b", "c")
L_IN, L_OUT, P = 12, 4, 3


def _bank_model(placement="prefix"):
  bank = PromptBank(num_prompts=len(TASKS), length=P, init_fn=initializers.uniform(),
                    placement=placement)
  return EncoderDecoderModel(t5.Transformer(t5.preset("tiny"), bank))


def _batch(rng, task_ids):
  rows = len(task_ids)
  tokens = rng.integers(3, 259, size=(rows, L_IN)).astype(np.int32)
  for row, n in enumerate(rng.integers(4, L_IN, size=rows)):
    tokens[row, n:] = 0
  targets = rng.integers(3, 259, size=(rows, L_OUT)).astype(np.int32)
  targets[:, -1] = 0
  inputs = np.concatenate([np.zeros((rows, 1), np.int32), targets[:, :-1]], axis=1)
  return {"encoder_input_tokens": tokens, "decoder_input_tokens": inputs,
          "decoder_target_tokens": targets,
          "decoder_loss_weights": (targets > 0).astype(np.int32),
          "prompt_ids": np.asarray(task_ids, np.int32)}


def _rows(batch, task):
  keep = batch["prompt_ids"] == task
  return {k: v[keep] for k, v in batch.items() if k != "prompt_ids"}


@pytest.mark.parametrize("placement", ["prefix", "suffix"])
def test_n_tasks_in_one_run_equal_n_single_task_runs(placement):
  rng = np.random.default_rng(0)
  # Mixed batches; task 2 is absent from the third one (its prompt must skip that step).
  schedule = [[0, 1, 2, 0, 1, 2], [2, 0, 1, 1, 0, 2], [0, 1, 0, 1], [1, 2, 0, 2, 1, 0]]
  batches = [_batch(rng, ids) for ids in schedule]
  model = _bank_model(placement)
  task_paths = multitask_training.task_leaf_paths(model)
  assert task_paths == ["encoder/prompt/prompt/prompts"]
  multi = PromptPrograms.for_training(
      model, optimizers.per_task(optimizers.adafactor(), task_paths), Partitioner(), L_IN, L_OUT,
      6)
  frozen = multi.load_frozen_params(DEMO_CHECKPOINT)
  regime = multitask_training.MultiTaskTuning(multi, None, TASKS, task_paths)
  state = regime.init_state(frozen, jax.random.key(0))
  bank0 = np.asarray(multi.export_prompt(state.prompt_params, frozen))
  multi_losses = []
  for batch in batches:
    state, metrics = regime.step_fn(state, frozen, multi.shard_batch(batch), jax.random.key(1))
    multi_losses.append({t: float(metrics[f"loss/{task}"]) for t, task in enumerate(TASKS)})
  bank = np.asarray(multi.export_prompt(state.prompt_params, frozen))

  single = multitask_evaluation.single_prompt_programs(multi)
  single = PromptPrograms.for_training(single.model, optimizers.adafactor(), Partitioner(), L_IN,
                                 L_OUT, 2)
  for t in range(len(TASKS)):
    alone = single.state_from_prompt(loading.prompt_params_from_array(single, bank0[t]))
    for step, batch in enumerate(batches):
      rows = _rows(batch, t)
      if not len(rows["encoder_input_tokens"]):
        assert multi_losses[step][t] == 0.0  # absent: no loss, no step
        continue
      alone, metrics = single.train_step(alone, frozen, rows, jax.random.key(1))
      assert multi_losses[step][t] == pytest.approx(float(metrics["loss"]), rel=1e-5), (t, step)
    # Float32 sums over 6 rows or 2 differ in the last bits, and Adafactor (lr 0.3, each entry
    # divided by the RMS of its own gradients: see adafactor_tolerance) amplifies that to ~1.5e-4
    # after 4 steps (1.2e-4 of how far the prompts moved, with YNNPACK's AVX-512 kernels; 0 with
    # Eigen's): the prompts must agree to 0.5% of how far they moved. Coupled tasks (a shared
    # normaliser, an absent task stepped with a zero gradient) differ by tens of percent.
    moved = np.max(np.abs(bank[t] - bank0[t]))
    diff = np.max(np.abs(bank[t] - np.asarray(single.export_prompt(alone.prompt_params,
                                                                   frozen))))
    assert diff <= 5e-3 * moved, (t, diff, moved)
  assert not np.allclose(bank, bank0)


def test_grouped_loss_normalises_each_group_like_its_own_batch():
  rng = np.random.default_rng(1)
  logits = rng.normal(size=(5, 3, 7)).astype(np.float32)
  targets = rng.integers(1, 7, size=(5, 3))
  targets[0, 2] = targets[3, 1:] = 0
  groups = np.array([0, 1, 0, 2, 1])
  for normalizer in ("NUM_REAL_TARGET_TOKENS", "NUM_TOTAL_TARGET_TOKENS",
                     "AVERAGE_PER_SEQUENCE", None, 2.0):
    total, metrics = losses.grouped_loss_and_metrics(logits, targets, None, groups, 4, 1e-4,
                                                     normalizer)
    want = [float(losses.loss_and_metrics(logits[groups == g], targets[groups == g], None,
                                          1e-4, normalizer)[0]) for g in range(3)]
    np.testing.assert_allclose(metrics["group_loss"], want + [0.0], rtol=1e-6)
    assert float(total) == pytest.approx(sum(want), rel=1e-6)
    assert list(np.asarray(metrics["group_present"])) == [True, True, True, False]


def test_mixture_batches_carry_task_indices_at_the_mixture_rates():
  cfg = pipeline.DatasetConfig(synthetic.MULTITASK_MIXTURE, {"inputs": 64, "targets": 16},
                               batch_size=16)
  names = mixtures.task_names(cfg)
  assert sorted(names) == sorted(synthetic.MULTITASK_TASKS)
  it = mixtures.iterate_tagged_batches(cfg)
  ids = np.concatenate([next(it)["prompt_ids"] for _ in range(30)])
  counts = np.bincount(ids, minlength=3) / len(ids)
  np.testing.assert_allclose(counts, [1 / 3] * 3, atol=0.08)  # 480 draws, equal rates
  # Each row's target is a label of its own task.
  labels = {"demo_sentiment": set(synthetic.SENTIMENT_LABELS),
            "demo_topic": set(synthetic.TOPICS),
            "demo_adjective": {a for adjs in synthetic.ADJECTIVES.values() for a in adjs}}
  batch = next(it)
  for row, task in zip(batch["decoder_target_tokens"], batch["prompt_ids"]):
    text = bytes(int(x) - 3 for x in row if x > 1).decode()
    assert text in labels[names[task]]


def test_train_multitask_resumes_exports_and_evaluates_every_task(tmp_path):
  lengths = {"inputs": 48, "targets": 6}
  train = pipeline.DatasetConfig(synthetic.MULTITASK_MIXTURE, lengths, batch_size=8)
  evaluate = pipeline.DatasetConfig(synthetic.MULTITASK_MIXTURE, lengths, split="validation",
                                    batch_size=32, shuffle=False)
  model = EncoderDecoderModel(t5.Transformer(t5.preset("tiny"), PromptBank(
      num_prompts=3, length=4, init_fn=initializers.uniform())))
  run = lambda d, **kw: multitask_training.train_multitask(
      model=model, model_dir=str(d), train_steps=4, train_dataset_cfg=train,
      initial_checkpoint_path=DEMO_CHECKPOINT, checkpoint_every_steps=2, keep_checkpoints=None,
      log_every_steps=1, **kw)
  straight = tmp_path / "straight"
  summary = run(straight, eval_dataset_cfg=evaluate, eval_at_start=False)
  names = mixtures.task_names(train)
  assert json.loads((straight / "tasks.json").read_text())["tasks"] == names
  scores = summary["eval_trained"]
  per_task = {t: [v for k, v in scores.items() if k.startswith(f"{t}/")] for t in names}
  assert all(per_task.values())
  assert scores["average"] == pytest.approx(np.mean([np.mean(v) for v in per_task.values()]))
  bank = np.load(straight / "prompts" / "prompt_4.npy")
  assert bank.shape == (3, 4, 64)
  for t, task in enumerate(names):
    np.testing.assert_array_equal(np.load(straight / "prompts" / f"{task}.npy"), bank[t])
    np.testing.assert_array_equal(peft.load_prompt(str(straight / "prompts" / "peft" / task)),
                                  bank[t])
  # Cut after step 2 and resume: the same bank, bit for bit (the task sampling is data state).
  cut = tmp_path / "cut"
  run(cut)
  shutil.rmtree(cut / "checkpoints" / "4")
  run(cut)
  np.testing.assert_array_equal(np.load(cut / "prompts" / "prompt_4.npy"), bank)
  # A bank of the wrong size for the mixture is one line naming both numbers.
  wrong = EncoderDecoderModel(t5.Transformer(t5.preset("tiny"), PromptBank(num_prompts=2,
                                                                         length=4)))
  with pytest.raises(ValueError, match=r"mixture has 3 tasks .* hook holds 2 prompts"):
    multitask_training.train_multitask(model=wrong, model_dir=str(tmp_path / "w"),
                                       train_steps=1, train_dataset_cfg=train)


def test_multitask_command_runs_the_mixture(tmp_path, capsys):
  from prompt_jax import cli
  model_dir = tmp_path / "run"
  assert cli.main(["multitask", "--gin_file=runs/multitask_demo.gin",
                   f"--gin.MODEL_DIR='{model_dir}'", "--gin.TRAIN_STEPS=2", "--gin.BATCH_SIZE=6",
                   "--gin.multitask_training.train_multitask.eval_dataset_cfg=None"]) == 0
  tasks = json.loads((model_dir / "tasks.json").read_text())["tasks"]
  assert sorted(tasks) == sorted(synthetic.MULTITASK_TASKS)
  assert f"3 tasks, one prompt each: {', '.join(tasks)}" in capsys.readouterr().out
  assert json.loads((model_dir / "summary.json").read_text())["step"] == 2


def test_spot_transfer_starts_from_the_mean_of_a_trained_bank(tmp_path):
  bank = np.random.default_rng(3).normal(size=(3, 4, 8)).astype(np.float32)
  np.save(tmp_path / "bank.npy", bank)
  init = prompt_files.from_array(str(tmp_path / "bank.npy"), bank_mean=True)
  np.testing.assert_allclose(init(None, (4, 8)), bank.mean(axis=0), rtol=1e-6)
  with pytest.raises(ValueError, match=r"bank_mean needs a bank .* got shape \(4, 8\)"):
    np.save(tmp_path / "one.npy", bank[0])
    prompt_files.from_array(str(tmp_path / "one.npy"), bank_mean=True)
