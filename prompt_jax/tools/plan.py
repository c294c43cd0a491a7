"""`prompt-jax plan`: what the programs of a prompt-tuning run cost per device, without a weight.

    prompt-jax plan --gin_file=runs/scale_xxl.gin --mesh=2x4 --topology=v5e:2x4
    prompt-jax plan --gin_file=runs/demo.gin --mesh=4x2 --platform=tpu     (not a TPU plan)

The training config (the command line parses its gin and passes the objects in) gives the model,
batch, feature lengths, optimizer, axis rules and `frozen_dtype`; the programs of
`PromptPrograms` (train step, eval step, score, predict) are lowered on a (data, model) mesh from
`jax.ShapeDtypeStruct`s that carry their `NamedSharding`s and compiled ahead of time.

With `--topology` (e.g. `v5e:2x4`, `v4:2x2x2`, `v5p:2x2x1`, `v6e:2x4`, `v5e:4x4`) the devices
are those of that TPU slice as libtpu describes it (`jax.experimental.topologies`), on any host,
with no TPU attached, and the compiler is the TPU compiler: its memory analysis is what the slice
would allocate, and a program that does not fit is its own RESOURCE_EXHAUSTED error (as in
MaxText's `train_compile.py`). libtpu is the optional extra `pip install -e ".[tpu]"`.

Without `--topology` the devices are the machine's own of `--platform` when there are enough,
else fake CPU devices (`--xla_force_host_platform_device_count`, in a child process): then the
byte counts are the XLA *CPU* compiler's, not a TPU plan (docs/scale.md shows how far apart).

Printed per program and device: argument, output, temporary and generated-code bytes, the
compiler's peak, whether it fits the chip, XLA's FLOPs and the time they take at the chip's peak;
for the train step also the analytic prompt-tuning count 4 x (encoder matmul weights x encoder
tokens + (decoder matmul weights + logits weights) x decoder tokens) plus attention scores.
`--max_batch` searches (doubling, then bisection) for the largest global batch whose train step
the TPU compiler fits.

This module is the command (its flags, `target`, `build_plan`, `main`) and the compiling
(`Planner`); the rest is beside it: `topology` (chips and TPU slices), `plan_devices` (the
devices, and the process settings the caller makes before they are described), `flops` (the
analytic count), `plan_report` (the printed table).
"""

from __future__ import annotations

import dataclasses
import json
import re
import sys
import time
from importlib import metadata
from typing import Mapping, Optional, Sequence

import jax
import jax.numpy as jnp
import jaxlib

from prompt_jax import params as params_lib
from prompt_jax import partitioning
from prompt_jax import programs as programs_lib
from prompt_jax.programs import PromptPrograms
from prompt_jax.tools.flops import analytic_flops, matmul_weights
from prompt_jax.tools.plan_devices import (
  ProcessSettings,
  Target,
  gpu_devices,
  host_devices,
  mesh_ordered,
  process_settings,
  tpu_devices,
  usable_hbm,
)
from prompt_jax.tools.plan_report import MAX_BATCH_LIMIT, TITLES, format_bytes, format_plan
from prompt_jax.tools.topology import CHIPS, DEFAULT_CHIP, Topology, parse_topology
from prompt_jax.training import optimizers

PROGRAMS = ("train", "eval", "score", "predict")


# ------------------------------------------------------------------------------------ the flags


def parse_mesh(mesh: str) -> tuple[int, int]:
  """'4x2' -> (4, 2)."""
  parts = mesh.lower().split("x")
  if len(parts) != 2 or not all(p.isdigit() and int(p) > 0 for p in parts):
    raise ValueError(f"--mesh must be DATAxMODEL with positive integers, e.g. 4x2; got {mesh!r}")
  return int(parts[0]), int(parts[1])


def parse_programs(programs: Optional[str], topology: Optional[Topology]) -> tuple[str, ...]:
  """'train,predict' -> ('train', 'predict'); None -> all programs for a TPU topology, else the
  train step alone (a fake-CPU compile is slow and only a stand-in)."""
  if programs is None:
    return PROGRAMS if topology is not None else ("train",)
  names = tuple(p.strip() for p in programs.split(",") if p.strip())
  unknown = [p for p in names if p not in PROGRAMS]
  if not names or unknown:
    raise ValueError(f"--programs must be a comma-separated subset of {','.join(PROGRAMS)}; "
                     f"got {programs!r}")
  return tuple(p for p in PROGRAMS if p in names)


