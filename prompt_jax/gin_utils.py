"""The command line's gin: files and bindings in, one-line errors naming the bad value out.

Only `prompt_jax.cli` imports this module (tests/test_import_graph.py checks): library modules
take built objects (a model, a SweepConfig, ...) and never parse gin themselves.

`configure_gin` reads the gin files and bindings twice. First `check` reads them with gin's own
parser without executing their imports (nothing heavy is imported, it takes milliseconds): a
missing file (with the search paths), a syntax error (file and line), a string value without its
inner quotes, a macro binding no config uses (with the closest macro), a `%gin.REQUIRED` macro
left unset, ill-typed well-known T5X macros (TRAIN_STEPS, BATCH_SIZE, LEARNING_RATE, ...) and a
config meant for another command (`check_command`) are ValueErrors. Then gin parses them for
real, one binding at a time so that its own errors (an unknown configurable or parameter) name
the binding. `run_configured` calls a gin command's function (`prompt-jax train|spt|pretrain|
eval|infer`) after flag parsing; `model_from_gin`, `sweep_config` and `frozen_parameter_count`
build what `export-prompt` and `sweep` hand to the library, the last two in short-lived child
processes (`python -m prompt_jax.gin_utils config|parameters SPEC_JSON`) so that this process's
gin registry is left alone.

Nothing here imports prompt_jax.cli or anything heavy at import time.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib.util
import json
import logging
import os
import re
import subprocess
import sys
import tokenize
import traceback
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping, Optional, Sequence

# Macros that code reads with gin.query_parameter (not through a %reference).
CODE_MACROS = ("MODEL_DIR",)


def _is_int(value) -> bool:
  return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
  return isinstance(value, (int, float)) and not isinstance(value, bool)


def _int_at_least(minimum: int) -> tuple[str, Callable[[Any], bool]]:
  return f"an integer >= {minimum}", lambda v: _is_int(v) and v >= minimum


_STRING_OR_NONE = ("a string or None", lambda v: v is None or isinstance(v, str))

# Well-known T5X macro names -> (what they must be, check).
MACRO_TYPES: dict[str, tuple[str, Callable[[Any], bool]]] = {
    "TRAIN_STEPS": _int_at_least(1),
    "BATCH_SIZE": _int_at_least(1),
    "EVAL_BATCH_SIZE": _int_at_least(1),
    "EVAL_PERIOD": ("an integer >= 0 or None", lambda v: v is None or (_is_int(v) and v >= 0)),
    "CHECKPOINT_PERIOD": _int_at_least(1),
    "PROMPT_LENGTH": _int_at_least(1),
    "NUM_PARTITIONS": _int_at_least(1),
    "SEED": ("an integer", _is_int),
    "LEARNING_RATE": ("a number > 0", lambda v: _is_number(v) and v > 0),
    "DROPOUT_RATE": ("a number in [0, 1)", lambda v: _is_number(v) and 0 <= v < 1),
    "MODEL_DIR": _STRING_OR_NONE,
    "INITIAL_CHECKPOINT_PATH": _STRING_OR_NONE,
    "MIXTURE_OR_TASK_NAME": _STRING_OR_NONE,
}


def shipped_gin_configs() -> Optional[Path]:
  """The gin_configs/ folder that came with this code: inside the package when installed from a
  wheel (setup.py maps it there), the repository's top-level one in a source checkout."""
  package = Path(__file__).resolve().parent
  for candidate in (package / "gin_configs", package.parent / "gin_configs"):
    if candidate.is_dir():
      return candidate
  return None


def default_gin_search_paths() -> list[str]:
  """The current directory, then the shipped gin_configs/ (so `runs/demo.gin` is found from any
  directory) and its parent (so a checkout's `gin_configs/runs/demo.gin` is too)."""
  paths = [os.getcwd()]
  configs = shipped_gin_configs()
  if configs is not None:
    paths += [str(configs), str(configs.parent)]
  return paths


def quiet_gin_search(record: logging.LogRecord) -> bool:
  """Log filter: gin logs every search path it tries for a file as an ERROR ('Path not found')
  and each lookup at INFO; keep those for --verbosity=debug only."""
  message = str(record.msg)
  if not message.startswith(("Path not found", "system_path_file_exists",
                              "gin-config opened resource")):
    return True
  return logging.getLogger().isEnabledFor(logging.DEBUG)


