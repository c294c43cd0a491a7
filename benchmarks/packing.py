"""Examples/s on GLUE-like input lengths: packed rows vs length buckets vs PEFT padding to the
longest example of each batch.

    python benchmarks/packing.py [--rounds 3 --examples 192 --buckets 32,64,128 \
        --packed 256x8,384x6,512x4 --open_rows 16 --preset t5_1_1_small --dtype float32]

The examples are `length_bucketing.py`'s (same GLUE-like lengths, same seed, 100-token prompt,
8 targets). Sides, all training prompt tuning on the same examples in alternating rounds inside
one process:
- bucketed: ours, batches of `--batch` examples padded to the smallest bucket, prompt prepended;
- packed LxR: ours, R rows of L encoder positions, several examples per row, each with its own
  copy of the prompt (`prompt_jax.data.packing.pack_examples`, greedy first fit over
  `--open_rows` open rows; L counts the prompt slots; a decoder row holds `--targets` positions
  for each example of the fullest encoder row);
- PEFT: Hugging Face PEFT prompt tuning, batches of `--batch` padded to their longest input.
Every shape is compiled before timing. Imports no TensorFlow or seqio.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import bench_common  # noqa: E402
import length_bucketing  # noqa: E402
import numpy as np  # noqa: E402
import train_throughput  # noqa: E402

from prompt_jax.data import bucketing, packing  # noqa: E402
from prompt_jax.prompts import base  # noqa: E402


def parse_packed(spec: str) -> list[tuple[int, int]]:
  """'256x6,512x3' -> [(row length 256, 6 rows), (512, 3)]."""
  out = []
  for item in spec.split(","):
    try:
      length, rows = (int(x) for x in item.lower().split("x"))
    except ValueError:
      raise ValueError(f"--packed items are LENGTHxROWS such as 256x6, got {item!r}") from None
    if length < 1 or rows < 1:
      raise ValueError(f"--packed {item!r}: row length and rows must be >= 1")
    out.append((length, rows))
  return out


def positions_per_example(batches, examples: int, key: str) -> float:
  """Positions the step computes per example (padding, empty rows and prompt slots included)."""
  return sum(b[key].size for b in batches) / examples


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--rounds", type=int, default=3)
  parser.add_argument("--examples", type=int, default=192, help="examples per round and side")
  parser.add_argument("--buckets", default="32,64,128")
  parser.add_argument("--packed", default="256x8,384x6,512x4",
                      help="packed shapes, LENGTHxROWS (encoder positions incl. prompt slots)")
  parser.add_argument("--open_rows", type=int, default=16,
                      help="rows the first-fit packer keeps open (its window)")
  train_throughput.add_common_flags(parser)
  args = parser.parse_args(argv)
  if args.examples < args.batch or args.examples % args.batch:
    raise ValueError(f"--examples {args.examples} must be a positive multiple of --batch "
                     f"{args.batch}")
  buckets = bucketing.check_buckets([int(b) for b in args.buckets.split(",")])
  packed_shapes = parse_packed(args.packed)
  for length, _ in packed_shapes:
    if length < args.prompt + args.inputs:
      raise ValueError(f"--packed row length {length} cannot hold the prompt {args.prompt} + the "
                       f"longest input {args.inputs}")
  load = bench_common.start()

  rng = np.random.default_rng(0)  # the examples of length_bucketing.py
  lengths = length_bucketing.glue_like_lengths(rng, args.examples, args.inputs)
  vocab = train_throughput.batch_vocab(args.preset)
  host = [train_throughput.random_batch(rng, args.batch, args.inputs, args.targets,
                                        lengths[i:i + args.batch], vocab_size=vocab)
          for i in range(0, args.examples, args.batch)]
  examples = [{k: v[j] for k, v in b.items()} for b in host for j in range(args.batch)]

  sides = {}  # name -> host batches
  bucketed = bucketing.bucket_by_length(examples, args.batch, buckets, flush=True)
  sides["bucketed"] = [length_bucketing.pad_rows(b, args.batch) for b in bucketed]
  for length, rows in packed_shapes:
    # Decoder rows: --targets positions for as many examples as the encoder rows take at most.
    layout = packing.first_fit(lengths, [0] * len(lengths), rows, length, 1, args.prompt,
                               args.open_rows)
    per_row = max(len(row) for batch in layout for row in batch)
    sides[f"packed {length}x{rows}"] = packing.pack_examples(
        examples, rows, length, args.targets * per_row, args.prompt, args.open_rows,
        slot_id=base.PROMPT_SLOT_ID)
  print(f"lengths: median {np.median(lengths):.0f}, 90th pct {np.percentile(lengths, 90):.0f}, "
        f"max {lengths.max()}; prompt {args.prompt}, targets {args.targets}")
  real = args.prompt + lengths.mean()
  print(f"{'side':>16} {'steps':>6} {'enc pos/example':>16} {'real share':>11} "
        f"{'dec pos/example':>16}")
  for name, batches in sides.items():
    enc = positions_per_example(batches, args.examples, "encoder_input_tokens")
    if name == "bucketed":
      enc += len(batches) * args.batch * args.prompt / args.examples  # prompt prepended
    dec = positions_per_example(batches, args.examples, "decoder_target_tokens")
    print(f"{name:>16} {len(batches):6d} {enc:16.1f} {real / enc:11.1%} {dec:16.1f}")
  longest = np.mean([bucketing.real_lengths(b["encoder_input_tokens"]).max() for b in host])
  peft_enc = args.prompt + longest
  print(f"{'PEFT longest':>16} {len(host):6d} {peft_enc:16.1f} {real / peft_enc:11.1%} "
        f"{float(args.targets):16.1f}")

  ours = train_throughput.JaxPromptTuning(args.batch, args.inputs, args.targets, args.prompt,
                                          args.dropout, args.preset, args.dtype)
  device = {name: ours.device_batches(batches) for name, batches in sides.items()}
  for batches in device.values():  # compile every shape once
    widths = [b["encoder_input_tokens"].shape[1] for b in batches]
    for width in sorted(set(widths)):
      ours.run([batches[widths.index(width)]])
  peft = None
  if not args.no_peft:
    peft = train_throughput.PeftPromptTuning(args.prompt, args.dropout, args.threads,
                                             args.preset, args.dtype)
    peft_batches = [peft.torch_batch(b, trim=True) for b in host]
    peft.run(peft_batches[:1])
  print(f"shape: {args.preset}, {train_throughput.dtype_note(args.dtype)}, dropout "
        f"{args.dropout}; bucketed and PEFT batches of {args.batch} examples")

  names = list(sides)
  packed_names = names[1:]
  header = [f"{n} ex/s" for n in names] + ["PEFT ex/s"]
  header += [f"{n.split()[1]}/bucketed" for n in packed_names] + ["bucketed/PEFT"]
  header += [f"{n.split()[1]}/PEFT" for n in packed_names]
  widths = [max(len(h), 8) for h in header]
  print(f"{'round':>6} " + " ".join(f"{h:>{w}}" for h, w in zip(header, widths)))
  table = []
  for r in range(args.rounds):
    eps = {name: args.examples / ours.run(device[name]) for name in names}
    eps["PEFT"] = args.examples / peft.run(peft_batches) if peft else float("nan")
    row = [eps[n] for n in names] + [eps["PEFT"]]
    row += [eps[n] / eps["bucketed"] for n in packed_names] + [eps["bucketed"] / eps["PEFT"]]
    row += [eps[n] / eps["PEFT"] for n in packed_names]
    table.append(row)
    print(f"{r:6d} " + " ".join(f"{v:{w}.2f}" for v, w in zip(row, widths)), flush=True)
  med = [statistics.median(col) for col in zip(*table)]
  print(f"{'median':>6} " + " ".join(f"{v:{w}.2f}" for v, w in zip(med, widths)))
  bench_common.finish(load)
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
