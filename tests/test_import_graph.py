"""The import graph of prompt_jax/: acyclic, no library module imports the CLI, and only the CLI
parses gin.

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


def _sources() -> dict[str, tuple[Path, str]]:
  """module name -> (path, source) of every module of prompt_jax/."""
  return {_module_name(p): (p, p.read_text()) for p in PACKAGE.rglob("*.py")}


def import_graph(sources=None) -> dict[str, set[str]]:
  """module -> the prompt_jax modules it imports (packages resolved to their __init__).
  `sources`: module name -> (path, source), default prompt_jax/'s files."""
  sources = _sources() if sources is None else sources
  modules = dict.fromkeys(sources)
  graph = {}
  for name, (path, source) in sources.items():
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    edges = set()
    for node in ast.walk(ast.parse(source, str(path))):
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
  assert "prompt_jax.training.trainer" in graph and "prompt_jax.serving.evaluation" in graph
  assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


def test_no_library_module_imports_the_cli():
  importers = sorted(m for m, edges in import_graph().items() if "prompt_jax.cli" in edges)
  assert importers == [], importers


def test_the_cycle_finder_finds_a_cycle():
  assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
  assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


# gin's functions that read gin files or bindings into its registry.
GIN_PARSERS = ("parse_config", "parse_config_file", "parse_config_files_and_bindings")
# The command line and its gin helper (which only the command line imports).
GIN_PARSING_MODULES = {"prompt_jax.cli", "prompt_jax.gin_utils"}


def gin_parsing(sources=None) -> dict[str, list[str]]:
  """module -> why it parses gin: it imports gin_utils, or calls (or imports) one of
  `GIN_PARSERS`. Only modules with a reason are listed."""
  sources = _sources() if sources is None else sources
  graph = import_graph(sources)
  found: dict[str, list[str]] = {}
  for name, (path, source) in sources.items():
    reasons = ["imports prompt_jax.gin_utils"] if "prompt_jax.gin_utils" in graph[name] else []
    for node in ast.walk(ast.parse(source, str(path))):
      if isinstance(node, ast.Attribute) and node.attr in GIN_PARSERS:
        reasons.append(f"calls .{node.attr} (line {node.lineno})")
      elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "gin":
        reasons += [f"imports gin's {a.name} (line {node.lineno})" for a in node.names
                    if a.name in GIN_PARSERS]
    if reasons:
      found[name] = reasons
  return found


def test_only_the_cli_parses_gin():
  found = gin_parsing()
  assert "prompt_jax.gin_utils" in found  # it does parse gin: the check sees it
  offenders = {m: r for m, r in found.items() if m not in GIN_PARSING_MODULES}
  assert offenders == {}, offenders
  importers = sorted(m for m, edges in import_graph().items()
                     if "prompt_jax.gin_utils" in edges and m != "prompt_jax.cli")
  assert importers == [], importers


def test_the_gin_parsing_finder_finds_each_form():
  def fake(**modules):
    return {f"prompt_jax.{name}": (PACKAGE / f"{name}.py", source)
            for name, source in modules.items()}

  sources = fake(
      gin_utils="",
      lazy="def f():\n  from prompt_jax import gin_utils\n  return gin_utils\n",
      relative="from . import gin_utils\n",
      calls="import gin\ngin.parse_config_files_and_bindings(['a.gin'], [])\n",
      binds="import gin as g\ndef f():\n  g.parse_config('A = 1')\n",
      imported="from gin import parse_config_file\n",
      clean="import gin\n@gin.configurable\ndef f(x):\n  return x\n")
  found = gin_parsing(sources)
  assert sorted(found) == ["prompt_jax.binds", "prompt_jax.calls", "prompt_jax.imported",
                           "prompt_jax.lazy", "prompt_jax.relative"], found
  assert found["prompt_jax.calls"] == ["calls .parse_config_files_and_bindings (line 2)"]
  assert found["prompt_jax.lazy"] == ["imports prompt_jax.gin_utils"]
