"""`prompt-jax sweep --gin_file=sweeps/<name>.gin`: a scale-ablation grid in one command.

A sweep gin file configures `SweepConfig`: named model sizes, methods and initialisers (each a
list of gin files and/or bindings), prompt lengths, learning rates and seeds. Their product is
the grid; each cell is one `prompt-jax train` run with

  gin files:    size files + method files + initialiser files + base_gin_files
  gin bindings: bindings + size, method and initialiser bindings + PROMPT_LENGTH,
                LEARNING_RATE, SEED, MODEL_DIR = <sweep_dir>/<cell name>

Modes (`--mode`):
  local     run the cells one after another in this process; a cell whose summary.json exists
            is finished and skipped, so an interrupted sweep resumes where it stopped (and a
            half-trained cell resumes from its own checkpoint);
  commands  write one job command per cell to <sweep_dir>/commands.sh (e.g. Cloud TPU VMs,
            via `command_template`) and run nothing;
  collect   only gather results.
Every mode ends by writing <sweep_dir>/results.csv (one row per cell: its configured values,
parameter count and final metrics, or status 'pending'/'failed') and the plots
score_vs_parameters.png (per method; Lester et al. Fig. 1), score_vs_prompt_length.png (per
size; Fig. 3a) and score_vs_initializer.png (per size; Fig. 3b). Each plot fixes the axes it does
not show at `SweepConfig.reference` (default: each axis' first value) and averages the seeds
(error bars: standard deviation).
"""

from __future__ import annotations

import csv
import dataclasses
import io
import itertools
import json
import logging
import math
import os
import shlex
import sys
import time
import traceback
from typing import Any, Mapping, Optional, Sequence

import gin

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
      (frozen model size for the plots) is optional: local cells count it from the config.
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
    return os.path.join(self.model_dir, "summary.json")

  def finished(self) -> bool:
    return _gfile().exists(self.summary_path)

  def train_argv(self) -> list[str]:
    return ([f"--gin_file={f}" for f in self.gin_files]
            + [f"--gin_bindings={b}" for b in self.bindings])


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


def _frozen_parameter_count() -> Optional[int]:
  """Parameters of the gin-configured T5 (without prompt), from shapes only."""
  from prompt_jax import params as params_lib  # pylint: disable=g-import-not-at-top
  from prompt_jax.models import encoder_decoder, t5  # pylint: disable=g-import-not-at-top
  try:
    config = gin.get_configurable(t5.T5Config)()
  except Exception:  # pylint: disable=broad-except
    log.warning("could not build the cell's T5Config to count parameters", exc_info=True)
    return None
  model = encoder_decoder.EncoderDecoderModel(t5.Transformer(config))
  return params_lib.count(model.init_abstract(model.dummy_batch(1, 8, 4)))


def run_cell(cell: Cell, search_paths: Sequence[str] = ()) -> dict:
  """Train one cell in this process; writes <model_dir>/summary.json and sweep_cell.json."""
  from prompt_jax import gin_utils, trainer  # pylint: disable=g-import-not-at-top
  os.makedirs(cell.model_dir, exist_ok=True)
  gin.clear_config()
  try:
    start = time.perf_counter()
    summary = gin_utils.run_configured(trainer.train, cell.gin_files, cell.bindings,
                                       search_paths)
    gin_utils.print_summary(summary)
    info = {"values": dict(cell.values), "seconds": time.perf_counter() - start,
            "parameters": _frozen_parameter_count(), "gin_files": list(cell.gin_files),
            "bindings": list(cell.bindings)}
  finally:
    gin.clear_config()
  with open(os.path.join(cell.model_dir, "sweep_cell.json"), "w") as f:
    json.dump(info, f, indent=2)
  return summary


