"""`prompt-jax plan` for the tiny demo config on a 4x2 mesh of fake devices: per-device bytes,
parameter counts and FLOPs checked against independent counts."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from prompt_jax import cli, plan, trainer
from prompt_jax.models import t5
from tests.conftest import REPO_ROOT

PROMPT_LENGTH, BATCH, INPUTS, TARGETS = 10, 32, 64, 16  # gin_configs/runs/demo.gin


@pytest.fixture(scope="module")
def tiny_plan(tmp_path_factory):
  out = tmp_path_factory.mktemp("plan") / "plan.json"
  env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}
  proc = subprocess.run(
      [sys.executable, "-m", "prompt_jax.cli", "plan", "--gin_file=runs/demo.gin",
       "--mesh=4x2", "--platform=tpu", f"--json={out}"],
      cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  with open(out) as f:
    return json.load(f), proc.stdout


def _tiny_counts():
  c = t5.preset("tiny")
  joined = c.num_heads * c.head_dim
  attention = 4 * c.emb_dim * joined
  mlp = 3 * c.emb_dim * c.mlp_dim  # gated: wi_0, wi_1, wo
  encoder = c.num_encoder_layers * (attention + mlp)
  decoder = c.num_decoder_layers * (2 * attention + mlp)
  logits = c.emb_dim * c.vocab_size
  norms = (2 * c.num_encoder_layers + 3 * c.num_decoder_layers + 2) * c.emb_dim
  relpos = 2 * c.num_heads * c.relative_attention_num_buckets
  embedding = c.vocab_size * c.emb_dim
  return c, encoder, decoder, logits, norms, relpos, embedding


def test_parameter_counts_and_flops(tiny_plan):
  result, stdout = tiny_plan
  c, encoder, decoder, logits, norms, relpos, embedding = _tiny_counts()
  assert result["params"]["frozen"] == encoder + decoder + logits + norms + relpos + embedding
  assert result["params"]["trainable"] == PROMPT_LENGTH * c.emb_dim
  assert result["config"]["encoder_length"] == INPUTS + PROMPT_LENGTH
  want = 4 * (encoder * BATCH * (INPUTS + PROMPT_LENGTH) + (decoder + logits) * BATCH * TARGETS)
  assert result["flops_per_step"]["analytic_matmul"] == want
  # XLA counts everything (softmax, norms, attention scores, the loss); it must be of the same
  # order as the analytic matmul + attention count, not off by a device factor.
  ratio = result["flops_per_step"]["xla_total"] / result["flops_per_step"]["analytic_total"]
  assert 0.8 < ratio < 2.0, ratio
  assert "mesh 4x2 (data x model) on fake CPU devices" in stdout
  assert "fits in 16 GiB per v5e chip" in stdout


def test_argument_bytes_are_the_sharded_sizes(tiny_plan):
  """Arguments per device = frozen weights split over 'model' (2) except norms, + replicated
  prompt, optimizer state and step, + the batch split over 'data' (4), + the rng key."""
  result, _ = tiny_plan
  c, encoder, decoder, logits, norms, relpos, embedding = _tiny_counts()
  split = encoder + decoder + logits + relpos + embedding
  frozen = 4 * (split // 2 + norms)
  prompt = np.zeros((PROMPT_LENGTH, c.emb_dim), np.float32)
  opt_state = jax.eval_shape(trainer.adafactor().init, prompt)
  state = prompt.nbytes + sum(x.size * x.dtype.itemsize
                              for x in jax.tree_util.tree_leaves(opt_state)) + 4
  batch = 4 * (BATCH // 4) * (INPUTS + 3 * TARGETS)
  key = 8  # a threefry key: two uint32
  # jit drops arguments the step never reads (Adafactor's placeholder leaves of unfactored
  # parameters), so allow those few bytes.
  args = result["bytes_per_device"]["arguments"]
  assert frozen + state + batch + key - 64 <= args <= frozen + state + batch + key
  # The state is donated: its outputs alias the inputs.
  assert result["bytes_per_device"]["aliased"] >= prompt.nbytes
  assert result["fits"] is True


def test_bad_mesh_is_a_one_line_error(capsys):
  assert cli.main(["plan", "--gin_file=runs/demo.gin", "--mesh=4by2"]) == 1
  assert "--mesh must be DATAxMODEL" in capsys.readouterr().err
  with pytest.raises(ValueError, match="got '0x2'"):
    plan.parse_mesh("0x2")


# ------------------------------------------------------------- no process-wide side effects


def test_fake_devices_are_asked_for_in_the_child_environment_only(monkeypatch):
  monkeypatch.setenv("XLA_FLAGS", "--xla_cpu_enable_fast_math=false")
  monkeypatch.delenv(plan._CHILD_ENV, raising=False)
  started = {}

  def run(command, env, check):
    started.update(command=command, env=env)
    return subprocess.CompletedProcess(command, 0)

  monkeypatch.setattr(plan.subprocess, "run", run)
  with pytest.raises(SystemExit) as stop:
    plan._devices_for("cpu", 64, ["--mesh=8x8"])
  assert stop.value.code == 0
  assert os.environ["XLA_FLAGS"] == "--xla_cpu_enable_fast_math=false"  # this process: unchanged
  assert started["env"]["XLA_FLAGS"] == ("--xla_cpu_enable_fast_math=false "
                                         "--xla_force_host_platform_device_count=64")
  assert started["env"]["JAX_PLATFORMS"] == "cpu"
  assert started["command"][1:] == ["-m", "prompt_jax.cli", "plan", "--mesh=8x8"]
  assert plan.fake_device_flags("--xla_force_host_platform_device_count=2 --a", 8) == (
      "--a --xla_force_host_platform_device_count=8")


def test_importing_prompt_jax_data_imports_no_tensorflow():
  """The package once hid the GPUs from TensorFlow at import time; now importing it does
  nothing (`pipeline.host_only_tensorflow` runs when a pipeline is built)."""
  proc = subprocess.run(
      [sys.executable, "-c", "import sys, prompt_jax.data; print('tensorflow' in sys.modules)"],
      cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert proc.stdout.strip() == "False"


def test_host_only_tensorflow_hides_gpus_when_a_pipeline_starts(monkeypatch):
  import tensorflow as tf

  from prompt_jax.data import pipeline
  visible, hidden = ["GPU:0"], []

  def set_visible_devices(devices, kind):
    hidden.append((devices, kind))
    visible.clear()

  monkeypatch.setattr(tf.config, "get_visible_devices",
                      lambda kind=None: list(visible) if kind == "GPU" else [])
  monkeypatch.setattr(tf.config, "set_visible_devices", set_visible_devices)
  pipeline.host_only_tensorflow()
  pipeline.host_only_tensorflow()  # idempotent: no GPU is visible any more
  assert hidden == [([], "GPU")]
  visible.append("GPU:0")
  pipeline.get_task_or_mixture("demo_sentiment", "prompt_jax.data.synthetic")
  assert hidden == [([], "GPU")] * 2

  def too_late(devices, kind):
    raise RuntimeError("Visible devices cannot be modified after being initialized")

  visible.append("GPU:0")
  monkeypatch.setattr(tf.config, "set_visible_devices", too_late)
  with pytest.warns(RuntimeWarning, match="may use GPU memory beside JAX"):
    pipeline.host_only_tensorflow()
