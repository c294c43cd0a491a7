"""The speed benchmarks import and run with TensorFlow, seqio and tensorflow-datasets blocked.

An accelerator machine may have only jax/flax/optax/orbax/numpy (and torch for the other side);
`benchmarks/{train_throughput,length_bucketing,decode_throughput,host_devices}.py` and every
prompt_jax module they use must not need the seqio input pipeline. Each test starts a fresh
interpreter whose `sys.meta_path` does not find those packages (nor their submodules: importing
one raises ModuleNotFoundError), loads the benchmarks by path and runs one on a tiny
configuration (our side only), then checks its exit status and that none of the packages is in
`sys.modules`.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import types

from tests.conftest import REPO_ROOT

BLOCKED = ("tensorflow", "seqio", "tensorflow_datasets")
BENCHMARKS = ("train_throughput", "length_bucketing", "decode_throughput", "host_devices")

# Run in the child: hide the blocked packages, load every benchmark module by path, run one
# `main(argv)`, check. Every finder on `sys.meta_path` is wrapped so that it does not find them:
# `import tensorflow` raises ModuleNotFoundError (an ImportError) and
# `importlib.util.find_spec("tensorflow")` is None, as on a machine without TensorFlow (a finder
# that raised from find_spec would also break probes such as etils' "is TensorFlow installed?",
# which jax's compilation cache makes).
_CHILD = r"""
import importlib.util, json, sys

BLOCKED = tuple(json.loads(sys.argv[1]))
attempts = []

class HideBlocked:
  def __init__(self, finder):
    self.finder = finder

  def find_spec(self, name, path=None, target=None):
    if name.partition(".")[0] in BLOCKED:
      attempts.append(name)
      return None
    find_spec = getattr(self.finder, "find_spec", None)
    return None if find_spec is None else find_spec(name, path, target)

  def __getattr__(self, attr):
    return getattr(self.finder, attr)

assert not [m for m in sys.modules if m.partition(".")[0] in BLOCKED], "loaded at start-up"
sys.meta_path[:] = [HideBlocked(finder) for finder in sys.meta_path]
modules = {}
for path in json.loads(sys.argv[2]):
  name = path.rpartition("/")[2].removesuffix(".py")
  spec = importlib.util.spec_from_file_location(name, path)
  modules[name] = sys.modules[name] = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(modules[name])
run = json.loads(sys.argv[3])
if run:
  assert modules[run[0]].main(run[1]) == 0, run
leaked = sorted(m for m in sys.modules if m.partition(".")[0] in BLOCKED)
if attempts:
  print(f"looked up and not found: {sorted(set(attempts))}", file=sys.stderr)
