"""`prompt-jax sweep --gin_file=sweeps/<name>.gin`: a scale-ablation grid in one command.

A sweep gin file configures `SweepConfig`: named model sizes, methods and initialisers (each a
list of gin files and/or bindings), prompt lengths, learning rates and seeds. Their product is
the grid; each cell is one `prompt-jax train` run with

  gin files:    size files + method files + initialiser files + base_gin_files
  gin bindings: bindings + size, method and initialiser bindings + PROMPT_LENGTH,
                LEARNING_RATE, SEED, MODEL_DIR = <sweep_dir>/<cell name>

Modes (`--mode`):
  local     run the cells one after another, each in its own `python -m prompt_jax.cli train`
            process (no gin or JAX state is shared between cells); a finished cell is skipped,
            so an interrupted sweep resumes where it stopped (and a half-trained cell resumes
            from its own checkpoint). SIGTERM or SIGINT to the sweep (`kill`, `docker stop`, a
            scheduler, Ctrl-C) is passed on to the running cell, which saves a checkpoint; the
            sweep then starts no further cell and exits with code 75 (`preemption.EXIT_CODE`);
            a second signal stops at once;
  commands  write one job command per cell to <sweep_dir>/commands.sh (e.g. Cloud TPU VMs,
            via `command_template`) and run nothing;
  collect   only gather results.
Every mode ends by writing <sweep_dir>/results.csv (one row per cell: its configured values,
parameter count and final metrics from its summary.json and sweep_cell.json, or status
'pending'/'failed'/'changed') and the plots of `prompt_jax.tools.sweep_plots`.

A cell's identity includes its settings: <sweep_dir>/<cell>/sweep_cell.json records its gin
files and bindings when it starts (`cell_state`). A cell is finished when its summary.json
exists, its record says it finished and the recorded gin files and bindings are the current
ones. A cell trained with other bindings is never reused: when only TRAIN_STEPS changed
(`CONTINUABLE`) it runs again and its training run continues from its checkpoint (or refuses
fewer steps than it holds, in one line); any other change (a binding, the gin files) is refused
in one line naming the cell and the differing binding (results.csv status 'changed', exit code
1): remove the cell's directory, or use another sweep_dir. (Only the gin files' names are
compared, not their contents: a training run's own record, MODEL_DIR/run.json, refuses a
resume whose model, prompt, data, optimizer or seed differ, and the cell fails with that line.)

Nothing here parses gin: the command line builds the `SweepConfig` (from the sweep's gin file)
and hands in `count_parameters`, which counts a size's frozen parameters from its gin config; both
run in short-lived child processes, so no process reuses gin's registry across cells.
"""

from __future__ import annotations

import codecs
import csv
import dataclasses
import io
import itertools
import json
import logging
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from typing import Any, Callable, Mapping, Optional, Sequence

from prompt_jax.storage import run_dir
from prompt_jax.tools import sweep_plots
from prompt_jax.training import preemption

log = logging.getLogger(__name__)

AXES = ("size", "method", "initializer", "prompt_length", "learning_rate", "seed")
DEFAULT_COMMAND_TEMPLATE = (
    "gcloud compute tpus tpu-vm ssh $TPU_NAME --zone=$ZONE --worker=all "
    "--command={command}")