def install_gin_log_filter() -> None:
  """`quiet_gin_search` on the root logger (gin logs through it) and its handlers."""
  root = logging.getLogger()
  for target in [root, *root.handlers]:
    if quiet_gin_search not in target.filters:
      target.addFilter(quiet_gin_search)


# ------------------------------------------------------------------ reading without importing


@dataclasses.dataclass(frozen=True)
class _Ref:
  """`@selector` or `@selector()` in a value."""
  selector: str


@dataclasses.dataclass(frozen=True)
class _Macro:
  """`%NAME` in a value (`%gin.REQUIRED` and other dotted names are constants)."""
  name: str


_REQUIRED = _Macro("gin.REQUIRED")


def _delegate():
  from gin import config_parser  # pylint: disable=g-import-not-at-top

  class Delegate(config_parser.ParserDelegate):
    def configurable_reference(self, scoped_configurable_name, evaluate):
      return _Ref(scoped_configurable_name)

    def macro(self, macro_name):
      return _Macro(macro_name)

  return Delegate()


def _walk(value) -> Iterator[Any]:
  """Every `_Ref` and `_Macro` in a (nested) value."""
  if isinstance(value, (_Ref, _Macro)):
    yield value
  elif isinstance(value, dict):
    for key, item in value.items():
      yield from _walk(key)
      yield from _walk(item)
  elif isinstance(value, (list, tuple, set, frozenset)):
    for item in value:
      yield from _walk(item)


@dataclasses.dataclass
class _Definition:
  value: Any
  where: str  # "FILE line N" or "binding 'NAME = VALUE'"


@dataclasses.dataclass
class StaticConfig:
  """What the gin files and bindings say, read without importing anything.

  Attributes:
    macros: macro name -> its last definition.
    file_macros: macros some file defines.
    references: macros some value references (`%NAME`).
    configurables: selector (without scope) -> the values bound to its parameters.
    user_macros: (macro, binding) for each macro set by a (user) binding.
    history: macro name -> every definition in order (the last is `macros[name]`).
    imports: the files' import statements (`from prompt_jax.training import optimizers`), in order.
    complete: False when some file could not be read here (a remote path, which only gin's
      registered readers open): then unused and unset macros are not reported.
  """

  macros: dict[str, _Definition] = dataclasses.field(default_factory=dict)
  file_macros: set[str] = dataclasses.field(default_factory=set)
  references: set[str] = dataclasses.field(default_factory=set)
  configurables: dict[str, list[Any]] = dataclasses.field(default_factory=dict)
  user_macros: list[tuple[str, str]] = dataclasses.field(default_factory=list)
  history: dict[str, list[_Definition]] = dataclasses.field(default_factory=dict)
  imports: list[str] = dataclasses.field(default_factory=list)
  complete: bool = True

  def final(self, name: str) -> tuple[Any, Optional[_Definition]]:
    """The value of macro `name` after following `%OTHER` macros, and where it was set;
    (_REQUIRED, definition) for `%gin.REQUIRED`, (None, None) when it is not defined."""
    definition = self.macros.get(name)
    seen = {name}
    while definition is not None and isinstance(definition.value, _Macro):
      target = definition.value.name
      if target == _REQUIRED.name:
        return _REQUIRED, definition
      if target in seen or target not in self.macros:
        return definition.value, definition
      seen.add(target)
      definition = self.macros[target]
    return (definition.value if definition else None), definition


def _search_dirs(search_paths: Sequence[str]) -> list[str]:
  dirs = []
  for path in ["", *search_paths, *default_gin_search_paths()]:
    if path not in dirs:
      dirs.append(path)
  return dirs


def _resolve(path: str, dirs: Sequence[str], included_from: Optional[str]) -> Optional[str]:
  """The local file gin reads for `path` (None for a remote path, which only gin can read);
  ValueError naming the search paths when there is none."""
  if "://" in path:
    return None
  candidates = [path] if os.path.isabs(path) else [os.path.join(d, path) for d in dirs]
  head, _, rest = path.partition("/")
  if rest and head.isidentifier():
    # gin also reads <package>/<file>.gin from an installed package (find_spec of a top-level
    # name imports nothing).
    spec = importlib.util.find_spec(head)
    if spec is not None and spec.origin:
      candidates += [os.path.join(d, rest) for d in spec.submodule_search_locations or []]
  for candidate in candidates:
    if os.path.isfile(candidate):
      return candidate
  origin = f" (included from {included_from})" if included_from else ""
  searched = ", ".join(dict.fromkeys(os.path.abspath(d) for d in dirs))
  raise ValueError(f"gin file {path!r}{origin} not found; searched {searched}")


