"""The import graph of prompt_jax/: acyclic between modules and between folders, no library
module imports the CLI, only the CLI parses gin, imports of our own modules sit at the top of
their module (the CLI's fast paths excepted), and importing a library module changes nothing
process-wide.

Every `import` / `from ... import` of a prompt_jax module anywhere in a file counts as an edge
(also the ones inside functions: a lazy import is still a dependency). Each check has a
self-test on fake sources showing that it can fail."""

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


def _fake(files: dict[str, str]) -> dict[str, tuple[Path, str]]:
  """Sources for the self-tests: {path under prompt_jax/: source} -> what `_sources` returns."""
  return {_module_name(PACKAGE / rel): (PACKAGE / rel, source) for rel, source in files.items()}


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


# ------------------------------------------------------------------------ between folders

# The folders by concern (one node each in the folder graph) and the top-level modules (one node
# each); the graph is built from the files, these only check that it sees them.
FOLDERS = ("models", "prompts", "data", "storage", "serving", "training", "interop", "t5x_compat",
           "tools")
TOP_LEVEL_MODULES = ("cli", "gin_utils", "host_devices", "params", "partitioning", "programs",
                     "tasks")


def folder_graph(sources=None) -> dict[str, dict[str, list[str]]]:
  """node -> {node it imports: the imports that make that edge, 'module -> imported module'}.

  A node is a subpackage of prompt_jax (`prompt_jax.storage` for every module under storage/) or
  a top-level module (`prompt_jax.cli`); imports within one subpackage are no edge."""
  sources = _sources() if sources is None else sources
  folders = {name.split(".")[1] for name, (path, _) in sources.items()
             if name.count(".") >= 2 or (path.name == "__init__.py" and name != "prompt_jax")}

  def node(module: str) -> str:
    parts = module.split(".")
    return ".".join(parts[:2]) if len(parts) > 1 and parts[1] in folders else module

  graph: dict[str, dict[str, list[str]]] = {}
  for name, edges in sorted(import_graph(sources).items()):
    out = graph.setdefault(node(name), {})
    for target in sorted(edges):
      # `from prompt_jax.a import x` imports both prompt_jax.a and prompt_jax.a.x: name the latter.
      named = any(other.startswith(target + ".") for other in edges)
      if node(target) != node(name) and not named:
        out.setdefault(node(target), []).append(f"{name} -> {target}")
  return graph


def _components(graph) -> list[list[str]]:
  """The strongly connected components of `graph` (node -> nodes it reaches), Tarjan's."""
  index: dict[str, int] = {}
  low: dict[str, int] = {}
  stack: list[str] = []
  components = []

  def visit(node):
    index[node] = low[node] = len(index)
    stack.append(node)
    for nxt in sorted(graph.get(node, ())):
      if nxt not in index:
        visit(nxt)
        low[node] = min(low[node], low[nxt])
      elif nxt in stack:
        low[node] = min(low[node], index[nxt])
    if low[node] == index[node]:
      component = stack[stack.index(node):]
      del stack[stack.index(node):]
      components.append(sorted(component))

  for node in sorted(graph):
    if node not in index:
      visit(node)
  return components


def folder_cycles(graph) -> list[str]:
  """One cycle through each group of folders that import each other, each hop with the imports
  that make it: 'a -> b -> a' then '  a -> b: a.x -> b.y, ...' lines."""
  found = []
  for component in _components(graph):
    if len(component) < 2:
      continue
    inside = {n: set(graph[n]) & set(component) for n in component}
    cycle = find_cycle(inside)
    hops = [f"  {a} -> {b}: {', '.join(graph[a][b])}" for a, b in zip(cycle, cycle[1:])]
    found.append("\n".join([" -> ".join(cycle)] + hops))
  return found


def test_the_folders_import_each_other_without_a_cycle():
  graph = folder_graph()
  assert {f"prompt_jax.{n}" for n in FOLDERS + TOP_LEVEL_MODULES} <= set(graph), sorted(graph)
  cycles = folder_cycles(graph)
  assert not cycles, "import cycles between folders:\n" + "\n".join(cycles)


def test_the_folder_cycle_finder_names_the_imports():
  files = {"a/__init__.py": "", "a/x.py": "from prompt_jax.b import y\n", "a/w.py": "",
           "b/__init__.py": "", "b/y.py": "from prompt_jax.a import w\n",  # a.x > b.y > a.w
           "b/z.py": "from . import y\n",  # within b: no edge
           "top.py": "from prompt_jax.a import x\n"}
  graph = folder_graph(_fake(files))
  assert find_cycle(import_graph(_fake(files))) is None  # no cycle between modules
  assert graph["prompt_jax.top"] == {"prompt_jax.a": ["prompt_jax.top -> prompt_jax.a.x"]}
  (cycle,) = folder_cycles(graph)
  assert cycle.splitlines() == [
      "prompt_jax.a -> prompt_jax.b -> prompt_jax.a",
      "  prompt_jax.a -> prompt_jax.b: prompt_jax.a.x -> prompt_jax.b.y",
      "  prompt_jax.b -> prompt_jax.a: prompt_jax.b.y -> prompt_jax.a.w"]
  del files["b/y.py"]
  assert folder_cycles(folder_graph(_fake(files))) == []


