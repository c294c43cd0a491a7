"""GPU check in one command: train step and decoding, ours vs PEFT / HF generate, one table.

Issue 36: our prompt-tuning train step and decoding against Hugging Face PEFT and `generate`
(torch) on T5 1.1 base and large, in bf16 and fp32, on an accelerator.

On a GPU machine, from the repository root:

    pip install -e ".[bench]"   # torch, transformers, peft: once (this script installs nothing)
    python benchmarks/gpu_check.py --output gpu_check.csv

(`--quick` first for a few-step rehearsal; `--presets`, `--dtypes` narrow it; `--ours_only` times
our side alone, e.g. where torch is missing.) It prints the machine (`bench_common`) and the jax
devices, the fp32 matmul precision of both sides, then each benchmark's own rounds as it runs
(train_throughput.py and decode_throughput.py, called through their `measure(argv)`), and at the
end ONE table, a row per preset x dtype x benchmark:

- `train`: prompt-tuning train steps/s at batch 8, inputs 128 + a 100-token prompt, targets 8,
  dropout 0.1, Adafactor (ours: `PromptPrograms`; theirs: PEFT prompt tuning, bf16 by autocast);
- `greedy`, `4-beam`: decoding examples/s (32 new tokens each, EOS never ends a sequence) at batch
  8, encoder length 228 (= 128 + 100); ours `decoding.greedy` / `beam_search`, theirs `generate`.

How to read it: `ratio` is ours / theirs, so above 1 means ours is faster. It is the median of
per-round ratios, both sides timed in alternating rounds in one process on the same device
(torch on `cuda` when jax runs on a GPU; the `device` column names both when they differ, and
then the ratio compares two devices, not two frameworks). Compare ratios rather than absolute
numbers across machines. A `note` of UNDER LOAD means other processes used the CPU during that
benchmark (`bench_common.finish`): rerun before quoting it. fp32 rows: jax's default matmul
precision may use TF32 on Ampere and newer GPUs while torch's default ("highest") does not; the
header prints both settings, so a large fp32 ratio with bf16 ratios near 1 points there. bf16
rows: ours keeps frozen weights in bf16, PEFT autocasts fp32 weights (train); for decoding HF
weights are bf16, ours are fp32 with bf16 activations (as in the two benchmarks).

Unless set already, it sets CUDA_VISIBLE_DEVICES=0 (both sides on one GPU; with more visible
devices ours would be data-parallel over them) and XLA_PYTHON_CLIENT_PREALLOCATE=false (jax
must leave GPU memory to torch in the same process). Runs on CPU too, with the tiny preset, in
about half a minute on 2 cores (tests/test_gpu_check.py):

    python benchmarks/gpu_check.py --presets tiny --dtypes float32 --ours_only --quick
"""

from __future__ import annotations

import argparse
import csv
import gc
import importlib.util
import math
import os
import sys
import traceback

os.environ.setdefault("USE_TF", "0")  # keep transformers from importing TensorFlow
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
# torch shares the GPU with jax in this process: do not let jax take 75% of its memory up front.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
# One GPU for both sides: our train step would otherwise be data-parallel over every visible GPU
# while PEFT and `generate` use one.
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "0")
if os.path.dirname(os.path.abspath(__file__)) not in sys.path:
  sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import bench_common  # noqa: E402
import decode_throughput  # noqa: E402
import jax  # noqa: E402
import train_throughput  # noqa: E402

from prompt_jax.models import t5  # noqa: E402

PRESETS = ("t5_1_1_base", "t5_1_1_large")
DTYPES = ("bfloat16", "float32")
BENCH_PACKAGES = ("torch", "transformers", "peft")
TRAIN_SHAPE = ["--batch", "8", "--inputs", "128", "--prompt", "100", "--targets", "8",
               "--dropout", "0.1"]
NEW_TOKENS = 32
DECODE_SHAPE = ["--batch", "8", "--inputs", "228", "--new_tokens", str(NEW_TOKENS),
                "--num_beams", "1,4"]
# Rounds and steps: a GPU step takes milliseconds, so a round needs tens of them.
FULL = {"train": ["--rounds", "5", "--steps", "20", "--warmup", "3"],
        "decode": ["--rounds", "3"]}
# --quick: a rehearsal, so the matmul peak (train_throughput's "% peak", not in the table) is small.
QUICK = {"train": ["--rounds", "1", "--steps", "2", "--warmup", "1", "--peak_size", "512"],
         "decode": ["--rounds", "1"]}
COLUMNS = ("preset", "dtype", "benchmark", "ours", "theirs", "unit", "ratio", "device", "note")


