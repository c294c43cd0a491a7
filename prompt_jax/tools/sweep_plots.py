"""The plots of a sweep's results (`prompt_jax.tools.sweep.collect` rows); matplotlib lives here
only.

  score_vs_parameters.png     one line per method, log x (Lester et al. Fig. 1)
  score_vs_prompt_length.png  one line per size (Fig. 3a)
  score_vs_initializer.png    one line per size (Fig. 3b)

Each plot fixes the axes it does not show at `SweepConfig.reference` (default: each axis' first
value) and averages the seeds (error bars: standard deviation); each line's untrained-prompt
score is drawn dashed in the same colour. `cfg` is a `prompt_jax.tools.sweep.SweepConfig` (not
imported: the sweep imports this module).
"""

from __future__ import annotations

import math
import os
from typing import Any, Sequence


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
  mean = sum(values) / len(values)
  return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / len(values))


def _series(rows, cfg, x_axis: str, line_axis: str, key: str = "score"):
  """{line value: [(x value, mean `key`, std)]} with the other axes at the reference values;
  seeds are averaged. `key`: 'score' (trained prompt) or 'score_untrained'."""
  ref = cfg.reference_values()
  fixed = [a for a in cfg.axis_values() if a not in (x_axis, line_axis, "seed")]
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


def parameter_label(count: float) -> str:
  """1083136 -> '1.1M', 11e9 -> '11B': tick labels for the model-size axis."""
  for scale, suffix in ((1e9, "B"), (1e6, "M"), (1e3, "k")):
    if count >= scale:
      value = count / scale
      return f"{value:.1f}{suffix}" if value < 10 else f"{value:.0f}{suffix}"
  return f"{count:g}"


def plot(cfg, rows: Sequence[dict]) -> list[str]:
  """Write the three PNGs (skipping a plot with no finished cells); returns their paths."""
  # Heavy (seconds), so imported only to plot (`sweep` imports this module at its top): pyplot
  # after selecting the display-free Agg backend.
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  import tensorflow as tf  # pylint: disable=g-import-not-at-top  # tf.io.gfile: gs:// dirs too
  ref = cfg.reference_values()
  parameters = {}
  for r in rows:
    if r["parameters"]:
      parameters[r["size"]] = float(r["parameters"])
  written = []

  def fixed_note(*shown):
    return ", ".join(f"{a}={ref[a]}" for a in cfg.axis_values() if a not in shown + ("seed",))

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
      ax.set_xticks(ticks, [parameter_label(t) for t in ticks])
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
    with tf.io.gfile.GFile(path, "wb") as f:
      fig.savefig(f, dpi=100, format="png")
    plt.close(fig)
    written.append(path)
  return written
