"""Every module the package imports comes from a dependency pyproject.toml declares.

A module that some other dependency happens to install today (tensorflow-datasets needed
`importlib_resources` without declaring it) works on the machine it was written on and fails on
a fresh install; CI's fresh environment finds that only on the paths its tests take, this test
finds it from the source.
"""

from __future__ import annotations

import ast
import importlib.metadata
import re
import sys

from tests.conftest import REPO_ROOT

# Imported but not on PyPI: installed from source by the user who wants it (docs/t5x.md).
NOT_ON_PYPI = {"t5x"}


def _imported_top_level_modules() -> dict[str, str]:
  """Top-level module -> first file importing it, over prompt_jax/ and tasks.py."""
  found = {}
  for path in sorted([*(REPO_ROOT / "prompt_jax").rglob("*.py"), REPO_ROOT / "tasks.py"]):
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
      if isinstance(node, ast.Import):
        names = [alias.name for alias in node.names]
      elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
        names = [node.module]
      else:
        continue
      for name in names:
        found.setdefault(name.split(".")[0], str(path.relative_to(REPO_ROOT)))
  return found


def _normalise(name: str) -> str:
  return re.sub(r"[-_.]+", "-", name).lower()


def _declared_distributions() -> set[str]:
  """What the installed project declares (pyproject.toml's dependencies and extras, as pip read
  them)."""
  requirements = importlib.metadata.requires("prompt-jax") or []
  return {_normalise(re.match(r"[A-Za-z0-9_.\-]+", r).group(0)) for r in requirements}


def test_every_imported_module_is_declared():
  declared = _declared_distributions()
  providers = importlib.metadata.packages_distributions()
  undeclared = []
  for module, where in sorted(_imported_top_level_modules().items()):
    if module in sys.stdlib_module_names or module == "prompt_jax" or module in NOT_ON_PYPI:
      continue
    distributions = {_normalise(d) for d in providers.get(module, [])}
    if not distributions & declared:
      undeclared.append(f"{module} (imported by {where}; installed by "
                        f"{sorted(distributions) or 'nothing here'})")
  assert not undeclared, "imported but not declared in pyproject.toml: " + "; ".join(undeclared)


def test_the_scan_sees_the_imports_it_checks():
  """The scan is not empty and finds a known third-party import (so the test above can fail)."""
  modules = _imported_top_level_modules()
  assert {"jax", "seqio", "gin", "numpy"} <= set(modules), sorted(modules)