@dataclasses.dataclass(frozen=True)
class Request:
  """The command line's plan flags, checked (no device touched)."""

  data: int
  model: int
  topology: Optional[Topology]
  platform: str
  chip: Optional[str]
  programs: tuple[str, ...]
  max_batch: bool = False
  gpu_target_config: Optional[str] = None


def request(*, mesh: str, topology: Optional[str] = None, platform: str = "cpu",
            chip: Optional[str] = None, programs: Optional[str] = None,
            max_batch: bool = False, gpu_target_config: Optional[str] = None) -> Request:
  """Check the flags together; a one-line ValueError for the first that is wrong."""
  data, model = parse_mesh(mesh)
  if gpu_target_config is not None:
    if topology is not None:
      raise ValueError("--gpu_target_config (GPUs) and --topology (a TPU slice) exclude each "
                       "other")
    if platform not in ("cpu", "gpu"):
      raise ValueError(f"--gpu_target_config describes GPUs; it cannot be planned for "
                       f"--platform={platform}")
    if max_batch:
      raise ValueError("--max_batch needs --topology: the XLA GPU compiler does not refuse a "
                       "program that needs more memory than the GPU has")
    chip = chip or DEFAULT_CHIP["gpu"]
    return Request(data, model, None, "gpu", chip, parse_programs(programs, None), False,
                   gpu_target_config)
  if platform not in DEFAULT_CHIP:
    raise ValueError(f"--platform must be one of {sorted(DEFAULT_CHIP)}, got {platform!r}")
  if chip is not None and chip not in CHIPS:
    raise ValueError(f"--chip must be one of {sorted(CHIPS)}, got {chip!r}")
  slice_ = None
  if topology is not None:
    slice_ = parse_topology(topology)
    if chip is not None and chip != slice_.generation:
      raise ValueError(f"--chip={chip} contradicts --topology={topology} (a "
                       f"{slice_.generation} slice); leave --chip out")
    if platform not in ("cpu", "tpu"):
      raise ValueError(f"--topology is a TPU slice; it cannot be planned for --platform="
                       f"{platform}")
    if data * model != slice_.chips:
      raise ValueError(f"--mesh={mesh} has {data * model} devices but --topology={topology} "
                       f"has {slice_.chips} chips; use a DATAxMODEL whose product is "
                       f"{slice_.chips}")
    platform, chip = "tpu", slice_.generation
  elif max_batch:
    raise ValueError("--max_batch needs --topology: only the TPU compiler says what does not "
                     "fit (the CPU compiler never runs out of memory)")
  return Request(data, model, slice_, platform, chip or DEFAULT_CHIP[platform],
                 parse_programs(programs, slice_), max_batch)


def target(req: Request, reexec_argv: Sequence[str] = ()) -> Target:
  """The devices a plan compiles for. With a topology: the TPU slice's (libtpu's description).
  Else this machine's `platform` devices, or fake CPU devices (this may run
  `prompt-jax plan <reexec_argv>` again in a child process and exit with its code). For a TPU
  slice or GPUs the caller first sets `settings(req, os.environ)` (the command line does)."""
  if req.topology is not None:
    devices = tpu_devices(req.topology)
    if len(devices) != req.topology.chips:
      raise RuntimeError(f"libtpu describes {req.topology.name} with {len(devices)} devices, "
                         f"expected {req.topology.chips} (one per chip)")
    return Target(tuple(mesh_ordered(devices, req.data, req.model)), req.data, req.model,
                  req.topology, "tpu", req.chip)
  if req.gpu_target_config is not None:
    devices = gpu_devices(req.gpu_target_config, req.data * req.model)
    return Target(tuple(devices), req.data, req.model, None, "gpu", req.chip, False,
                  req.gpu_target_config)
  devices, fake = host_devices(req.platform, req.data * req.model, reexec_argv)
  return Target(tuple(devices), req.data, req.model, None, req.platform, req.chip, fake)


def settings(req: Request, environ: Mapping[str, str]) -> ProcessSettings:
  """The process-wide settings `target(req)` needs (see `plan_devices.process_settings`), for a
  process whose environment is `environ`; returned, not set."""
  return process_settings(req.topology, req.gpu_target_config, environ)


# ------------------------------------------------------------------------------------ compiling


def check_divisible(abstract, shardings, mesh_shape) -> None:
  """Every sharded dimension must divide evenly over its mesh axes (say which one does not)."""
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


def out_of_memory(error: BaseException) -> Optional[str]:
  """The compiler's out-of-memory message as one line (None if `error` is something else)."""
  text = str(error)
  if "RESOURCE_EXHAUSTED" not in text and "Ran out of memory" not in text:
    return None
  lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
  first = next((line for line in lines if "RESOURCE_EXHAUSTED" in line), lines[0])
  if not re.search(r"\d", first):  # keep the line with the numbers
    first = next((f"{first} {line}" for line in lines if re.search(r"\d+(\.\d+)?[KMGT]", line)),
                 first)
  return first