assert not leaked, f"blocked modules were imported: {leaked}"
print("BENCHMARK_CHILD_OK")
"""


def _child(run=None, paths=None, timeout=600) -> subprocess.CompletedProcess:
  paths = paths or [str(REPO_ROOT / "benchmarks" / f"{name}.py") for name in BENCHMARKS]
  return subprocess.run(
      [sys.executable, "-c", _CHILD, json.dumps(BLOCKED), json.dumps(paths),
       json.dumps(run or [])], cwd=REPO_ROOT, capture_output=True, text=True, timeout=timeout)


def _run_child(run=None, timeout=600) -> str:
  proc = _child(run, timeout=timeout)
  output = f"stdout:\n{proc.stdout[-4000:]}\nstderr:\n{proc.stderr[-4000:]}"
  assert proc.returncode == 0, output
  assert "BENCHMARK_CHILD_OK" in proc.stdout, output
  return proc.stdout


def test_benchmarks_import_without_tensorflow_or_seqio():
  _run_child()


def test_the_check_fails_when_a_module_needs_seqio(tmp_path):
  # What the benchmarks did before: the trainer imports the seqio pipeline.
  (tmp_path / "uses_trainer.py").write_text("from prompt_jax.training import trainer\n")
  proc = _child(paths=[str(tmp_path / "uses_trainer.py")])
  assert proc.returncode != 0 and "No module named 'seqio'" in proc.stderr, proc.stderr[-2000:]


def test_train_throughput_runs_without_tensorflow_or_seqio():
  out = _run_child(["train_throughput", [
      "--preset", "tiny", "--rounds", "1", "--steps", "1", "--warmup", "1", "--no_peft",
      "--batch", "2", "--inputs", "16", "--prompt", "4"]])
  assert "median" in out and "load average at end" in out, out


def test_length_bucketing_runs_without_tensorflow_or_seqio():
  # One bucket of train_throughput's shape: its compiled step comes from the session's
  # compilation cache (conftest) when that test ran first.
  out = _run_child(["length_bucketing", [
      "--preset", "tiny", "--rounds", "1", "--no_peft", "--batch", "2", "--inputs", "16",
      "--prompt", "4", "--examples", "8", "--buckets", "16"]])
  assert "median" in out and "load average at end" in out, out


def test_decode_throughput_runs_without_tensorflow_or_seqio():
  _run_child(["decode_throughput", [
      "--preset", "tiny", "--no_hf", "--rounds", "1", "--batch", "2", "--inputs", "16",
      "--new_tokens", "4"]])


def test_host_devices_runs_one_and_two_devices():
  """Each worker process gets the device count it was asked for (the benchmark refuses a
  mismatch) and the table lists both, one device at ratio 1."""
  out = _run_child(["host_devices", [
      "--preset", "tiny", "--devices", "1,2", "--rounds", "1", "--repeats", "1",
      "--inputs", "16", "--prompt_length", "4", "--decode_length", "2"]])
  rows = {line.split()[0]: line for line in out.splitlines()
          if line.strip()[:1].isdigit() and "x)" in line}
  assert set(rows) == {"1", "2"}, out
  assert rows["1"].count("(1.00x)") == 4, rows["1"]


def _bench_common():
  spec = importlib.util.spec_from_file_location("bench_common",
                                                REPO_ROOT / "benchmarks" / "bench_common.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_finish_labels_cpu_used_by_other_processes(monkeypatch, capsys):
  bench = _bench_common()
  busy, own, clock = [100.0], [5.0], [0.0]
  monkeypatch.setattr(bench, "_machine_busy_seconds", lambda: busy[0])
  monkeypatch.setattr(bench, "_own_cpu_seconds", lambda: own[0])
  monkeypatch.setattr(bench, "describe_machine", lambda: "test machine")
  monkeypatch.setattr(bench, "time", types.SimpleNamespace(monotonic=lambda: clock[0]))
  # 10 s: this process used 18 CPU seconds, the machine 18.5: others 0.05 cores -> quiet, even
  # with a high load average left over from an earlier job.
  monkeypatch.setattr(bench, "load_average", lambda: 3.0)
  start_load = bench.start()
  busy[0], own[0], clock[0] = 118.5, 23.0, 10.0
  assert bench.finish(start_load)
  assert "quiet machine" in capsys.readouterr().out
  # Others kept 1 core busy for the 10 s: under load, even with a low load average.
  monkeypatch.setattr(bench, "load_average", lambda: 0.1)
  start_load = bench.start()
  busy[0], own[0], clock[0] = 146.0, 41.0, 20.0
  assert not bench.finish(start_load)
  assert "UNDER LOAD" in capsys.readouterr().out


def test_finish_falls_back_to_load_averages(monkeypatch, capsys):
  bench = _bench_common()
  monkeypatch.setattr(bench, "_machine_busy_seconds", lambda: None)
  monkeypatch.setattr(bench, "describe_machine", lambda: "test machine")
  monkeypatch.setattr(bench, "load_average", lambda: 0.2)
  assert bench.finish(bench.start())
  monkeypatch.setattr(bench, "load_average", lambda: 4.0)
  assert not bench.finish(bench.start())
  assert "not measurable" in capsys.readouterr().out
