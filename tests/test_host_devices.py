"""Data-parallel CPU host devices (issue 36): what `prompt-jax` asks XLA for, a training batch
that does not divide over the devices (the most devices that divide it, same step as one
device), serving batches padded to the devices (same outputs as one device), and the CLI's
flag, variable and errors. Gradient equality over whole meshes is tests/test_sharding.py's.

The numerical checks run in ONE subprocess with 4 fake CPU devices (jax fixes its device count
at start-up)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from prompt_jax import cli, host_devices
from tests.conftest import REPO_ROOT

FLAG = host_devices.DEVICE_COUNT_FLAG


# --------------------------------------------------------------- what the CLI asks XLA for


def test_auto_is_one_device_per_usable_core_capped():
  assert host_devices.auto_count(1) == 1
  assert host_devices.auto_count(2) == 2
  assert host_devices.auto_count(64) == host_devices.MAX_AUTO_DEVICES
  new, count = host_devices.xla_flags_with_host_devices(None, {"XLA_FLAGS": "--xla_a=1"})
  assert count == min(host_devices.usable_cores(), host_devices.MAX_AUTO_DEVICES)
  assert new == f"--xla_a=1 {FLAG}={count}"  # the user's other XLA flags stay


def test_a_device_count_in_xla_flags_is_kept_unless_the_flag_or_variable_asks():
  environ = {"XLA_FLAGS": f"{FLAG}=8 --xla_b=2"}
  assert host_devices.xla_flags_with_host_devices(None, environ) is None
  assert host_devices.xla_flags_with_host_devices("3", environ) == (f"--xla_b=2 {FLAG}=3", 3)
  environ[host_devices.ENV] = "5"
  assert host_devices.xla_flags_with_host_devices(None, environ) == (f"--xla_b=2 {FLAG}=5", 5)
  # The flag wins over the variable; asking for the count already set changes nothing.
  assert host_devices.xla_flags_with_host_devices("8", environ) is None


@pytest.mark.parametrize("value", ["0", "-2", "two", "1.5", ""])
def test_bad_counts_are_refused_naming_the_value_and_where_it_came_from(value):
  with pytest.raises(ValueError, match=f"--host_devices must be 'auto' or an integer >= 1, "
                                       f"got {value!r}"):
    host_devices.xla_flags_with_host_devices(value, {})
  if value.strip():
    with pytest.raises(ValueError, match=rf"\${host_devices.ENV} must be .* got {value!r}"):
      host_devices.xla_flags_with_host_devices(None, {host_devices.ENV: value})


def test_only_commands_that_run_programs_take_the_flag():
  assert cli.parse("train", ["--gin_file=runs/demo.gin"]).host_devices is None
  assert cli.parse("eval", ["--host_devices=2", "--model_dir=x"]).host_devices == "2"
  for command in ("plan", "curves", "export-prompt"):
    assert not hasattr(cli.parse(command, _minimal_args(command)), "host_devices")


def _minimal_args(command: str) -> list[str]:
  return {"plan": ["--gin_file=runs/demo.gin", "--mesh=1x1"], "curves": ["d"],
          "export-prompt": ["--model_dir=d"]}[command]


def test_in_a_process_whose_jax_is_imported_the_flag_is_an_error_and_nothing_changes(
    monkeypatch):
  import jax  # noqa: F401  (this test process has imported jax: its devices are fixed)
  monkeypatch.setenv("XLA_FLAGS", "--xla_c=1")
  with pytest.raises(ValueError, match="--host_devices=2: jax is already imported"):
    cli.configure_host_devices("2", "train")
  assert cli.configure_host_devices(None, "train") is None
  assert os.environ["XLA_FLAGS"] == "--xla_c=1"


def test_apply_writes_the_count_into_the_environment_it_is_given_only_before_jax_starts():
  environ = {"XLA_FLAGS": "--xla_d=1"}
  assert host_devices.apply("3", environ, jax_started=False) == 3
  assert environ["XLA_FLAGS"] == f"--xla_d=1 {FLAG}=3"
  assert host_devices.apply("3", environ, jax_started=False) is None  # already asked for
  untouched = {"XLA_FLAGS": "--xla_d=1"}
  assert host_devices.apply(None, untouched, jax_started=True) is None
  with pytest.raises(ValueError, match="--host_devices=3: jax is already imported"):
    host_devices.apply("3", untouched, jax_started=True)
  assert untouched == {"XLA_FLAGS": "--xla_d=1"}


def _prompt_jax(argv, **env):
  environ = {k: v for k, v in os.environ.items()
             if k not in ("XLA_FLAGS", host_devices.ENV)}
  environ.update(env)
  return subprocess.run([sys.executable, "-m", "prompt_jax.cli", *argv], cwd=REPO_ROOT,
                        env=environ, capture_output=True, text=True, timeout=600)


def test_a_bad_variable_is_a_one_line_error_before_jax_starts():
  proc = _prompt_jax(["train", "--gin_file=runs/demo.gin", "--gin.MODEL_DIR='/nonexistent/x'"],
                     PROMPT_JAX_HOST_DEVICES="many")
  assert proc.returncode == 1
  assert proc.stderr.strip() == ("error: $PROMPT_JAX_HOST_DEVICES must be 'auto' or an integer "
                                 ">= 1, got 'many'"), proc.stderr


def test_the_demo_trains_on_three_host_devices_and_its_run_moves_to_one_device(tmp_path):
  """32 rows do not divide over 3 devices: training uses 2 of them (the most that divide), and
  the evaluations (batches padded to the devices) score every example. The run directory then
  serves and resumes on one device."""
  proc = _prompt_jax(["train", "--gin_file=runs/demo.gin", f"--gin.MODEL_DIR='{tmp_path}/run'",
                      "--gin.TRAIN_STEPS=2", "--host_devices=3"])
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "mesh {'data': 2, 'model': 1}" in proc.stdout, proc.stdout
  assert "validation metric" in proc.stdout, proc.stdout

  # Saved on a 2-device mesh, read on 1 device: exported here (this test process has one
  # device; Orbax refuses a restore without a target on another topology), then trained on.
  exported = tmp_path / "prompt.npy"
  assert cli.main(["export-prompt", f"--model_dir={tmp_path}/run", f"--output={exported}"]) == 0
  assert np.load(exported).shape == (10, 64)
  proc = _prompt_jax(["train", "--gin_file=runs/demo.gin", f"--gin.MODEL_DIR='{tmp_path}/run'",
                      "--gin.TRAIN_STEPS=3", "--host_devices=1"])
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "mesh {'data': 1, 'model': 1}" in proc.stdout and "at step 3" in proc.stdout, proc.stdout


# ------------------------------------------------- the numbers, on 4 fake CPU devices

SCRIPT = textwrap.dedent("""
    import json, jax, numpy as np, optax
    from prompt_jax import tasks  # registers demo_sentiment
    from prompt_jax.programs import PromptPrograms
    from prompt_jax.data import pipeline
    from prompt_jax.models import t5
    from prompt_jax.models.encoder_decoder import EncoderDecoderModel
    from prompt_jax.partitioning import Partitioner
    from prompt_jax.prompts import initializers
    from prompt_jax.prompts.base import InputPrompt
    from prompt_jax.prompts.plain import Prompt
    assert len(jax.devices()) == 4, jax.devices()

    model = EncoderDecoderModel(t5.Transformer(t5.preset('tiny'),
        InputPrompt(Prompt(4, initializers.sampled_vocabulary()))))
    cfg = pipeline.DatasetConfig('demo_sentiment', {'inputs': 64, 'targets': 16}, batch_size=6)
    batch = next(pipeline.iterate_batches(cfg))
    out = {}

    def step(partitioner):
      # SGD with rate 1: the updated prompt is the prompt minus the gradient.
      pt = PromptPrograms.for_training(model, optax.sgd(1.0), partitioner, 64, 16, 6)
      frozen = pt.load_frozen_params('builtin:demo_t5_tiny.npz')
      state = pt.init_state(frozen, jax.random.key(0))
      before = np.asarray(jax.tree_util.tree_leaves(state.prompt_params)[0])
      state, metrics = pt.train_step(state, frozen, batch, jax.random.key(1))
      after = np.asarray(jax.tree_util.tree_leaves(state.prompt_params)[0])
      return pt, frozen, state, {
          'mesh': dict(pt.partitioner.mesh.shape), 'grad': (before - after).tolist(),
          'loss': float(metrics['loss']), 'grad_norm': float(metrics['grad_norm'])}

    _, _, _, out['one'] = step(Partitioner(devices=jax.devices()[:1]))
    pt, frozen, state, out['four'] = step(Partitioner())  # 6 rows over 4 devices: 3 of them

    # Serving: 5 rows on all 4 devices (padded to 8) against 1 device.
    rows = {k: v[:5] for k, v in batch.items()}
    serve4 = PromptPrograms(model, Partitioner())
    serve1 = PromptPrograms(model, Partitioner(devices=jax.devices()[:1]))
    for name, serve in (('four', serve4), ('one', serve1)):
      frozen = serve.load_frozen_params('builtin:demo_t5_tiny.npz')
      prompt = jax.device_put(jax.device_get(state.prompt_params), serve.prompt_shardings)
      tokens = serve.predict(prompt, frozen, rows, 8)
      beams, beam_scores = serve.predict(prompt, frozen, rows, 8, return_scores=True)
      out['serve_' + name] = {'tokens': tokens.tolist(), 'beams_shape': list(beams.shape),
                              'scores': serve.score(prompt, frozen, rows).tolist()}

    # fit_batch on CPU devices: the most that divide; 2 model partitions keep their pairs.
    out['fit'] = {str(n): dict(Partitioner().fit_batch(n).mesh.shape) for n in (8, 6, 5)}
    out['fit_model2'] = dict(Partitioner(num_partitions=2).fit_batch(3).mesh.shape)
    print('RESULT' + json.dumps(out))