@dataclasses.dataclass(frozen=True)
class SweepConfig:
  """A grid of prompt-tuning runs.

  Attributes:
    name: the sweep's name (titles of the plots).
    sweep_dir: where each cell's MODEL_DIR, results.csv and the plots go.
    base_gin_files: gin files every cell includes after the size and method files
      (e.g. ['runs/prompt_finetune.gin']).
    sizes: {name: {'gin_files': [...], 'bindings': [...], 'parameters': int}}; 'parameters'
      (frozen model size for the plots) is optional: a local sweep counts it from the gin
      config of the size's first cell it trains (`count_parameters`).
    methods: {name: {'gin_files': [...], 'bindings': [...]}}, e.g. prompt_tuning ->
      ['prompts/uniform.gin'].
    initializers: {name: {'gin_files': [...], 'bindings': [...]}}, included after the method
      files, e.g. 'sampled_vocab' -> {'gin_files': ['sweeps/initializers/sampled_vocab.gin']}.
      (Bindings can only name configurables that some included gin file imports, so new
      references such as @initializers.class_labels() belong in a gin file.)
    prompt_lengths, learning_rates, seeds: the remaining axes.
    bindings: gin bindings for every cell (task, steps, batch size, ...).
    metric: the eval metric reported (a key of the trained prompt's validation metrics).
    reference: values of the axes a plot does not show, e.g. {'prompt_length': 20}.
    exclude: partial cells to leave out, e.g. [{'prompt_length': 1, 'initializer':
      'class_label'}] (a class-label prompt needs at least one row per label).
    substitutions: {key: text}: '{key}' in any cell gin file name or binding becomes text
      (e.g. {'root': %CHECKPOINT_ROOT} for checkpoint paths).
    command_template: `--mode=commands` line; {command} is replaced by the quoted
      `prompt-jax train ...` command, {cell} by the cell name.
  """

  name: str
  sweep_dir: str
  base_gin_files: Sequence[str]
  sizes: Mapping[str, Mapping[str, Any]]
  methods: Mapping[str, Mapping[str, Any]]
  initializers: Mapping[str, Mapping[str, Any]]
  prompt_lengths: Sequence[int] = (100,)
  learning_rates: Sequence[float] = (0.3,)
  seeds: Sequence[int] = (0,)
  bindings: Sequence[str] = ()
  metric: str = "accuracy"
  reference: Mapping[str, Any] = dataclasses.field(default_factory=dict)
  command_template: str = DEFAULT_COMMAND_TEMPLATE
  substitutions: Mapping[str, str] = dataclasses.field(default_factory=dict)
  exclude: Sequence[Mapping[str, Any]] = ()

  def __post_init__(self):
    for field in ("sizes", "methods", "initializers", "prompt_lengths", "learning_rates",
                  "seeds"):
      if not getattr(self, field):
        raise ValueError(f"SweepConfig.{field} must not be empty, got {getattr(self, field)!r}")
    for field in ("sizes", "methods", "initializers"):
      for key, spec in getattr(self, field).items():
        unknown = set(spec) - {"gin_files", "bindings", "parameters"}
        if unknown:
          raise ValueError(f"SweepConfig.{field}[{key!r}] has unknown keys {sorted(unknown)}; "
                           "expected gin_files, bindings, parameters")
    for rule in self.exclude:
      if set(rule) - set(AXES):
        raise ValueError(f"SweepConfig.exclude rule {dict(rule)} names unknown axes; expected "
                         f"some of {AXES}")
    unknown = set(self.reference) - set(AXES)
    if unknown:
      raise ValueError(f"SweepConfig.reference has unknown axes {sorted(unknown)}; expected "
                       f"some of {AXES}")

  def axis_values(self) -> dict[str, list]:
    return {"size": list(self.sizes), "method": list(self.methods),
            "initializer": list(self.initializers),
            "prompt_length": [int(x) for x in self.prompt_lengths],
            "learning_rate": [float(x) for x in self.learning_rates],
            "seed": [int(x) for x in self.seeds]}

  def reference_values(self) -> dict[str, Any]:
    values = {axis: vals[0] for axis, vals in self.axis_values().items()}
    values.update(self.reference)
    return values