def _quote_hint(binding: str) -> str:
  """'; a string needs inner quotes: ...' when `binding` reads NAME = <an unquoted word> and NAME
  is not a well-known numeric macro, else ''."""
  name, sep, value = binding.partition("=")
  value, name = value.strip(), name.strip()
  numeric = name in MACRO_TYPES and MACRO_TYPES[name] is not _STRING_OR_NONE
  if (not sep or not value or numeric or value[0] in "'\"[({@%" or re.search(r"\s", value)
      or re.fullmatch(r"[-+.\deE]+", value)):
    return ""
  return f"; a string needs inner quotes: --gin.{name}=\"{_quoted(value)}\""


def _quoted(value: str) -> str:
  return repr(value) if "'" not in value else '"' + value.replace('"', '\\"') + '"'


def _statements(source, where: str, binding: Optional[str]) -> Iterator[Any]:
  """gin's statements of a file or binding; its syntax errors as one-line ValueErrors."""
  from gin import config_parser  # pylint: disable=g-import-not-at-top
  try:
    yield from config_parser.ConfigParser(source, _delegate())
  except SyntaxError as e:
    message = [line.strip() for line in str(e.msg).splitlines() if line.strip()][-1].rstrip(".")
    if binding is not None:
      raise ValueError(f"gin syntax error in {where}: {message}{_quote_hint(binding)}") from None
    text = (e.text or "").strip()
    raise ValueError(f"gin syntax error in {where} line {e.lineno}: {message}"
                     + (f": {text}" if text else "")) from None
  except tokenize.TokenError as e:
    message, (line, _) = e.args[0], e.args[1]
    place = where if binding is not None else f"{where} line {line}"
    raise ValueError(f"gin syntax error in {place}: {message} (an unclosed bracket or "
                     "quote?)") from None


def read_config(gin_files: Sequence[str], gin_bindings: Sequence[str] = (),
                search_paths: Sequence[str] = (),
                extra_bindings: Sequence[str] = ()) -> StaticConfig:
  """Read the files (following includes) and bindings like gin does, executing nothing.

  `gin_bindings` are the user's (checked for unused macros), `extra_bindings` the code's."""
  from gin import config_parser  # pylint: disable=g-import-not-at-top
  config = StaticConfig()
  dirs = _search_dirs(search_paths)

  def read(statements, where_of, stack: tuple[str, ...], binding: Optional[str] = None,
           user: bool = False):
    for statement in statements:
      if isinstance(statement, config_parser.IncludeStatement):
        include(statement.filename, where_of(statement.location), stack)
      elif isinstance(statement, config_parser.ImportStatement):
        if statement.format() not in config.imports:
          config.imports.append(statement.format())
      elif isinstance(statement, config_parser.BindingStatement):
        for item in _walk(statement.value):
          if isinstance(item, _Macro) and "." not in item.name:
            config.references.add(item.name)
        if statement.arg_name:
          config.configurables.setdefault(statement.selector, []).append(statement.value)
          continue
        name = f"{statement.scope}/{statement.selector}" if statement.scope else statement.selector
        config.macros[name] = _Definition(statement.value, where_of(statement.location))
        config.history.setdefault(name, []).append(config.macros[name])
        if binding is None:
          config.file_macros.add(name)
        elif user:
          config.user_macros.append((name, binding))

  def include(path: str, included_from: Optional[str], stack: tuple[str, ...]):
    resolved = _resolve(path, dirs, included_from)
    if resolved is None:
      config.complete = False
      return
    key = os.path.realpath(resolved)
    if key in stack:
      raise ValueError(f"gin include cycle: {' -> '.join([*stack, key])}")
    with open(resolved) as f:
      read(_statements(f, resolved, None), lambda loc: f"{resolved} line {loc.line_num}",
           (*stack, key))

  for path in gin_files:
    include(path, None, ())
  for binding, user in [(b, True) for b in gin_bindings] + [(b, False) for b in extra_bindings]:
    where = f"binding {binding!r}"
    read(_statements(binding, where, binding), lambda loc, where=where: where, (), binding, user)
  return config


