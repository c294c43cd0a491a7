"""Shared test helpers: tiny models, and the ../shared fixtures (skipped when absent)."""

from __future__ import annotations

import atexit
import os
import re
import shutil
import tempfile
from pathlib import Path

import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

# One XLA compilation cache for the whole session (and the subprocesses tests start): many tests
# compile the same tiny model's steps, and a cache hit replaces a compile with a file read.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  _CACHE_DIR = tempfile.mkdtemp(prefix="prompt_jax_test_xla_cache_")
  atexit.register(shutil.rmtree, _CACHE_DIR, ignore_errors=True)
  os.environ["JAX_COMPILATION_CACHE_DIR"] = _CACHE_DIR
  os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
  os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

REPO_ROOT = Path(__file__).resolve().parent.parent
GIN_CONFIGS = REPO_ROOT / "gin_configs"
SHARED_FIXTURES = Path(os.environ.get("PROMPT_JAX_SHARED_FIXTURES",
                                      REPO_ROOT.parent / "shared" / "fixtures"))


def shared_fixture(name: str) -> Path:
  """Path of a file in ../shared/fixtures, or skip the test saying what is missing."""
  path = SHARED_FIXTURES / name
  if not path.exists():
    pytest.skip(f"shared fixture {path} is absent (the ../shared folder ships beside the "
                "repository on the project's machines; see ../shared/fixtures/README.md)")
  return path


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config, log):
  """Under pytest-xdist (`-n 2`): a doc's documented commands build on the ones before them (a
  run directory an earlier command made), so each doc's commands run in order on one worker;
  every other test is its own unit, spread over the workers as `--dist load` does. (xdist's own
  `xdist_group` does not group with pytest 9, whose node ids it can no longer rename.)"""
  if config.getvalue("dist") != "load":
    return None
  from xdist.scheduler import LoadScopeScheduling  # pylint: disable=g-import-not-at-top

  class DocumentedCommandsTogether(LoadScopeScheduling):
    def _split_scope(self, nodeid: str) -> str:
      doc = re.search(r"::test_documented_command\[([^:\]]+):", nodeid)
      return doc.group(1) if doc else nodeid

  return DocumentedCommandsTogether(config, log)


@pytest.fixture
def tiny_config():
  from prompt_jax.models import t5
  return t5.preset("tiny")