@dataclasses.dataclass(frozen=True)
class Cell:
  """One grid point: its values, gin files and bindings."""

  values: Mapping[str, Any]
  gin_files: tuple[str, ...]
  bindings: tuple[str, ...]
  model_dir: str

  @property
  def name(self) -> str:
    v = self.values
    return (f"{v['size']}-{v['method']}-{v['initializer']}-len{v['prompt_length']}"
            f"-lr{v['learning_rate']:g}-seed{v['seed']}")

  @property
  def summary_path(self) -> str:
    return os.path.join(self.model_dir, run_dir.SUMMARY_FILE)

  @property
  def record_path(self) -> str:
    return os.path.join(self.model_dir, CELL_FILE)

  def finished(self) -> bool:
    """Trained to the end with the bindings and gin files it has now (`cell_state`)."""
    return cell_state(self)[0] == "finished"

  def train_argv(self) -> list[str]:
    return ([f"--gin_file={f}" for f in self.gin_files]
            + [f"--gin_bindings={b}" for b in self.bindings])

  def train_command(self, search_paths: Sequence[str] = ()) -> list[str]:
    """The cell's `prompt-jax train` as this Python's `python -m prompt_jax.cli train ...`."""
    flags = [f"--gin_search_paths={','.join(search_paths)}"] if search_paths else []
    return [sys.executable, "-m", "prompt_jax.cli", "train", *self.train_argv(), *flags]


# ------------------------------------------------------------------- a cell's identity

CELL_FILE = "sweep_cell.json"  # the cell's record: values, gin files, bindings, status
# Bindings whose change does not make a cell another run: a cell trained with another value is
# re-run, and its training run continues from its checkpoint (more steps) or refuses in one line
# (fewer steps than its checkpoint holds). Any other change is refused (`cell_state`).
CONTINUABLE = ("TRAIN_STEPS",)
# Bindings that name where a cell lives, not what it trains (a moved sweep_dir changes them).
_LOCATION = ("MODEL_DIR",)


def _binding_values(bindings: Sequence[str]) -> dict[str, str]:
  """{name: value} of gin bindings 'name = value' (the last binding of a name wins, as in gin);
  whitespace-insensitive."""
  values = {}
  for binding in bindings:
    name, equals, value = binding.partition("=")
    values[name.strip()] = " ".join(value.split()) if equals else ""
  return {k: v for k, v in values.items() if k not in _LOCATION}


def binding_changes(recorded: Mapping[str, Any], cell: Cell) -> list[tuple[str, Any, Any]]:
  """(name, recorded, current) for each gin binding and for the gin files where the cell's record
  (sweep_cell.json) and the cell's current configuration differ."""
  changes = []
  if list(recorded.get("gin_files", [])) != list(cell.gin_files):
    changes.append(("gin files", list(recorded.get("gin_files", [])), list(cell.gin_files)))
  old, new = _binding_values(recorded.get("bindings", [])), _binding_values(cell.bindings)
  for name in sorted(set(old) | set(new)):
    if old.get(name) != new.get(name):
      changes.append((name, old.get(name), new.get(name)))
  return changes


def _has_training_state(cell: Cell) -> bool:
  """Whether the cell's MODEL_DIR holds a run: summary, run record or checkpoints."""
  return any(_gfile().exists(os.path.join(cell.model_dir, name))
             for name in (run_dir.SUMMARY_FILE, run_dir.RECORD_FILE, run_dir.CHECKPOINTS_DIR))


def cell_state(cell: Cell) -> tuple[str, list[tuple[str, Any, Any]]]:
  """('finished' | 'continue' | 'changed' | 'pending', changes) of `cell` from its directory.

  finished: summary.json exists, its record says it finished (a record from before records had
    a status counts) and it was trained with the cell's current bindings and gin files;
  continue: its directory holds a run trained with other values of `CONTINUABLE` bindings only
    (e.g. TRAIN_STEPS): run it again, its training run resumes from its checkpoint;
  changed: its directory holds a run trained with other bindings or gin files: never reused nor
    resumed (`changed_message`);
  pending: anything else (not started, stopped, failed): run it.
  """
  record = _read_json(cell.record_path)
  changes = binding_changes(record, cell) if record is not None else []
  if changes and _has_training_state(cell):
    if all(name in CONTINUABLE for name, _, _ in changes):
      return "continue", changes
    return "changed", changes
  if (not changes and _gfile().exists(cell.summary_path)
      and (record or {}).get("status", "finished") == "finished"):
    return "finished", []
  return "pending", changes