def _names(allowed):
  def parse(text: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    bad = [n for n in names if n not in allowed]
    if not names or bad:
      raise argparse.ArgumentTypeError(f"expected names from {sorted(allowed)}, got {text!r}")
    return names
  return parse


def _torch_device(ours_only: bool) -> tuple[str, str]:
  """(torch device for the other side, its name): cuda when jax runs on a GPU and torch sees one."""
  if ours_only:
    return "", ""
  import torch  # pylint: disable=g-import-not-at-top
  if jax.devices()[0].platform in ("gpu", "cuda", "rocm") and torch.cuda.is_available():
    return "cuda", torch.cuda.get_device_name(0)
  return "cpu", "cpu"


def _free_memory() -> None:
  """Drops the previous benchmark's models and compiled programs from the device(s)."""
  gc.collect()
  jax.clear_caches()
  torch = sys.modules.get("torch")
  if torch is not None and torch.cuda.is_available():
    torch.cuda.empty_cache()


def _train_rows(common: list[str], args, torch_device: str) -> list[dict]:
  steps = QUICK if args.quick else FULL
  theirs = ["--no_peft"] if args.ours_only else ["--torch_device", torch_device]
  r = train_throughput.measure(common + TRAIN_SHAPE + steps["train"] + theirs)
  return [dict(benchmark="train", unit="steps/s", ours=r["ours"], theirs=r["peft"],
               ratio=r["ratio"], quiet=r["quiet"])]


def _decode_rows(common: list[str], args, torch_device: str) -> list[dict]:
  steps = QUICK if args.quick else FULL
  theirs = ["--no_hf"] if args.ours_only else ["--torch_device", torch_device]
  r = decode_throughput.measure(common + DECODE_SHAPE + steps["decode"] + theirs)
  # tokens/s counts batch x new tokens: examples/s is that over the new tokens per example.
  return [dict(benchmark=name, unit="examples/s", ours=r[beams]["ours"] / NEW_TOKENS,
               theirs=r[beams]["hf"] / NEW_TOKENS, ratio=r[beams]["ratio"], quiet=r["quiet"])
          for beams, name in ((1, "greedy"), (4, "4-beam"))]


def _run(benchmark, names: tuple[str, ...], common: list[str], args,
         torch_device: str) -> tuple[list[dict], bool]:
  """`benchmark`'s rows with a `note` (UNDER LOAD or the error), and whether it ran; an error
  becomes rows named `names` so that one failing benchmark does not lose the others."""
  try:
    rows = benchmark(common, args, torch_device)
    for row in rows:
      row["note"] = "" if row.pop("quiet") else "UNDER LOAD"
    return rows, True
  except Exception as e:  # noqa: BLE001
    traceback.print_exc()
    note = f"error: {type(e).__name__}: {(str(e).splitlines() or [''])[0]}"[:100]
    return [dict(benchmark=name, unit="", ours=math.nan, theirs=math.nan, ratio=math.nan,
                 note=note) for name in names], False
  finally:
    _free_memory()


def _cell(value) -> str:
  if isinstance(value, float):
    return "-" if math.isnan(value) else f"{value:.4g}"
  return str(value)


def print_table(rows: list[dict]) -> None:
  cells = [[_cell(row[c]) for c in COLUMNS] for row in rows]
  widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(COLUMNS)]
  line = lambda values: "  ".join(v.ljust(w) for v, w in zip(values, widths)).rstrip()
  print(line(COLUMNS))
  print(line(["-" * w for w in widths]))
  for r in cells:
    print(line(r))


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--presets", type=_names(t5.PRESETS), default=list(PRESETS),
                      help=f"comma-separated T5 presets (default {','.join(PRESETS)})")
  parser.add_argument("--dtypes", type=_names(train_throughput.DTYPES), default=list(DTYPES),
                      help=f"comma-separated (default {','.join(DTYPES)})")
  parser.add_argument("--ours_only", action="store_true",
                      help="time our side only (no torch, transformers or peft needed)")
  parser.add_argument("--quick", action="store_true", help="one round of a few steps each")
  parser.add_argument("--output", default=None, help="also write the table to this CSV file")
  args = parser.parse_args(argv)
  missing = [n for n in BENCH_PACKAGES if importlib.util.find_spec(n) is None]
  if missing and not args.ours_only:
    print(f'{", ".join(missing)} not installed: pip install -e ".[bench]" '
          "(or pass --ours_only to time our side alone)", file=sys.stderr)
    return 2

  print(f"gpu_check: {bench_common.describe_machine()}")
  print(f"jax devices: {jax.devices()}")
  torch_device, torch_name = _torch_device(args.ours_only)
  ours_name = jax.devices()[0].device_kind
  device = ours_name
  if torch_name and torch_name != ours_name:
    device = f"ours {ours_name}, theirs {torch_name}"
  precision = f"fp32 matmul precision: jax {jax.config.jax_default_matmul_precision or 'default'}"
  if torch_device:
    import torch  # pylint: disable=g-import-not-at-top
    precision += f", torch {torch.get_float32_matmul_precision()} (torch on {torch_device})"
    if torch_device == "cpu" and jax.devices()[0].platform != "cpu":
      print(f"WARNING: jax runs on {ours_name} but torch on the CPU: the ratios compare devices")
  print(precision, flush=True)
  if torch_device and len(jax.devices()) > 1:
    print(f"WARNING: ours runs on {len(jax.devices())} devices, theirs on one")

  rows, failed = [], False
  out = open(args.output, "w", newline="") if args.output else None
  writer = csv.DictWriter(out, fieldnames=COLUMNS) if out else None
  if writer:
    writer.writeheader()
  for preset in args.presets:
    for dtype in args.dtypes:
      print(f"\n===== {preset} {dtype} =====", flush=True)
      common = ["--preset", preset, "--dtype", dtype]
      new = []
      for benchmark, names in ((_train_rows, ("train",)), (_decode_rows, ("greedy", "4-beam"))):
        got, ok = _run(benchmark, names, common, args, torch_device)
        new += got
        failed |= not ok
      for row in new:
        row.update(preset=preset, dtype=dtype, device=device)
        rows.append(row)
        if writer:
          writer.writerow(row)
      if out:
        out.flush()
  if out:
    out.close()

  print("\n===== gpu_check: ours vs theirs (ratio = ours / theirs; > 1: ours faster) =====")
  print_table(rows)
  if args.output:
    print(f"written to {args.output}")
  return 1 if failed else 0


if __name__ == "__main__":
  raise SystemExit(main())