""")


@pytest.fixture(scope="module")
def result():
  env = dict(os.environ, XLA_FLAGS=host_devices.with_device_count(
      os.environ.get("XLA_FLAGS", ""), 4), JAX_PLATFORMS="cpu")
  proc = subprocess.run([sys.executable, "-c", SCRIPT], cwd=REPO_ROOT, env=env,
                        capture_output=True, text=True, timeout=900)
  assert proc.returncode == 0, proc.stderr[-4000:]
  return json.loads(proc.stdout.split("RESULT", 1)[1])


@pytest.mark.numerics
def test_a_batch_that_does_not_divide_trains_on_the_most_devices_that_divide_it(result):
  assert result["one"]["mesh"] == {"data": 1, "model": 1}
  assert result["four"]["mesh"] == {"data": 3, "model": 1}  # 6 rows: 3 of the 4 devices
  # One forward and backward; 3 devices only split the float32 sums over rows (|loss| ~0.5,
  # 6 rows x 16 targets): differences are float32 rounding, ~1e-7 relative; 1e-5 leaves room
  # for any CPU's summation order while a lost or doubled row (1/6 of the sum) is far outside.
  np.testing.assert_allclose(result["four"]["loss"], result["one"]["loss"], rtol=1e-5)
  np.testing.assert_allclose(result["four"]["grad_norm"], result["one"]["grad_norm"], rtol=1e-5)
  grad1, grad3 = np.asarray(result["one"]["grad"]), np.asarray(result["four"]["grad"])
  assert np.abs(grad1).max() > 0
  np.testing.assert_allclose(grad3, grad1, rtol=0, atol=1e-5 * np.abs(grad1).max())


@pytest.mark.numerics
def test_serving_batches_are_padded_to_the_devices_and_the_padding_dropped(result):
  four, one = result["serve_four"], result["serve_one"]
  assert len(four["tokens"]) == len(four["scores"]) == 5
  assert four["beams_shape"][0] == 5
  assert four["tokens"] == one["tokens"]  # greedy tokens: the same argmax on every row
  # Scores are sums of ~8 float32 log-probabilities per row, computed row by row on either
  # mesh: only the devices' summation order can differ.
  np.testing.assert_allclose(four["scores"], one["scores"], rtol=1e-5, atol=1e-5)


def test_fit_batch_keeps_model_partitions_and_takes_the_most_dividing_data_shards(result):
  assert result["fit"] == {"8": {"data": 4, "model": 1}, "6": {"data": 3, "model": 1},
                           "5": {"data": 1, "model": 1}}
  assert result["fit_model2"] == {"data": 1, "model": 2}
