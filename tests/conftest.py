"""Shared test helpers: tiny models, and the ../shared fixtures (skipped when absent)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

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


@pytest.fixture
def tiny_config():
  from prompt_jax.models import t5
  return t5.preset("tiny")
