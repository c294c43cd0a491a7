"""Compile time and memory of the train step, per-layer vs scanned layers, by the TPU compiler.

    pip install -e ".[tpu]"     # libtpu: the TPU compiler, runs on a CPU-only host
    python benchmarks/scan_compile.py --gin_file=runs/scale_xxl.gin --topology=v5e:2x4 --mesh=2x4

Runs `prompt-jax plan --programs=train` twice in one run, with `SCAN_LAYERS = False` and then
`True` (each in its own process, one after the other, so neither reuses the other's compile),
and prints per-device memory and compile seconds of both and their ratio. The JSON plans go to
OUT_DIR. Compile seconds are this machine's (2 CPU cores), not a TPU VM host's.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_common  # noqa: E402


def plan(gin_files, topology: str, mesh: str, scan: bool, out_dir: Path, extra) -> dict:
  out = out_dir / f"plan_scan_{scan}.json"
  command = [sys.executable, "-m", "prompt_jax.cli", "plan",
             *(f"--gin_file={g}" for g in gin_files), f"--gin.SCAN_LAYERS={scan}",
             *(f"--gin.{b}" for b in extra), f"--mesh={mesh}", f"--topology={topology}",
             "--programs=train", f"--json={out}"]
  print(" ".join(command[1:]), flush=True)
  start = time.perf_counter()
  proc = subprocess.run(command, check=False, capture_output=True, text=True)
  wall = time.perf_counter() - start
  if not out.exists():
    raise SystemExit(f"no plan from {' '.join(command)}:\n{proc.stderr[-3000:]}")
  result = json.loads(out.read_text())
  result["process_seconds"] = wall
  return result


def gib(n) -> str:
  return "-" if n is None else f"{n / 2 ** 30:.2f}"


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--gin_file", action="append", default=None)
  parser.add_argument("--gin", action="append", default=[], help="extra bindings, NAME=VALUE")
  parser.add_argument("--topology", default="v5e:2x4")
  parser.add_argument("--mesh", default="2x4")
  parser.add_argument("--out_dir", default=None)
  args = parser.parse_args()
  gin_files = args.gin_file or ["runs/scale_xxl.gin"]
  out_dir = Path(args.out_dir or tempfile.mkdtemp(prefix="scan_compile_"))
  out_dir.mkdir(parents=True, exist_ok=True)
  start = bench_common.start()
  rows = {scan: plan(gin_files, args.topology, args.mesh, scan, out_dir, args.gin)
          for scan in (False, True)}
  print(f"\n{' '.join(gin_files)}, {args.topology}, mesh {args.mesh}, train step:")
  print("| layers | arguments / temporaries / peak GiB per chip | fits | compile s | process s |")
  print("| --- | --- | --- | --- | --- |")
  for scan, p in rows.items():
    train = p["programs"]["train"]
    m = train.get("memory") or {}
    print(f"| {'scanned' if scan else 'per layer'} | {gib(m.get('arguments'))} / "
          f"{gib(m.get('temporaries'))} / {gib(m.get('peak'))} | "
          f"{'yes' if train.get('fits') else 'no'} | {train['compile_seconds']:.1f} | "
          f"{p['process_seconds']:.1f} |")
  unscanned = rows[False]["programs"]["train"]["compile_seconds"]
  scanned = rows[True]["programs"]["train"]["compile_seconds"]
  print(f"compile time, per layer / scanned: {unscanned / scanned:.1f}x (plans in {out_dir})")
  bench_common.finish(start)


if __name__ == "__main__":
  main()
