"""Selective Prompt Tuning: gates, generator, top-K selection, SPT-DARTS steps, two-phase run."""

from __future__ import annotations

import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow as tf
from flax.linen import unbox

from prompt_jax import cli
from prompt_jax.models import t5
from prompt_jax.models.encoder_decoder import EncoderDecoderModel
from prompt_jax.partitioning import Partitioner
from prompt_jax.prompts import initializers, spt
from prompt_jax.prompts.base import InputPrompt, prompt_positions
from prompt_jax.prompts.plain import Prompt
from prompt_jax.training import optimizers, spt_training
from tests.conftest import GIN_CONFIGS

CONFIG = t5.preset("tiny", num_encoder_layers=4, num_decoder_layers=1)
P = 3
R = 8


def _tokens(seed=0, batch=2, length=9):
  rng = np.random.default_rng(seed)
  tokens = rng.integers(3, 259, size=(batch, length))
  for row, n in enumerate(rng.integers(3, length, size=batch)):
    tokens[row, n:] = 0
  return jnp.asarray(tokens, jnp.int32)


def _spt_module(**kw):
  return t5.Transformer(CONFIG, spt.SelectivePrompt(Prompt(P, initializers.uniform()),
                                                    bottleneck=R, **kw))


def _init(module, tokens, seed=0):
  return unbox(module.init(jax.random.key(seed), tokens, tokens[:, :4], tokens[:, :4],
                           enable_dropout=False)["params"])


def _apply(module, params, tokens, capture=False):
  kw = {}
  if capture:
    kw["capture_intermediates"] = lambda m, name: name in ("layer_inputs", "__call__")
  return module.apply({"params": params}, tokens, tokens[:, :4], tokens[:, :4],
                      enable_dropout=False, **kw)


def _with_gates(params, logits):
  params = jax.tree_util.tree_map(lambda x: x, params)
  for layer, g in logits.items():
    params["encoder"]["prompt"][f"layers_{layer}"]["gate"] = jnp.asarray(g, jnp.float32)
  return params


def _numpy_generator(gen, pooled):
  """LPT generator in numpy: relu(x W_down + b_down) W_up + b_up -> [b, p, d]."""
  hidden = np.maximum(pooled @ np.asarray(gen["down"]["kernel"]) + np.asarray(gen["down"]["bias"]),
                      0)
  out = hidden @ np.asarray(gen["up"]["kernel"]) + np.asarray(gen["up"]["bias"])
  return out.reshape(pooled.shape[0], P, -1)


def _numpy_pool(hidden, tokens, positions):
  """Mean of hidden over real text positions (prompt positions and padding excluded)."""
  out = []
  for b in range(hidden.shape[0]):
    text = [i for i in range(hidden.shape[1]) if i not in set(positions[b])]
    text = [i for i in text if i < P + int((np.asarray(tokens[b]) > 0).sum())]
    out.append(hidden[b, text].mean(axis=0))
  return np.stack(out)


def test_gates_propagating_everywhere_equal_plain_prompt_tuning_exactly():
  tokens = _tokens()
  module = _spt_module()
  params = _with_gates(_init(module, tokens), {1: -jnp.inf, 2: -jnp.inf, 3: -jnp.inf})
  plain = t5.Transformer(CONFIG, InputPrompt(Prompt(P, initializers.uniform())))
  plain_params = dict(params, encoder=dict(params["encoder"], prompt={
      "prompt": params["encoder"]["prompt"]["prompt"]}))
  expected = np.asarray(_apply(plain, plain_params, tokens))
  np.testing.assert_array_equal(np.asarray(_apply(module, params, tokens)), expected)
  # The re-train model with no kept layer (K = 0) is plain prompt tuning too.
  hard = _spt_module(layers=(), hard=True)
  np.testing.assert_array_equal(np.asarray(_apply(hard, plain_params, tokens)), expected)


