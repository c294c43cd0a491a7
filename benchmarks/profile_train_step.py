"""Where a prompt-tuning train step's time goes: a `jax.profiler` trace of the compiled step,
each XLA op's time summed by kind.

    python benchmarks/profile_train_step.py [--preset t5_1_1_small --batch 8 --inputs 128
        --prompt 100 --targets 8 --dropout 0.1 --dtype float32 --steps 4]

The step is `train_throughput.JaxPromptTuning`'s (the benchmark's shape by default). The trace's
per-op events (one per op and worker thread) are matched to the compiled HLO by name and put in
one of: matmul (any fusion with a dot/convolution: the frozen weights' matmuls, attention scores
and values, logits), dropout bits (PRNG: threefry's shifts/xors), softmax/normalisation
reductions, transcendental elementwise (tanh of gelu, exp, rsqrt), other elementwise, copies and
transposes, gathers/slices. Times are thread-milliseconds per step (the sum over the worker
threads); the wall time per step and how much of it had 0, 1 or 2+ threads busy show how well
the step uses the cores. Host overhead is wall time with no op running.
"""

from __future__ import annotations

import argparse
import collections
import glob
import os
import re
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import bench_common  # noqa: E402
import jax  # noqa: E402
import numpy as np  # noqa: E402
import train_throughput  # noqa: E402

_LAYOUT = ("copy", "transpose", "bitcast", "reshape", "broadcast", "parameter", "concatenate",
           "slice", "pad", "constant", "fusion")


def parse_hlo(text: str):
  """Instruction name -> (its opcode and the opcodes of the computation it calls, its line)."""
  computations: dict[str, list[str]] = {}
  ops, calls, lines, current = {}, {}, {}, None
  for line in text.splitlines():
    header = re.match(r"^(?:ENTRY )?%?([\w.\-]+) .*\{$", line)
    if header and not line.startswith(" "):
      current = header.group(1)
      computations[current] = []
      continue
    instruction = re.match(r"^\s+(?:ROOT )?%?([\w.\-]+) = \S+ ([\w\-]+)\(", line)
    if instruction and current:
      name, op = instruction.groups()
      computations[current].append(op)
      ops[name], lines[name] = op, line
      called = re.search(r"calls=%?([\w.\-]+)", line)
      if called:
        calls[name] = called.group(1)
  return {name: [op, *computations.get(calls.get(name), [])] for name, op in ops.items()}, lines


def category(opcodes: list[str], line: str) -> str:
  ops = set(opcodes)
  if ops & {"dot", "convolution"}:
    return "matmul"
  if ops & {"rng-bit-generator", "rng"} or ops >= {"shift-right-logical", "xor"}:
    return "dropout bits (PRNG)"
  if "reduce" in ops:
    return "reductions (softmax, norms, loss)"
  if ops & {"exponential", "log", "tanh", "rsqrt", "power"}:
    return "transcendental elementwise"
  if ops & {"gather", "scatter", "dynamic-slice", "dynamic-update-slice"}:
    return "gathers/slices"
  if ops <= set(_LAYOUT) or "copy" in line.split("=")[0]:
    return "copies/transposes"
  return "other elementwise"


def profile(ours, batches, steps: int):
  """(per-op thread-ns summed over `steps` steps, wall seconds, busy-thread histogram)."""
  directory = tempfile.mkdtemp(prefix="prompt_jax_profile_")
  jax.profiler.start_trace(directory)
  wall = ours.run(batches[:steps])
  jax.profiler.stop_trace()
  path = glob.glob(os.path.join(directory, "**", "*.xplane.pb"), recursive=True)[0]
  data = jax.profiler.ProfileData.from_file(path)
  per_op = collections.Counter()
  edges = []
  for plane in data.planes:
    for thread, line in enumerate(plane.lines):
      if not line.name.startswith("tf_XLA"):
        continue
      for event in line.events:
        if "::" in event.name or event.name.startswith("end: "):
          continue  # executor bookkeeping, not an op
        per_op[event.name] += event.duration_ns
        edges += [(event.start_ns, 1, thread), (event.start_ns + event.duration_ns, -1, thread)]
  edges.sort()
  busy, running, last = collections.Counter(), collections.Counter(), edges[0][0] if edges else 0
  for time_ns, delta, thread in edges:
    busy[min(sum(1 for c in running.values() if c > 0), 2)] += time_ns - last
    running[thread] += delta
    last = time_ns
  return per_op, wall, busy


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--preset", default=train_throughput.PRESET)
  parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--inputs", type=int, default=128)
  parser.add_argument("--targets", type=int, default=8)
  parser.add_argument("--prompt", type=int, default=100)
  parser.add_argument("--dropout", type=float, default=0.1)
  parser.add_argument("--steps", type=int, default=4)
  parser.add_argument("--top", type=int, default=0, help="also list the N slowest ops")
  args = parser.parse_args(argv)
  load = bench_common.start()
  ours = train_throughput.JaxPromptTuning(args.batch, args.inputs, args.targets, args.prompt,
                                          args.dropout, preset=args.preset, dtype=args.dtype)
  vocab = train_throughput.t5.preset(args.preset).vocab_size
  rng = np.random.default_rng(0)
  host = [train_throughput.random_batch(rng, args.batch, args.inputs, args.targets,
                                        vocab_size=vocab) for _ in range(args.steps)]
  batches = ours.device_batches(host)
  compiled = ours.pt.train_step_fn.lower(ours.state, ours.frozen, batches[0], ours.rng).compile()
  opcodes, lines = parse_hlo(compiled.as_text())
  ours.run(batches[:1] * 2)  # warm-up
  per_op, wall, busy = profile(ours, batches, args.steps)

  by_kind = collections.Counter()
  for name, ns in per_op.items():
    by_kind[category(opcodes.get(name, ["?"]), lines.get(name, ""))] += ns
  total = sum(by_kind.values())
  steps = args.steps
  print(f"shape: {args.preset}, batch {args.batch}, inputs {args.inputs} + prompt {args.prompt}, "
        f"targets {args.targets}, {args.dtype}, dropout {args.dropout}")
  print(f"wall {1e3 * wall / steps:.0f} ms/step; ops {total / steps / 1e6:.0f} thread-ms/step")
  print(f"{'kind':36} {'thread-ms/step':>15} {'share':>6}")
  for kind, ns in by_kind.most_common():
    print(f"{kind:36} {ns / steps / 1e6:15.1f} {100 * ns / total:5.1f}%")
  span = sum(busy.values()) or 1
  print("wall time with 0 / 1 / 2+ threads running an op: "
        + " / ".join(f"{100 * busy[k] / span:.0f}%" for k in (0, 1, 2)))
  for name, ns in per_op.most_common(args.top):
    print(f"  {ns / steps / 1e6:7.2f} ms  {lines.get(name, name).strip()[:140]}")
  bench_common.finish(load)
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
