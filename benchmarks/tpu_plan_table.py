"""The plan table of docs/scale.md, produced by the TPU compiler (`prompt-jax plan --topology`).

    pip install -e ".[tpu]"        # libtpu: the TPU compiler, runs on a CPU-only host
    python benchmarks/tpu_plan_table.py --sizes small,base --topologies v5e:2x4,v4:2x2x2,v5p:2x2x1 \
        --remat none,full --out_dir benchmarks/results/tpu_plans

Each cell is one `prompt-jax plan` process (T5 1.1 LM-adapted shapes with `runs/scale.gin`:
batch 32, inputs 512 / targets 8, prompt 100, bf16 frozen weights), run one after another; its
JSON goes to OUT_DIR/<size>_<topology>_<remat>.json and an existing JSON is reused, so an
interrupted table resumes. With remat 'none' all four programs are compiled (train, eval,
score, predict: the last three never differentiate, so remat does not change them); other remat
policies compile the train step only. Prints the Markdown table at the end.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

HEADS = {"small": 6, "base": 12, "large": 16, "xl": 32, "xxl": 64}


def mesh_for(size: str, chips: int) -> str:
  """DATAxMODEL: the model axis as wide as divides the heads, at most 4 (and the chips)."""
  model = next(m for m in (4, 2, 1) if HEADS[size] % m == 0 and chips % m == 0)
  return f"{chips // model}x{model}"


def chips_of(topology: str) -> int:
  n = 1
  for d in topology.split(":")[1].split("x"):
    n *= int(d)
  return n


def run_cell(size: str, topology: str, remat: str, out_dir: Path) -> dict:
  out = out_dir / f"{size}_{topology.replace(':', '_')}_{remat}.json"
  if out.exists():
    return json.loads(out.read_text())
  gin = ([f"--gin_file=models/t5_1_1_lm_adapted_{size}.gin", "--gin_file=runs/scale.gin"]
         if size != "xxl" else ["--gin_file=runs/scale_xxl.gin"])
  command = [sys.executable, "-m", "prompt_jax.cli", "plan", *gin,
             f"--gin.REMAT_POLICY='{remat}'", f"--mesh={mesh_for(size, chips_of(topology))}",
             f"--topology={topology}", f"--json={out}"]
  if remat != "none":
    command.append("--programs=train")
  print(" ".join(command[1:]), flush=True)
  proc = subprocess.run(command, check=False, capture_output=True, text=True)
  print(proc.stdout, flush=True)
  if not out.exists():
    raise SystemExit(f"no plan from {' '.join(command)}:\n{proc.stderr[-3000:]}")
  return json.loads(out.read_text())


def gib(n) -> str:
  return "-" if n is None else f"{n / 2 ** 30:.2f}"


def table(plans: list[dict]) -> str:
  rows = ["| size | slice | mesh | layers | remat | train: arguments / temporaries / peak GiB | "
          "fits | eval / score / predict peak GiB | train FLOPs (XLA) | at peak | "
          "compile s (train; others) |",
          "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
  for p in plans:
    programs = p["programs"]
    train = programs["train"]
    scanned = bool(p["config"].get("scan_layers"))
    m = train.get("memory", {})
    others = [programs[n].get("memory", {}).get("peak") for n in ("eval", "score", "predict")
              if n in programs]
    rest = [f"{programs[n]['compile_seconds']:.0f}" for n in ("eval", "score", "predict")
            if n in programs]
    rows.append(
        f"| {p['size']} | {p['topology']['name']} | {p['mesh']['data']}x{p['mesh']['model']} | "
        f"{'scanned' if scanned else 'per layer'} | "
        f"{p['config']['remat_policy']} | "
        + (f"{gib(m['arguments'])} / {gib(m['temporaries'])} / {gib(m['peak'])}" if m else
           train["out_of_memory"]) +
        f" | {'yes' if train['fits'] else '**no**'} of {p['usable_hbm_bytes'] / 2 ** 30:.2f} | "
        + (" / ".join(gib(x) for x in others) if others else "-") +
        # XLA counts a scanned stack's loop body once: show the analytic bound instead.
        (" | - | " f"{p['ideal_step_seconds'] * 1e3:.1f} ms (analytic) | " if scanned else
           f" | {train.get('flops_total', float('nan')):.3g} | "
           f"{train.get('seconds_at_peak', float('nan')) * 1e3:.1f} ms | ") +
        f"{train['compile_seconds']:.0f}" + (f"; {', '.join(rest)}" if rest else "") + " |")
  return "\n".join(rows)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--sizes", default="small,base")
  parser.add_argument("--topologies", default="v5e:2x4,v4:2x2x2,v5p:2x2x1")
  parser.add_argument("--remat", default="none,full")
  parser.add_argument("--out_dir", default="benchmarks/results/tpu_plans")
  args = parser.parse_args(argv)
  out_dir = Path(args.out_dir)
  out_dir.mkdir(parents=True, exist_ok=True)
  plans = []
  for size in args.sizes.split(","):
    for topology in args.topologies.split(","):
      for remat in args.remat.split(","):
        plan = run_cell(size, topology, remat, out_dir)
        plans.append(dict(plan, size=size))
  print(table(plans))
  return 0


if __name__ == "__main__":
  sys.exit(main())