@pytest.mark.parametrize("placement", ["prefix", "suffix"])
def test_gate_forced_on_inserts_the_generated_prompt(placement):
  tokens = _tokens(3)
  module = _spt_module(placement=placement)
  layer = 2
  params = _with_gates(_init(module, tokens), {1: -jnp.inf, 2: jnp.inf, 3: -jnp.inf})
  _, state = _apply(module, params, tokens, capture=True)
  enc = state["intermediates"]["encoder"]
  inputs = enc["prompt"]["layer_inputs"]
  below = np.asarray(enc[f"layers_{layer - 1}"]["__call__"][0])
  positions = np.asarray(prompt_positions(tokens, P, placement))
  gen = params["encoder"]["prompt"][f"layers_{layer}"]["generator"]
  new = _numpy_generator(gen, _numpy_pool(below, tokens, positions))
  hidden = np.asarray(inputs[layer])
  for b in range(hidden.shape[0]):
    np.testing.assert_allclose(hidden[b, positions[b]], new[b], rtol=1e-5, atol=1e-5)
    text = np.setdiff1d(np.arange(hidden.shape[1]), positions[b])
    np.testing.assert_array_equal(hidden[b, text], below[b, text])
  # Layer 1 (gate off) kept the propagated prompt states exactly.
  below0 = np.asarray(enc["layers_0"]["__call__"][0])
  np.testing.assert_array_equal(np.asarray(inputs[1]), below0)


def test_relaxed_gate_mixes_new_and_propagated_states():
  tokens = _tokens(4)
  module = _spt_module(layers=(1,))
  g = 0.7
  params = _with_gates(_init(module, tokens), {1: g})
  _, state = _apply(module, params, tokens, capture=True)
  enc = state["intermediates"]["encoder"]
  below = np.asarray(enc["layers_0"]["__call__"][0])
  positions = np.asarray(prompt_positions(tokens, P, "prefix"))
  new = _numpy_generator(params["encoder"]["prompt"]["layers_1"]["generator"],
                         _numpy_pool(below, tokens, positions))
  a = 1 / (1 + np.exp(-g))
  np.testing.assert_allclose(np.asarray(enc["prompt"]["layer_inputs"][1])[:, :P],
                             a * new + (1 - a) * below[:, :P], rtol=1e-5, atol=1e-5)
  assert spt.gate_values(params) == pytest.approx({1: a})


def test_top_k_selection_is_deterministic_with_ties_by_layer():
  gates = {5: 0.9, 1: 0.4, 3: 0.9, 2: 0.4, 4: 0.1}
  assert spt.select_layers(gates, 2) == (3, 5)
  assert spt.select_layers(gates, 3) == (1, 3, 5)
  shuffled = dict(reversed(list(gates.items())))
  for k in range(len(gates) + 1):
    assert spt.select_layers(shuffled, k) == spt.select_layers(gates, k)
  assert spt.select_layers(gates, 0) == ()
  with pytest.raises(ValueError, match=r"K must be an integer in \[0, 5\].*got 6"):
    spt.select_layers(gates, 6)


def _search(mode_batch=4):
  model = EncoderDecoderModel(_spt_module())
  search = spt_training.SptSearch(model, optimizers.spt_optimizer(), optimizers.gate_adam(),
                                  Partitioner(), 9, 4, mode_batch)
  frozen = search.random_frozen_params(jax.random.key(0))
  state = search.init_state(frozen, jax.random.key(1))
  tokens = np.asarray(_tokens(5, batch=mode_batch))
  targets = np.asarray(_tokens(6, batch=mode_batch, length=4))
  batch = {"encoder_input_tokens": tokens, "decoder_input_tokens": targets,
           "decoder_target_tokens": targets, "decoder_loss_weights": (targets > 0).astype(np.int32)}
  return search, frozen, state, search.shard_batch(batch)


def _host(tree):
  return [np.array(x) for x in jax.tree_util.tree_leaves(tree)]


