"""Prompt-only training: frozen params untouched, optimizer state prompt-shaped, resume,
NaN stop, step checks, and the same loss on an 8-device mesh."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest

from prompt_jax.data import pipeline, synthetic  # noqa: F401  (registers demo tasks)
from prompt_jax.host_devices import with_device_count
from prompt_jax.models import t5
from prompt_jax.models.encoder_decoder import EncoderDecoderModel
from prompt_jax.partitioning import Partitioner
from prompt_jax.programs import PromptPrograms
from prompt_jax.prompts import initializers
from prompt_jax.prompts.base import InputPrompt
from prompt_jax.prompts.plain import Prompt
from prompt_jax.storage import checkpoints
from prompt_jax.training import guards, trainer
from tests.adafactor_tolerance import assert_adafactor_runs_agree
from tests.conftest import REPO_ROOT

# Values compared against tolerances: CI runs these again under another CPU instruction set.
pytestmark = pytest.mark.numerics

LENGTHS = {"inputs": 64, "targets": 16}
DEMO_CHECKPOINT = "builtin:demo_t5_tiny.npz"


def _model(normalizer="NUM_REAL_TARGET_TOKENS", prompt_length=4):
  return EncoderDecoderModel(
      t5.Transformer(t5.preset("tiny"), InputPrompt(Prompt(prompt_length,
                                                           initializers.uniform()))),
      loss_normalizing_factor=normalizer)


def _data(batch_size=8, split="train", shuffle=True):
  return pipeline.DatasetConfig("demo_sentiment", LENGTHS, split=split, batch_size=batch_size,
                                shuffle=shuffle)


def _host(tree):
  return jax.tree_util.tree_map(lambda x: np.array(x), tree)


def test_only_the_prompt_trains_and_frozen_params_are_bit_identical():
  model = _model()
  pt = PromptPrograms.for_training(model, trainer.adafactor(), Partitioner(), 64, 16, 8)
  frozen = pt.load_frozen_params(DEMO_CHECKPOINT)
  frozen_before = _host(frozen)
  state = pt.init_state(frozen, jax.random.key(0))
  prompt_before = _host(state.prompt_params)
  batches = pipeline.iterate_batches(_data())
  losses = []
  for _ in range(15):
    state, metrics = pt.train_step(state, frozen, next(batches), jax.random.key(1))
    losses.append(float(metrics["loss"]))
  # Frozen: bit-identical, and never part of the trainable state.
  for a, b in zip(jax.tree_util.tree_leaves(frozen_before), jax.tree_util.tree_leaves(frozen)):
    np.testing.assert_array_equal(a, np.asarray(b))
  assert set(state.prompt_params) == {"encoder"}
  assert list(state.prompt_params["encoder"]) == ["prompt"]
  # Optimizer state: every array leaf is prompt-shaped ([4, 64]) or a factored/scalar piece
  # of it; nothing of the frozen model's sizes.
  prompt_shape = (4, 64)
  for leaf in jax.tree_util.tree_leaves(state.opt_state):
    shape = tuple(np.shape(leaf))
    assert shape in {(), (1,), prompt_shape, prompt_shape[:1], prompt_shape[1:]}, shape
  assert not np.array_equal(prompt_before["encoder"]["prompt"]["prompt"]["prompt"],
                            np.asarray(state.prompt_params["encoder"]["prompt"]["prompt"]
                                       ["prompt"]))
  assert int(state.step) == 15
  assert min(losses[-3:]) < losses[0]


def test_no_prompt_configured_is_an_error():
  model = EncoderDecoderModel(t5.Transformer(t5.preset("tiny")))
  with pytest.raises(ValueError, match="no parameter matches the trainable pattern"):
    PromptPrograms.for_training(model, trainer.adafactor(), Partitioner(), 64, 16, 8)


def _train(model_dir, steps, model=None, **kwargs):
  return trainer.train(model=model or _model(), model_dir=str(model_dir), train_steps=steps,
                       train_dataset_cfg=_data(), initial_checkpoint_path=DEMO_CHECKPOINT,
                       checkpoint_every_steps=2, log_every_steps=1, **kwargs)


def _saved_prompt(model_dir, step):
  return np.load(os.path.join(model_dir, "prompts", f"prompt_{step}.npy"))


def test_resume_continues_exactly_where_it_stopped(tmp_path):
  straight, resumed = tmp_path / "straight", tmp_path / "resumed"
  _train(straight, 6)
  _train(resumed, 4)
  summary = _train(resumed, 6)
  assert summary["step"] == 6
  # Exact: both runs execute the same compiled steps on the same batches from the same state (a
  # restored checkpoint holds the arrays bit for bit), on any CPU. (It was atol=1e-6.)
  np.testing.assert_array_equal(_saved_prompt(resumed, 6), _saved_prompt(straight, 6))
  manager = checkpoints.PromptCheckpointManager(str(resumed), 2)
  assert manager.all_steps()[-1] == 6
  with open(resumed / "summary.json") as f:
    assert json.load(f)["train"]["loss"] == pytest.approx(summary["train"]["loss"])


def test_rerunning_a_finished_run_returns_its_summary_and_fewer_steps_is_an_error(tmp_path):
  first = _train(tmp_path, 2)
  before = sorted(os.listdir(tmp_path / "checkpoints"))
  again = _train(tmp_path, 2)  # complete: nothing to do, same summary, nothing rewritten
  assert again["train"]["loss"] == pytest.approx(first["train"]["loss"])
  assert sorted(os.listdir(tmp_path / "checkpoints")) == before
  with pytest.raises(ValueError, match="TRAIN_STEPS=1 is below the step 2 restored"):
    _train(tmp_path, 1)


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
  _train(tmp_path, 2)
  good = _saved_prompt(tmp_path, 2)
  # A zero loss-normalising factor turns the loss into inf/nan at the next step.
  with pytest.raises(guards.TrainingDivergedError, match="at step 3.*step 2 in"):
    _train(tmp_path, 6, model=_model(normalizer=0.0))
  manager = checkpoints.PromptCheckpointManager(str(tmp_path), 2)
  assert manager.latest_step() == 2
  pt = PromptPrograms.for_training(_model(), trainer.adafactor(), Partitioner(), 64, 16, 8)
  state, _ = manager.restore(2, pt.abstract_state())
  np.testing.assert_array_equal(
      np.asarray(state.prompt_params["encoder"]["prompt"]["prompt"]["prompt"]), good)


def test_missing_model_dir_is_an_error():
  with pytest.raises(ValueError, match="MODEL_DIR is not set"):
    _train("", 2)


MULTI_DEVICE_SCRIPT = textwrap.dedent("""
    import json, jax, numpy as np
    from prompt_jax.training import trainer
    from prompt_jax.programs import PromptPrograms
    from prompt_jax.data import pipeline, synthetic
    from prompt_jax.models import t5
    from prompt_jax.models.encoder_decoder import EncoderDecoderModel
    from prompt_jax.partitioning import Partitioner
    from prompt_jax.prompts import initializers
    from prompt_jax.prompts.base import InputPrompt
    from prompt_jax.prompts.plain import Prompt
    assert len(jax.devices()) == 8, jax.devices()
    model = EncoderDecoderModel(t5.Transformer(t5.preset('tiny'),
        InputPrompt(Prompt(4, initializers.uniform()))))
    cfg = pipeline.DatasetConfig('demo_sentiment', {'inputs': 64, 'targets': 16}, batch_size=8)
    batches = pipeline.iterate_batches(cfg)
    batch = [next(batches) for _ in range(3)]
    out = {}
    for name, partitioner in [('1x1', Partitioner(devices=jax.devices()[:1])),
                              ('4x2', Partitioner(num_partitions=2))]:
      pt = PromptPrograms.for_training(model, trainer.adafactor(), partitioner, 64, 16, 8)
      frozen = pt.load_frozen_params('builtin:demo_t5_tiny.npz')
      state = pt.init_state(frozen, jax.random.key(0))
      losses = []
      for b in batch:
        state, metrics = pt.train_step(state, frozen, b, jax.random.key(1))
        losses.append(float(metrics['loss']))
      spec = frozen['encoder']['layers_0']['mlp']['wi_0']['kernel'].sharding.spec
      out[name] = {'losses': losses, 'wi_spec': [str(s) for s in spec],
                   'prompt': np.asarray(state.prompt_params['encoder']['prompt']['prompt']
                                        ['prompt']).tolist()}
    print('RESULT' + json.dumps(out))
""")


def test_same_loss_on_a_4x2_mesh_of_fake_devices():
  env = dict(os.environ, XLA_FLAGS=with_device_count(os.environ.get("XLA_FLAGS", ""), 8),
             JAX_PLATFORMS="cpu")
  proc = subprocess.run([sys.executable, "-c", MULTI_DEVICE_SCRIPT], cwd=REPO_ROOT, env=env,
                        capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  result = json.loads(proc.stdout.split("RESULT", 1)[1])
  # Losses of ~1 whose sums the mesh splits across devices: float32 rounding, 3e-7 seen.
  np.testing.assert_allclose(result["4x2"]["losses"], result["1x1"]["losses"], atol=1e-5)
  # After three Adafactor steps at lr 0.3 (updates are normalised, so summation-order noise in
  # the gradient shows up at lr scale): relative to how far the steps move the prompt.
  assert_adafactor_runs_agree(result["4x2"]["prompt"], result["1x1"]["prompt"], steps=3)
  assert result["4x2"]["wi_spec"] == ["None", "model"]
