"""Sharding on 8 fake CPU devices: meshes 8x1, 4x2 and 2x4 give the 1-device loss and prompt
gradient; frozen weights are laid out as T5X's standard rules say and the prompt never on
'model'; bf16 frozen weights stay close to fp32; remat changes memory, not numbers.

Everything runs in ONE subprocess (JAX fixes its device count at start-up) to pay the start-up
and compile cost once. The last tests (in this process) check that every prompt method's axes
are replicated by rules the method files declare, composed by `standard_logical_axis_rules`.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from flax import traverse_util

from prompt_jax import partitioning, prompts
from prompt_jax.host_devices import with_device_count
from prompt_jax.models import t5
from prompt_jax.programs import PromptPrograms
from prompt_jax.prompts import bank, base, deep, p_tuning, plain, residual, spt, superpos
from tests.conftest import REPO_ROOT

# Values compared against tolerances: CI runs these again under another CPU instruction set.
pytestmark = pytest.mark.numerics

SCRIPT = textwrap.dedent("""
    import json, jax, jax.numpy as jnp, numpy as np
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

    def model(**overrides):
      return EncoderDecoderModel(t5.Transformer(t5.preset('tiny', **overrides),
          InputPrompt(Prompt(4, initializers.sampled_vocabulary()))))

    cfg = pipeline.DatasetConfig('demo_sentiment', {'inputs': 64, 'targets': 16}, batch_size=8)
    batch = next(pipeline.iterate_batches(cfg))

    def flat(tree):
      return {'/'.join(str(getattr(k, 'key', k)) for k in path): leaf
              for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}

    def run(partitioner, m=None, frozen_dtype=None):
      pt = PromptPrograms.for_training(m or model(), trainer.adafactor(), partitioner, 64, 16, 8,
                                 frozen_dtype=frozen_dtype)
      frozen = pt.load_frozen_params('builtin:demo_t5_tiny.npz')
      state = pt.init_state(frozen, jax.random.key(0))
      loss_and_grad = jax.jit(
          jax.value_and_grad(lambda p, f, b: pt._loss(p, f, b, None)[0]),
          in_shardings=(pt.prompt_shardings, pt.frozen_shardings, None))
      loss, grad = loss_and_grad(state.prompt_params, frozen, pt.shard_batch(batch))
      return pt, frozen, state, float(loss), flat(grad)

    out = {'meshes': {}}
    devices = jax.devices()
    meshes = {'1x1': Partitioner(devices=devices[:1]), '8x1': Partitioner(num_partitions=1),
              '4x2': Partitioner(num_partitions=2), '2x4': Partitioner(num_partitions=4)}
    for name, partitioner in meshes.items():
      pt, frozen, state, loss, grad = run(partitioner)
      specs = {k: [str(s) for s in v.sharding.spec] for k, v in flat(frozen).items()}
      shard_shapes = {k: list(v.addressable_shards[0].data.shape)
                      for k, v in flat(frozen).items()}
      trainable_specs = [[str(s) for s in v.sharding.spec]
                         for v in jax.tree_util.tree_leaves(state)]
      out['meshes'][name] = {
          'loss': loss, 'grad': {k: np.asarray(v).tolist() for k, v in grad.items()},
          'specs': specs, 'shard_shapes': shard_shapes, 'trainable_specs': trainable_specs,
          'mesh_shape': dict(partitioner.mesh.shape)}

    # bf16 frozen weights and bf16 activations vs fp32, on the 4x2 mesh.
    pt, frozen, state, loss, grad = run(
        meshes['4x2'], model(dtype='bfloat16'), frozen_dtype='bfloat16')
    out['bf16'] = {
        'loss': loss, 'grad': {k: np.asarray(v, np.float32).tolist() for k, v in grad.items()},
        'frozen_dtypes': sorted({str(x.dtype) for x in jax.tree_util.tree_leaves(frozen)}),
        'state_dtypes': sorted({str(x.dtype) for x in jax.tree_util.tree_leaves(
            (state.prompt_params, state.opt_state))
            if jnp.issubdtype(x.dtype, jnp.floating)})}

    # Rematerialisation: same numbers, fewer temporaries in the compiled step.
    out['remat'] = {}
    for policy in ('none', 'full', 'dots_saveable'):
      m = model(remat_policy=policy, num_encoder_layers=3, num_decoder_layers=1)
      pt = PromptPrograms.for_training(m, trainer.adafactor(), meshes['4x2'], 128, 8, 16)
      frozen = pt.random_frozen_params(jax.random.key(2))
      state = pt.init_state(frozen, jax.random.key(0))
      b = {k: np.asarray(jax.random.randint(jax.random.key(3), v.shape, 3, 300))
           for k, v in pt.dummy_batch.items()}
      loss, grad = jax.jit(jax.value_and_grad(lambda p, f, b: pt._loss(p, f, b, None)[0]))(
          state.prompt_params, frozen, pt.shard_batch(b))
      rng = jax.eval_shape(lambda: jax.random.key(0))
      batch_structs = {k: jax.ShapeDtypeStruct(v.shape, v.dtype,
                                               sharding=meshes['4x2'].data_sharding(2))
                       for k, v in pt.dummy_batch.items()}
      compiled = pt.train_step_fn.lower(pt.abstract_state(), pt.frozen_structs(),
                                        batch_structs, rng).compile()
      out['remat'][policy] = {
          'loss': float(loss),
          'grad': np.asarray(jax.tree_util.tree_leaves(grad)[0]).tolist(),
          'temp_bytes': int(compiled.memory_analysis().temp_size_in_bytes)}

    # Scanned layers on the 4x2 mesh: the per-layer npz is stacked at load time.
    pt, frozen, state, loss, grad = run(meshes['4x2'], model(scan_layers=True))
    out['scanned'] = {
        'loss': loss, 'grad': {k: np.asarray(v).tolist() for k, v in grad.items()},
        'specs': {k: [str(s) for s in v.sharding.spec] for k, v in flat(frozen).items()},
        'shapes': {k: list(v.shape) for k, v in flat(frozen).items()},
        'shard_shapes': {k: list(v.addressable_shards[0].data.shape)
                         for k, v in flat(frozen).items()}}
    print('RESULT' + json.dumps(out))