def _flag_example(name: str) -> str:
  if name == "MODEL_DIR":
    return "--gin.MODEL_DIR=\"'/path/to/run'\""
  if MACRO_TYPES.get(name) is _STRING_OR_NONE or name.endswith(("_PATH", "_DIR", "_FILE")):
    return f"--gin.{name}=\"'...'\""
  return f"--gin.{name}=VALUE"


def _matching_configurables(config: StaticConfig, scoped_selector: str) -> list[str]:
  """The configured selectors that `scoped_selector` names ('train_spt',
  'spt_training.train_spt' and 'prompt_jax.training.spt_training.train_spt' name each other)."""
  selector = scoped_selector.rsplit("/", 1)[-1].split(".")
  keys = []
  for key in config.configurables:
    parts = key.split(".")
    shorter = min(len(parts), len(selector))
    if parts[-shorter:] == selector[-shorter:]:
      keys.append(key)
  return keys


def reachable_macros(config: StaticConfig, roots: Optional[Sequence[str]],
                     values: Sequence[Any] = ()) -> set[str]:
  """Macros the roots use, directly or through references: a root is a configurable's selector
  ('trainer.train') or a macro ('%MODEL'); `values` are more starting points (bound values).
  All referenced macros when `roots` is None."""
  if roots is None:
    return set(config.references)
  found: set[str] = set()
  visited: set[str] = set()
  stack: list[Any] = list(values)

  def add_configurable(scoped_selector: str):
    for key in _matching_configurables(config, scoped_selector):
      if key not in visited:
        visited.add(key)
        stack.extend(config.configurables[key])

  for root in roots:
    if root.startswith("%"):
      stack.append(_Macro(root[1:]))
    else:
      add_configurable(root)
  while stack:
    for item in _walk(stack.pop()):
      if isinstance(item, _Ref):
        add_configurable(item.selector)
      elif "." not in item.name and item.name not in found:
        found.add(item.name)
        if item.name in config.macros:
          stack.append(config.macros[item.name].value)
  return found


def check_config(config: StaticConfig, *, roots: Optional[Sequence[str]] = None,
                 optional: Iterable[str] = (), not_empty: Iterable[str] = ()) -> set[str]:
  """ValueError for the first of: a user macro binding no config uses, an ill-typed
  well-known macro, a `%gin.REQUIRED` (or unset well-known) macro that the roots use, a
  `not_empty` macro that is unset, None or ''. Returns the macros the roots use."""
  defined = config.file_macros | set(config.macros)
  if config.complete:
    for name, binding in config.user_macros:
      base = name.rsplit("/", 1)[-1]  # a scoped macro (scope/NAME) sets NAME in that scope
      if base in config.references or base in config.file_macros or base in CODE_MACROS:
        continue
      close = difflib.get_close_matches(name, sorted(config.references | defined - {name}), 1)
      hint = (f"; did you mean {close[0]}?" if close else
              "; check its spelling (a parameter is bound as configurable.parameter=VALUE)")
      raise ValueError(f"gin binding {binding!r} sets macro {name}, which no gin config "
                       f"uses{hint}")
  used = reachable_macros(config, roots)
  if config.complete and roots is not None:
    check_overridden(config, used)
  user_set = {name for name, _ in config.user_macros}
  optional = set(optional)
  for name, (expected, ok) in MACRO_TYPES.items():
    if name not in config.macros or (name not in used and name not in user_set):
      continue
    value, definition = config.final(name)
    if value is _REQUIRED or any(True for _ in _walk(value)) or ok(value):
      continue
    hint = ""
    if expected == _STRING_OR_NONE[0]:
      hint = f"; a string needs inner quotes: --gin.{name}=\"{_quoted(str(value))}\""
    raise ValueError(f"{name} must be {expected}, got {value!r} ({definition.where}){hint}")
  for name in sorted(used - optional):
    value, definition = config.final(name)
    if value is _REQUIRED:
      raise ValueError(f"{name} is required but not set ({definition.where} sets it to "
                       f"%gin.REQUIRED); pass {_flag_example(name)}")
    if definition is None and name in MACRO_TYPES and config.complete:
      raise ValueError(f"{name} is not set; pass {_flag_example(name)}")
  for name in set(not_empty) - optional:
    value, definition = config.final(name)
    if (value is _REQUIRED or value in (None, "")) and (definition or config.complete):
      raise ValueError(f"{name} is not set; pass {_flag_example(name)}")
  return used