def describe_changes(changes: Sequence[tuple[str, Any, Any]]) -> str:
  return ", ".join(f"{name}: {old!r} -> {new!r}" if name == "gin files"
                   else f"'{name} = {old}' -> '{name} = {new}'"
                   for name, old, new in changes)


def changed_message(cell: Cell, changes: Sequence[tuple[str, Any, Any]]) -> str:
  """The one line refusing a cell trained with other settings."""
  shown = [c for c in changes if c[0] not in CONTINUABLE] or list(changes)
  return (f"cell {cell.name} was trained with other settings ({describe_changes(shown)}); it "
          f"is neither reused nor resumed: remove {cell.model_dir} to train it with the new ones, "
          "or use another --sweep_dir")


def _substitute(texts: Sequence[str], cfg: SweepConfig) -> tuple[str, ...]:
  out = []
  for text in texts:
    for key, value in cfg.substitutions.items():
      text = text.replace("{" + key + "}", str(value))
    out.append(text)
  return tuple(out)


def _absolute(path: str) -> str:
  return path if "://" in path else os.path.abspath(path)


def expand(cfg: SweepConfig) -> list[Cell]:
  """Every cell of the grid, in axis order (size slowest, seed fastest)."""
  axes = cfg.axis_values()
  cells = []
  for combo in itertools.product(*(axes[a] for a in AXES)):
    values = dict(zip(AXES, combo))
    if any(all(values.get(k) == v for k, v in rule.items()) for rule in cfg.exclude):
      continue
    specs = (cfg.sizes[values["size"]], cfg.methods[values["method"]],
             cfg.initializers[values["initializer"]])
    gin_files = sum((tuple(s.get("gin_files", ())) for s in specs), ()) + tuple(
        cfg.base_gin_files)
    bindings = (tuple(cfg.bindings) + sum((tuple(s.get("bindings", ())) for s in specs), ())
                + (f"PROMPT_LENGTH = {values['prompt_length']}",
                   f"LEARNING_RATE = {values['learning_rate']!r}",
                   f"SEED = {values['seed']}"))
    gin_files, bindings = _substitute(gin_files, cfg), _substitute(bindings, cfg)
    cell = Cell(values, gin_files, bindings, "")
    model_dir = os.path.join(_absolute(cfg.sweep_dir), cell.name)
    cells.append(dataclasses.replace(
        cell, model_dir=model_dir, bindings=bindings + (f"MODEL_DIR = {model_dir!r}",)))
  names = [c.name for c in cells]
  if len(set(names)) != len(names):
    raise ValueError(f"sweep cell names collide: {sorted(n for n in names if names.count(n) > 1)}")
  return cells


# ------------------------------------------------------------------------ child processes

# The directory holding the prompt_jax package: children import the same code as this process.
_PACKAGE_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def child_env(**overrides: str) -> dict[str, str]:
  """This process's environment plus `overrides`; a source checkout's prompt_jax goes first on
  PYTHONPATH (an installed one is found anyway)."""
  env = dict(os.environ, **overrides)
  paths = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
  if _PACKAGE_ROOT not in paths and os.path.basename(_PACKAGE_ROOT) not in (
      "site-packages", "dist-packages"):
    env["PYTHONPATH"] = os.pathsep.join([_PACKAGE_ROOT, *paths])
  return env


def last_line(text: str) -> str:
  """The last non-empty line of `text` (progress bars end lines with \\r), stripped."""
  lines = [line.strip() for line in re.split(r"[\r\n]", text) if line.strip()]
  return lines[-1] if lines else ""


def _error_text(line: str) -> str:
  """A child's last stderr line without the CLI's 'error: ' prefix."""
  return line[len("error: "):] if line.startswith("error: ") else line


# ------------------------------------------------------------------------------ the cells


