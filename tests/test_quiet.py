"""Quiet start-up: importing any prompt_jax module prints nothing (TensorFlow's C++ start-up lines
included), `prompt-jax`'s start-up keeps libtpu's errors of a host without TPUs off stderr, and
PROMPT_JAX_VERBOSITY=info (or --verbosity=info) brings both back. Each case runs in a fresh
interpreter whose environment has none of the log-level variables set."""

from __future__ import annotations

import glob
import importlib.metadata
import importlib.util
import json
import os
import subprocess
import sys

import pytest

from prompt_jax import cli
from tests.conftest import REPO_ROOT

# What a user's shell would not have set (the test session sets some, e.g. conftest's
# TF_CPP_MIN_LOG_LEVEL); without them each child starts as a fresh `python`.
LOG_ENV = ("TF_CPP_MIN_LOG_LEVEL", "TF_CPP_MAX_VLOG_LEVEL", "TF_CPP_VMODULE", "TPU_MIN_LOG_LEVEL",
           "TPU_STDERR_LOG_LEVEL", "JAX_PLATFORMS", "JAX_FORCE_TPU_INIT", "XLA_FLAGS",
           "PYTHONWARNINGS", "PROMPT_JAX_VERBOSITY")
TF_START_UP = ("absl::InitializeLog", "oneDNN")  # TensorFlow's first C++ lines
LIBTPU_ERRORS = ("Failed to find host bounds", "TPU_WORKER_HOSTNAMES", "InitGoogle")
HAS_LIBTPU = importlib.util.find_spec("libtpu") is not None

# Imports every module of the package, each with file descriptors 1 and 2 in a file, and writes
# {module: [its output, the module a ModuleNotFoundError names or an error]} and whether
# TensorFlow was imported to argv[1]. The first module importing TensorFlow gets its lines.
IMPORT_ALL = r"""
import importlib, json, os, pkgutil, sys, tempfile

def imported(name):
  sys.stdout.flush(); sys.stderr.flush()
  saved = os.dup(1), os.dup(2)
  with tempfile.TemporaryFile() as f:
    os.dup2(f.fileno(), 1); os.dup2(f.fileno(), 2)
    error = None
    try:
      importlib.import_module(name)
    except ModuleNotFoundError as e:
      error = e.name or repr(e)
    except Exception as e:  # reported as a failure
      error = repr(e)
    finally:
      sys.stdout.flush(); sys.stderr.flush()
      os.dup2(saved[0], 1); os.dup2(saved[1], 2)
    f.seek(0)
    return f.read().decode("utf-8", "replace"), error

results = {"prompt_jax": imported("prompt_jax")}
import prompt_jax
for info in pkgutil.walk_packages(prompt_jax.__path__, "prompt_jax.", onerror=lambda _: None):
  results[info.name] = imported(info.name)
with open(sys.argv[1], "w") as f:
  json.dump({"modules": results, "tensorflow": "tensorflow" in sys.modules}, f)
"""


def _python(code: str, *args: str, timeout: int = 300, **env: str):
  """`python -c code args` from the repository, in this environment minus `LOG_ENV` plus `env`."""
  clean = {k: v for k, v in os.environ.items() if k not in LOG_ENV}
  return subprocess.run([sys.executable, "-c", code, *args], cwd=REPO_ROOT,
                        env={**clean, **env}, capture_output=True, text=True, timeout=timeout)


def test_importing_any_module_prints_nothing(tmp_path):
  out = tmp_path / "imports.json"
  proc = _python(IMPORT_ALL, str(out))
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert proc.stdout == proc.stderr == "", (proc.stdout + proc.stderr)[-3000:]  # e.g. at exit
  report = json.loads(out.read_text())
  results = report["modules"]
  assert report["tensorflow"]  # so its start-up lines were there to hide
  assert {"prompt_jax", "prompt_jax.cli", "prompt_jax.training.trainer", "prompt_jax.data.pipeline",
          "prompt_jax.tasks"} <= set(results)
  # t5x_compat's modules that subclass T5X's need T5X itself, an optional install.
  failed = {name: error for name, (_, error) in results.items()
            if error and not (name.startswith("prompt_jax.t5x_compat.") and error == "t5x")}
  assert not failed, f"modules that do not import: {failed}"
  noisy = {name: output for name, (output, _) in results.items() if output}
  assert not noisy, "importing these printed (the first one to import TensorFlow gets its " \
                    f"lines): {json.dumps(noisy, indent=1)[:3000]}"


