"""Every prompt method on the demo's three synthetic tasks: one comparison table (issue 35).

    nice -n 10 python benchmarks/compare_methods.py          # ~20-30 min on 2 CPU cores

Each method of `prompt_jax.api.METHODS` (plain, residual, superpos, p_tuning, dpt, dept, smop,
prefix), ATTEMPT and three variants (`VARIANTS`: P-tuning's LSTM encoder, deep prompts, prefix
tuning without its MLP) is tuned on `demo_sentiment`, `demo_topic` and `demo_adjective` (2, 4
and 24 labels, `prompt_jax.data.synthetic`) on the shipped tiny T5 (`builtin:demo_t5_tiny.npz`),
through `api.FrozenT5.tune` only: the one training loop, each method with the optimizer its paper
trains it with. Every run has the same prompt length in *encoder tokens* (default 10), steps (150),
batch (32), input/target lengths (the longest demo example) and evaluation schedule (every 10
steps on the 400 validation sentences); what differs is what a method trains to produce those
tokens, so the trainable parameter counts differ by method and are reported, not equalised
(DePT: a prompt of 60% of the tokens plus a low-rank update of the input embeddings; SMoP: 4
prompts of that length, one routed per example; ATTEMPT: a target prompt plus its attention
module; prefix tuning: that many key/value positions in every attention layer of the encoder
and the decoder, through its MLP, instead of encoder tokens).

Learning rates: each method's paper optimizer, except where `--learning_rate` overrides it
(default `prefix=3e-3`: prefix tuning's paper rate, 5e-5, is for thousands of steps on GPT-2 and
BART and does not move the tiny model in 150 steps); the summary lists both.

ATTEMPT needs source prompts trained beforehand. Here they are the plain prompts of the *other
two* tasks, trained in this same run with the same seed (`TunedPrompt.prompt_array()`), handed to
`prompts.attempt.AttemptPrompt` as arrays, with its paper's optimizer (AdamW lr 0.3, weight
decay 0: `gin_configs/prompts/attempt.gin`). Cheap and honest, but not the paper's setting (six
large source tasks); a plain run that only serves as a source (its task not in `--tasks`) is in
the CSV with role `attempt_source` and not in the table.

Per (method, task, seed), read from the run directory's metrics.jsonl and the returned
`TunedPrompt`: trainable parameters; the first evaluated step with validation accuracy >= 95%
(step 0 is the untrained prompt; empty when never reached); the final validation accuracy; the
training steps/s the loop logged (its 10-step windows, evaluation excluded, the first step's
compilation excluded) relative to plain prompt tuning of the same task and seed; and the memory of
the compiled train step, as `prompt-jax plan` reads it (`tools.plan.Planner`: XLA's
memory_analysis, arguments + outputs - aliased (the donated state) + temporaries; the same for
every task and seed, as the lengths are equal, so compiled once per method).

    python benchmarks/compare_methods.py --methods plain,dpt,attempt --tasks demo_sentiment \\
        --seeds 0 --steps 10 --eval_every 5 --output /tmp/cm_smoke/x     # smoke run, ~2 min

Run time (estimated from smoke runs on 2 shared CPU cores): 25-35 s per run of the defaults,
of which ~17 s is fixed (loading, compiling the train and predict steps, the train-step memory
compile once per method, the final evaluation and checkpoint), ~10 s the 150 steps (~15 steps/s)
and ~16 s the 16 evaluations of 400 sentences (~1 s each); 12 methods x 3 tasks x 2 seeds = 72
runs, so 35-50 min.

Writes <output>.csv (one row per run), <output>_curves.csv (every validation curve; `--plot_only`
redraws the plot from it), <output>_summary.md (the table, the machine, the settings
and what the tiny model can tell) and <output>.png (validation accuracy vs step, mean over seeds,
one panel per task); default output benchmarks/results/compare_methods. The run directories go
to a temporary directory, deleted at the end unless --keep.
"""

from __future__ import annotations

