"""`prompt-jax plan`: the tiny demo config on a 4x2 mesh of fake CPU devices (per-device bytes,
parameter counts and FLOPs against independent counts); TPU slices (`--topology`): parsing and
validation, the missing/mismatched-libtpu errors and the max-batch search run everywhere; the
compiles by the TPU compiler need libtpu (`pip install -e ".[tpu]"`) and skip without it."""

from __future__ import annotations

import ast
import importlib.metadata
import json
import os
import re
import subprocess
import sys

import jax
import numpy as np
import pytest

from prompt_jax import cli, host_devices
from prompt_jax.models import t5
from prompt_jax.tools import plan, plan_devices, plan_report
from prompt_jax.tools.topology import CHIPS, parse_topology
from prompt_jax.training import trainer
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
  assert "NOT a TPU plan" in stdout
  assert "fits in 16 GiB per v5e chip" in stdout
  assert list(result["programs"]) == ["train"]  # without --topology: the train step only


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


# An H100 SXM 80GB as XLA's GpuTargetConfigProto describes a GPU (its published characteristics;
# XLA keeps complete ones under xla/backends/gpu/target_config/specs/).
H100_TARGET_CONFIG = """
gpu_device_info {
  threads_per_block_limit: 1024 threads_per_warp: 32 shared_memory_per_block: 49152
  shared_memory_per_core: 233472 threads_per_core_limit: 2048 core_count: 132
  fpus_per_core: 128 block_dim_limit_x: 2147483647 block_dim_limit_y: 65535
  block_dim_limit_z: 65535 memory_bandwidth: 3352320000000 l2_cache_size: 52428800
  clock_rate_ghz: 1.98 device_memory_size: 84942979072 shared_memory_per_block_optin: 232448
  cuda_compute_capability { major: 9 }
  registers_per_core_limit: 65536 registers_per_block_limit: 65536
}
platform_name: "CUDA"
dnn_version_info { major: 8 minor: 9 patch: 4 }
device_description_str: "NVIDIA H100 80GB HBM3"
"""


def _gpu_compiler_installed() -> bool:
  try:
    importlib.metadata.version("jax-cuda12-plugin")
    return True
  except importlib.metadata.PackageNotFoundError:
    return False