# -------------------------------------------------------------- imports at the top of modules

# Only these import our modules inside functions: the command line (`--help` and the static gin
# checks import nothing heavy) and the gin helper only it imports.
LAZY_IMPORT_MODULES = {"prompt_jax.cli", "prompt_jax.gin_utils"}
# Other exceptions, module -> why. Empty, and to stay so: an optional dependency (t5x, torch, ...)
# is imported lazily, a module of ours at the top.
ALLOWED_LAZY_IMPORTS: dict[str, str] = {}


def _imports_ours(node: ast.AST) -> bool:
  if isinstance(node, ast.Import):
    return any(alias.name.split(".")[0] == "prompt_jax" for alias in node.names)
  if isinstance(node, ast.ImportFrom):
    return node.level > 0 or (node.module or "").split(".")[0] == "prompt_jax"
  return False


def function_level_imports(sources=None) -> dict[str, list[str]]:
  """module -> its imports of prompt_jax modules inside a function or method ('line N: import'),
  relative imports included. Only modules with such imports are listed."""
  sources = _sources() if sources is None else sources
  found = {}
  for name, (path, source) in sorted(sources.items()):
    hits = set()
    for function in ast.walk(ast.parse(source, str(path))):
      if isinstance(function, (ast.FunctionDef, ast.AsyncFunctionDef)):
        hits |= {(node.lineno, ast.unparse(node)) for node in ast.walk(function)
                 if _imports_ours(node)}
    if hits:
      found[name] = [f"line {line}: {text}" for line, text in sorted(hits)]
  return found


def test_our_modules_are_imported_at_the_top():
  found = function_level_imports()
  assert "prompt_jax.cli" in found  # it does import lazily: the check sees it
  exempt = LAZY_IMPORT_MODULES | set(ALLOWED_LAZY_IMPORTS)
  offenders = {m: hits for m, hits in found.items() if m not in exempt}
  assert offenders == {}, "imports of prompt_jax modules inside functions:\n" + "\n".join(
      f"  {m}: {'; '.join(hits)}" for m, hits in offenders.items())
  stale = sorted(set(ALLOWED_LAZY_IMPORTS) - set(found))
  assert stale == [], f"ALLOWED_LAZY_IMPORTS lists modules without lazy imports: {stale}"


def test_the_function_level_import_finder_finds_each_form():
  found = function_level_imports(_fake({
      "top.py": "import json\nfrom prompt_jax import params\nimport prompt_jax.tasks\n",
      "lazy.py": "def f():\n  from prompt_jax.storage import run_dir\n  return run_dir\n",
      "dotted.py": "def f():\n  import prompt_jax.storage.run_dir\n",
      "relative.py": "async def f():\n  from . import params\n",
      "nested.py": "class C:\n  def m(self):\n    def g():\n      from prompt_jax import tasks\n",
      "optional.py": "def f():\n  import torch\n  from t5x import models\n",
      "guarded.py": "try:\n  from prompt_jax import params\nexcept ImportError:\n  pass\n"}))
  assert found == {
      "prompt_jax.dotted": ["line 2: import prompt_jax.storage.run_dir"],
      "prompt_jax.lazy": ["line 2: from prompt_jax.storage import run_dir"],
      "prompt_jax.nested": ["line 4: from prompt_jax import tasks"],
      "prompt_jax.relative": ["line 2: from . import params"]}, found


# ------------------------------------------------------------- no process state at import time

# The package's __init__ and the command line may set process-wide state when imported; no other
# module may. The __init__'s one setting is TensorFlow's log level default (kept if the user set
# one): TensorFlow reads it only while it loads, so `import prompt_jax` in a notebook is quiet
# only if it is set before any module of ours imports TensorFlow.
PROCESS_STATE_MODULES = {"prompt_jax", "prompt_jax.cli"}
# Calls that change the process for everyone, by dotted name (import aliases resolved).
PROCESS_STATE_CALLS = frozenset({
    "os.environ.update", "os.environ.setdefault", "os.environ.pop", "os.environ.popitem",
    "os.environ.clear", "os.putenv", "os.unsetenv", "jax.config.update", "logging.basicConfig",
    "warnings.filterwarnings", "warnings.simplefilter", "warnings.resetwarnings",
    "sys.path.append", "sys.path.insert", "sys.path.extend", "sys.path.remove", "sys.path.pop",
    "sys.path.clear", "signal.signal"})