def check_overridden(config: StaticConfig, used: set[str]) -> None:
  """ValueError when a macro the user set (a binding) never reaches the run because a later
  definition replaced the value that read it: e.g. PROMPT_FILE, read by the
  `PROMPT_INIT = @prompt_files.from_array()` of prompts/from_file.gin, when a later file's
  `PROMPT_INIT = @initializers.uniform()` wins. Names both definitions. An override by a
  binding (the command line's) is deliberate and not reported."""
  for name, binding in config.user_macros:
    if name in used or name.rsplit("/", 1)[-1] in CODE_MACROS:
      continue
    for macro, definitions in config.history.items():
      if macro not in used or definitions[-1].where.startswith("binding "):
        continue  # (a binding that overrides is the user's own choice, not a file's)
      for earlier in definitions[:-1]:
        if name in reachable_macros(config, [], [earlier.value]):
          raise ValueError(
              f"gin binding {binding!r} never reaches the run: {macro} as set at "
              f"{earlier.where} reads {name}, but {definitions[-1].where} sets {macro} again "
              "later and wins; order the gin files so that the one that reads it comes last")


def check(gin_files: Sequence[str], gin_bindings: Sequence[str] = (),
          search_paths: Sequence[str] = (), *, roots: Optional[Sequence[str]] = None,
          optional: Iterable[str] = (), not_empty: Iterable[str] = (),
          extra_bindings: Sequence[str] = ()) -> tuple[StaticConfig, set[str]]:
  """`read_config` + `check_config`: every gin error that needs no import, in milliseconds.
  -> (the config, the macros the roots use)."""
  if not gin_files:
    raise ValueError("no --gin_file given")
  config = read_config(gin_files, gin_bindings, search_paths, extra_bindings)
  return config, check_config(config, roots=roots, optional=optional, not_empty=not_empty)


# ------------------------------------------------------------------------- parsing for real


def _one_line(error: BaseException, binding: Optional[str]) -> str:
  """gin's (possibly multi-line, location-augmented) error as one line naming its source."""
  text = str(error).strip() or type(error).__name__
  if isinstance(error, OSError) and text.startswith("Unable to open file"):
    return text.splitlines()[0]
  first = text.splitlines()[0].rstrip(".")
  if binding is not None:
    return f"{first} (binding {binding!r})"
  match = re.search(r'In file "([^"]+)", line (\d+)', text)
  if match:
    return f"{first} (in {match.group(1)} line {match.group(2)})"
  if isinstance(error, SyntaxError) and error.filename:
    return f"{first} (in {error.filename} line {error.lineno})"
  return first


_GIN_ERRORS = (SyntaxError, tokenize.TokenError, ImportError, OSError, ValueError, KeyError,
               TypeError, AttributeError)


def _is_constant(name: str) -> bool:
  from gin import config as gin_config  # pylint: disable=g-import-not-at-top
  constants = getattr(gin_config, "_CONSTANTS", None)
  try:
    return bool(constants is not None and constants.matching_selectors(name))
  except Exception:  # pylint: disable=broad-except
    return False


def configure_gin(gin_files: Sequence[str], gin_bindings: Sequence[str] = (),
                  search_paths: Sequence[str] = (), *, roots: Optional[Sequence[str]] = None,
                  optional: Iterable[str] = (), not_empty: Iterable[str] = (),
                  extra_bindings: Sequence[str] = ()) -> StaticConfig:
  """Check (see `check`), then parse the gin files and bindings (unfinalized). `roots`: what
  will be called (selectors or %MACROs; used macros must be set); `optional`: macros the caller
  fills in itself; `extra_bindings`: the caller's own bindings, parsed last."""
  import gin  # pylint: disable=g-import-not-at-top
  optional = set(optional)
  config, used = check(gin_files, gin_bindings, search_paths, roots=roots, optional=optional,
                       not_empty=not_empty, extra_bindings=extra_bindings)
  install_gin_log_filter()
  known = getattr(gin.config, "_LOCATION_PREFIXES", [])
  for path in [*search_paths, *default_gin_search_paths()]:
    if path and path not in known:
      gin.add_config_file_search_path(path)
  for path in gin_files:
    try:
      gin.parse_config_file(path)
    except _GIN_ERRORS as e:
      raise ValueError(_one_line(e, None)) from e
  # A binding may name a function no file references yet (`--gin.trainer.train.optimizer=
  # @optimizers.adamw()`): gin's dynamic registration resolves it only where its module is
  # imported, so each binding is parsed under the files' imports.
  dynamic = "from __gin__ import dynamic_registration"
  preamble = [dynamic, *(i for i in config.imports if i != dynamic)
              ] if dynamic in config.imports else []
  for binding in [*gin_bindings, *extra_bindings]:
    try:
      gin.parse_config([*preamble, binding] if preamble and "@" in binding else binding)
    except _GIN_ERRORS as e:
      raise ValueError(_one_line(e, binding)) from e
  if roots is not None and config.complete:
    for name in sorted(used - optional - set(config.macros)):
      if not _is_constant(name):
        raise ValueError(f"{name} is not set; pass {_flag_example(name)}")
  return config