def test_darts_gradients_reach_gates_only_in_the_gate_phase():
  search, frozen, state, batch = _search()
  assert set(spt.gate_logits(state.gates)) == {1, 2, 3}
  assert not spt.gate_logits(state.weights)
  weights0, gates0 = _host(state.weights), _host(state.gates)
  # Weight phase: the weights move, the gates are bit-identical.
  state, metrics = search.weight_step(state, frozen, batch, jax.random.key(2))
  weights1, gates1 = _host(state.weights), _host(state.gates)
  for a, b in zip(gates0, gates1):
    np.testing.assert_array_equal(a, b)
  assert any(not np.array_equal(a, b) for a, b in zip(weights0, weights1))
  assert float(metrics["grad_norm"]) > 0
  # Gate phase: every gate moves (non-zero gradient), the weights are bit-identical.
  state, metrics = search.gate_step(state, frozen, batch)
  for a, b in zip(weights1, _host(state.weights)):
    np.testing.assert_array_equal(a, b)
  for a, b in zip(gates1, _host(state.gates)):
    assert not np.array_equal(a, b)
  assert float(metrics["gate_grad_norm"]) > 0
  # The gate optimizer state is gate-shaped only (scalars), the weights' never sees gates.
  assert all(np.shape(x) in {(), (1,)} for x in jax.tree_util.tree_leaves(state.gate_opt_state))


def test_held_out_split_partitions_the_training_examples():
  tokens = np.random.default_rng(0).integers(3, 259, size=(400, 6)).astype(np.int32)
  ds = tf.data.Dataset.from_tensor_slices({"encoder_input_tokens": tokens})
  key = lambda ex: tuple(ex["encoder_input_tokens"].tolist())
  held = {key(ex) for ex in ds.filter(spt_training.held_out_filter(0.25, True))
          .as_numpy_iterator()}
  rest = {key(ex) for ex in ds.filter(spt_training.held_out_filter(0.25, False))
          .as_numpy_iterator()}
  assert not held & rest
  assert len(held) + len(rest) == 400
  assert 60 <= len(held) <= 140  # ~25% of 400
  again = {key(ex) for ex in ds.shuffle(400, seed=1).filter(
      spt_training.held_out_filter(0.25, True)).as_numpy_iterator()}
  assert again == held  # a fixed partition, independent of the order


def test_spt_search_rejects_a_non_spt_prompt():
  model = EncoderDecoderModel(t5.Transformer(CONFIG, InputPrompt(Prompt(P))))
  with pytest.raises(ValueError, match="SelectivePrompt with hard=False, got InputPrompt"):
    spt_training.SptSearch(model, optimizers.spt_optimizer(), optimizers.gate_adam(),
                           Partitioner(), 9, 4, 4)


@pytest.mark.slow  # ~60 s of CPU: seqio input pipeline plus six compilations
def test_two_phase_cli_run_prints_the_selected_layers(tmp_path, capsys):
  model_dir = tmp_path / "spt"
  argv = ["spt", f"--gin_file={GIN_CONFIGS / 'runs' / 'spt_demo.gin'}",
          f"--gin.MODEL_DIR='{model_dir}'", "--gin.SPT_SEARCH_STEPS=3", "--gin.TRAIN_STEPS=2",
          "--gin.BATCH_SIZE=4", "--gin.INITIAL_CHECKPOINT_PATH=None",
          "--gin.t5.T5Config.num_encoder_layers=3", "--gin.SPT_NUM_LAYERS=1",
          "--gin.spt_training.train_spt.eval_dataset_cfg=None", "--gin.CHECKPOINT_PERIOD=2"]
  assert cli.main(argv) == 0
  out = capsys.readouterr().out
  selection = json.loads((model_dir / "search" / "selection.json").read_text())
  assert set(selection["gates"]) == {"1", "2"}
  gates = {int(k): v for k, v in selection["gates"].items()}
  assert tuple(selection["selected_layers"]) == spt.select_layers(gates, 1)
  assert f"SPT selected layers (K=1): {selection['selected_layers']}" in out
  assert (model_dir / "search" / "checkpoints" / "3").is_dir()
  assert (model_dir / "retrain" / "checkpoints" / "2").is_dir()
  summary = json.loads((model_dir / "summary.json").read_text())
  assert summary["selected_layers"] == selection["selected_layers"]

  # K=2 on the finished search: selected again from its gates, never the old re-training.
  k2 = [a.replace("SPT_NUM_LAYERS=1", "SPT_NUM_LAYERS=2") for a in argv]
  assert cli.main(k2) == 1
  out, err = capsys.readouterr()
  assert f"SPT selected layers (K=2): {list(spt.select_layers(gates, 2))}" in out
  assert "re-trains layers" in err and "remove" in err and "Traceback" not in err
  shutil.rmtree(model_dir / "retrain")
  assert cli.main(k2) == 0
  out = capsys.readouterr().out
  assert "SPT search already finished" in out
  selection2 = json.loads((model_dir / "search" / "selection.json").read_text())
  assert selection2["gates"] == selection["gates"] and selection2["k"] == 2
  assert tuple(selection2["selected_layers"]) == spt.select_layers(gates, 2) == (1, 2)
  assert json.loads((model_dir / "summary.json").read_text())["selected_layers"] == [1, 2]
  record = json.loads((model_dir / "retrain" / "run.json").read_text())
  assert record["prompt"]["layers"] == [1, 2]