import argparse
import csv
import os
import shutil
import sys
import tempfile
import time
from typing import Optional

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
if os.path.dirname(os.path.abspath(__file__)) not in sys.path:  # bench_common, when imported
  sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import bench_common  # noqa: E402
import numpy as np  # noqa: E402
from absl import logging as absl_logging  # noqa: E402

from prompt_jax import api  # noqa: E402
from prompt_jax.data import synthetic  # noqa: E402  (registers the demo tasks)
from prompt_jax.prompts import attempt, base, deep, p_tuning, plain, prefix  # noqa: E402
from prompt_jax.storage import metric_writer  # noqa: E402
from prompt_jax.tools import plan  # noqa: E402
from prompt_jax.training import optimizers  # noqa: E402

FROZEN = "builtin:demo_t5_tiny.npz"
TASKS = tuple(synthetic.MULTITASK_TASKS)  # demo_sentiment, demo_topic, demo_adjective
ATTEMPT = "attempt"
# Variants of api.METHODS' methods: name -> (hook of a prompt length, optimizer, description).
VARIANTS = {
    "p_tuning_lstm": (
        lambda n: base.InputPrompt(prompt=p_tuning.PTuningPrompt(
            length=n, reparameterization_type="LSTM")),
        api.METHODS["p_tuning"].optimizer,
        "P-tuning with PEFT's bidirectional-LSTM prompt encoder"),
    "deep": (
        lambda n: deep.DeepPrompt(prompt=plain.Prompt(length=n), layers=(1,)),
        api.METHODS["plain"].optimizer,
        "deep prompts (P-tuning v2 style): a prompt before every encoder layer (the tiny model's "
        "layer 1; layer 0's is the input prompt)"),
    "prefix_direct": (
        lambda n: prefix.PrefixTuning(length=n, reparameterization="none"),
        lambda: optimizers.adamw(learning_rate=3e-3, weight_decay=0.0),
        "prefix tuning without the MLP (the prefixes are the parameters, N(0, 0.5) init; the "
        "paper found this less stable), AdamW lr 3e-3 as `prefix` here"),
}
METHODS = (*api.METHODS, ATTEMPT, *VARIANTS)
THRESHOLD = 95.0  # validation accuracy, percent
RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
CSV_FIELDS = (
    "method", "task", "seed", "role", "prompt_length", "steps", "trainable_params",
    "steps_to_95", "final_validation_accuracy", "untrained_validation_accuracy",
    "steps_per_second", "steps_per_second_vs_plain", "train_step_bytes",
    "train_step_argument_bytes", "train_step_output_bytes", "train_step_aliased_bytes",
    "train_step_temporary_bytes", "run_seconds", "attempt_sources")
def parse_list(text: str, allowed: Optional[tuple[str, ...]], what: str) -> list[str]:
  values = [v.strip() for v in text.split(",") if v.strip()]
  if not values:
    raise SystemExit(f"--{what}: give at least one value")
  unknown = [v for v in values if allowed is not None and v not in allowed]
  if unknown:
    raise SystemExit(f"--{what}: unknown {unknown}; known: {', '.join(allowed)}")
  return list(dict.fromkeys(values))


def short_optimizer(description: Optional[dict]) -> str:
  """'adamw lr 0.3, wd 1e-05' from `optimizers.description(...)`."""
  if not description:
    return "?"
  if description.get("name") == "split_by_path":
    low_rank, prompt = description["names"]
    return (f"{low_rank}: {short_optimizer(description['matched'])}; "
            f"{prompt}: {short_optimizer(description['rest'])}")
  text = f"{description['name']} lr {description['learning_rate']:g}"
  decay = description.get("weight_decay", description.get("weight_decay_rate"))
  if decay is not None:
    text += f", wd {decay:g}"
  if description.get("clipping_threshold"):
    text += f", clip {description['clipping_threshold']:g}"
  return text


# ----------------------------------------------------------------------- one run's numbers