def check_command(config: StaticConfig, command: str, *,
                  elsewhere: Optional[Mapping[str, str]] = None,
                  required: Optional[tuple[str, str]] = None) -> None:
  """ValueError when the config belongs to another command: `elsewhere` maps a configurable's
  selector, or a '%MACRO' the config binds, to the command that runs it (`prompt-jax train`
  given runs/spt.gin: run `prompt-jax spt`); `required` = (selector, hint): the command's
  function, which the config must configure (for a function without useful defaults)."""
  for name, other in (elsewhere or {}).items():
    if name.startswith("%"):
      definition = config.macros.get(name[1:])
      if definition is None:
        continue
      user = any(macro == name[1:] for macro, _ in config.user_macros)
      raise ValueError(f"gin macro {name[1:]} ({definition.where}) no longer chooses what "
                       f"`prompt-jax {command}` runs: run `prompt-jax {other}` with the same "
                       f"flags{' without that binding' if user else ''}")
    if _matching_configurables(config, name):
      raise ValueError(f"the gin config configures {name}, which `prompt-jax {command}` does "
                       f"not run: run `prompt-jax {other}` with the same flags")
  if required is not None and config.complete:
    selector, hint = required
    if not _matching_configurables(config, selector):
      raise ValueError(f"the gin config does not configure {selector}, which `prompt-jax "
                       f"{command}` runs; {hint}")


def run_configured(function: Callable, gin_files: Sequence[str],
                   gin_bindings: Sequence[str] = (), search_paths: Sequence[str] = (), *,
                   roots: Optional[Sequence[str]] = None, not_empty: Iterable[str] = (),
                   pass_config_text: bool = False):
  """Configure gin (`configure_gin` with `roots` and `not_empty`) and call the gin-configured
  `function`; its result. A `not_empty` macro that gin leaves unset, None or '' is an error.
  `pass_config_text`: also pass the whole gin config as `config_text=` (a training function
  writes it to MODEL_DIR/config.gin, as T5X does)."""
  import gin  # pylint: disable=g-import-not-at-top
  not_empty = list(not_empty)
  configure_gin(gin_files, gin_bindings, search_paths, roots=roots, not_empty=not_empty)
  for name in not_empty:
    try:
      value = gin.query_parameter(f"%{name}")
    except ValueError:
      value = None
    if value in (None, "") or value is gin.REQUIRED:
      raise ValueError(f"{name} is not set; pass {_flag_example(name)}")
  if pass_config_text:
    return gin.get_configurable(function)(config_text=gin.config_str())
  return gin.get_configurable(function)()


# ------------------------------------------------------- objects the library is handed


def configured_model(model):
  """Identity; `model_from_gin` binds `model = %MODEL` to build a run's model."""
  return model


def model_from_gin(gin_files: Sequence[str], gin_bindings: Sequence[str] = (),
                   search_paths: Sequence[str] = ()) -> tuple[Any, Optional[str]]:
  """The model a run's gin files build (gin MODEL) and gin MODEL_DIR (None if unset)."""
  import gin  # pylint: disable=g-import-not-at-top
  configure_gin(gin_files, gin_bindings, search_paths, roots=["%MODEL"],
                optional=["MODEL_DIR"])
  gin.parse_config(["from __gin__ import dynamic_registration",
                    "from prompt_jax import gin_utils",
                    "gin_utils.configured_model.model = %MODEL"])
  try:
    model_dir = gin.query_parameter("%MODEL_DIR")
  except ValueError:
    model_dir = None
  return gin.get_configurable(configured_model)(), model_dir