""")


@pytest.fixture(scope="module")
def result():
  env = dict(os.environ, XLA_FLAGS=with_device_count(os.environ.get("XLA_FLAGS", ""), 8),
             JAX_PLATFORMS="cpu")
  proc = subprocess.run([sys.executable, "-c", SCRIPT], cwd=REPO_ROOT, env=env,
                        capture_output=True, text=True, timeout=900)
  assert proc.returncode == 0, proc.stderr[-4000:]
  return json.loads(proc.stdout.split("RESULT", 1)[1])


@pytest.mark.parametrize("mesh", ["8x1", "4x2", "2x4"])
def test_every_mesh_gives_the_single_device_loss_and_prompt_gradient(result, mesh):
  one, many = result["meshes"]["1x1"], result["meshes"][mesh]
  data, model = (int(n) for n in mesh.split("x"))
  assert many["mesh_shape"] == {"data": data, "model": model}
  # One forward and backward; the mesh only splits the float32 sums across devices (|loss| ~0.4,
  # |grad| <= ~0.1): rounding, ~1e-7 of them (6e-8 seen, also with Eigen's dots).
  np.testing.assert_allclose(many["loss"], one["loss"], atol=1e-5, rtol=0)
  assert many["grad"].keys() == one["grad"].keys()
  for key in one["grad"]:
    grad_one = np.asarray(one["grad"][key])
    assert np.abs(grad_one).max() > 1e-4  # a real gradient, not zeros agreeing with zeros
    np.testing.assert_allclose(many["grad"][key], grad_one, atol=1e-5, rtol=0)


# T5X's standard 1-D model-parallel rules: vocab, mlp, heads and joined_kv split over 'model';
# embed, relpos buckets and the layer norms replicated.
EXPECTED_SPECS = {
    "token_embedder/embedding": ["model", "None"],
    "encoder/layers_0/attention/query/kernel": ["None", "model"],
    "encoder/layers_1/attention/out/kernel": ["model", "None"],
    "encoder/layers_0/mlp/wi_0/kernel": ["None", "model"],
    "encoder/layers_0/mlp/wo/kernel": ["model", "None"],
    "encoder/relpos_bias/rel_embedding": ["model", "None"],
    "encoder/layers_0/pre_attention_layer_norm/scale": ["None"],
    "decoder/layers_1/encoder_decoder_attention/value/kernel": ["None", "model"],
    "decoder/logits_dense/kernel": ["None", "model"],
    "decoder/decoder_norm/scale": ["None"],
}


@pytest.mark.parametrize("mesh", ["4x2", "2x4"])
def test_frozen_params_are_sharded_as_the_rules_say(result, mesh):
  got = result["meshes"][mesh]
  model = int(mesh.split("x")[1])
  for path, spec in EXPECTED_SPECS.items():
    assert got["specs"][path] == spec, path
  # The split is real: each device holds 1/model of the split dimension.
  assert got["shard_shapes"]["encoder/layers_0/mlp/wi_0/kernel"] == [64, 128 // model]
  assert got["shard_shapes"]["token_embedder/embedding"] == [384 // model, 64]
  assert got["shard_shapes"]["decoder/decoder_norm/scale"] == [64]
  # Prompt, optimizer state and step: never split over 'model' (nor anything else).
  assert got["trainable_specs"] and all(s == [] or set(s) == {"None"}
                                        for s in got["trainable_specs"])


def test_data_only_mesh_replicates_the_frozen_model(result):
  specs = result["meshes"]["8x1"]["specs"]
  shapes = result["meshes"]["8x1"]["shard_shapes"]
  assert shapes["encoder/layers_0/mlp/wi_0/kernel"] == [64, 128]  # model axis of size 1
  assert specs["encoder/layers_0/mlp/wi_0/kernel"] == ["None", "model"]


def test_bf16_frozen_model_matches_fp32_within_tolerance(result):
  """Documented tolerance (docs/scale.md): bf16 weights and activations have an 8-bit mantissa
  (relative rounding 2^-8 = 0.4%); through 2+2 layers the loss stays within 2% and the prompt
  gradient keeps its direction (cosine > 0.99) and size (within 5%)."""
  fp32, bf16 = result["meshes"]["4x2"], result["bf16"]
  assert bf16["frozen_dtypes"] == ["bfloat16"]
  assert bf16["state_dtypes"] == ["float32"]  # prompt and Adafactor state stay fp32
  assert bf16["loss"] != fp32["loss"]  # really computed in bf16
  np.testing.assert_allclose(bf16["loss"], fp32["loss"], rtol=2e-2)
  for key in fp32["grad"]:
    a = np.asarray(fp32["grad"][key]).ravel()
    b = np.asarray(bf16["grad"][key]).ravel()
    cosine = a @ b / (np.linalg.norm(a) * np.linalg.norm(b))
    assert cosine > 0.99, cosine
    np.testing.assert_allclose(np.linalg.norm(b), np.linalg.norm(a), rtol=5e-2)


def test_scanned_layers_on_a_mesh_give_the_single_device_numbers(result):
  one, scanned = result["meshes"]["1x1"], result["scanned"]
  np.testing.assert_allclose(scanned["loss"], one["loss"], atol=1e-5, rtol=0)
  assert scanned["grad"].keys() == one["grad"].keys()
  for key in one["grad"]:
    np.testing.assert_allclose(scanned["grad"][key], one["grad"][key], atol=1e-5, rtol=0)
  # Stacked blocks keep the per-layer rules behind an unsplit leading "layers" axis.
  kernel = "encoder/layers/attention/query/kernel"
  layers = len([k for k in one["specs"] if k.startswith("encoder/layers_")
                and k.endswith("attention/query/kernel")])
  assert scanned["specs"][kernel] == ["None", "None", "model"]
  assert scanned["shapes"][kernel] == [layers, 64, 64]
  assert scanned["shard_shapes"][kernel] == [layers, 64, 32]
  assert not any("layers_" in k for k in scanned["specs"])


def test_remat_gives_the_same_numbers_with_fewer_temporaries(result):
  remat = result["remat"]
  for policy in ("full", "dots_saveable"):
    np.testing.assert_allclose(remat[policy]["loss"], remat["none"]["loss"], atol=1e-6)
    np.testing.assert_allclose(remat[policy]["grad"], remat["none"]["grad"], atol=1e-6)
  assert remat["full"]["temp_bytes"] < remat["none"]["temp_bytes"]


def test_multihost_environment_is_checked_by_name():
  from prompt_jax.tools import distributed
  assert distributed.maybe_initialize({}) is False
  assert distributed.maybe_initialize({"PROMPT_JAX_MULTIHOST": "0"}) is False
  with pytest.raises(ValueError, match="PROMPT_JAX_NUM_PROCESSES must be an integer, got 'two'"):
    distributed.maybe_initialize({"PROMPT_JAX_COORDINATOR": "localhost:1",
                                  "PROMPT_JAX_NUM_PROCESSES": "two",
                                  "PROMPT_JAX_PROCESS_ID": "0"})
  with pytest.raises(ValueError, match=r"PROMPT_JAX_PROCESS_ID must be in \[0, 2\), got 2"):
    distributed.maybe_initialize({"PROMPT_JAX_COORDINATOR": "localhost:1",
                                  "PROMPT_JAX_NUM_PROCESSES": "2", "PROMPT_JAX_PROCESS_ID": "2"})
  with pytest.raises(ValueError, match="PROMPT_JAX_MULTIHOST must be 1/auto or 0, got 'maybe'"):
    distributed.maybe_initialize({"PROMPT_JAX_MULTIHOST": "maybe"})


def test_explicit_coordinator_initializes_jax_distributed():
  import socket
  with socket.socket() as s:
    s.bind(("localhost", 0))
    port = s.getsockname()[1]
  env = dict(os.environ, JAX_PLATFORMS="cpu", PROMPT_JAX_COORDINATOR=f"localhost:{port}",
             PROMPT_JAX_NUM_PROCESSES="1", PROMPT_JAX_PROCESS_ID="0")
  code = ("from prompt_jax.tools import distributed; assert distributed.maybe_initialize(); "
          "import jax; from jax._src import distributed as d; "
          "print('RESULT', jax.process_count(), d.global_state.client is not None)")
  proc = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, env=env,
                        capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert "RESULT 1 True" in proc.stdout


TWO_HOST_WORKER = """
import json, os, sys
import jax
jax.config.update("jax_cpu_collectives_implementation", "gloo")
from prompt_jax.tools import distributed
distributed.maybe_initialize()
import numpy as np
from prompt_jax.training import trainer
from prompt_jax.data import pipeline, synthetic
from prompt_jax.models import t5
from prompt_jax.models.encoder_decoder import EncoderDecoderModel
from prompt_jax.partitioning import Partitioner
from prompt_jax.prompts import initializers
from prompt_jax.prompts.base import InputPrompt
from prompt_jax.prompts.plain import Prompt
from prompt_jax.programs import PromptPrograms
model = EncoderDecoderModel(t5.Transformer(t5.preset('tiny'),
                                           InputPrompt(Prompt(4, initializers.uniform()))))
