"""The import graph of prompt_jax/: acyclic, and no library module imports the CLI.

Every `import` / `from ... import` of a prompt_jax module anywhere in a file counts (also the
ones inside functions: a lazy import is still a dependency)."""

from __future__ import annotations

import ast
from pathlib import Path

from tests.conftest import REPO_ROOT

PACKAGE = REPO_ROOT / "prompt_jax"


def _module_name(path: Path) -> str:
  parts = path.relative_to(REPO_ROOT).with_suffix("").parts
  return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
  """module -> the prompt_jax modules it imports (packages resolved to their __init__)."""
  modules = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
  graph = {}
  for name, path in modules.items():
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    edges = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
      targets = []
      if isinstance(node, ast.Import):
        targets = [alias.name for alias in node.names]
      elif isinstance(node, ast.ImportFrom):
        base = node.module or ""
        if node.level:
          anchor = package.split(".")[:len(package.split(".")) - node.level + 1]
          base = ".".join(anchor + ([base] if base else []))
        targets = [f"{base}.{alias.name}" for alias in node.names] + [base]
      for target in targets:
        while target and target not in modules:
          target = target.rpartition(".")[0]
        if target and target != name and target.startswith("prompt_jax"):
          edges.add(target)
    graph[name] = edges - {"prompt_jax"}  # the package __init__ imports nothing of ours
  return graph


def find_cycle(graph: dict[str, set[str]]):
  """One import cycle as a list of modules, or None."""
  state: dict[str, int] = {}
  stack: list[str] = []

  def visit(node):
    state[node] = 1
    stack.append(node)
    for nxt in sorted(graph.get(node, ())):
      if state.get(nxt) == 1:
        return stack[stack.index(nxt):] + [nxt]
      if nxt not in state:
        found = visit(nxt)
        if found:
          return found
    stack.pop()
    state[node] = 2
    return None

  for node in sorted(graph):
    if node not in state:
      found = visit(node)
      if found:
        return found
  return None


def test_the_import_graph_has_no_cycle():
  graph = import_graph()
  assert "prompt_jax.trainer" in graph and "prompt_jax.evaluation" in graph
  assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


def test_no_library_module_imports_the_cli():
  importers = sorted(m for m, edges in import_graph().items() if "prompt_jax.cli" in edges)
  assert importers == [], importers


def test_the_cycle_finder_finds_a_cycle():
  assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
  assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None