class CellFailed(RuntimeError):
  """A cell's `prompt-jax train` process failed: its exit code and last stderr line."""

  def __init__(self, cell: Cell, exit_code: int, last_line: str):
    self.cell, self.exit_code, self.last_line = cell, exit_code, last_line
    how = (f"was killed by {signal.Signals(-exit_code).name}" if exit_code < 0
           else f"exited with code {exit_code}")
    super().__init__(f"cell {cell.name} {how}: {_error_text(last_line) or '(no stderr)'}")


def _verbosity_flags() -> list[str]:
  """--verbosity for the children when this process logs more than the default (warning)."""
  level = logging.getLogger().getEffectiveLevel()
  if level <= logging.DEBUG:
    return ["--verbosity=debug"]
  return ["--verbosity=info"] if level <= logging.INFO else []


def _tee_stderr(proc: subprocess.Popen) -> str:
  """Copy the child's stderr to ours as it arrives (progress bars included); its last line."""
  decoder = codecs.getincrementaldecoder("utf-8")("replace")
  tail = ""
  for chunk in iter(lambda: proc.stderr.read1(1 << 16), b""):
    text = decoder.decode(chunk)
    sys.stderr.write(text)
    sys.stderr.flush()
    tail = (tail + text)[-(1 << 14):]
  return last_line(tail + decoder.decode(b"", final=True))


class _ForwardSignals(preemption.SignalHandlers):
  """While a local sweep runs: SIGTERM / SIGINT to the sweep are passed on to its running cell.

  Each cell runs in its own process group, so a signal reaches it only through here (Ctrl-C at
  a terminal reaches the sweep's group; `kill <sweep pid>`, `docker stop` or a scheduler signal
  the sweep alone). The first signal is forwarded to the running cell, which saves a checkpoint
  and exits with `preemption.EXIT_CODE`; the sweep launches no further cell. A second signal
  kills the running cell and stops the sweep at once (KeyboardInterrupt).

  Outside the main thread no handler can be installed: then cells share the sweep's process
  group and a Ctrl-C reaches them directly."""

  def __init__(self):
    self.signal_name: Optional[str] = None
    self.proc: Optional[subprocess.Popen] = None
    self._forwarded = False
    self._previous: dict = {}

  @property
  def active(self) -> bool:
    return bool(self._previous)

  def __enter__(self) -> _ForwardSignals:
    self._install((signal.SIGINT, signal.SIGTERM))
    return self

  def _handler(self, signum, frame):  # pylint: disable=unused-argument
    name = signal.Signals(signum).name
    if self.signal_name is not None:
      if self.proc is not None and self.proc.poll() is None:
        self.proc.kill()
      raise KeyboardInterrupt(f"second {name}")
    self.signal_name = name
    print(f"sweep: {name} received: the running cell saves a checkpoint and stops, no further "
          "cell starts (send it again to stop at once)", file=sys.stderr, flush=True)
    self.forward()

  def started(self, proc: subprocess.Popen) -> None:
    self.proc, self._forwarded = proc, False
    if self.signal_name is not None:
      self.forward()

  def forward(self) -> None:
    proc = self.proc
    if proc is None or self._forwarded or proc.poll() is not None:
      return
    self._forwarded = True
    proc.send_signal(signal.Signals[self.signal_name])


# A cell's exit codes when it stopped because the sweep passed a signal on: saved after a step
# (75), or stopped before its training loop (by the signal, or KeyboardInterrupt: 130).
_STOPPED_CODES = (preemption.EXIT_CODE, 130, -signal.SIGTERM, -signal.SIGINT)