cfg = pipeline.DatasetConfig('demo_sentiment', {'inputs': 64, 'targets': 16}, batch_size=8)
n, i = jax.process_count(), jax.process_index()
batches = pipeline.iterate_batches(cfg, shard_id=i, num_shards=n)
local = [next(batches) for _ in range(2)]
pt = PromptPrograms.for_training(model, trainer.adafactor(), Partitioner(num_partitions=2), 64,
                                 16, 8)
frozen = pt.load_frozen_params('builtin:demo_t5_tiny.npz')
state = pt.init_state(frozen, jax.random.key(0))
losses = []
for b in local:
  state, metrics = pt.train_step(state, frozen, b, jax.random.key(1))
  losses.append(float(metrics['loss']))
prompt = np.asarray(state.prompt_params['encoder']['prompt']['prompt']['prompt'])
out = {'losses': losses, 'prompt': prompt.tolist(), 'devices': len(jax.devices()), 'n': n,
       'local': [{k: v.tolist() for k, v in b.items()} for b in local]}
json.dump(out, open(os.path.join(sys.argv[1], f'out_{i}.json'), 'w'))
print('done', i, losses)
"""


@pytest.mark.slow
def test_two_processes_train_like_one_device(tmp_path):
  """Two JAX processes x 4 CPU devices (gloo collectives) form one 4x2 mesh; each reads its own
  data shard; the losses and trained prompt equal one device training on the joined batches."""
  import socket

  import jax

  from prompt_jax.models import t5
  from prompt_jax.models.encoder_decoder import EncoderDecoderModel
  from prompt_jax.partitioning import Partitioner
  from prompt_jax.prompts import initializers
  from prompt_jax.prompts.base import InputPrompt
  from prompt_jax.prompts.plain import Prompt
  from prompt_jax.training import trainer
  with socket.socket() as s:
    s.bind(("localhost", 0))
    port = s.getsockname()[1]
  script = tmp_path / "worker.py"
  script.write_text(TWO_HOST_WORKER)
  procs = []
  for i in range(2):
    env = dict(os.environ, XLA_FLAGS=with_device_count(os.environ.get("XLA_FLAGS", ""), 4),
               JAX_PLATFORMS="cpu", PROMPT_JAX_COORDINATOR=f"localhost:{port}",
               PROMPT_JAX_NUM_PROCESSES="2", PROMPT_JAX_PROCESS_ID=str(i))
    procs.append(subprocess.Popen([sys.executable, str(script), str(tmp_path)], cwd=REPO_ROOT,
                                  env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                  text=True))
  for proc in procs:
    _, err = proc.communicate(timeout=900)
    assert proc.returncode == 0, err[-3000:]
  outs = [json.loads((tmp_path / f"out_{i}.json").read_text()) for i in range(2)]
  assert outs[0]["devices"] == 8 and outs[0]["n"] == 2
  assert outs[0]["local"][0] != outs[1]["local"][0]  # each host read a different shard
  model = EncoderDecoderModel(t5.Transformer(t5.preset("tiny"),
                                             InputPrompt(Prompt(4, initializers.uniform()))))
  pt = PromptPrograms.for_training(model, trainer.adafactor(),
                                   Partitioner(devices=jax.devices()[:1]), 64, 16, 8)
  frozen = pt.load_frozen_params("builtin:demo_t5_tiny.npz")
  state = pt.init_state(frozen, jax.random.key(0))
  losses = []
  for step in range(2):
    joined = {k: np.concatenate([np.asarray(outs[0]["local"][step][k]),
                                 np.asarray(outs[1]["local"][step][k])]).astype(np.int32)
              for k in outs[0]["local"][step]}
    state, metrics = pt.train_step(state, frozen, joined, jax.random.key(1))
    losses.append(float(metrics["loss"]))
  for out in outs:
    np.testing.assert_allclose(out["losses"], losses, atol=1e-5)
    np.testing.assert_allclose(
        out["prompt"], np.asarray(state.prompt_params["encoder"]["prompt"]["prompt"]["prompt"]),
        atol=1e-4)


# --------------------------------------------------------------- prompt axes and their rules

PROMPT_HOOKS = {
    "plain": lambda: base.InputPrompt(plain.Prompt(4)),
    "superpos": lambda: base.InputPrompt(superpos.SuperPosPrompt(4, 8, population_size=300)),
    "superpos_shared": lambda: base.InputPrompt(superpos.SuperPosPrompt(
        4, 8, population_size=300, shared_embeddings=True)),
    "residual": lambda: base.InputPrompt(residual.ResidualPrompt(4, bottleneck=8)),
    "p_tuning_mlp": lambda: base.InputPrompt(p_tuning.PTuningPrompt(4, hidden_size=8)),
    "p_tuning_lstm": lambda: base.InputPrompt(p_tuning.PTuningPrompt(
        4, "LSTM", hidden_size=8, num_layers=1)),
    "bank": lambda: bank.PromptBank(num_prompts=2, length=4),
    "deep": lambda: deep.DeepPrompt(plain.Prompt(4), layers=(1, 2)),
    "spt": lambda: spt.SelectivePrompt(plain.Prompt(4), bottleneck=8),
}


def _prompt_axis_names(hook) -> set[str]:
  module = t5.Transformer(t5.preset("tiny", num_encoder_layers=3, num_decoder_layers=1), hook)
  tokens = jnp.ones((1, 6), jnp.int32)
  boxed = jax.eval_shape(lambda: module.init(jax.random.key(0), tokens, tokens, tokens,
                                             enable_dropout=False))["params"]
  specs = traverse_util.flatten_dict(nn.get_partition_spec(boxed), sep="/")
  return {name for path, spec in specs.items() if path.startswith("encoder/prompt/")
          for name in spec}


@pytest.mark.parametrize("method", sorted(PROMPT_HOOKS))
def test_every_prompt_axis_is_replicated_by_a_rule_its_method_declares(method):
  names = _prompt_axis_names(PROMPT_HOOKS[method]())
  rules = dict(partitioning.standard_logical_axis_rules())
  assert names and names <= set(rules), names - set(rules)
  assert {rules[name] for name in names} == {None}
  assert all(rules[name] is None for name, _ in prompts.logical_axis_rules())
  assert rules["mlp"] == rules["vocab"] == "model"  # the frozen model's axes stay split


def test_standard_rules_compose_model_prompt_and_additional_rules(monkeypatch):
  t5x = partitioning.T5X_LOGICAL_AXIS_RULES
  rules = partitioning.standard_logical_axis_rules(additional_rules=[["toy_axis", "model"]])
  assert rules[:len(t5x)] == t5x and rules[-1] == ("toy_axis", "model")
  assert rules[len(t5x):-1] == prompts.logical_axis_rules()
  assert partitioning.Partitioner().logical_axis_rules == partitioning.standard_logical_axis_rules()
  # Two method files may share a name only with the same mesh axis.
  monkeypatch.setattr(superpos, "LOGICAL_AXIS_RULES", (("prompt", "model"),))
  with pytest.raises(ValueError, match=r"logical axis 'prompt': prompt_jax\.prompts\.superpos "
                                       r"maps it to 'model', prompt_jax\.prompts\.base to None"):
    prompts.logical_axis_rules()


def test_importing_partitioning_imports_no_prompt_method():
  # The prompt rules are composed when a Partitioner is built, not at import time.
  code = ("import sys, prompt_jax.partitioning; "
          "print(sorted(m for m in sys.modules if m.startswith('prompt_jax.prompts.')))")
  child = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=REPO_ROOT, timeout=600, check=True)
  assert child.stdout.strip() == "[]", child.stdout
