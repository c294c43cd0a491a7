"""Data-parallel host devices on CPU: train, eval and greedy-decode rates with 1, 2, ... XLA host
devices, as ratios to one device measured in alternating rounds (issue 36).

    python benchmarks/host_devices.py [--devices 1,2] [--rounds 3] [--preset t5_1_1_small]

XLA:CPU runs each op of these programs on few threads, so on a multi-core CPU one compiled
program leaves cores idle. `--xla_force_host_platform_device_count=N` splits the CPU into N
devices; `Partitioner()` then puts them all on the mesh's data axis and every program splits its
batch over them, so N shards compute at the same time. Whether that is faster depends on the
CPU and the shapes: this measures it. Each device count runs in a worker process of its own
(the flag must be set before jax starts), one after the other within each round; the table
reports each count's median rate and its median per-round ratio to one device, framed by the
load (`bench_common`: "UNDER LOAD" when other processes used the CPU).

Programs (T5 1.1 small shape by default, random frozen weights, fp32): the prompt-tuning train
step (batch 8, inputs 128 + a 100-token prompt, targets 8, dropout 0.1, Adafactor; the shape of
the issue's goal), the eval step (loss, same batch), and greedy decoding of 16 tokens at batch 8
and 32 (`PromptPrograms.predict_fn`; eos never matches, so every step runs). Batches must divide
by the device count.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
if os.path.dirname(os.path.abspath(__file__)) not in sys.path:  # bench_common, when imported
  sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import bench_common  # noqa: E402

from prompt_jax import host_devices  # noqa: E402

PROGRAMS = ("train", "eval", "greedy_b8", "greedy_b32")


def _device_counts(text: str) -> list[int]:
  try:
    counts = [int(x) for x in text.split(",") if x.strip()]
  except ValueError:
    raise argparse.ArgumentTypeError(f"comma-separated integers, got {text!r}") from None
  if not counts or any(c < 1 for c in counts):
    raise argparse.ArgumentTypeError(f"device counts must be integers >= 1, got {text!r}")
  return sorted(set(counts))


def worker(args) -> dict:
  """In a process whose XLA_FLAGS already hold the device count: seconds per call of each
  program (median of `args.repeats` timed calls after one warm-up)."""
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  import train_throughput  # pylint: disable=g-import-not-at-top

  from prompt_jax.programs import PromptPrograms  # pylint: disable=g-import-not-at-top
  ours = train_throughput.JaxPromptTuning(args.batch, args.inputs, args.targets,
                                          args.prompt_length, 0.1, args.preset)
  pt = ours.pt
  rng = np.random.default_rng(0)
  vocab = train_throughput.batch_vocab(args.preset)
  batch = pt.shard_batch(train_throughput.random_batch(rng, args.batch, args.inputs,
                                                       args.targets, vocab_size=vocab))
  results = {"devices": len(jax.devices())}

  def time_calls(fn) -> float:
    jax.block_until_ready(fn())  # compile + warm-up
    seconds = []
    for _ in range(args.repeats):
      start = time.perf_counter()
      jax.block_until_ready(fn())
      seconds.append(time.perf_counter() - start)
    return statistics.median(seconds)

  def train():
    ours.state, metrics = pt.train_step_fn(ours.state, ours.frozen, batch, ours.rng)
    return metrics["loss"]

  results["train"] = time_calls(train)
  prompt = ours.state.prompt_params
  results["eval"] = time_calls(lambda: pt.eval_step_fn(prompt, ours.frozen, batch))
  # eos_id -1 never matches, so every sequence decodes all steps.
  decoder = PromptPrograms(dataclasses.replace(ours.model, eos_id=-1), pt.partitioner)
  for size in (8, 32):
    tokens = pt.shard_batch({"encoder_input_tokens": rng.integers(
        3, vocab, (size, args.inputs)).astype(np.int32)})
    results[f"greedy_b{size}"] = time_calls(
        lambda tokens=tokens: decoder.predict_fn(prompt, ours.frozen, tokens,
                                                 args.decode_length, None))
  return results


def run_worker(count: int, args) -> dict:
  env = dict(os.environ)
  env["XLA_FLAGS"] = host_devices.with_device_count(env.get("XLA_FLAGS", ""), count)
  command = [sys.executable, os.path.abspath(__file__), "--worker",
             f"--preset={args.preset}", f"--batch={args.batch}", f"--inputs={args.inputs}",
             f"--targets={args.targets}", f"--prompt_length={args.prompt_length}",
             f"--decode_length={args.decode_length}", f"--repeats={args.repeats}"]
  done = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
  if done.returncode:
    raise SystemExit(f"worker with {count} device(s) failed:\n{done.stderr[-3000:]}")
  result = json.loads(done.stdout.strip().splitlines()[-1])
  if result["devices"] != count:
    raise SystemExit(f"the worker asked for {count} host device(s) saw {result['devices']} "
                     f"(XLA_FLAGS={env['XLA_FLAGS']!r})")
  return result


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--devices", type=_device_counts, default=[1, 2],
                      help="host device counts, comma-separated (default 1,2)")
  parser.add_argument("--rounds", type=int, default=3)
  parser.add_argument("--repeats", type=int, default=5, help="timed calls per program")
  parser.add_argument("--preset", default="t5_1_1_small")
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--inputs", type=int, default=128)
  parser.add_argument("--targets", type=int, default=8)
  parser.add_argument("--prompt_length", type=int, default=100)
  parser.add_argument("--decode_length", type=int, default=16)
  parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  for name in ("rounds", "repeats", "batch", "inputs", "targets", "prompt_length",
               "decode_length"):
    if getattr(args, name) < 1:
      parser.error(f"--{name} must be a positive integer, got {getattr(args, name)}")
  if args.worker:
    print(json.dumps(worker(args)), flush=True)
    return 0
  for count in args.devices:
    for size in (args.batch, 8, 32):
      if size % count:
        parser.error(f"batch {size} does not divide over {count} devices")
  start_load = bench_common.start()
  print(f"{args.preset}: train/eval batch {args.batch}, inputs {args.inputs} + prompt "
        f"{args.prompt_length}, targets {args.targets}; greedy {args.decode_length} tokens at "
        f"batch 8 and 32; {args.rounds} rounds x {args.repeats} calls", flush=True)
  rounds = []
  for r in range(args.rounds):
    results = {count: run_worker(count, args) for count in args.devices}
    rounds.append(results)
    print(f"round {r + 1}: " + "; ".join(
        f"{count} device(s) " + ", ".join(f"{p} {1 / res[p]:.2f}/s" for p in PROGRAMS)
        for count, res in results.items()), flush=True)
  base = args.devices[0]
  print(f"\nper second (median over rounds) and ratio to {base} device(s) (median of per-round "
        "ratios):")
  header = f"{'devices':>8}  " + "  ".join(f"{p:>20}" for p in PROGRAMS)
  print(header)
  for count in args.devices:
    cells = []
    for p in PROGRAMS:
      rate = statistics.median(1 / r[count][p] for r in rounds)
      ratio = statistics.median(r[base][p] / r[count][p] for r in rounds)
      cells.append(f"{rate:10.2f} ({ratio:4.2f}x)")
    print(f"{count:>8}  " + "  ".join(f"{c:>20}" for c in cells))
  bench_common.finish(start_load)
  return 0


if __name__ == "__main__":
  sys.exit(main())