def run_cell(cell: Cell, search_paths: Sequence[str] = (),
             signals: Optional[_ForwardSignals] = None) -> float:
  """Train `cell` in its own `python -m prompt_jax.cli train` process (stdout and stderr pass
  through); returns its wall seconds. Raises CellFailed when the process fails and
  `preemption.Preempted` when it stopped on a signal (after saving a checkpoint if it was
  training); `signals` (active) passes the sweep's SIGTERM / SIGINT on to it."""
  command = cell.train_command(search_paths) + _verbosity_flags()
  sys.stdout.flush()
  start = time.perf_counter()
  own_group = signals is not None and signals.active
  proc = subprocess.Popen(command, stdin=subprocess.DEVNULL, stderr=subprocess.PIPE,
                          env=child_env(), **({"process_group": 0} if own_group else {}))
  if signals is not None:
    signals.started(proc)
  try:
    last_line = _tee_stderr(proc)
    exit_code = proc.wait()
  except KeyboardInterrupt:
    # A second signal (or, without forwarding, Ctrl-C reaching the cell too: it saves a
    # checkpoint and stops; pass on what it says meanwhile; a second Ctrl-C stops it at once).
    try:
      if not own_group:
        _tee_stderr(proc)
        proc.wait()
    except KeyboardInterrupt:
      pass
    if proc.poll() is None:
      proc.kill()
    proc.wait()
    raise
  finally:
    if signals is not None:
      signals.proc = None
  seconds = time.perf_counter() - start
  stopped_by = signals.signal_name if signals is not None else None
  if exit_code == preemption.EXIT_CODE or (stopped_by and exit_code in _STOPPED_CODES):
    raise preemption.Preempted(
        f"sweep stopped by {stopped_by or 'a signal'}: cell {cell.name} "
        + ("saved a checkpoint" if exit_code == preemption.EXIT_CODE else "stopped")
        + "; rerun the same sweep command to continue")
  if exit_code:
    raise CellFailed(cell, exit_code, last_line)
  if not _gfile().exists(cell.summary_path):
    raise CellFailed(cell, exit_code, f"it wrote no {cell.summary_path}")
  return seconds


def _read_json(path: str) -> Optional[dict]:
  if not _gfile().exists(path):
    return None
  try:
    with _gfile().GFile(path) as f:
      return json.load(f)
  except ValueError:
    return None


def _write_json(path: str, value: Any) -> None:
  _gfile().makedirs(os.path.dirname(path))
  with _gfile().GFile(path, "w") as f:
    json.dump(value, f, indent=2)


def _gfile():
  """tf.io.gfile: local paths and gs:// alike (the sweep dir of a TPU sweep is a bucket)."""
  # Heavy (seconds): imported when a file is first read or written, so that the sweep's own
  # process, and gin_utils' checks that import this module, stay light.
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  return tf.io.gfile


def _recorded_parameters(cfg: SweepConfig, cells: Sequence[Cell], size: str) -> Optional[int]:
  """A size's frozen parameter count: SweepConfig.sizes[size]['parameters'], else one recorded in
  a sweep_cell.json of that size, else None."""
  if cfg.sizes[size].get("parameters") is not None:
    return int(cfg.sizes[size]["parameters"])
  for cell in cells:
    if cell.values["size"] == size:
      info = _read_json(cell.record_path) or {}
      if info.get("parameters") is not None:
        return int(info["parameters"])
  return None


def collect(cfg: SweepConfig, cells: Sequence[Cell]) -> list[dict]:
  """One row per cell: configured values, parameters, status, metrics; writes results.csv."""
  rows = []
  for cell in cells:
    state, _ = cell_state(cell)
    summary = _read_json(cell.summary_path) if state == "finished" else None
    info = _read_json(cell.record_path) or {}
    error = _read_json(os.path.join(cell.model_dir, "sweep_error.json"))
    parameters = cfg.sizes[cell.values["size"]].get("parameters", info.get("parameters"))
    row = {"cell": cell.name, **cell.values, "parameters": parameters}
    if state == "changed":  # trained with other settings: its results are not this cell's
      row.update(status="changed", score=None, score_untrained=None, final_loss=None,
                 steps=None, seconds=None)
    elif summary is not None:
      trained = summary.get("eval_trained") or {}
      untrained = summary.get("eval_untrained") or {}
      row.update(status="finished", score=trained.get(cfg.metric),
                 score_untrained=untrained.get(cfg.metric),
                 final_loss=(summary.get("train") or {}).get("loss"), steps=summary.get("step"),
                 seconds=info.get("seconds"))
    else:
      row.update(status="failed" if error else "pending", score=None, score_untrained=None,
                 final_loss=None, steps=None, seconds=None)
    row["model_dir"] = cell.model_dir
    rows.append(row)
  _gfile().makedirs(cfg.sweep_dir)
  text = io.StringIO()
  writer = csv.DictWriter(text, fieldnames=list(rows[0]))
  writer.writeheader()
  writer.writerows(rows)
  with _gfile().GFile(os.path.join(cfg.sweep_dir, "results.csv"), "w") as f:
    f.write(text.getvalue())
  return rows


