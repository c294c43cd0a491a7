"""benchmarks/gpu_check.py, the one-command accelerator check (issue 36), still runs: its tiny CPU
form, our side only, in a fresh interpreter with TensorFlow, seqio and tensorflow-datasets hidden
(as tests/test_benchmark_imports.py runs the benchmarks it calls), prints the machine first and
a table row with a positive number for every preset x dtype x benchmark, and writes the same rows
to --output.
"""

from __future__ import annotations

import csv

from tests.conftest import REPO_ROOT
from tests.test_benchmark_imports import _child

BENCHMARKS = ("train", "greedy", "4-beam")


def test_gpu_check_prints_a_row_per_preset_dtype_and_benchmark(tmp_path):
  argv = ["--presets", "tiny", "--dtypes", "float32", "--ours_only", "--quick",
          "--output", str(tmp_path / "gpu_check.csv")]
  proc = _child(["gpu_check", argv], paths=[str(REPO_ROOT / "benchmarks" / "gpu_check.py")],
                timeout=300)
  output = f"stdout:\n{proc.stdout[-4000:]}\nstderr:\n{proc.stderr[-4000:]}"
  assert proc.returncode == 0 and "BENCHMARK_CHILD_OK" in proc.stdout, output
  lines = proc.stdout.splitlines()
  assert lines[0].startswith("gpu_check: ") and lines[1].startswith("jax devices: "), output
  table = proc.stdout.rpartition("===== gpu_check: ours vs theirs")[2].splitlines()
  assert table[1].split()[:5] == ["preset", "dtype", "benchmark", "ours", "theirs"], output
  rows = {tuple(line.split()[:3]): float(line.split()[3])
          for line in table[3:] if line.startswith("tiny ")}
  assert sorted(rows) == sorted(("tiny", "float32", b) for b in BENCHMARKS), output
  assert all(value > 0 for value in rows.values()), rows
  with open(tmp_path / "gpu_check.csv", newline="") as f:
    written = {(r["preset"], r["dtype"], r["benchmark"]): float(r["ours"])
               for r in csv.DictReader(f)}
  assert written.keys() == rows.keys() and all(v > 0 for v in written.values()), written