def eval_curve(records: list[dict]) -> list[tuple[int, float]]:
  """[(step, validation accuracy)] from metrics.jsonl records, by step (a repeated step: the
  last record)."""
  curve = {int(r["step"]): float(r["value"]) for r in records
           if r["split"] == "eval" and r["name"] == "accuracy"}
  return sorted(curve.items())


def steps_to(curve: list[tuple[int, float]], threshold: float) -> Optional[int]:
  return next((step for step, accuracy in curve if accuracy >= threshold), None)


def train_rate(records: list[dict]) -> Optional[float]:
  """Training steps/s over the run: the loop logs each window's rate at its log steps (not at
  the first step, which is mostly compilation); each window spans the steps since the previous
  log step, so the run's rate is their steps over their summed seconds."""
  logged = sorted({int(r["step"]) for r in records if r["split"] == "train"})
  rates = {int(r["step"]): float(r["value"]) for r in records
           if r["split"] == "train" and r["name"] == "steps_per_second"}
  steps = seconds = 0.0
  for previous, step in zip(logged, logged[1:]):
    if step in rates and rates[step] > 0:
      steps += step - previous
      seconds += (step - previous) / rates[step]
  return steps / seconds if seconds else None


def train_step_memory(tuned: api.TunedPrompt, batch_size: int) -> dict[str, Optional[int]]:
  """The compiled train step's bytes as `prompt-jax plan` counts them (`Planner`)."""
  planner = plan.Planner(tuned.programs, tuned.input_length, tuned.target_length)
  memory = planner.compile("train", batch_size).get("memory")
  if memory is None:  # the compiler ran out of memory: not on a CPU at this size
    return dict.fromkeys(("train_step_bytes", "train_step_argument_bytes",
                          "train_step_output_bytes", "train_step_aliased_bytes",
                          "train_step_temporary_bytes"))
  return {"train_step_bytes": memory["total"], "train_step_argument_bytes": memory["arguments"],
          "train_step_output_bytes": memory["outputs"],
          "train_step_aliased_bytes": memory["aliased"],
          "train_step_temporary_bytes": memory["temporaries"]}


def parse_learning_rates(text: str) -> dict[str, float]:
  """'prefix=3e-3,dpt=0.1' -> {'prefix': 0.003, 'dpt': 0.1} (methods of api.METHODS)."""
  rates = {}
  for item in (i.strip() for i in text.split(",") if i.strip()):
    method, _, value = item.partition("=")
    if method not in api.METHODS:
      raise SystemExit(f"--learning_rate: unknown method {method!r} in {item!r}; known: "
                       f"{', '.join(api.METHODS)}")
    try:
      rates[method] = float(value)
    except ValueError:
      raise SystemExit(f"--learning_rate: {item!r} is not METHOD=RATE") from None
    if not rates[method] > 0:
      raise SystemExit(f"--learning_rate: {item!r} must be > 0")
  return rates


def attempt_optimizer():
  """ATTEMPT's paper optimizer, as `gin_configs/prompts/attempt.gin` binds it."""
  return optimizers.adamw(learning_rate=0.3, weight_decay=0.0)