def write_commands(cfg: SweepConfig, cells: Sequence[Cell]) -> str:
  """<sweep_dir>/commands.sh: one job line per unfinished cell."""
  lines = ["#!/bin/sh", f"# {cfg.name}: {len(cells)} cells; finished cells are omitted."]
  for cell in cells:
    state, changes = cell_state(cell)
    if state == "finished":
      continue
    if state == "changed":
      lines.append(f"# refused: {changed_message(cell, changes)}")
      continue
    command = shlex.join(["prompt-jax", "train", *cell.train_argv()])
    lines.append(cfg.command_template.replace("{command}", shlex.quote(command))
                 .replace("{cell}", cell.name))
  _gfile().makedirs(cfg.sweep_dir)
  path = os.path.join(cfg.sweep_dir, "commands.sh")
  with _gfile().GFile(path, "w") as f:
    f.write("\n".join(lines) + "\n")
  return path


def _text(value) -> str:
  return f"{value:g}" if isinstance(value, float) else str(value)


def select(cells: Sequence[Cell], selections: Sequence[str]) -> list[Cell]:
  """Cells matching every 'axis=v1,v2' selection (values compared as text)."""
  chosen = list(cells)
  for selection in selections:
    axis, _, values = selection.partition("=")
    if axis not in AXES or not values:
      raise ValueError(f"--select must be AXIS=V1,V2 with AXIS one of {AXES}, got {selection!r}")
    wanted = values.split(",")
    chosen = [c for c in chosen if _text(c.values[axis]) in wanted]
  if not chosen:
    raise ValueError(f"--select {list(selections)} matches no cell of the sweep")
  return chosen


# A size's frozen parameter count from a cell's gin config (the command line builds one that
# parses it in a child process); ValueError when it cannot.
CountParameters = Callable[[Cell], int]


def _count_parameters(count_parameters: Optional[CountParameters], cell: Cell) -> Optional[int]:
  """`count_parameters(cell)`; None (logged) when there is none or it fails."""
  if count_parameters is None:
    return None
  try:
    return count_parameters(cell)
  except ValueError as e:
    log.warning("could not count the parameters of cell %s's model: %s", cell.name, e)
    return None