def _spt_argv(model_dir, *extra):
  return ["spt", f"--gin_file={GIN_CONFIGS / 'runs' / 'spt_demo.gin'}",
          f"--gin.MODEL_DIR='{model_dir}'", "--gin.SPT_SEARCH_STEPS=3", "--gin.TRAIN_STEPS=2",
          "--gin.BATCH_SIZE=4", "--gin.INITIAL_CHECKPOINT_PATH=None",
          "--gin.t5.T5Config.num_encoder_layers=3",
          "--gin.spt_training.train_spt.eval_dataset_cfg=None", "--gin.CHECKPOINT_PERIOD=2",
          *extra]


def test_another_k_selects_again_from_the_stored_gates_and_never_resumes_the_old_retrain(
    tmp_path, capsys):
  """A finished search (its selection.json) and a re-training started for K=1: K=2 selects
  again from the stored gates and refuses the re-training of the other selection; other search
  settings are refused. Nothing trains."""
  model_dir = tmp_path / "spt"
  gates = {1: 0.2, 2: 0.9}
  (model_dir / "search").mkdir(parents=True)
  stored = {"gates": {str(k): v for k, v in gates.items()}, "selected_layers": [2], "k": 1,
            "search_mode": "darts", "search_steps": 3, "held_out_fraction": 0.2}
  (model_dir / "search" / "selection.json").write_text(json.dumps(stored))
  (model_dir / "retrain" / "checkpoints").mkdir(parents=True)

  assert cli.main(_spt_argv(model_dir, "--gin.SPT_NUM_LAYERS=2")) == 1
  out, err = capsys.readouterr()
  assert f"SPT selected layers (K=2): {list(spt.select_layers(gates, 2))}" in out
  assert list(spt.select_layers(gates, 2)) == [1, 2]
  assert err.strip().splitlines()[-1] == (
      f"error: {model_dir / 'retrain'} re-trains layers [2] (K=1); this command selects [1, 2] "
      f"(K=2) from the same search: remove {model_dir / 'retrain'} to re-train for K=2 (the "
      "search is kept), or use another MODEL_DIR")
  assert json.loads((model_dir / "search" / "selection.json").read_text()) == stored
  assert not (model_dir / "retrain" / "run.json").exists()

  assert cli.main(_spt_argv(model_dir, "--gin.SPT_NUM_LAYERS=1",
                            "--gin.SPT_SEARCH_STEPS=5", "--gin.SPT_SEARCH_MODE='joint'")) == 1
  err = capsys.readouterr().err.strip().splitlines()[-1]
  assert err.startswith(f"error: {model_dir / 'search'} holds a finished SPT search with "
                        "search_mode='darts', search_steps=3; this command configures "
                        "search_mode='joint', search_steps=5: use the search's settings")
