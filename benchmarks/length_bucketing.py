"""Examples/s on GLUE-like input lengths: ours with length buckets vs PEFT padding every batch to
its longest example (what `DataCollatorWithPadding` / `padding=True` does).

    python benchmarks/length_bucketing.py [--rounds 3 --examples 96 --buckets 32,64,128]
        [--preset t5_1_1_base] [--dtype bfloat16] [--no_peft]

Input lengths (T5 tokens, before the 100-token prompt) follow a GLUE-like mixture: half short
single sentences (SST-2/CoLA-like, median 22 tokens) and half sentence pairs (MNLI/QQP-like,
median 50), log-normal, clipped to [4, 128]. Both sides see the same examples in the same order;
ours groups them into buckets (`prompt_jax.data.bucketing.bucket_by_length`), compiling once per
bucket before timing. Rounds alternate between the two sides inside one process, framed by the
load averages at the start and end (`bench_common`: "UNDER LOAD" when other processes used the
CPU). `--preset`, `--dtype` (bfloat16: bf16 activations and frozen weights for ours, torch bf16
autocast for PEFT) and `--no_peft` are as in train_throughput.py.

Imports only jax/flax/optax/orbax/numpy from prompt_jax's dependencies (no TensorFlow, seqio or
tensorflow-datasets), so it runs on a GPU or TPU machine as is.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import bench_common  # noqa: E402
import numpy as np  # noqa: E402
import train_throughput  # noqa: E402

from prompt_jax.data import bucketing  # noqa: E402


def glue_like_lengths(rng: np.random.Generator, n: int, max_length: int) -> np.ndarray:
  pairs = rng.random(n) < 0.5
  median = np.where(pairs, 50.0, 22.0)
  sigma = np.where(pairs, 0.45, 0.5)
  lengths = np.exp(np.log(median) + sigma * rng.standard_normal(n))
  return np.clip(np.round(lengths), 4, max_length).astype(int)


def pad_rows(batch: dict[str, np.ndarray], batch_size: int) -> dict[str, np.ndarray]:
  """Pad a short final batch [n, ...] to [batch_size, ...] with all-zero rows (zero loss
  weight, all padding), so every bucket compiles one batch shape."""
  n = len(next(iter(batch.values())))
  if n > batch_size:
    raise ValueError(f"batch has {n} rows, more than the batch size {batch_size}")
  return {k: np.concatenate([v, np.zeros((batch_size - n,) + v.shape[1:], v.dtype)])
          for k, v in batch.items()}


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--rounds", type=int, default=3)
  parser.add_argument("--examples", type=int, default=96, help="examples per round and side")
  parser.add_argument("--buckets", default="32,64,128")
  train_throughput.add_common_flags(parser)
  args = parser.parse_args(argv)
  if args.rounds < 1:
    parser.error(f"--rounds must be >= 1, got {args.rounds}")
  if args.batch < 1 or args.examples < args.batch or args.examples % args.batch:
    parser.error(f"--examples {args.examples} must be a positive multiple of --batch "
                 f"{args.batch}")
  try:
    buckets = bucketing.check_buckets([int(b) for b in args.buckets.split(",")])
  except ValueError as e:
    parser.error(f"--buckets {args.buckets!r}: {e}")
  if max(buckets) < args.inputs:
    parser.error(f"--buckets {args.buckets}: the largest bucket must hold --inputs "
                 f"{args.inputs}")
  start_load = bench_common.start()
  rng = np.random.default_rng(0)
  lengths = glue_like_lengths(rng, args.examples, args.inputs)
  vocab = train_throughput.batch_vocab(args.preset)
  host = [train_throughput.random_batch(rng, args.batch, args.inputs, args.targets,
                                        lengths[i:i + args.batch], vocab_size=vocab)
          for i in range(0, args.examples, args.batch)]
  examples = [{k: v[j] for k, v in b.items()} for b in host for j in range(args.batch)]
  bucketed = list(bucketing.bucket_by_length(examples, args.batch, buckets, flush=True))
  bucketed = [pad_rows(b, args.batch) for b in bucketed]
  widths = [b["encoder_input_tokens"].shape[1] for b in bucketed]
  longest = [int(bucketing.real_lengths(b["encoder_input_tokens"]).max()) for b in host]
  per_width = {int(w): widths.count(w) for w in sorted(set(widths))}
  print(f"lengths: median {np.median(lengths):.0f}, 90th pct {np.percentile(lengths, 90):.0f}, "
        f"max {lengths.max()}; ours {len(bucketed)} batches at widths {per_width}; PEFT "
        f"{len(host)} batches, mean width {np.mean(longest):.1f}; fixed padding would be "
        f"{args.inputs}")

  ours = train_throughput.JaxPromptTuning(args.batch, args.inputs, args.targets, args.prompt,
                                          args.dropout, args.preset, args.dtype)
  ours_batches = ours.device_batches(bucketed)
  for width in sorted(set(widths)):  # compile each bucket once
    ours.run([ours_batches[widths.index(width)]])
  peft = None
  if not args.no_peft:
    peft = train_throughput.PeftPromptTuning(args.prompt, args.dropout, args.threads,
                                             args.preset, args.dtype)
    peft_batches = [peft.torch_batch(b, trim=True) for b in host]
    peft.run(peft_batches[:1])
  ours_fixed = ours.device_batches(host)  # padded to the full --inputs, for reference
  ours.run(ours_fixed[:1])
  print(f"shape: {args.preset}, batch {args.batch}, prompt {args.prompt}, targets "
        f"{args.targets}, {train_throughput.dtype_note(args.dtype)}, dropout {args.dropout}")

  fixed = f"ours fixed-{args.inputs} ex/s"
  print(f"{'round':>5} {'ours bucketed ex/s':>19} {fixed:>20} "
        f"{'PEFT longest ex/s':>18} {'bucketed/PEFT':>14}")
  rows = []
  for r in range(args.rounds):
    ours_eps = args.examples / ours.run(ours_batches)
    fixed_eps = args.examples / ours.run(ours_fixed)
    peft_eps = args.examples / peft.run(peft_batches) if peft else float("nan")
    rows.append((ours_eps, fixed_eps, peft_eps, ours_eps / peft_eps))
    print(f"{r:5d} {ours_eps:19.2f} {fixed_eps:20.2f} {peft_eps:18.2f} {rows[-1][3]:14.2f}",
          flush=True)
  med = [statistics.median(col) for col in zip(*rows)]
  print(f"{'median':>5} {med[0]:19.2f} {med[1]:20.2f} {med[2]:18.2f} {med[3]:14.2f}")
  bench_common.finish(start_load)
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
