"""`prompt-jax plan`: what one train step costs per device, without allocating a weight.

    prompt-jax plan --gin_file=runs/scale_xxl.gin --mesh=2x4 [--platform tpu|gpu|cpu]

reads the training gin config (model, prompt, batch size, feature lengths, optimizer, axis rules,
`frozen_dtype`), builds the step on a (data, model) mesh of DATA x MODEL devices, and lowers and
compiles it ahead of time from `jax.ShapeDtypeStruct`s that carry their `NamedSharding`s. When
the machine has fewer devices of the platform than the mesh needs, the step is compiled for fake
CPU devices (`--xla_force_host_platform_device_count`); the byte counts are then those of the XLA
CPU compiler, a close but not exact stand-in for the TPU/GPU compiler (see docs/scale.md).

Printed: per-device bytes of the compiled step (arguments, outputs, temporaries), parameter
counts (frozen / trainable), and FLOPs per step, from XLA's cost analysis and from the analytic
prompt-tuning count 4 x (encoder matmul weights x encoder tokens + (decoder matmul weights +
logits weights) x decoder tokens) plus the attention-score FLOPs.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from typing import Optional, Sequence

# Per-chip memory and peak dense bf16 FLOP/s of common accelerators (methods.md section 5).
CHIPS = {
    "v4": (32, 275e12),
    "v5e": (16, 197e12),
    "v5p": (95, 459e12),
    "h100": (80, 989e12),
    "a100": (80, 312e12),
}
DEFAULT_CHIP = {"tpu": "v5e", "gpu": "h100", "cpu": None}
_CHILD_ENV = "PROMPT_JAX_PLAN_CHILD"
_DEVICE_COUNT_FLAG = "--xla_force_host_platform_device_count"


def parse_mesh(mesh: str) -> tuple[int, int]:
  """'4x2' -> (4, 2)."""
  parts = mesh.lower().split("x")
  if len(parts) != 2 or not all(p.isdigit() and int(p) > 0 for p in parts):
    raise ValueError(f"--mesh must be DATAxMODEL with positive integers, e.g. 4x2; got {mesh!r}")
  return int(parts[0]), int(parts[1])


def fake_device_flags(xla_flags: str, count: int) -> str:
  """`xla_flags` (an XLA_FLAGS value) asking for `count` fake CPU devices instead of any count it
  asked for before; its other flags are kept."""
  kept = [f for f in xla_flags.split() if not f.startswith(f"{_DEVICE_COUNT_FLAG}=")]
  return " ".join([*kept, f"{_DEVICE_COUNT_FLAG}={count}"])


def _devices_for(platform: str, needed: int, argv: Sequence[str]):
  """Real devices of `platform` if there are enough, else fake CPU devices: when this process
  has too few, `prompt-jax plan <argv>` runs again in a child process whose environment (only)
  asks XLA for `needed` CPU devices."""
  import jax  # pylint: disable=g-import-not-at-top
  if platform != "cpu":
    try:
      real = jax.devices(platform)
    except RuntimeError:
      real = []
    if len(real) >= needed:
      return real[:needed], False
  cpus = jax.devices("cpu")
  if len(cpus) >= needed:
    return cpus[:needed], platform != "cpu"
  if os.environ.get(_CHILD_ENV):
    raise RuntimeError(f"could not create {needed} fake CPU devices (have {len(cpus)})")
  env = dict(os.environ, XLA_FLAGS=fake_device_flags(os.environ.get("XLA_FLAGS", ""), needed),
             JAX_PLATFORMS="cpu", **{_CHILD_ENV: "1"})
  proc = subprocess.run([sys.executable, "-m", "prompt_jax.cli", "plan", *argv], env=env,
                        check=False)
  raise SystemExit(proc.returncode)


def _training_bindings(args):
  """Resolve the gin-configured arguments of `trainer.train` without running it."""
  import gin  # pylint: disable=g-import-not-at-top

  from prompt_jax import gin_utils, trainer  # pylint: disable=g-import-not-at-top
  gin_utils.configure_gin(args.gin_file, args.gin_bindings, args.search_paths,
                          **_gin_checks(args.model))
  # The plan never writes or reads data: fill what a run would require.
  for macro, value in (("MODEL_DIR", "None"), ("MIXTURE_OR_TASK_NAME", "'plan_only'")):
    try:
      bound = gin.query_parameter(f"%{macro}")
    except ValueError:
      bound = gin.REQUIRED
    if bound is gin.REQUIRED or repr(bound) == repr(gin.REQUIRED):
      gin.parse_config(f"{macro} = {value}")
  return gin.get_bindings(trainer.train)


def matmul_weights(abstract_frozen, logits_via_embedding: bool) -> dict[str, int]:
  """Frozen matmul weight counts: encoder, decoder (without logits) and logits."""
  import flax  # pylint: disable=g-import-not-at-top
  flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(abstract_frozen), sep="/")
  counts = {"encoder": 0, "decoder": 0, "logits": 0}
  for path, leaf in flat.items():
    if path.endswith("logits_dense/kernel"):
      counts["logits"] += leaf.size
    elif path.endswith("/kernel"):
      counts[path.split("/")[0]] += leaf.size
  if logits_via_embedding:
    counts["logits"] = flat["token_embedder/embedding"].size
  return counts


def analytic_flops(weights: dict[str, int], config, batch: int, encoder_length: int,
                   target_length: int) -> dict[str, float]:
  """Prompt-tuning FLOPs per step: 4N per token (forward + activation half of the backward).

  `encoder_length` includes the prompt. Attention scores (QK^T and weights x V, 4 x joined_kv
  FLOPs per query-key pair forward) are counted separately, doubled for the backward too."""
  matmul = 4.0 * (weights["encoder"] * batch * encoder_length
                  + (weights["decoder"] + weights["logits"]) * batch * target_length)
  joined = config.num_heads * config.head_dim
  pairs = (config.num_encoder_layers * encoder_length ** 2
           + config.num_decoder_layers * (target_length ** 2 + target_length * encoder_length))
  attention = 2.0 * 4.0 * joined * batch * pairs
  return {"matmul": matmul, "attention": attention, "total": matmul + attention}


def check_divisible(abstract, shardings, mesh_shape) -> None:
  """Every sharded dimension must divide evenly over its mesh axes (say which one does not)."""
  import jax  # pylint: disable=g-import-not-at-top
  for (path, leaf), sharding in zip(jax.tree_util.tree_leaves_with_path(abstract),
                                    jax.tree_util.tree_leaves(shardings)):
    for dim, axes in zip(leaf.shape, sharding.spec):
      parts = 1
      for axis in (axes if isinstance(axes, tuple) else (axes,)):
        parts *= mesh_shape[axis] if axis else 1
      if dim % parts:
        name = "/".join(str(getattr(k, "key", k)) for k in path)
        raise ValueError(f"{name} {tuple(leaf.shape)}: dimension {dim} does not split over "
                         f"{parts} devices of mesh axis {axes!r}; pick a model-axis size that "
                         f"divides the number of heads and the MLP width")


def _cost(compiled) -> dict:
  cost = compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else {}
  return dict(cost or {})


def build_plan(args, devices, fake: bool) -> dict:
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top

  from prompt_jax import trainer as trainer_lib  # pylint: disable=g-import-not-at-top
  from prompt_jax.partitioning import Partitioner  # pylint: disable=g-import-not-at-top

  bindings = _training_bindings(args)
  model = bindings["model"]
  data_cfg = bindings["train_dataset_cfg"]
  rules = bindings.get("partitioner") or Partitioner(devices=devices[:1])
  partitioner = Partitioner(num_partitions=args.model, logical_axis_rules=rules.logical_axis_rules,
                            devices=devices)
  lengths = data_cfg.task_feature_lengths
  batch = data_cfg.batch_size
  pt = trainer_lib.PromptTrainer(
      model, bindings.get("optimizer") or trainer_lib.adafactor(), partitioner, lengths["inputs"],
      lengths["targets"], batch,
      bindings.get("trainable_pattern", trainer_lib.params_lib.DEFAULT_TRAINABLE_PATTERN),
      frozen_dtype=bindings.get("frozen_dtype"))

  check_divisible(pt.abstract_frozen, pt.frozen_shardings, partitioner.mesh.shape)

  def data(ndim_shape):
    return jax.ShapeDtypeStruct(ndim_shape, jnp.int32,
                                sharding=partitioner.data_sharding(len(ndim_shape)))
  shaped_batch = model.dummy_batch(batch, lengths["inputs"], lengths["targets"])
  batch_structs = {k: data(v.shape) for k, v in shaped_batch.items()}
  rng = jax.eval_shape(lambda: jax.random.key(0))
  rng = jax.ShapeDtypeStruct(rng.shape, rng.dtype, sharding=partitioner.replicated())
  start = time.perf_counter()
  lowered = pt.train_step_fn.lower(pt.abstract_state(), pt.frozen_structs(), batch_structs,
                                   rng)
  compiled = lowered.compile()
  compile_seconds = time.perf_counter() - start

  memory = compiled.memory_analysis()
  per_device = {
      "arguments": int(memory.argument_size_in_bytes),
      "outputs": int(memory.output_size_in_bytes),
      "aliased": int(memory.alias_size_in_bytes),
      "temporaries": int(memory.temp_size_in_bytes),
      "generated_code": int(memory.generated_code_size_in_bytes),
  }
  per_device["total"] = (per_device["arguments"] + per_device["outputs"] - per_device["aliased"]
                         + per_device["temporaries"])

  module = model.module
  encoder_length = jax.eval_shape(
      lambda: module.apply({"params": {}}, shaped_batch["encoder_input_tokens"],
                           method=module.encoder_mask)).shape[1]
  weights = matmul_weights(pt.abstract_frozen, model.config.logits_via_embedding)
  flops = analytic_flops(weights, model.config, batch, encoder_length, lengths["targets"])
  cost = _cost(compiled)
  num_devices = len(devices)
  chip = args.chip
  result = {
      "mesh": {"data": args.data, "model": args.model},
      "platform": args.platform,
      "compiled_for": "fake CPU devices" if fake else devices[0].platform,
      "chip": chip,
      "config": {"batch_size": batch, "inputs": lengths["inputs"],
                 "targets": lengths["targets"], "encoder_length": int(encoder_length),
                 "activation_dtype": model.config.dtype,
                 "frozen_dtype": str(pt.frozen_dtype or "float32"),
                 "remat_policy": model.config.remat_policy},
      "params": pt.param_counts(),
      "matmul_weights": weights,
      "bytes_per_device": per_device,
      "flops_per_step": {"analytic_matmul": flops["matmul"],
                         "analytic_attention": flops["attention"],
                         "analytic_total": flops["total"],
                         "xla_per_device": float(cost.get("flops", float("nan"))),
                         "xla_total": float(cost.get("flops", float("nan"))) * num_devices},
      "compile_seconds": compile_seconds,
  }
  if chip:
    hbm_gib, peak = CHIPS[chip]
    result["fits"] = per_device["total"] <= hbm_gib * 2 ** 30
    result["chip_memory_gib"] = hbm_gib
    result["ideal_step_seconds"] = flops["total"] / (peak * num_devices)
  return result


def _gib(n: float) -> str:
  if n >= 2 ** 30:
    return f"{n / 2 ** 30:9.2f} GiB"
  return f"{n / 2 ** 20:9.2f} MiB"


def format_plan(plan: dict) -> str:
  c, p, b, f = plan["config"], plan["params"], plan["bytes_per_device"], plan["flops_per_step"]
  mesh = plan["mesh"]
  lines = [
      f"mesh {mesh['data']}x{mesh['model']} (data x model) on {plan['compiled_for']} "
      f"(planned for {plan['platform']}{' ' + plan['chip'] if plan['chip'] else ''}); "
      f"compiled in {plan['compile_seconds']:.1f} s",
      f"batch {c['batch_size']}, inputs {c['inputs']} (+prompt -> encoder {c['encoder_length']}),"
      f" targets {c['targets']}; activations {c['activation_dtype']}, frozen weights "
      f"{c['frozen_dtype']}, remat {c['remat_policy']}",
      f"parameters: frozen {p['frozen']:,}  trainable {p['trainable']:,}",
      "per-device bytes of the compiled train step:",
      f"  arguments    {_gib(b['arguments'])}",
      f"  outputs      {_gib(b['outputs'])}  (of which {_gib(b['aliased']).strip()} donated "
      "in place)",
      f"  temporaries  {_gib(b['temporaries'])}",
      f"  total        {_gib(b['total'])}",
      "FLOPs per step (whole mesh):",
      f"  analytic 4N matmul  {f['analytic_matmul']:.4g}",
      f"  + attention scores  {f['analytic_attention']:.4g}  -> {f['analytic_total']:.4g}",
      f"  XLA cost analysis   {f['xla_total']:.4g}  ({f['xla_per_device']:.4g} per device)",
  ]
  if "fits" in plan:
    verdict = "fits" if plan["fits"] else "does NOT fit"
    lines.append(f"{verdict} in {plan['chip_memory_gib']} GiB per {plan['chip']} chip; "
                 f"step time at 100% of peak: {plan['ideal_step_seconds'] * 1e3:.1f} ms")
  return "\n".join(lines)


def _gin_checks(model_partitions: int) -> dict:
  """`gin_utils.check`/`configure_gin` arguments: trainer.train's config, with the macros
  `_training_bindings` fills in optional and NUM_PARTITIONS from the mesh."""
  return {"roots": ["trainer.train"], "optional": ["MODEL_DIR", "MIXTURE_OR_TASK_NAME"],
          "extra_bindings": [f"NUM_PARTITIONS = {model_partitions}"]}


def main(*, gin_files: Sequence[str], mesh: str, gin_bindings: Sequence[str] = (),
         search_paths: Sequence[str] = (), platform: str = "cpu", chip: Optional[str] = None,
         json_path: Optional[str] = None) -> int:
  """`prompt-jax plan`: print (and with `json_path` write) the plan of the gin-configured train
  step on a `mesh` ('DATAxMODEL') of `platform` devices, compared with `chip`."""
  data, model = parse_mesh(mesh)
  if platform not in DEFAULT_CHIP:
    raise ValueError(f"--platform must be one of {sorted(DEFAULT_CHIP)}, got {platform!r}")
  if chip is not None and chip not in CHIPS:
    raise ValueError(f"--chip must be one of {sorted(CHIPS)}, got {chip!r}")
  from prompt_jax import gin_utils  # pylint: disable=g-import-not-at-top
  gin_utils.check(gin_files, gin_bindings, search_paths, **_gin_checks(model))  # fast, no imports
  args = argparse.Namespace(gin_file=list(gin_files), gin_bindings=list(gin_bindings),
                            search_paths=list(search_paths), data=data, model=model,
                            platform=platform, chip=chip or DEFAULT_CHIP[platform])
  child_argv = [*(f"--gin_file={f}" for f in gin_files),
                *(f"--gin_bindings={b}" for b in gin_bindings),
                f"--gin_search_paths={','.join(search_paths)}", f"--mesh={mesh}",
                f"--platform={platform}", *([f"--chip={chip}"] if chip else []),
                *([f"--json={json_path}"] if json_path else [])]  # `prompt-jax plan` again
  devices, fake = _devices_for(platform, data * model, child_argv)
  plan = build_plan(args, devices, fake)
  print(format_plan(plan), flush=True)
  if json_path:
    with open(json_path, "w") as f:
      json.dump(plan, f, indent=2)
  return 0
