"""prompt_jax: soft prompt tuning of frozen T5 models in JAX/Flax.

Importing it or any of its modules prints nothing. TensorFlow (imported by seqio) writes C++
start-up lines to stderr as it loads: it reads TF_CPP_MIN_LOG_LEVEL only at that moment, and its
first INFO lines (oneDNN, CUDA's stub) ignore even that. This file runs before any module of ours
imports TensorFlow, so the package's only process-wide settings are here, and only these: unless
PROMPT_JAX_VERBOSITY is info or debug, TF_CPP_MIN_LOG_LEVEL defaults to 3 (a value the user set
is kept; jaxlib's C++ logs read it too) and, unless it is 0, TensorFlow's import drops those INFO
lines (`quiet_tensorflow_import`). No logger or warning filter is touched; `prompt-jax` sets the
same from --verbosity (`prompt_jax.cli.configure_output`).
"""

import contextlib
import importlib.abc
import importlib.util
import os
import re
import sys

__version__ = "0.1.0"

VERBOSITY_ENV = "PROMPT_JAX_VERBOSITY"

# TensorFlow's C++ start-up lines (absl logs everything before InitializeLog, ignoring
# TF_CPP_MIN_LOG_LEVEL): the InitializeLog warning and INFO lines such as oneDNN and CUDA's.
_TF_NOISE = re.compile(r"WARNING: All log messages before absl::InitializeLog\(\) is called"
                       r"|I\d{4} \d\d:\d\d:\d+\.\d+ +\d+ \S+:\d+\] ")


class _QuietTensorFlowImport(importlib.abc.MetaPathFinder):
  """Drops TensorFlow's C++ start-up INFO lines from stderr while `tensorflow` is imported
  (whoever imports it), then leaves sys.meta_path; its other output is kept."""

  def find_spec(self, fullname, path=None, target=None):
    if fullname != "tensorflow":
      return None
    quiet_tensorflow_import(False)
    spec = importlib.util.find_spec(fullname)
    if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
      return spec
    exec_module = spec.loader.exec_module

    def quiet_exec_module(module):
      with _filtered_stderr():
        exec_module(module)

    spec.loader.exec_module = quiet_exec_module
    return spec


def quiet_tensorflow_import(quiet: bool = True) -> None:
  """Whether TensorFlow's import, if still to come, drops its start-up INFO lines from stderr."""
  finders = [f for f in sys.meta_path if isinstance(f, _QuietTensorFlowImport)]
  if quiet and not finders and "tensorflow" not in sys.modules:
    sys.meta_path.insert(0, _QuietTensorFlowImport())
  elif not quiet:
    for finder in finders:
      sys.meta_path.remove(finder)


@contextlib.contextmanager
def _filtered_stderr():
  """File descriptor 2 into a temporary file; afterwards its lines, minus `_TF_NOISE`, go on."""
  import tempfile  # pylint: disable=g-import-not-at-top
  sys.stderr.flush()
  try:
    saved = os.dup(2)
  except OSError:  # no stderr to filter
    saved = None
  if saved is None:
    yield
    return
  with tempfile.TemporaryFile() as captured:
    os.dup2(captured.fileno(), 2)
    try:
      yield
    finally:
      sys.stderr.flush()
      os.dup2(saved, 2)
      os.close(saved)
      captured.seek(0)
      lines = captured.read().decode("utf-8", "replace").splitlines(keepends=True)
      kept = "".join(line for line in lines if not _TF_NOISE.match(line))
      if kept:
        os.write(2, kept.encode())


if os.environ.get(VERBOSITY_ENV, "").strip().lower() not in ("info", "debug"):
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
  if os.environ["TF_CPP_MIN_LOG_LEVEL"] != "0":
    quiet_tensorflow_import()