class Runner:
  """Tunes one (method, task, seed) after another and keeps what the others need: plain prompts
  (ATTEMPT's sources, the speed reference) and one train-step memory figure per method."""

  def __init__(self, args, input_length: int, target_length: int, workdir: str):
    self.args = args
    self.lengths = (input_length, target_length)
    self.workdir = workdir
    self.frozen = api.load_frozen(FROZEN)
    self.plain_prompts: dict[tuple[str, int], np.ndarray] = {}
    self.memory: dict[str, dict] = {}
    self.rows: list[dict] = []
    self.curves: dict[tuple[str, str, int], list[tuple[int, float]]] = {}

  def run(self, method: str, task: str, seed: int, role: str = "compared") -> dict:
    args = self.args
    done = len(self.rows) + 1
    what = f"[{done}] {method} on {task}, seed {seed}" + (
        " (ATTEMPT source)" if role != "compared" else "")
    print(f"\n=== {what}", flush=True)
    sources_note = ""
    if method == ATTEMPT:
      others = [t for t in TASKS if t != task]
      sources = [self.plain_prompts[(t, seed)] for t in others]
      hook = attempt.AttemptPrompt(source_prompts=sources)
      tune_method, optimizer = hook, attempt_optimizer()
      sources_note = " + ".join(f"plain {t} seed {seed}" for t in others) + " (this run)"
    elif method in VARIANTS:
      make_hook, make_optimizer, _ = VARIANTS[method]
      tune_method, optimizer = make_hook(args.prompt_length), make_optimizer()
    else:
      tune_method, optimizer = method, None
    learning_rate = args.learning_rates.get(method)
    model_dir = os.path.join(self.workdir, f"{method}_{task}_seed{seed}")
    start = time.perf_counter()
    tuned = self.frozen.tune(
        task, method=tune_method, optimizer=optimizer, prompt_length=args.prompt_length,
        steps=args.steps, eval_every=args.eval_every, seed=seed, model_dir=model_dir,
        batch_size=args.batch_size, input_length=self.lengths[0],
        target_length=self.lengths[1], learning_rate=learning_rate)
    seconds = time.perf_counter() - start
    if method == "plain":
      self.plain_prompts[(task, seed)] = np.asarray(tuned.prompt_array())
    if method not in self.memory:
      self.memory[method] = train_step_memory(tuned, args.batch_size)
    records = metric_writer.read_metrics(tuned.model_dir)
    curve = eval_curve(records)
    self.curves[(method, task, seed)] = curve
    rate = train_rate(records)
    row = {"method": method, "task": task, "seed": seed, "role": role,
           "prompt_length": args.prompt_length, "steps": int(tuned.summary.get("step", 0)),
           "trainable_params": tuned.programs.param_counts()["trainable"],
           "steps_to_95": steps_to(curve, THRESHOLD),
           "final_validation_accuracy": tuned.summary["eval_trained"]["accuracy"],
           "untrained_validation_accuracy": tuned.summary.get("eval_untrained", {}).get(
               "accuracy"),
           "steps_per_second": rate, "steps_per_second_vs_plain": None,
           **self.memory[method], "run_seconds": round(seconds, 1),
           "attempt_sources": sources_note}
    plain = next((r for r in self.rows if r["method"] == "plain" and r["task"] == task
                  and r["seed"] == seed), row if method == "plain" else None)
    if plain is not None and rate and plain["steps_per_second"]:
      row["steps_per_second_vs_plain"] = rate / plain["steps_per_second"]
    self.rows.append(row)
    reached = row["steps_to_95"]
    print(f"=== {what}: {row['trainable_params']:,} trainable, validation accuracy "
          f"{row['untrained_validation_accuracy']} -> {row['final_validation_accuracy']:.2f}, "
          f">= {THRESHOLD:g}% at step {'never' if reached is None else reached}, "
          f"{_fmt(rate, '.1f')} steps/s ({_fmt(row['steps_per_second_vs_plain'], '.2f')} x "
          f"plain), train step {_mib(row['train_step_bytes'])}, {seconds:.0f} s", flush=True)
    return row


# ---------------------------------------------------------------------------------- the table


def _fmt(value, spec: str, empty: str = "-") -> str:
  return empty if value is None else format(value, spec)


def _mib(n: Optional[int]) -> str:
  return "-" if n is None else f"{n / 2 ** 20:.2f} MiB"


def _mean(values) -> Optional[float]:
  values = [v for v in values if v is not None]
  return float(np.mean(values)) if values else None


def _steps_cell(runs: list[dict]) -> str:
  reached = [r["steps_to_95"] for r in runs if r["steps_to_95"] is not None]
  if not reached:
    return "never"
  text = f"{np.mean(reached):.0f}"
  return text if len(reached) == len(runs) else f"{text} ({len(reached)}/{len(runs)} runs)"


