"""Training regimes through the one loop (`trainer.run`): SPT's gate search and a prompt started
from given parameters get the loop's checkpoints, bit-identical resume, NaN check and metrics."""

from __future__ import annotations

import os
import shutil

import jax
import numpy as np
import optax
import pytest

from prompt_jax.data import pipeline, synthetic  # noqa: F401  (registers demo tasks)
from prompt_jax.models import t5
from prompt_jax.models.encoder_decoder import EncoderDecoderModel
from prompt_jax.partitioning import Partitioner
from prompt_jax.programs import PromptPrograms
from prompt_jax.prompts import initializers, spt
from prompt_jax.prompts.base import InputPrompt
from prompt_jax.prompts.plain import Prompt
from prompt_jax.storage import metric_writer, run_dir
from prompt_jax.training import guards, optimizers, regimes, spt_training, trainer

LENGTHS = {"inputs": 32, "targets": 8}
DATA = pipeline.DatasetConfig("demo_sentiment", LENGTHS, batch_size=4)


def _leaves(tree):
  return [np.asarray(x) for x in jax.tree_util.tree_leaves(tree)]


def _search(mode="darts"):
  config = t5.preset("tiny", num_encoder_layers=3, num_decoder_layers=1)
  hook = spt.SelectivePrompt(Prompt(3, initializers.uniform()), bottleneck=4)
  model = EncoderDecoderModel(t5.Transformer(config, hook))
  return spt_training.SptSearch(model, optimizers.spt_optimizer(), optimizers.gate_adam(),
                                Partitioner(), LENGTHS["inputs"], LENGTHS["targets"],
                                DATA.batch_size, dataset_cfg=DATA, search_mode=mode)


def test_spt_search_resumes_bit_identically_and_logs_gates(tmp_path):
  run = lambda d: trainer.run(_search(), model_dir=str(d), train_steps=4,
                              checkpoint_every_steps=2, keep_checkpoints=None,
                              log_every_steps=1, seed=3, label="SPT search")
  straight = run(tmp_path / "straight")
  cut = tmp_path / "cut"
  run(cut)
  shutil.rmtree(cut / "checkpoints" / "4")
  resumed = run(cut)
  for a, b in zip(_leaves(straight.state), _leaves(resumed.state), strict=True):
    np.testing.assert_array_equal(a, b)
  assert int(resumed.state.step) == 4
  # The gates moved and every gate value a_l is an event scalar of every logged step.
  gates = spt.gate_values(straight.state.gates)
  assert set(gates) == {1, 2} and all(v != 0.5 for v in gates.values())
  scalars = metric_writer.read_scalars(str(tmp_path / "straight" / "train"))
  for layer, value in gates.items():
    steps = scalars[f"gate/layer_{layer}"]
    assert [s for s, _ in steps] == [1, 2, 3, 4]
    assert steps[-1][1] == pytest.approx(value, rel=1e-6)
  assert "held_out_loss" in scalars


def test_spt_search_stops_on_a_non_finite_gate_update(tmp_path):
  search = _search(mode="joint")
  search.gate_optimizer = optax.scale(np.inf)  # the gates' update overflows at step 1
  search.step_fn = jax.jit(search._search_step)
  with pytest.raises(guards.TrainingDivergedError, match="diverged at step 1: .*non-finite"):
    trainer.run(search, model_dir=str(tmp_path / "run"), train_steps=2,
                checkpoint_every_steps=1)
  assert not (tmp_path / "run" / "checkpoints").exists()


def test_prompt_tuning_starts_from_given_parameters(tmp_path):
  model = EncoderDecoderModel(t5.Transformer(t5.preset("tiny"),
                                             InputPrompt(Prompt(4, initializers.uniform()))))
  programs = PromptPrograms.for_training(model, optax.sgd(0.0), Partitioner(), LENGTHS["inputs"],
                                   LENGTHS["targets"], DATA.batch_size)
  given = jax.tree_util.tree_map(lambda s: np.full(s.shape, 0.25, s.dtype),
                                 programs.abstract_prompt)
  result = trainer.run(regimes.PromptTuning(programs, DATA, initial_params=given),
                       model_dir=str(tmp_path / "run"), train_steps=1)
  for leaf in _leaves(result.state.prompt_params):  # learning rate 0: still the given values
    np.testing.assert_array_equal(leaf, 0.25)
  wrong = {"encoder": {"prompt": {"prompt": {"prompt": np.zeros((5, 8), np.float32)}}}}
  with pytest.raises(ValueError, match=r"initial parameters: encoder/prompt/prompt/prompt has "
                                       r"shape \(5, 8\), expected \(4, "):
    regimes.PromptTuning(programs, DATA, initial_params=wrong).init_state(None, None)


def test_resuming_with_other_regime_settings_is_one_line(tmp_path):
  model_dir = str(tmp_path / "run")
  trainer.run(_search(), model_dir=model_dir, train_steps=1)
  with pytest.raises(ValueError, match=r"holds a run with settings.search_mode='darts'; this "
                                       r"command configures settings.search_mode='joint'"):
    trainer.run(_search(mode="joint"), model_dir=model_dir, train_steps=2)
  os.remove(os.path.join(model_dir, run_dir.RECORD_FILE))  # lost: the checkpoint's copy refuses
  with pytest.raises(ValueError, match=r"holds a run with settings.search_mode='darts'"):
    trainer.run(_search(mode="joint"), model_dir=model_dir, train_steps=2)
