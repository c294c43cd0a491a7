"""Training and validation curves of runs, drawn from MODEL_DIR/metrics.jsonl (no TensorBoard).

One panel for the training loss ("loss", and "cross_ent_loss" when logged) against step, and one
per validation metric (split "eval") against step, with the untrained prompt's score (the eval at
step 0) as a dashed horizontal line. `plot_run` draws one run into MODEL_DIR/curves.png;
`plot_runs` compares runs, one line per run labelled by its directory's name. PNGs are written
atomically (a temporary file in the same directory, then `os.replace`). matplotlib is imported
inside the functions, so importing this module is cheap.
"""

from __future__ import annotations

import math
import os
from typing import Optional, Sequence

from prompt_jax.storage import metric_writer, output_paths, run_dir

CURVES_FILE = run_dir.CURVES_FILE
TRAIN_SPLIT = "train"
EVAL_SPLIT = "eval"
LOSS_NAMES = ("loss", "cross_ent_loss")


def _series(records: Sequence[dict]) -> dict[tuple[str, str], list[tuple[int, float]]]:
  """(split, name) -> [(step, value)] sorted by step; a step written twice keeps its last value."""
  by_key: dict[tuple[str, str], dict[int, float]] = {}
  for r in records:
    by_key.setdefault((r["split"], r["name"]), {})[int(r["step"])] = float(r["value"])
  return {key: sorted(points.items()) for key, points in by_key.items()}


def _load(model_dir: str) -> dict[tuple[str, str], list[tuple[int, float]]]:
  model_dir = os.fspath(model_dir)
  if not os.path.isdir(model_dir):
    raise ValueError(f"{model_dir} does not exist or is not a directory")
  path = os.path.join(model_dir, metric_writer.METRICS_FILE)
  if not os.path.isfile(path):
    raise ValueError(f"{model_dir} has no {metric_writer.METRICS_FILE}: is it a training run "
                     "directory?")
  return _series(metric_writer.read_metrics(model_dir))


def _labels(model_dirs: Sequence[str]) -> list[str]:
  """Each directory's basename; the whole path where two basenames are the same."""
  paths = [os.path.normpath(os.fspath(d)) for d in model_dirs]
  names = [os.path.basename(p) or p for p in paths]
  return [n if names.count(n) == 1 else p for n, p in zip(names, paths)]


def _check_output(output: str, inputs: Sequence[str], overwrite: bool) -> str:
  """`output` as a path to write (`output_paths.check_output_path`): none of the inputs, and not
  an existing file unless `overwrite`."""
  output = os.fspath(output)
  real = os.path.realpath(output)
  for model_dir in inputs:
    if real == os.path.realpath(os.path.join(model_dir, metric_writer.METRICS_FILE)):
      raise ValueError(f"output {output} is an input ({metric_writer.METRICS_FILE} of "
                       f"{model_dir}); choose another path")
  hint = None if overwrite else "pass --overwrite to replace it, or choose another --output"
  return output_paths.check_output_path(output, "--output", exists_hint=hint)


def _panels(runs: Sequence[dict]) -> list[tuple[str, str, list[str]]]:
  """(split, title, metric names) per panel, over all runs: the training loss, then each
  validation metric in name order."""
  panels = []
  losses = [n for n in LOSS_NAMES if any((TRAIN_SPLIT, n) in run for run in runs)]
  if losses:
    panels.append((TRAIN_SPLIT, "training loss", losses))
  evals = sorted({name for run in runs for split, name in run if split == EVAL_SPLIT})
  panels.extend((EVAL_SPLIT, f"validation {name}", [name]) for name in evals)
  return panels


def _draw(runs: Sequence[dict], labels: Optional[Sequence[str]], output: str) -> str:
  """One figure of the panels (`labels`: one per run when comparing runs, else None), written
  atomically to `output`."""
  from matplotlib.backends.backend_agg import FigureCanvasAgg  # pylint: disable=g-import-not-at-top
  from matplotlib.figure import Figure  # pylint: disable=g-import-not-at-top
  panels = _panels(runs)
  if not panels:
    raise ValueError("nothing to plot: no training loss or validation metric in "
                     f"{metric_writer.METRICS_FILE}")
  columns = min(len(panels), 3)
  rows = math.ceil(len(panels) / columns)
  fig = Figure(figsize=(5.0 * columns, 3.6 * rows), layout="constrained")
  canvas = FigureCanvasAgg(fig)
  axes = fig.subplots(rows, columns, squeeze=False).ravel()
  colors = [f"C{i % 10}" for i in range(len(runs))]
  styles = ("-", "--", ":")
  for ax, (split, title, names) in zip(axes, panels):
    for i, run in enumerate(runs):
      prefix = f"{labels[i]} " if labels else ""
      for j, name in enumerate(names):
        points = run.get((split, name))
        if not points:
          continue
        steps, values = zip(*points)
        line_label = prefix + name if split == TRAIN_SPLIT else (labels[i] if labels else name)
        ax.plot(steps, values, styles[j % len(styles)], color=colors[i], label=line_label,
                marker="o" if len(points) < 30 and split == EVAL_SPLIT else None, markersize=3)
        if split == EVAL_SPLIT and steps[0] == 0:
          ax.axhline(values[0], linestyle="--", linewidth=1, color=colors[i], alpha=0.7,
                     label=prefix + "untrained prompt")
    ax.set_title(title)
    ax.set_xlabel("step")
    ax.set_ylabel(names[0] if len(names) == 1 else "loss")
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
      ax.legend(fontsize="small")
  for ax in axes[len(panels):]:
    ax.set_axis_off()
  fmt = os.path.splitext(output)[1][1:].lower() or "png"
  if fmt not in canvas.get_supported_filetypes():
    raise ValueError(f"output {output}: unsupported image format {fmt!r} (use .png, .svg or "
                     ".pdf)")
  return run_dir.atomic_write(output, lambda f: fig.savefig(f, format=fmt, dpi=100))


def plot_run(model_dir: str, output: Optional[str] = None, overwrite: bool = False) -> str:
  """Draw MODEL_DIR/metrics.jsonl's curves into `output` (default MODEL_DIR/curves.png, always
  redrawn; another existing file only with `overwrite`); returns the path written."""
  model_dir = os.fspath(model_dir)
  run = _load(model_dir)
  default = os.path.join(model_dir, CURVES_FILE)
  output = _check_output(output or default, [model_dir],
                         overwrite or os.path.realpath(output or default) == os.path.realpath(
                             default))
  return _draw([run], None, output)


def plot_runs(model_dirs: Sequence[str], output: str, overwrite: bool = False) -> str:
  """Compare runs: the panels of `plot_run` with one line per run, labelled by its directory's
  name, into `output` (an existing file only with `overwrite`); returns the path written."""
  model_dirs = [os.fspath(d) for d in model_dirs]
  if not model_dirs:
    raise ValueError("no run directories given")
  runs = [_load(d) for d in model_dirs]
  output = _check_output(output, model_dirs, overwrite)
  return _draw(runs, _labels(model_dirs), output)