def table(rows: list[dict], methods: list[str], tasks: list[str]) -> list[list[str]]:
  """One row per (method, task) and one per method over all tasks: means over seeds."""
  body = []
  for method in methods:
    mine = [r for r in rows if r["method"] == method and r["role"] == "compared"]
    groups = [(task, [r for r in mine if r["task"] == task]) for task in tasks]
    if len(tasks) > 1:
      groups.append(("all tasks", mine))
    for label, runs in groups:
      if not runs:
        continue
      params = sorted({r["trainable_params"] for r in runs})
      body.append([
          method, label, "/".join(f"{p:,}" for p in params),
          _fmt(_mean(r["final_validation_accuracy"] for r in runs), ".1f"),
          _steps_cell(runs),
          _fmt(_mean(r["steps_per_second_vs_plain"] for r in runs), ".2f"),
          _mib(runs[0]["train_step_bytes"])])
  return body


HEADER = ["method", "task", "trainable params", "final val. acc. (%)",
          f"steps to >= {THRESHOLD:g}%", "steps/s vs plain", "train-step memory"]


def text_table(body: list[list[str]]) -> str:
  widths = [max(len(str(row[i])) for row in [HEADER, *body]) for i in range(len(HEADER))]
  line = lambda row: "  ".join(str(c).rjust(w) if i > 1 else str(c).ljust(w)
                               for i, (c, w) in enumerate(zip(row, widths)))
  return "\n".join([line(HEADER), line(["-" * w for w in widths]), *map(line, body)])


def markdown_table(body: list[list[str]]) -> str:
  lines = ["| " + " | ".join(HEADER) + " |",
           "|" + "|".join(["---", "---"] + ["---:"] * (len(HEADER) - 2)) + "|"]
  for row in body:
    cells = [f"**{c}**" if row[1] == "all tasks" and i < 2 else c for i, c in enumerate(row)]
    lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines)


def method_settings(methods: list[str], learning_rates: dict[str, float]) -> list[str]:
  lines = []
  for method in methods:
    if method == ATTEMPT:
      optimizer = short_optimizer(optimizers.description(attempt_optimizer()))
      lines.append(f"- `{method}`: {optimizer}; sources: the plain prompts of the other two "
                   "tasks, trained in this same run with the same seed")
    elif method in VARIANTS:
      _, make_optimizer, description = VARIANTS[method]
      optimizer = short_optimizer(optimizers.description(make_optimizer()))
      lines.append(f"- `{method}`: {description}; {optimizer}")
    else:
      optimizer = short_optimizer(optimizers.description(api.METHODS[method].optimizer()))
      if method in learning_rates:
        optimizer = (f"{optimizer}, with lr {learning_rates[method]:g} here "
                     "(`--learning_rate`)")
      lines.append(f"- `{method}`: {optimizer}")
  return lines