# Names whose items (or themselves) must not be assigned, augmented or deleted.
PROCESS_STATE_TARGETS = frozenset({"os.environ", "sys.path"})


def _aliases(tree: ast.Module) -> dict[str, str]:
  """Local name -> dotted name, from the file's imports (`from jax import config` ->
  {'config': 'jax.config'}, `import numpy as np` -> {'np': 'numpy'})."""
  aliases = {}
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      for alias in node.names:
        if alias.asname:
          aliases[alias.asname] = alias.name
    elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
      for alias in node.names:
        aliases[alias.asname or alias.name] = f"{node.module}.{alias.name}"
  return aliases


def _dotted(node: ast.AST, aliases: dict[str, str]):
  """`os.environ.update` for that attribute chain (its first name resolved), else None."""
  if isinstance(node, ast.Name):
    return aliases.get(node.id, node.id)
  if isinstance(node, ast.Attribute):
    base = _dotted(node.value, aliases)
    return None if base is None else f"{base}.{node.attr}"
  return None


def _is_main_block(node: ast.AST) -> bool:
  return isinstance(node, ast.If) and ast.unparse(node.test).replace("'", '"') in (
      '__name__ == "__main__"', '"__main__" == __name__')


def _import_time_nodes(tree: ast.Module):
  """Every node that runs when the module is imported: all but the bodies of functions and
  lambdas (their decorators and defaults do run) and `if __name__ == "__main__":` blocks."""
  todo = list(reversed(tree.body))
  while todo:
    node = todo.pop()
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
      todo += [*getattr(node, "decorator_list", ()), *node.args.defaults,
               *(d for d in node.args.kw_defaults if d is not None)]
    elif _is_main_block(node):
      todo += node.orelse
    else:
      yield node
      todo += reversed(list(ast.iter_child_nodes(node)))


def import_time_process_state(sources=None) -> dict[str, list[str]]:
  """module -> what it changes process-wide when imported ('line N: code'): a call in
  `PROCESS_STATE_CALLS`, or an assignment or `del` of `os.environ[...]` or `sys.path`. Only
  modules that do are listed."""
  sources = _sources() if sources is None else sources
  found = {}
  for name, (path, source) in sorted(sources.items()):
    tree = ast.parse(source, str(path))
    aliases = _aliases(tree)
    hits = set()
    for node in _import_time_nodes(tree):
      if isinstance(node, ast.Call) and _dotted(node.func, aliases) in PROCESS_STATE_CALLS:
        hits.add((node.lineno, ast.unparse(node)))
      targets = (node.targets if isinstance(node, (ast.Assign, ast.Delete)) else
                 [node.target] if isinstance(node, (ast.AugAssign, ast.AnnAssign)) else [])
      for target in targets:
        base = target.value if isinstance(target, ast.Subscript) else target
        if _dotted(base, aliases) in PROCESS_STATE_TARGETS:
          hits.add((node.lineno, ast.unparse(node)))
    if hits:
      found[name] = [f"line {line}: {text}" for line, text in sorted(hits)]
  return found


def test_importing_a_library_module_changes_nothing_process_wide():
  found = import_time_process_state()
  assert "prompt_jax" in found  # TF_CPP_MIN_LOG_LEVEL's default: the check sees it
  offenders = {m: hits for m, hits in found.items() if m not in PROCESS_STATE_MODULES}
  assert offenders == {}, offenders


def test_the_process_state_finder_finds_each_form():
  found = import_time_process_state(_fake({
      "env.py": "import os\nos.environ['A'] = '1'\nos.environ.setdefault('B', '2')\n",
      "aliased.py": ("from os import environ as env\nfrom jax import config\n"
                     "import warnings as w\nenv.update(C='3')\nconfig.update('x', True)\n"
                     "w.simplefilter('ignore')\n"),
      "nested.py": ("import logging, signal, sys\nclass C:\n  logging.basicConfig()\n"
                    "if True:\n  sys.path.insert(0, '.')\n  del sys.path[0]\n"
                    "def f(handler=signal.signal(2, None)):\n  pass\n"),
      "calls_later.py": ("import os, jax, logging\ndef f():\n  os.environ['A'] = '1'\n"
                         "  jax.config.update('x', True)\ng = lambda: os.putenv('A', '1')\n"
                         "if __name__ == '__main__':\n  logging.basicConfig()\n"
                         "x = os.environ.get('A')\n"),
  }))
  assert found == {
      "prompt_jax.aliased": ["line 4: env.update(C='3')", "line 5: config.update('x', True)",
                             "line 6: w.simplefilter('ignore')"],
      "prompt_jax.env": ["line 2: os.environ['A'] = '1'",
                         "line 3: os.environ.setdefault('B', '2')"],
      "prompt_jax.nested": ["line 3: logging.basicConfig()", "line 5: sys.path.insert(0, '.')",
                            "line 6: del sys.path[0]", "line 7: signal.signal(2, None)"]}, found