def run_local(cfg: SweepConfig, cells: Sequence[Cell], search_paths: Sequence[str] = (),
              stop_on_error: bool = False, max_cells: Optional[int] = None,
              count_parameters: Optional[CountParameters] = None) -> None:
  """Train the unfinished `cells` (at most `max_cells`) one process after another.

  A cell's record <model_dir>/sweep_cell.json (values, gin files, bindings, status 'running')
  is written when it starts; a finished one adds its seconds and its size's parameter count
  (given in the SweepConfig, recorded by an earlier cell, or `count_parameters(cell)`), a failed
  one gets sweep_error.json. A cell trained with other settings is refused (`cell_state`).
  SIGTERM / SIGINT stop the running cell after it saved a checkpoint, and the sweep
  (`preemption.Preempted`; `_ForwardSignals`)."""
  parameters: dict[str, Optional[int]] = {}
  ran = 0
  with _ForwardSignals() as signals:
    for i, cell in enumerate(cells, 1):
      state, changes = cell_state(cell)
      if state == "finished":
        continue
      if state == "changed":
        message = changed_message(cell, changes)
        if stop_on_error:
          raise ValueError(message)
        print(f"{message} (the sweep goes on)", file=sys.stderr, flush=True)
        continue
      if max_cells is not None and ran >= max_cells:
        break
      if signals.signal_name is not None:
        raise preemption.Preempted(
            f"sweep stopped by {signals.signal_name} before cell {cell.name}; rerun the same "
            "sweep command to continue")
      print(f"\n=== cell {i}/{len(cells)}: {cell.name}", flush=True)
      if state == "continue":
        print(f"cell {cell.name} was trained with {describe_changes(changes)}: its training run "
              "continues from its checkpoint", flush=True)
      error_path = os.path.join(cell.model_dir, "sweep_error.json")
      record = {"values": dict(cell.values), "gin_files": list(cell.gin_files),
                "bindings": list(cell.bindings), "status": "running",
                "parameters": (_read_json(cell.record_path) or {}).get("parameters")}
      _write_json(cell.record_path, record)
      try:
        seconds = run_cell(cell, search_paths, signals)
      except CellFailed as e:
        _write_json(cell.record_path, dict(record, status="failed"))
        if stop_on_error:
          raise
        _write_json(error_path, {"exit_code": e.exit_code, "error": e.last_line,
                                 "command": cell.train_command(search_paths)})
        print(f"{e}\n(recorded in {error_path}; the sweep goes on)", file=sys.stderr,
              flush=True)
      else:
        if _gfile().exists(error_path):
          _gfile().remove(error_path)
        size = cell.values["size"]
        if parameters.get(size) is None:
          parameters[size] = (_recorded_parameters(cfg, cells, size)
                              or _count_parameters(count_parameters, cell))
        _write_json(cell.record_path, dict(record, status="finished", seconds=seconds,
                                           parameters=parameters[size]))
      ran += 1
      collect(cfg, cells)  # keep results.csv current while the sweep runs


def run(cfg: SweepConfig, mode: str = "local", search_paths: Sequence[str] = (),
        stop_on_error: bool = False, max_cells: Optional[int] = None,
        selections: Sequence[str] = (),
        count_parameters: Optional[CountParameters] = None) -> list[dict]:
  """Run (or write commands for) the sweep (or the cells `selections` picks); returns the
  results rows."""
  if mode not in ("local", "commands", "collect"):
    raise ValueError(f"sweep mode must be local, commands or collect, got {mode!r}")
  cells = select(expand(cfg), selections)
  done = sum(cell_state(c)[0] == "finished" for c in cells)
  print(f"sweep {cfg.name}: {len(cells)} cells, {done} finished, in {cfg.sweep_dir}", flush=True)
  if mode == "commands":
    print(f"wrote {write_commands(cfg, cells)}", flush=True)
  elif mode == "local":
    run_local(cfg, cells, search_paths, stop_on_error, max_cells, count_parameters)
  rows = collect(cfg, cells)
  paths = sweep_plots.plot(cfg, rows)
  finished = sum(r["status"] == "finished" for r in rows)
  print(f"sweep {cfg.name}: {finished}/{len(rows)} cells finished; wrote "
        f"{os.path.join(cfg.sweep_dir, 'results.csv')}" + "".join(f", {p}" for p in paths),
        flush=True)
  return rows


def main(cfg: SweepConfig, *, search_paths: Sequence[str] = (), mode: str = "local",
         max_cells: Optional[int] = None, stop_on_error: bool = False,
         select: Sequence[str] = (), cell_bindings: Sequence[str] = (),
         count_parameters: Optional[CountParameters] = None) -> int:
  """`prompt-jax sweep`: `run` the sweep `cfg` with `cell_bindings` added to every cell's
  bindings; 1 if a cell failed or was refused (trained with other settings)."""
  if cell_bindings:
    cfg = dataclasses.replace(cfg, bindings=tuple(cfg.bindings) + tuple(cell_bindings))
  rows = run(cfg, mode, search_paths, stop_on_error, max_cells, select, count_parameters)
  return 0 if all(r["status"] not in ("failed", "changed") for r in rows) else 1