def write_markdown(path: str, body, args, machine: str, features: str, load_label: str,
                   lengths: tuple[int, int], methods: list[str], tasks: list[str],
                   extra_sources: int, total_minutes: float) -> None:
  settings = (
      f"frozen model `{FROZEN}` (the tiny demo T5); tasks {', '.join(f'`{t}`' for t in tasks)}; "
      f"prompt length {args.prompt_length} encoder tokens for every method; {args.steps} steps; "
      f"batch {args.batch_size}; inputs {lengths[0]} / targets {lengths[1]} tokens; validation "
      f"accuracy (exact match, 400 sentences) every {args.eval_every} steps and at the end; "
      f"seeds {', '.join(map(str, args.seeds))}; each method with its paper's optimizer "
      f"(`prompt_jax.api.METHODS`), trained through `api.FrozenT5.tune`.")
  text = [
      "# Prompt methods compared on the demo tasks",
      "",
      "`" + " ".join(["python", "benchmarks/compare_methods.py", *args.argv]) + "`",
      "",
      f"Machine: {machine}.  ",
      f"CPU features: {features}.  ",
      f"Load: {load_label}. Wall time {total_minutes:.1f} min.",
      "",
      f"Settings: {settings}",
      "",
      *method_settings(methods, args.learning_rates),
      "",
      f"Means over seeds; **all tasks** is the mean over every task and seed. "
      f"\"steps to >= {THRESHOLD:g}%\" is the first evaluated step at or above it (evaluations "
      f"every {args.eval_every} steps, so it is a multiple of {args.eval_every}; 0: the untrained "
      f"prompt already was), averaged over the runs that reached it (\"k/n runs\" when not all "
      "did). Steps/s: the training loop's own rate (evaluation and the first step's compilation "
      "excluded) divided by plain prompt tuning's on the same task and seed. Train-step memory: "
      "the compiled train step's arguments + outputs - aliased (the donated state) + "
      "temporaries from XLA's CPU memory analysis, as `prompt-jax plan` counts it; the frozen "
      "model's weights (about 1 MiB) are part of every method's arguments.",
      "",
      markdown_table(body),
      "",
      "**Equal prompt length, not equal parameters.** Every method puts "
      f"{args.prompt_length} prompt tokens in front of the encoder input, but what it trains to "
      "produce them differs, and so does the trainable parameter count (the table's third "
      "column): residual and p_tuning train an MLP over the prompt, superpos coefficients over "
      "128 embeddings, dpt a low-rank factorisation, DePT a prompt of 60% of the tokens plus a "
      "low-rank update of the input embeddings, SMoP 4 prompts of which each example uses one, "
      "ATTEMPT a target prompt plus an attention module over frozen source prompts. Prefix "
      "tuning adds no encoder tokens: its length is the number of key/value positions in every "
      "attention layer (encoder self-, decoder self- and cross-attention), produced by its "
      "paper's 512-wide MLP, so it trains by far the most parameters here (the MLP folds away "
      "after training: the folded prefixes are p x layers x 2 x heads x kv per attention kind).",
      "",
      "**ATTEMPT's sources** are the plain prompts of the other two demo tasks trained in this "
      "same run (same seed, same steps), not prompts from large source tasks as in the paper"
      + (f"; {extra_sources} plain run(s) were trained only as sources (in the CSV with role "
         "`attempt_source`)" if extra_sources else "") + ".",
      "",
      "**What this can and cannot tell.** The demo tasks are easy: each label is a word of "
      "the sentence (adjective) or follows from a fixed word list (sentiment, topic), and the "
      "frozen model was pretrained on prefixed versions of these exact tasks "
      "(`demo_pretrain_mixture`: \"sentiment: ...\", \"topic: ...\", \"adjective: ...\"), so "
      "a prompt mostly has to stand in for a prefix the model already knows. Several methods "
      "reach high accuracy within a few evaluations (at a coarse `--eval_every` they reach it "
      "at the first one and the steps column cannot separate them), and differences of a "
      "point or two, or of one evaluation interval, are within seed noise here. The table "
      "does show that every method trains through the one loop, how many parameters each "
      "trains for the same prompt length, and whether a method gets stuck or is slow to leave "
      "its initialisation on a small model. It cannot rank the methods for a real model and "
      "real tasks (the papers' claims are about T5-base and larger on GLUE/SuperGLUE-style "
      "tasks), and the speed column says little about large models: at this size (about "
      f"0.25 M frozen parameters, batch {args.batch_size}) a train step on 2 CPU cores is "
      "dominated by per-step overhead (dispatch, host-side batching), not by the prompt "
      "method's arithmetic; and the speeds were measured on a shared machine unless the load "
      "line above says \"quiet machine\"."]
  with open(path, "w") as f:
    f.write("\n".join(text) + "\n")


def write_curves(path: str, curves) -> None:
  """Every run's validation curve, one row per (method, task, seed, step): what `plot` draws,
  so `--plot_only` can redraw it without training."""
  with open(path, "w", newline="") as f:
    writer = csv.writer(f)
    writer.writerow(["method", "task", "seed", "step", "validation_accuracy"])
    for (method, task, seed), curve in curves.items():
      for step, accuracy in curve:
        writer.writerow([method, task, seed, step, accuracy])