def test_gpu_plan_without_a_gpu_counts_the_sharded_arguments(tmp_path):
  """The XLA GPU compiler, deviceless, for 8 H100s: the same per-device arguments as the
  independent count above (no tiling on GPUs)."""
  if not _gpu_compiler_installed():
    pytest.skip('needs the XLA GPU compiler: pip install -e ".[gpu-plan]" (jax-cuda12-plugin; '
                "the default environment and CI have none)")
  config = tmp_path / "h100.txtpb"
  config.write_text(H100_TARGET_CONFIG)
  out = tmp_path / "plan.json"
  env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}
  proc = subprocess.run(
      [sys.executable, "-m", "prompt_jax.cli", "plan", "--gin_file=runs/demo.gin",
       "--mesh=4x2", f"--gpu_target_config={config}", f"--json={out}"],
      cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  result = json.loads(out.read_text())
  assert "GPU plan: NVIDIA H100 80GB HBM3 x 8" in proc.stdout
  assert result["compiled_for"] == "XLA GPU compiler (deviceless)" and result["chip"] == "h100"
  test_argument_bytes_are_the_sharded_sizes((result, proc.stdout))
  memory = result["bytes_per_device"]
  assert memory["temporaries"] > 0 and memory["peak"] >= memory["arguments"]
  assert "fits in 80 GiB per h100 chip (by the GPU compiler's bytes)" in proc.stdout


@pytest.mark.skipif(_gpu_compiler_installed(), reason="jax-cuda12-plugin is installed here: "
                    "this checks the message without it")
def test_gpu_plan_without_the_gpu_compiler_says_what_to_install(capsys, tmp_path):
  assert cli.main(["plan", "--gin_file=runs/demo.gin", "--mesh=4x2",
                   f"--gpu_target_config={tmp_path / 'h100.txtpb'}"]) == 1
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and "needs the XLA GPU compiler (jax-cuda12-plugin)" in err[0]
  assert 'pip install "jax-cuda12-plugin==' in err[0]


def test_bad_mesh_is_a_one_line_error(capsys):
  assert cli.main(["plan", "--gin_file=runs/demo.gin", "--mesh=4by2"]) == 1
  assert "--mesh must be DATAxMODEL" in capsys.readouterr().err
  with pytest.raises(ValueError, match="got '0x2'"):
    plan.parse_mesh("0x2")


# ------------------------------------------------------------- no process-wide side effects


def test_fake_devices_are_asked_for_in_the_child_environment_only(monkeypatch):
  monkeypatch.setenv("XLA_FLAGS", "--xla_cpu_enable_fast_math=false")
  monkeypatch.delenv(plan_devices._CHILD_ENV, raising=False)
  started = {}

  def run(command, env, check):
    started.update(command=command, env=env)
    return subprocess.CompletedProcess(command, 0)

  monkeypatch.setattr(plan_devices.subprocess, "run", run)
  with pytest.raises(SystemExit) as stop:
    plan_devices.host_devices("cpu", 64, ["--mesh=8x8"])
  assert stop.value.code == 0
  assert os.environ["XLA_FLAGS"] == "--xla_cpu_enable_fast_math=false"  # this process: unchanged
  assert started["env"]["XLA_FLAGS"] == ("--xla_cpu_enable_fast_math=false "
                                         "--xla_force_host_platform_device_count=64")
  assert started["env"]["JAX_PLATFORMS"] == "cpu"
  assert started["command"][1:] == ["-m", "prompt_jax.cli", "plan", "--mesh=8x8"]
  assert host_devices.with_device_count("--xla_force_host_platform_device_count=2 --a", 8) == (
      "--a --xla_force_host_platform_device_count=8")


def test_compile_only_settings_are_returned_not_set(monkeypatch):
  """What a TPU or GPU plan needs set in the process (jax_platforms, XLA_FLAGS, libtpu's start-up
  environment) is returned by the library, for the variables the environment lacks."""
  monkeypatch.setattr(plan_devices, "check_libtpu", lambda: "0.0.42")
  monkeypatch.setattr(plan_devices, "check_gpu_compiler", lambda: jax.__version__)
  before = dict(os.environ), jax.config.jax_platforms
  environ = {"XLA_FLAGS": "--a", "TPU_SKIP_MDS_QUERY": "0"}
  tpu = plan.settings(plan.request(mesh="2x4", topology="v5e:2x4"), environ)
  assert (tpu.jax_platforms, tpu.xla_flags) == ("cpu", None)
  assert tpu.libtpu_environ == {"TPU_ACCELERATOR_TYPE": "v5litepod-8",
                                "TPU_WORKER_HOSTNAMES": "localhost",
                                "ALLOW_MULTIPLE_LIBTPU_LOAD": "1"}
  gpus = plan.request(mesh="4x2", gpu_target_config="h100.txtpb")
  gpu = plan.settings(gpus, environ)
  assert (gpu.jax_platforms, gpu.xla_flags, dict(gpu.libtpu_environ)) == (
      "cpu", "--a --xla_gpu_enable_triton_gemm=false", {})
  assert plan.settings(gpus, {"JAX_PLATFORMS": "cuda",
                              "XLA_FLAGS": "--xla_gpu_enable_triton_gemm=true"}) == (
      plan_devices.ProcessSettings())
  assert plan.settings(plan.request(mesh="4x2", platform="tpu"), {}) == (
      plan_devices.ProcessSettings())
  assert (dict(os.environ), jax.config.jax_platforms) == before


def test_the_command_sets_them_while_the_slice_is_described(monkeypatch):
  monkeypatch.setattr(plan_devices, "check_libtpu", lambda: "0.0.42")
  for name in ("JAX_PLATFORMS", "TPU_ACCELERATOR_TYPE", "TPU_WORKER_HOSTNAMES",
               "TPU_SKIP_MDS_QUERY", "ALLOW_MULTIPLE_LIBTPU_LOAD"):
    monkeypatch.delenv(name, raising=False)
  updates, seen = [], {}
  monkeypatch.setattr(jax.config, "update", lambda name, value: updates.append((name, value)))
  monkeypatch.setattr(plan, "target", lambda req, argv: seen.update(os.environ) or "devices")
  assert cli._plan_target(plan, plan.request(mesh="2x4", topology="v5e:2x4"), []) == "devices"
  assert updates == [("jax_platforms", "cpu")]
  assert (seen["TPU_ACCELERATOR_TYPE"], seen["TPU_SKIP_MDS_QUERY"]) == ("v5litepod-8", "1")
  assert "TPU_ACCELERATOR_TYPE" not in os.environ and "TPU_SKIP_MDS_QUERY" not in os.environ


def _process_state_changes(source: str) -> list[str]:
  """The calls and assignments in `source` that change jax's config or the environment."""
  found = []
  for node in ast.walk(ast.parse(source)):
    if isinstance(node, ast.Call) and ast.unparse(node.func) in (
        "jax.config.update", "os.environ.update", "os.environ.pop", "os.environ.setdefault",
        "os.environ.clear", "os.putenv", "os.unsetenv"):
      found.append(ast.unparse(node))
    targets = ([node.target] if isinstance(node, ast.AugAssign) else
               getattr(node, "targets", []) if isinstance(node, (ast.Assign, ast.Delete)) else [])
    found += [ast.unparse(t) for t in targets
              if isinstance(t, ast.Subscript) and ast.unparse(t.value) == "os.environ"]
  return found


def test_plan_modules_change_no_process_state():
  """Settings belong to the command line: no module of the plan updates jax's config or this
  process's environment."""
  assert _process_state_changes("os.environ['A'] = '1'\njax.config.update('x', 1)") == [
      "os.environ['A']", "jax.config.update('x', 1)"]
  for name in ("plan", "plan_devices", "plan_report", "flops", "topology"):
    source = (REPO_ROOT / "prompt_jax" / "tools" / f"{name}.py").read_text()
    assert _process_state_changes(source) == [], name


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


# --------------------------------------------------------------------- TPU slices (--topology)


@pytest.mark.parametrize("name, chips, hosts, bounds, cloud", [
    ("v5e:2x4", 8, 1, (2, 4, 1), "v5litepod-8"),
    ("v5e:4x4", 16, 4, (2, 2, 1), "v5litepod-16"),
    ("v6e:2x4", 8, 1, (2, 4, 1), "v6e-8"),
    ("v4:2x2x2", 8, 2, (2, 2, 1), "v4-16"),
    ("v4:2x2x4", 16, 4, (2, 2, 1), "v4-32"),
    ("V5P:2x2x1", 4, 1, (2, 2, 1), "v5p-8"),
])
def test_topology_names_give_the_slice(name, chips, hosts, bounds, cloud):
  topology = parse_topology(name)
  assert topology.name == name.lower()
  assert (topology.chips, topology.hosts, topology.chips_per_host_bounds) == (chips, hosts, bounds)
  assert topology.accelerator_type == cloud
  assert topology.hbm_gib == CHIPS[name.lower().split(":")[0]][0]


@pytest.mark.parametrize("cloud", ["v4-8", "v4-16", "v4-32", "v4-128", "v5p-8", "v5p-64",
                                   "v5litepod-1", "v5litepod-8", "v5litepod-16", "v5litepod-256",
                                   "v6e-4", "v6e-8", "v6e-64"])
def test_cloud_accelerator_types_name_the_slice_they_create(cloud):
  topology = parse_topology(cloud)  # what scripts/tpu pass (--topology=$ACCELERATOR)
  assert topology.accelerator_type == cloud
  assert parse_topology(topology.name) == topology  # a valid GENERATION:GRID slice


@pytest.mark.parametrize("name, message", [
    ("v9:2x4", "GENERATION one of v4, v5e, v5p, v6e"),
    ("v5e-8", "GENERATION:GRID"),
    ("v5e:2x4x1", "a v5e slice is a 2-D grid"),
    ("v5p:2x2", "a v5p slice is a 3-D grid"),
    ("v4:2x0x1", "3-D grid"),
    ("v5e:3x4", "2x2 chips per host"),
    ("v4:1x2x1", "2x2x1 chips per host"),
    ("v4-12", "v4-N for N in 8, 16, 32"),
    ("v5litepod-3", "v5litepod-N for N in 1, 4, 8, 16"),
])
def test_bad_topologies_are_one_line_errors(name, message):
  with pytest.raises(ValueError, match=re.escape(message)) as error:
    parse_topology(name)
  assert repr(name) in str(error.value) and "\n" not in str(error.value)


def test_flags_are_checked_together():
  ok = plan.request(mesh="4x2", topology="v4:2x2x2")
  assert (ok.platform, ok.chip, ok.programs) == ("tpu", "v4", plan.PROGRAMS)
  assert plan.request(mesh="4x2").programs == ("train",)
  assert plan.request(mesh="2x2", topology="v5p:2x2x1", programs="predict,train").programs == (
      "train", "predict")
  for flags, message in [
      ({"mesh": "2x2", "topology": "v5e:2x4"}, "--mesh=2x2 has 4 devices but --topology=v5e:2x4 "
                                               "has 8 chips"),
      ({"mesh": "2x4", "topology": "v5e:2x4", "chip": "v4"}, "--chip=v4 contradicts"),
      ({"mesh": "2x4", "topology": "v5e:2x4", "platform": "gpu"}, "cannot be planned for"),
      ({"mesh": "2x4", "max_batch": True}, "--max_batch needs --topology"),
      ({"mesh": "2x4", "topology": "v5e:2x4", "programs": "train,decode"}, "--programs"),
  ]:
    with pytest.raises(ValueError, match=re.escape(message)):
      plan.request(**flags)


def _libtpu_installed() -> bool:
  try:
    importlib.metadata.version("libtpu")
  except importlib.metadata.PackageNotFoundError:
    return False
  return True


@pytest.mark.skipif(_libtpu_installed(), reason="libtpu is installed here: this checks the "
                    "error of an environment without it")
def test_topology_without_libtpu_is_one_line_saying_what_to_install(capsys):
  assert cli.main(["plan", "--gin_file=runs/demo.gin", "--mesh=2x4", "--topology=v5e:2x4"]) == 1
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1, err
  assert "needs the TPU compiler (libtpu), which is not installed" in err[0]
  assert f'pip install "jax[tpu]=={jax.__version__}"' in err[0]


def test_mismatched_libtpu_says_what_to_install(monkeypatch):
  jax_requires = ['jaxlib<=0.10.2,>=0.10.2; extra == "tpu"', 'libtpu==0.0.42.*; extra == "tpu"']
  monkeypatch.setattr(importlib.metadata, "requires",
                      lambda name: jax_requires if name == "jax" else [])
  monkeypatch.setattr(importlib.metadata, "version",
                      lambda name: "0.0.40" if name == "libtpu" else "1")
  with pytest.raises(ValueError, match=r"libtpu 0\.0\.40 does not match jax .* needs "
                     r"libtpu==0\.0\.42\.\*; pip install \"jax\[tpu\]=="):
    plan_devices.check_libtpu()
  monkeypatch.setattr(importlib.metadata, "version",
                      lambda name: "0.0.42.1" if name == "libtpu" else "1")
  assert plan_devices.check_libtpu() == "0.0.42.1"


def test_out_of_memory_is_the_compilers_line_with_its_numbers():
  message = ("RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required for HLO "
             "temporaries (144.00G) exceeds available HBM (15.75G).\nProgram hbm requirement ...")
  assert plan.out_of_memory(RuntimeError(message)) == message.splitlines()[0]
  assert plan.out_of_memory(RuntimeError("INVALID_ARGUMENT: bad sharding")) is None


class _FakePrograms:
  """Just what `Planner.max_batch` reads: the data-parallel size."""

  class partitioner:  # noqa: N801
    data_parallel_size = 4
    devices = [type("D", (), {"platform": "tpu"})()]


@pytest.mark.parametrize("start, largest", [(32, 100), (32, 4), (256, 20), (8, 1 << 17)])
def test_max_batch_doubles_then_bisects_over_compiles(start, largest):
  planner = plan.Planner(_FakePrograms(), 512, 8)
  compiled = []

  def compile_(name, batch):  # a compiler that fits up to `largest` examples
    compiled.append(batch)
    assert name == "train" and batch % 4 == 0
    if batch <= largest:
      return {"memory": {"peak": batch}, "compile_seconds": 0.0}
    return {"out_of_memory": "RESOURCE_EXHAUSTED: ...", "compile_seconds": 0.0}

  planner.compile = compile_
  result = planner.max_batch(start, log=lambda _: None)
  if largest < plan_report.MAX_BATCH_LIMIT:
    assert result["max_batch"] == largest // 4 * 4
    assert result["first_not_fitting"] == result["max_batch"] + 4
  else:
    assert result["limit_reached"] and result["max_batch"] >= plan_report.MAX_BATCH_LIMIT
  assert len(compiled) == len(set(compiled)) <= 2 * 16  # no batch compiled twice


# ------------------------------------------------------------- compiled by the TPU compiler


def _tpu_plan(tmp_path, *flags):
  """`prompt-jax plan --topology=...` in a child process (libtpu initialises once per process);
  -> (exit code, the JSON plan or None, stdout, stderr)."""
  pytest.importorskip("libtpu", reason="needs libtpu, the TPU compiler: pip install -e "
                      "\".[tpu]\" (the default environment and CI have none)")
  out = tmp_path / "plan.json"
  env = {k: v for k, v in os.environ.items()
         if k not in ("XLA_FLAGS", "JAX_PLATFORMS", "JAX_COMPILATION_CACHE_DIR")}
  proc = subprocess.run([sys.executable, "-m", "prompt_jax.cli", "plan", *flags,
                         f"--json={out}"], cwd=REPO_ROOT, env=env, capture_output=True,
                        text=True, timeout=900)
  result = json.loads(out.read_text()) if out.exists() else None
  return proc.returncode, result, proc.stdout, proc.stderr


# Tile-aligned widths: the TPU stores every array in (8, 128) tiles, so with shards whose two last
# dimensions are multiples of those the matrices' bytes are exactly their element counts.
ALIGNED = ["--gin.t5.T5Config.emb_dim=256", "--gin.t5.T5Config.head_dim=64",
           "--gin.t5.T5Config.mlp_dim=512", "--gin.t5.T5Config.vocab_size=1024"]


def _tiled_bytes(shape, itemsize: int) -> int:
  """An upper bound of a small array's TPU bytes: (8, 128)-tiled in either orientation."""
  shape = [1, 1, *shape][-2:] if len(shape) < 2 else list(shape)
  rows, cols = int(np.prod(shape[:-1])), shape[-1]
  up = lambda n, k: -(-n // k) * k
  return max(up(rows, 8) * up(cols, 128), up(cols, 8) * up(rows, 128)) * itemsize


def test_tiny_model_compiles_for_v5e_and_its_arguments_are_the_shards(tmp_path):
  code, result, stdout, stderr = _tpu_plan(
      tmp_path, "--gin_file=runs/demo.gin", "--mesh=4x2", "--topology=v5e:2x4",
      "--programs=train", *ALIGNED)
  assert code == 0, stderr[-3000:]
  assert stdout.startswith("TPU plan: v5e:2x4 (v5litepod-8: 8 chips of TPU v5 lite, 1 host)")
  assert result["programs"]["train"]["fits"] is True
  assert result["programs"]["train"]["memory"]["peak"] >= (
      result["programs"]["train"]["memory"]["arguments"])
  assert 14 * 2 ** 30 < result["usable_hbm_bytes"] <= 16 * 2 ** 30  # the compiler's, for v5e

  # An independent count: every frozen leaf's shard (model axis 2) from the model's own logical
  # axis names; matrices exactly, the small leaves between their raw and tiled sizes.
  from prompt_jax.partitioning import standard_logical_axis_rules
  rules = dict(standard_logical_axis_rules())
  c = t5.preset("tiny", emb_dim=256, head_dim=64, mlp_dim=512, vocab_size=1024)
  e, j, m, v, h = c.emb_dim, c.num_heads * c.head_dim, c.mlp_dim, c.vocab_size, c.num_heads
  attention = [(e, j // 2), (e, j // 2), (e, j // 2), (j // 2, e)]  # q, k, v split; out split
  mlp = [(e, m // 2), (e, m // 2), (m // 2, e)]
  matrices = (c.num_encoder_layers * (attention + mlp) + c.num_decoder_layers *
              (2 * attention + mlp) + [(v // 2, e), (e, v // 2)])  # embedding, logits
  assert rules["vocab"] == rules["mlp"] == rules["joined_kv"] == "model"
  exact = sum(a * b * 4 for a, b in matrices)
  small = ([(e,)] * (2 * c.num_encoder_layers + 3 * c.num_decoder_layers + 2)  # norms
           + [(h // 2, c.relative_attention_num_buckets)] * 2)  # relpos, split over heads
  prompt = (PROMPT_LENGTH, e)
  opt_state = jax.eval_shape(trainer.adafactor().init, np.zeros(prompt, np.float32))
  state = [prompt, ()] + [x.shape for x in jax.tree_util.tree_leaves(opt_state)]
  batch = [(BATCH // 4, INPUTS)] + [(BATCH // 4, TARGETS)] * 3
  low = exact + sum(4 * int(np.prod(s)) for s in small + state + batch + [(2,)]) - 64
  high = exact + sum(_tiled_bytes(s, 4) for s in small + state + batch + [(2,)])
  args = result["programs"]["train"]["memory"]["arguments"]
  assert low <= args <= high, (low, args, high)
  assert args < exact * 1.5  # weights replicated over 'model' would be ~2x the matrices


def test_scripts_tpu_plan_compiles_the_scanned_model_for_the_slice_it_names(tmp_path):
  """scripts/tpu/plan.sh (ACCELERATOR=v5litepod-8 -> v5e:2x4) on the scanned tiny model: the
  stacked blocks hold the bytes of the per-layer ones, up to the tiling of the small leaves."""
  code, per_layer, _, stderr = _tpu_plan(
      tmp_path, "--gin_file=runs/demo.gin", "--mesh=4x2", "--topology=v5e:2x4",
      "--programs=train", *ALIGNED)
  assert code == 0, stderr[-3000:]
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  shim = bin_dir / "prompt-jax"  # the console script, for this interpreter
  shim.write_text(f"#!/bin/sh\nexec {sys.executable} -m prompt_jax.cli \"$@\"\n")
  shim.chmod(0o755)
  out = tmp_path / "scanned.json"
  env = {k: v for k, v in os.environ.items()
         if k not in ("XLA_FLAGS", "JAX_PLATFORMS", "JAX_COMPILATION_CACHE_DIR")}
  env.update(PATH=f"{bin_dir}:{env['PATH']}", ACCELERATOR="v5litepod-8", MESH="4x2")
  proc = subprocess.run(["bash", str(REPO_ROOT / "scripts/tpu/plan.sh"), "--gin_file=runs/demo.gin",
                         "--programs=train", "--gin.SCAN_LAYERS=True", *ALIGNED, f"--json={out}"],
                        cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=900)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert proc.stdout.startswith("TPU plan: v5e:2x4 (v5litepod-8")
  scanned = json.loads(out.read_text())
  assert scanned["config"]["scan_layers"] is True and per_layer["config"]["scan_layers"] is False
  a = per_layer["programs"]["train"]["memory"]["arguments"]
  b = scanned["programs"]["train"]["memory"]["arguments"]
  assert b <= a and a - b < 64 * 1024, (a, b)  # per-layer norms: one (8, 128) tile each


def test_an_over_large_batch_is_the_compilers_out_of_memory(tmp_path):
  code, result, stdout, stderr = _tpu_plan(
      tmp_path, "--gin_file=runs/demo.gin", "--mesh=4x2", "--topology=v5e:2x4",
      "--programs=train", "--gin.BATCH_SIZE=1048576")
  assert code == 1
  last = stderr.strip().splitlines()[-1]
  assert last.startswith("error: the train step does not fit v5e:2x4 at batch 1048576: "
                         "RESOURCE_EXHAUSTED"), stderr[-2000:]
  assert re.search(r"\d+(\.\d+)?G", last)  # the compiler's own numbers
  assert result["programs"]["train"]["fits"] is False
  assert "train step does NOT fit: RESOURCE_EXHAUSTED" in stdout
  assert plan_report.fit_hint(result["config"]["remat_policy"]) in stdout


def test_fit_hint_offers_only_remat_policies_that_keep_less():
  from prompt_jax.models import t5
  assert sorted(plan_report.REMAT_BY_MEMORY) == sorted(t5.REMAT_POLICIES)
  hints = {p: plan_report.fit_hint(p) for p in plan_report.REMAT_BY_MEMORY}
  assert "REMAT_POLICY='full'" in hints["none"]
  assert "REMAT_POLICY='dots_with_no_batch_dims_saveable'" in hints["dots_saveable"]
  assert "REMAT_POLICY='dots_saveable'" not in hints["dots_with_no_batch_dims_saveable"]
  assert "REMAT_POLICY" not in hints["full"]
  assert all("--max_batch" in h for h in hints.values())


@pytest.mark.slow
def test_every_program_compiles_for_v4_and_v5p(tmp_path):
  """~1 min: the four programs of the tiny model on a 2-host v4 slice and a v5p-8."""
  for flags, chips in ((["--mesh=4x2", "--topology=v4:2x2x2"], 8),
                       (["--mesh=2x2", "--topology=v5p:2x2x1"], 4)):
    code, result, stdout, stderr = _tpu_plan(tmp_path, "--gin_file=runs/demo.gin", *flags)
    assert code == 0, stderr[-3000:]
    assert list(result["programs"]) == list(plan.PROGRAMS)
    assert result["topology"]["chips"] == chips
    for name, program in result["programs"].items():
      assert program["fits"] and program["memory"]["peak"] > 0, name
      assert program["flops_total"] > 0, name
    # The train step differentiates: more FLOPs than the forward-only eval step.
    assert result["programs"]["train"]["flops_total"] > result["programs"]["eval"]["flops_total"]