def test_verbosity_info_shows_tensorflows_start_up_on_import():
  proc = _python("import prompt_jax.data.pipeline", PROMPT_JAX_VERBOSITY="info")
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert any(line in proc.stderr for line in TF_START_UP), proc.stderr[-3000:]


# Every command's start-up (`cli.main` calls configure_output with --verbosity, None when not
# given), then what the first jax computation does: initialise the backends.
START_UP = ("import sys; from prompt_jax import cli; cli.configure_output(sys.argv[1] or None); "
            "import jax; jax.devices()")


@pytest.mark.skipif(not HAS_LIBTPU, reason="needs libtpu (pip install -e \".[tpu]\"), whose "
                    "initialisation errors on a host without TPUs this checks")
@pytest.mark.parametrize("verbosity, env, shown", [
    ("", {}, False),
    ("", {"PROMPT_JAX_VERBOSITY": "info"}, True),
    ("info", {}, True),
])
def test_start_up_hides_libtpus_errors_unless_asked(verbosity, env, shown):
  if glob.glob("/dev/accel*") or os.path.exists("/dev/vfio"):
    pytest.skip("this host has TPU devices: libtpu starts and has no errors to hide")
  proc = _python(START_UP, verbosity, **env)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert any(line in proc.stderr for line in LIBTPU_ERRORS) == shown, proc.stderr[-3000:]
  if not shown:
    assert proc.stdout == proc.stderr == "", proc.stderr[-3000:]


@pytest.mark.parametrize("devices, env, plugins, expected", [
    ([], {}, [], True),                         # libtpu on a CPU host: jax stays on the CPU
    ([], {}, ["xla_cuda12"], True),             # ... also beside the GPU compiler (gpu-plan)
    (["/dev/vfio"], {}, [], False),             # a TPU VM (v5e and later; /dev/accel0 before)
    (["/dev/accel0"], {}, [], False),
    (["/dev/nvidia0"], {}, ["xla_cuda12"], False),  # a GPU host
    ([], {}, ["xla_rocm7"], False),             # another plugin may have its device here
    ([], {"JAX_PLATFORMS": "tpu,cpu"}, [], False),  # the user's choice
    ([], {"JAX_PLATFORMS": ""}, [], False),
    ([], {"JAX_FORCE_TPU_INIT": "1"}, [], False),
])
def test_libtpu_is_skipped_only_where_nothing_can_start(monkeypatch, devices, env, plugins,
                                                        expected):
  for name in ("JAX_PLATFORMS", "JAX_FORCE_TPU_INIT", "TPU_LIBRARY_PATH"):
    monkeypatch.delenv(name, raising=False)
  for name, value in env.items():
    monkeypatch.setenv(name, value)
  monkeypatch.setattr(glob, "glob", lambda pattern: [d for d in devices
                                                     if d.startswith(pattern.rstrip("*"))])
  monkeypatch.setattr(os.path, "exists", lambda path: path in devices)
  monkeypatch.setattr(importlib.metadata, "entry_points", lambda **_: [
      importlib.metadata.EntryPoint(name, f"{name}_plugin", "jax_plugins") for name in plugins])
  real_find_spec = importlib.util.find_spec
  monkeypatch.setattr(importlib.util, "find_spec", lambda name: (
      object() if name == "libtpu" else None if name == "jax_plugins" else real_find_spec(name)))
  assert cli._tpu_backend_cannot_start() is expected


def test_a_bad_verbosity_variable_is_a_one_line_error(monkeypatch, capsys, tmp_path):
  monkeypatch.setenv("PROMPT_JAX_VERBOSITY", "loud")
  assert cli.main(["convert", "prompt", str(tmp_path / "p.npy"), str(tmp_path / "out")]) == 1
  err = capsys.readouterr().err.strip().splitlines()
  assert err == ["error: PROMPT_JAX_VERBOSITY must be one of debug, info, warning, error, got "
                 "'loud'"], err