def _gfile():
  """tf.io.gfile: local paths and gs:// alike (the sweep dir of a TPU sweep is a bucket)."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  return tf.io.gfile


def _read_json(path: str) -> Optional[dict]:
  if not _gfile().exists(path):
    return None
  try:
    with _gfile().GFile(path) as f:
      return json.load(f)
  except ValueError:
    return None


def collect(cfg: SweepConfig, cells: Sequence[Cell]) -> list[dict]:
  """One row per cell: configured values, parameters, status, metrics; writes results.csv."""
  rows = []
  for cell in cells:
    summary = _read_json(cell.summary_path)
    info = _read_json(os.path.join(cell.model_dir, "sweep_cell.json")) or {}
    error = _read_json(os.path.join(cell.model_dir, "sweep_error.json"))
    parameters = cfg.sizes[cell.values["size"]].get("parameters", info.get("parameters"))
    row = {"cell": cell.name, **cell.values, "parameters": parameters}
    if summary is not None:
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


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
  mean = sum(values) / len(values)
  return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / len(values))


def _series(rows, cfg: SweepConfig, x_axis: str, line_axis: str, key: str = "score"):
  """{line value: [(x value, mean `key`, std)]} with the other axes at the reference values;
  seeds are averaged. `key`: 'score' (trained prompt) or 'score_untrained'."""
  ref = cfg.reference_values()
  fixed = [a for a in AXES if a not in (x_axis, line_axis, "seed")]
  series: dict[Any, list] = {}
  for line in cfg.axis_values()[line_axis]:
    points = []
    for x in cfg.axis_values()[x_axis]:
      scores = [r[key] for r in rows if r["status"] == "finished" and r[key] is not None
                and r[line_axis] == line and r[x_axis] == x
                and all(r[a] == ref[a] for a in fixed)]
      if scores:
        points.append((x, *_mean_std(scores)))
    if points:
      series[line] = points
  return series


def _parameter_label(count: float) -> str:
  """1083136 -> '1.1M', 11e9 -> '11B': tick labels for the model-size axis."""
  for scale, suffix in ((1e9, "B"), (1e6, "M"), (1e3, "k")):
    if count >= scale:
      value = count / scale
      return f"{value:.1f}{suffix}" if value < 10 else f"{value:.0f}{suffix}"
  return f"{count:g}"


def plot(cfg: SweepConfig, rows: Sequence[dict]) -> list[str]:
  """Write the three PNGs (skipping a plot with no finished cells); returns their paths."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  ref = cfg.reference_values()
  parameters = {}
  for r in rows:
    if r["parameters"]:
      parameters[r["size"]] = float(r["parameters"])
  written = []

  def fixed_note(*shown):
    return ", ".join(f"{a}={ref[a]}" for a in AXES if a not in shown + ("seed",))

  specs = [("score_vs_parameters.png", "size", "method", "model parameters"),
           ("score_vs_prompt_length.png", "prompt_length", "size", "prompt length"),
           ("score_vs_initializer.png", "initializer", "size", "prompt initialisation")]
  for filename, x_axis, line_axis, xlabel in specs:
    def placed(key, x_axis=x_axis, line_axis=line_axis):
      series = _series(rows, cfg, x_axis, line_axis, key)
      if x_axis == "size":
        series = {k: [(parameters[x], m, s) for x, m, s in pts if x in parameters]
                  for k, pts in series.items()}
      return {k: v for k, v in series.items() if v}

    series, untrained = placed("score"), placed("score_untrained")
    if not series:
      continue
    fig, ax = plt.subplots(figsize=(6, 4))
    categorical = x_axis == "initializer"

    def xs_of(points, categorical=categorical):
      xs = [p[0] for p in points]
      return [cfg.axis_values()["initializer"].index(x) for x in xs] if categorical else xs

    for line, points in series.items():
      bars = ax.errorbar(xs_of(points), [p[1] for p in points], yerr=[p[2] for p in points],
                         marker="o", capsize=3, label=str(line))
      if line in untrained:  # the starting point: trained == untrained means nothing was learnt
        ax.plot(xs_of(untrained[line]), [p[1] for p in untrained[line]], linestyle="--",
                alpha=0.6, color=bars.lines[0].get_color(), label=f"{line}, untrained prompt")
    low, high = ax.get_ylim()
    if high - low < 10:  # keep equal scores from looking like a trend
      middle = (low + high) / 2
      ax.set_ylim(middle - 5, middle + 5)
    if x_axis == "size":
      ax.set_xscale("log")
      ticks = sorted({p[0] for pts in series.values() for p in pts})
      ax.set_xticks(ticks, [_parameter_label(t) for t in ticks])
      ax.minorticks_off()
    if x_axis == "prompt_length" and min(cfg.axis_values()["prompt_length"]) > 0:
      ax.set_xscale("log")
      ticks = cfg.axis_values()["prompt_length"]
      ax.set_xticks(ticks, [str(t) for t in ticks])
      ax.minorticks_off()
    if categorical:
      names = cfg.axis_values()["initializer"]
      ax.set_xticks(range(len(names)), names)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(f"validation {cfg.metric}")
    ax.set_title(f"{cfg.name}: {fixed_note(x_axis, line_axis)}", fontsize=9)
    ax.legend(title=line_axis, fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path = os.path.join(cfg.sweep_dir, filename)
    with _gfile().GFile(path, "wb") as f:
      fig.savefig(f, dpi=100, format="png")
    plt.close(fig)
    written.append(path)
  return written


def write_commands(cfg: SweepConfig, cells: Sequence[Cell]) -> str:
  """<sweep_dir>/commands.sh: one job line per unfinished cell."""
  lines = ["#!/bin/sh", f"# {cfg.name}: {len(cells)} cells; finished cells are omitted."]
  for cell in cells:
    if cell.finished():
      continue
    command = shlex.join(["prompt-jax", "train", *cell.train_argv()])
    lines.append(cfg.command_template.replace("{command}", shlex.quote(command))
                 .replace("{cell}", cell.name))
  _gfile().makedirs(cfg.sweep_dir)
  path = os.path.join(cfg.sweep_dir, "commands.sh")
  with _gfile().GFile(path, "w") as f:
    f.write("\n".join(lines) + "\n")
  return path


def load_sweep_config(gin_files: Sequence[str], bindings: Sequence[str],
                      search_paths: Sequence[str]) -> SweepConfig:
  """Parse the sweep's gin files and build its SweepConfig (gin is cleared afterwards)."""
  from prompt_jax import gin_utils  # pylint: disable=g-import-not-at-top
  gin.clear_config()
  try:
    gin_utils.configure_gin(gin_files, bindings, search_paths, roots=["sweep.SweepConfig"])
    return gin.get_configurable(SweepConfig)()
  finally:
    gin.clear_config()


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


def run(cfg: SweepConfig, mode: str = "local", search_paths: Sequence[str] = (),
        stop_on_error: bool = False, max_cells: Optional[int] = None,
        selections: Sequence[str] = ()) -> list[dict]:
  """Run (or write commands for) the sweep (or the cells `selections` picks); returns the
  results rows."""
  if mode not in ("local", "commands", "collect"):
    raise ValueError(f"sweep mode must be local, commands or collect, got {mode!r}")
  cells = select(expand(cfg), selections)
  done = sum(c.finished() for c in cells)
  print(f"sweep {cfg.name}: {len(cells)} cells, {done} finished, in {cfg.sweep_dir}", flush=True)
  if mode == "commands":
    print(f"wrote {write_commands(cfg, cells)}", flush=True)
  elif mode == "local":
    ran = 0
    for i, cell in enumerate(cells, 1):
      if cell.finished():
        continue
      if max_cells is not None and ran >= max_cells:
        break
      print(f"\n=== cell {i}/{len(cells)}: {cell.name}", flush=True)
      error_path = os.path.join(cell.model_dir, "sweep_error.json")
      try:
        run_cell(cell, search_paths)
        if os.path.exists(error_path):
          os.remove(error_path)
      except Exception as e:  # pylint: disable=broad-except
        if stop_on_error:
          raise
        os.makedirs(cell.model_dir, exist_ok=True)
        with open(error_path, "w") as f:
          json.dump({"error": f"{type(e).__name__}: {e}",
                     "traceback": traceback.format_exc()}, f, indent=2)
        print(f"cell {cell.name} failed: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
      ran += 1
      collect(cfg, cells)  # keep results.csv current while the sweep runs
  rows = collect(cfg, cells)
  paths = plot(cfg, rows)
  finished = sum(r["status"] == "finished" for r in rows)
  print(f"sweep {cfg.name}: {finished}/{len(rows)} cells finished; wrote "
        f"{os.path.join(cfg.sweep_dir, 'results.csv')}" + "".join(f", {p}" for p in paths),
        flush=True)
  return rows


def main(*, gin_files: Sequence[str], gin_bindings: Sequence[str] = (),
         search_paths: Sequence[str] = (), mode: str = "local", sweep_dir: Optional[str] = None,
         max_cells: Optional[int] = None, stop_on_error: bool = False,
         select: Sequence[str] = (), cell_bindings: Sequence[str] = ()) -> int:
  """`prompt-jax sweep`: load the sweep's SweepConfig (`sweep_dir` overrides its sweep_dir,
  `cell_bindings` are added to every cell's bindings) and `run` it; 1 if a cell failed."""
  bindings = list(gin_bindings)
  if sweep_dir:
    bindings.append(f"sweep.SweepConfig.sweep_dir = {sweep_dir!r}")
  cfg = load_sweep_config(gin_files, bindings, search_paths)
  if cell_bindings:
    cfg = dataclasses.replace(cfg, bindings=tuple(cfg.bindings) + tuple(cell_bindings))
  rows = run(cfg, mode, search_paths, stop_on_error, max_cells, select)
  return 0 if all(r["status"] != "failed" for r in rows) else 1