def read_curves(path: str):
  """`write_curves`' file -> {(method, task, seed): [(step, accuracy)]}."""
  curves: dict = {}
  with open(path, newline="") as f:
    for row in csv.DictReader(f):
      key = (row["method"], row["task"], int(row["seed"]))
      curves.setdefault(key, []).append((int(row["step"]), float(row["validation_accuracy"])))
  return curves


def plot(curves, methods: list[str], tasks: list[str], path: str, args) -> None:
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, axes = plt.subplots(1, len(tasks), figsize=(max(7.0, 5.2 * len(tasks)), 4.6),
                           sharey=True, squeeze=False)
  colors = plt.get_cmap("tab10")
  styles = ("-", "--", ":")  # ten colours, then the next line style: no two methods look alike
  for ax, task in zip(axes[0], tasks):
    for i, method in enumerate(methods):
      runs = [curves[(method, task, seed)] for seed in args.seeds
              if (method, task, seed) in curves]
      if not runs:
        continue
      steps = sorted(set.intersection(*(set(s for s, _ in run) for run in runs)))
      mean = [np.mean([dict(run)[s] for run in runs]) for s in steps]
      ax.plot(steps, mean, marker="o", linestyle=styles[i // 10 % len(styles)],
              color=colors(i % 10), markersize=3, linewidth=1.2, label=method)
    ax.axhline(THRESHOLD, color="black", linewidth=0.6, linestyle=":")
    ax.set_title(task)
    ax.set_xlabel("step")
    ax.grid(alpha=0.3)
  axes[0][0].set_ylabel(f"validation accuracy (%), mean over {len(args.seeds)} seed(s)")
  axes[0][-1].legend(fontsize=8, loc="lower right")
  fig.suptitle(f"prompt methods on the tiny demo T5\n{args.prompt_length} prompt tokens, "
               f"{args.steps} steps, batch {args.batch_size}", fontsize=11)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


# ------------------------------------------------------------------------------------ main


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--methods", default=",".join(METHODS),
                      help=f"comma-separated, of {', '.join(METHODS)}")
  parser.add_argument("--tasks", default=",".join(TASKS), help="comma-separated demo tasks")
  parser.add_argument("--seeds", default="0,1", help="comma-separated integers")
  parser.add_argument("--steps", type=int, default=150)
  parser.add_argument("--eval_every", type=int, default=10)
  parser.add_argument("--prompt_length", type=int, default=10)
  parser.add_argument("--batch_size", type=int, default=32)
  parser.add_argument("--output", default=os.path.join(RESULTS, "compare_methods"),
                      help="path prefix of the .csv, _summary.md and .png")
  parser.add_argument("--learning_rate", default="prefix=3e-3",
                      help="METHOD=RATE,... overriding a method's paper learning rate")
  parser.add_argument("--plot_only", action="store_true",
                      help="redraw <output>.png from <output>_curves.csv (no training)")
  parser.add_argument("--keep", action="store_true",
                      help="keep the run directories (printed at the end)")
  args = parser.parse_args(argv)
  args.argv = list(sys.argv[1:] if argv is None else argv)
  methods = parse_list(args.methods, METHODS, "methods")
  args.learning_rates = parse_learning_rates(args.learning_rate)
  tasks = parse_list(args.tasks, TASKS, "tasks")
  try:
    args.seeds = [int(s) for s in parse_list(args.seeds, None, "seeds")]
  except ValueError:
    raise SystemExit(f"--seeds: integers separated by commas, got {args.seeds!r}") from None
  if args.steps < 2:
    raise SystemExit("--steps must be >= 2 (the loop logs no steps/s for its first step)")
  if args.eval_every < 1:
    raise SystemExit("--eval_every must be >= 1")
  if args.plot_only:
    curves = read_curves(args.output + "_curves.csv")
    present = {key[0] for key in curves}
    plot(curves, [m for m in METHODS if m in present and m in methods],
         [t for t in tasks if any(key[1] == t for key in curves)], args.output + ".png", args)
    print(f"wrote {args.output}.png")
    return 0
  if "plain" not in methods:
    methods.insert(0, "plain")
    print("plain prompt tuning added: it is the speed reference", flush=True)
  absl_logging.set_verbosity(absl_logging.ERROR)  # seqio's warnings about lengths and caching

  start_load = bench_common.start()  # prints the machine first
  machine = bench_common.describe_machine()
  features = bench_common.cpu_features()
  started = time.perf_counter()
  lengths = tuple(max(api.longest_example(t)[i] for t in TASKS) for i in (0, 1))
  print(f"methods {', '.join(methods)}; tasks {', '.join(tasks)}; seeds {args.seeds}; "
        f"prompt length {args.prompt_length}; {args.steps} steps, evaluation every "
        f"{args.eval_every}; batch {args.batch_size}; inputs/targets {lengths[0]}/{lengths[1]} "
        "tokens", flush=True)
  # ATTEMPT on a task needs plain prompts of the other two, whichever tasks are compared.
  source_tasks = [t for t in TASKS if t not in tasks] if ATTEMPT in methods else []
  if source_tasks:
    print(f"ATTEMPT's sources: plain prompts trained in this run, also on "
          f"{', '.join(source_tasks)} (not in the table)", flush=True)
  others = [m for m in methods if m != "plain"]
  per_seed = len(tasks) * len(methods) + len(source_tasks)
  print(f"{per_seed * len(args.seeds)} runs", flush=True)

  workdir = tempfile.mkdtemp(prefix="compare_methods_")
  runner = Runner(args, lengths[0], lengths[1], workdir)
  try:
    for seed in args.seeds:
      for task in tasks:
        runner.run("plain", task, seed)
      for task in source_tasks:
        runner.run("plain", task, seed, role="attempt_source")
      for task in tasks:
        for method in others:
          runner.run(method, task, seed)
  finally:
    if args.keep:
      print(f"run directories kept in {workdir}")
    else:
      shutil.rmtree(workdir, ignore_errors=True)
  quiet = bench_common.finish(start_load)
  others_cores = bench_common.other_cores()
  load_label = ("quiet machine" if quiet else "UNDER LOAD (other processes used "
                f"{_fmt(others_cores, '.2f', '?')} cores on average): speed figures are not "
                "README figures")
  minutes = (time.perf_counter() - started) / 60

  body = table(runner.rows, methods, tasks)
  print(f"\n{machine}\nCPU vector/matrix features: {features}\n{load_label}\n")
  print(text_table(body))
  print(f"\nEqual prompt length ({args.prompt_length} encoder tokens), not equal parameters: "
        "the trainable counts differ by method." + (
            " ATTEMPT's sources: plain prompts of the other two tasks trained in this run."
            if ATTEMPT in methods else ""))

  directory = os.path.dirname(os.path.abspath(args.output))
  os.makedirs(directory, exist_ok=True)
  with open(args.output + ".csv", "w", newline="") as f:
    writer = csv.DictWriter(f, fieldnames=CSV_FIELDS)
    writer.writeheader()
    for row in runner.rows:
      writer.writerow({k: "" if row[k] is None else row[k] for k in CSV_FIELDS})
  write_markdown(args.output + "_summary.md", body, args, machine, features, load_label,
                 lengths, methods, tasks, len(source_tasks) * len(args.seeds), minutes)
  write_curves(args.output + "_curves.csv", runner.curves)
  plot(runner.curves, methods, tasks, args.output + ".png", args)
  print(f"wrote {args.output}.csv, {args.output}_curves.csv, {args.output}_summary.md, "
        f"{args.output}.png ({minutes:.1f} min)")
  return 0


if __name__ == "__main__":
  sys.exit(main())