def _memory(compiled, tpu: bool) -> dict[str, int]:
  m = compiled.memory_analysis()
  memory = {
      "arguments": int(m.argument_size_in_bytes),
      "outputs": int(m.output_size_in_bytes),
      "aliased": int(m.alias_size_in_bytes),
      "temporaries": int(m.temp_size_in_bytes),
      "generated_code": int(m.generated_code_size_in_bytes),
  }
  # What is live at once: the TPU compiler reports it; the CPU compiler's figure leaves out
  # its temporaries, so there the sum of the buffers stands in (donated outputs reuse inputs).
  memory["total"] = (memory["arguments"] + memory["outputs"] - memory["aliased"]
                     + memory["temporaries"])
  peak = int(getattr(m, "peak_memory_in_bytes", 0) or 0) if tpu else 0
  memory["peak"] = peak or memory["total"]
  return memory


class Planner:
  """Lowers and compiles the programs of one `PromptPrograms` for batches of any size."""

  def __init__(self, programs, input_length: int, target_length: int):
    self.programs = programs
    self.tpu = programs.partitioner.devices[0].platform == "tpu"
    self.input_length, self.target_length = input_length, target_length

  def batch_structs(self, batch_size: int, keys: Optional[Sequence[str]] = None) -> dict:
    shaped = self.programs.model.dummy_batch(batch_size, self.input_length, self.target_length)
    partitioner = self.programs.partitioner
    return {k: jax.ShapeDtypeStruct(v.shape, jnp.int32,
                                    sharding=partitioner.data_sharding(len(v.shape)))
            for k, v in shaped.items() if keys is None or k in keys}

  def lower(self, name: str, batch_size: int):
    p = self.programs
    if name == "train":
      rng = jax.eval_shape(lambda: jax.random.key(0))
      rng = jax.ShapeDtypeStruct(rng.shape, rng.dtype, sharding=p.partitioner.replicated())
      return p.train_step_fn.lower(p.abstract_state(), p.frozen_structs(),
                                   self.batch_structs(batch_size), rng)
    if name == "eval":
      return p.eval_step_fn.lower(p.prompt_structs(), p.frozen_structs(),
                                  self.batch_structs(batch_size))
    if name == "score":  # the features `PromptPrograms.score` passes
      keys = getattr(programs_lib, "SCORE_KEYS", None)
      return p.score_fn.lower(p.prompt_structs(), p.frozen_structs(),
                              self.batch_structs(batch_size, keys))
    if name == "predict":
      keys = getattr(programs_lib, "PREDICT_KEYS", None)
      return p.predict_fn.lower(p.prompt_structs(), p.frozen_structs(),
                                self.batch_structs(batch_size, keys), self.target_length)
    raise ValueError(f"unknown program {name!r}; one of {PROGRAMS}")

  def compile(self, name: str, batch_size: int) -> dict:
    """{'memory', 'flops_per_device', 'cost_model_seconds', 'compile_seconds'} or, when the
    compiler runs out of memory, {'out_of_memory': its message, 'compile_seconds'};
    'compile_seconds' counts tracing and lowering too, 'lower_seconds' those alone."""
    start = time.perf_counter()
    lowered = self.lower(name, batch_size)
    lower_seconds = time.perf_counter() - start
    try:
      compiled = lowered.compile()
    except Exception as e:  # pylint: disable=broad-except
      message = out_of_memory(e)
      if message is None:
        raise
      return {"out_of_memory": message, "compile_seconds": time.perf_counter() - start,
              "lower_seconds": lower_seconds}
    seconds = time.perf_counter() - start
    cost = _cost(compiled)
    estimate = cost.get("optimal_seconds")  # XLA:TPU's own estimate; it overflows at 11B
    return {"memory": _memory(compiled, self.tpu),
            "flops_per_device": float(cost.get("flops", "nan")),
            "cost_model_seconds": estimate if estimate and estimate > 0 else None,
            "compile_seconds": seconds, "lower_seconds": lower_seconds}

  def max_batch(self, start: int, log=print) -> dict:
    """The largest global batch (a multiple of the data-parallel size) whose train step the
    compiler fits: double from `start` until it does not fit, then bisect."""
    unit = self.programs.partitioner.data_parallel_size
    probes = []

    def fits(batch: int) -> bool:
      result = self.compile("train", batch)
      ok = "out_of_memory" not in result
      probes.append({"batch": batch, "fits": ok, "compile_seconds": result["compile_seconds"],
                     "peak": result.get("memory", {}).get("peak"),
                     "out_of_memory": result.get("out_of_memory")})
      peak = format_bytes(result["memory"]["peak"]).strip() if ok else None
      log(f"  batch {batch:6d}: " + (f"fits, peak {peak}" if ok else "does NOT fit") +
          f" ({result['compile_seconds']:.0f} s)")
      return ok

    batch = max(unit, -(-start // unit) * unit)
    if fits(batch):
      low, high = batch, None
      while high is None and low < MAX_BATCH_LIMIT:
        if fits(low * 2):
          low *= 2
        else:
          high = low * 2
    else:
      low, high = 0, batch
      while low == 0 and high > unit:
        half = max(unit, (high // 2) // unit * unit)
        if fits(half):
          low = half
        else:
          high = half
    while high is not None and high - low > unit:
      mid = (low + high) // 2 // unit * unit
      if mid in (low, high):
        break
      if fits(mid):
        low = mid
      else:
        high = mid
    return {"max_batch": low, "first_not_fitting": high, "unit": unit, "probes": probes,
            "limit_reached": high is None}




# ------------------------------------------------------------------------------------ the plan


def _encoder_length(model, batch_size: int, input_length: int, target_length: int) -> int:
  """Encoder tokens per example: the inputs and the prompt."""
  shaped_batch = model.dummy_batch(batch_size, input_length, target_length)
  module = model.module
  return int(jax.eval_shape(
      lambda: module.apply({"params": {}}, shaped_batch["encoder_input_tokens"],
                           method=module.encoder_mask)).shape[1])


def _compile_programs(planner: Planner, names: Sequence[str], batch_size: int, target_: Target,
                      scan_layers: bool, log) -> dict:
  """name -> what `Planner.compile` says of it, with whether it fits the chip and its time at
  the chip's peak."""
  chip = target_.chip
  hbm, peak_flops = (CHIPS[chip][0] * 2 ** 30, CHIPS[chip][1]) if chip else (None, None)
  compiled = {}
  for name in names:
    log(f"compiling the {name} program ...")
    result = planner.compile(name, batch_size)
    if "memory" in result:
      result["flops_total"] = result["flops_per_device"] * len(target_.devices)
      if target_.topology is not None:
        result["fits"] = True  # the TPU compiler refuses what does not fit
      elif hbm:
        result["fits"] = result["memory"]["peak"] <= hbm
      if scan_layers:
        # XLA's cost analysis counts a while loop's body once, not once per layer: a scanned
        # model's XLA FLOPs are far below its step's (the analytic count is not).
        result["xla_flops_count_one_layer_per_stack"] = True
      elif peak_flops:
        result["seconds_at_peak"] = result["flops_per_device"] / peak_flops
    else:
      result["fits"] = False
    compiled[name] = result
  return compiled


def _describe_target(target_: Target, usable: Optional[float]) -> dict:
  """The plan's first keys: mesh, compiler, devices, versions and the chip's limits."""
  topology, chip, device = target_.topology, target_.chip, target_.devices[0]
  return {
      "mesh": {"data": target_.data, "model": target_.model},
      "platform": target_.platform,
      "compiled_for": ("TPU compiler" if topology is not None else
                       "XLA GPU compiler (deviceless)" if target_.gpu_target_config else
                       "fake CPU devices" if target_.fake else device.platform),
      "gpu_target_config": target_.gpu_target_config,
      "device_kind": device.device_kind,
      "tpu_plan": topology is not None or device.platform == "tpu",
      "topology": None if topology is None else {
          "name": topology.name, "accelerator_type": topology.accelerator_type,
          "chips": topology.chips, "hosts": topology.hosts,
          "device_kind": device.device_kind,
          "libtpu": metadata.version("libtpu")},
      "jax": jax.__version__, "jaxlib": jaxlib.__version__,
      "chip": chip,
      "chip_memory_gib": None if chip is None else CHIPS[chip][0],
      "usable_hbm_bytes": usable,
      "chip_peak_flops": CHIPS[chip][1] if chip else None,
  }


def _describe_config(programs, batch_size: int, input_length: int, target_length: int,
                     encoder_length: int) -> dict:
  config = programs.model.config
  return {"batch_size": batch_size, "inputs": input_length, "targets": target_length,
          "encoder_length": encoder_length,
          "activation_dtype": config.dtype,
          "frozen_dtype": str(programs.frozen_dtype or "float32"),
          "remat_policy": config.remat_policy,
          "scan_layers": bool(config.scan_layers)}


def _train_summary(train: dict, flops: dict, peak_flops: Optional[float],
                   num_devices: int) -> dict:
  """The train step's numbers at the top level of the plan, as before there were programs."""
  summary = {"compile_seconds": train["compile_seconds"]}
  if "memory" in train:
    summary["bytes_per_device"] = train["memory"]
    summary["flops_per_step"] = {
        "analytic_matmul": flops["matmul"], "analytic_attention": flops["attention"],
        "analytic_total": flops["total"], "xla_per_device": train["flops_per_device"],
        "xla_total": train["flops_total"]}
  if "fits" in train:
    summary["fits"] = train["fits"]
  if peak_flops:
    summary["ideal_step_seconds"] = flops["total"] / (peak_flops * num_devices)
  return summary


def build_plan(programs, target_: Target, *, batch_size: int, input_length: int,
               target_length: int, names: Sequence[str] = ("train",),
               max_batch: bool = False, log=print) -> dict:
  """Compile `names` of `programs` (a `PromptPrograms` on `target_`'s mesh) -> the plan."""
  check_divisible(programs.abstract_frozen, programs.frozen_shardings,
                  programs.partitioner.mesh.shape)
  if batch_size % target_.data:
    raise ValueError(f"batch size {batch_size} is not divisible by the data-parallel size "
                     f"{target_.data} of --mesh={target_.data}x{target_.model}")
  planner = Planner(programs, input_length, target_length)
  model = programs.model
  encoder_length = _encoder_length(model, batch_size, input_length, target_length)
  weights = matmul_weights(programs.abstract_frozen, model.config.logits_via_embedding)
  flops = analytic_flops(weights, model.config, batch_size, encoder_length, target_length)
  usable = usable_hbm(target_.devices[0]) if target_.topology is not None else None
  compiled = _compile_programs(planner, names, batch_size, target_, model.config.scan_layers,
                               log)
  plan = {
      **_describe_target(target_, usable),
      "config": _describe_config(programs, batch_size, input_length, target_length,
                                 encoder_length),
      "params": programs.param_counts(),
      "matmul_weights": weights,
      "programs": compiled,
      "analytic_train_flops": flops,
  }
  if "train" in compiled:
    plan.update(_train_summary(compiled["train"], flops, plan["chip_peak_flops"],
                               len(target_.devices)))
  if max_batch:
    if target_.topology is None:
      raise ValueError("max_batch needs a TPU topology (the CPU compiler never runs out of "
                       "memory)")
    log("searching the largest global batch whose train step fits ...")
    plan["max_batch"] = planner.max_batch(batch_size, log=log)
  return plan


# ------------------------------------------------------------------------------------ the command


def main(*, model, target: Target, batch_size: int, input_length: int, target_length: int,
         optimizer=None, logical_axis_rules=None, trainable_pattern: Optional[str] = None,
         frozen_dtype: Optional[str] = None, programs: Sequence[str] = ("train",),
         max_batch: bool = False, json_path: Optional[str] = None) -> int:
  """`prompt-jax plan` on configured objects (the command line parses the gin config): plan
  `programs` of `model` on `target` (see `target()`), print the table, write `json_path`.
  Exit code 1 when a program does not fit (the compiler's message is printed)."""
  partitioner = partitioning.Partitioner(
      num_partitions=target.model, devices=target.devices,
      logical_axis_rules=(logical_axis_rules if logical_axis_rules is not None else
                          partitioning.standard_logical_axis_rules()))
  built = PromptPrograms(
      model, partitioner, optimizer if optimizer is not None else optimizers.adafactor(),
      trainable_pattern or params_lib.DEFAULT_TRAINABLE_PATTERN, frozen_dtype,
      batch_size=batch_size, input_length=input_length, target_length=target_length)
  log = lambda message: print(message, file=sys.stderr, flush=True)
  plan = build_plan(built, target, batch_size=batch_size, input_length=input_length,
                    target_length=target_length, names=programs, max_batch=max_batch, log=log)
  print(format_plan(plan), flush=True)
  if json_path:
    with open(json_path, "w") as f:
      json.dump(plan, f, indent=2, default=str)
  failed = [n for n, r in plan["programs"].items() if "out_of_memory" in r]
  if failed:
    where = plan["topology"]["name"] if plan.get("topology") else plan["platform"]
    print(f"error: the {TITLES[failed[0]]} does not fit {where} at batch {batch_size}: "
          f"{plan['programs'][failed[0]]['out_of_memory']}", file=sys.stderr)
    return 1
  return 0