def _sweep_config_fields(gin_files, bindings, search_paths) -> dict:
  """In a child: the gin-configured SweepConfig's fields as JSON data."""
  import gin  # pylint: disable=g-import-not-at-top

  from prompt_jax.tools import sweep  # pylint: disable=g-import-not-at-top
  configure_gin(gin_files, bindings, search_paths, roots=["sweep.SweepConfig"])
  fields = dataclasses.asdict(gin.get_configurable(sweep.SweepConfig)())
  try:
    json.dumps(fields)
  except TypeError as e:
    raise ValueError(f"SweepConfig values must be strings, numbers, lists and dicts: {e}") from e
  return fields


def _frozen_parameters(gin_files, bindings, search_paths) -> int:
  """In a child: parameters of the gin-configured T5 (without prompt), from shapes only."""
  import gin  # pylint: disable=g-import-not-at-top

  from prompt_jax import params as params_lib  # pylint: disable=g-import-not-at-top
  from prompt_jax.models import encoder_decoder, t5  # pylint: disable=g-import-not-at-top
  configure_gin(gin_files, bindings, search_paths, roots=["t5.T5Config"])
  config = gin.get_configurable(t5.T5Config)()
  model = encoder_decoder.EncoderDecoderModel(t5.Transformer(config))
  return params_lib.count(model.init_abstract(model.dummy_batch(1, 8, 4)))


_CHILD_COMMANDS = {"config": _sweep_config_fields, "parameters": _frozen_parameters}


def _ask_child(command: str, spec: Mapping[str, Any], **env: str) -> Any:
  """Run `python -m prompt_jax.gin_utils <command> <spec as JSON>` and return the JSON value it
  prints last; ValueError with its error line when it fails."""
  from prompt_jax.tools import sweep  # pylint: disable=g-import-not-at-top
  proc = subprocess.run([sys.executable, "-m", "prompt_jax.gin_utils", command,
                         json.dumps(spec)], capture_output=True, text=True,
                        env=sweep.child_env(**env), check=False)
  if proc.returncode:
    line = sweep.last_line(proc.stderr)
    raise ValueError((line[len("error: "):] if line.startswith("error: ") else line)
                     or f"`python -m prompt_jax.gin_utils {command}` exited with "
                        f"{proc.returncode}")
  return json.loads(sweep.last_line(proc.stdout))


def sweep_config(gin_files: Sequence[str], bindings: Sequence[str] = (),
                 search_paths: Sequence[str] = ()):
  """The `sweep.SweepConfig` of a sweep's gin files and bindings, parsed in a child process
  (this process's gin registry is left alone)."""
  from prompt_jax.tools import sweep  # pylint: disable=g-import-not-at-top
  return sweep.SweepConfig(**_ask_child("config", {
      "gin_files": list(gin_files), "bindings": list(bindings),
      "search_paths": list(search_paths)}))


def frozen_parameter_count(gin_files: Sequence[str], bindings: Sequence[str] = (),
                           search_paths: Sequence[str] = ()) -> int:
  """Frozen parameters of the T5 that the gin files and bindings build, from shapes, in a child
  process on the CPU (an accelerator stays free, the gin registry untouched)."""
  return _ask_child("parameters", {"gin_files": list(gin_files), "bindings": list(bindings),
                                   "search_paths": list(search_paths)}, JAX_PLATFORMS="cpu")


def child_main(argv: Sequence[str]) -> int:
  """`python -m prompt_jax.gin_utils config|parameters SPEC_JSON`: print the answer as JSON; on
  an error print 'error: ...' to stderr and return 1."""
  if len(argv) != 2 or argv[0] not in _CHILD_COMMANDS:
    print(f"error: usage: python -m prompt_jax.gin_utils {{{'|'.join(_CHILD_COMMANDS)}}} "
          f"SPEC_JSON, got {list(argv)}", file=sys.stderr)
    return 2
  try:
    result = _CHILD_COMMANDS[argv[0]](**json.loads(argv[1]))
  except Exception as e:  # pylint: disable=broad-except
    if os.environ.get("PROMPT_JAX_TRACEBACK"):
      traceback.print_exc()
    text = (str(e).strip() or type(e).__name__).splitlines()[0]
    print(f"error: {text}", file=sys.stderr)
    return 1
  print(json.dumps(result), flush=True)
  return 0


if __name__ == "__main__":
  # The functions of the importable prompt_jax.gin_utils, not of this __main__ copy.
  from prompt_jax import gin_utils as _gin_utils  # pylint: disable=g-import-self
  sys.exit(_gin_utils.child_main(sys.argv[1:]))
