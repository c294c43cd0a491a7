"""Loss curves of plain prompt tuning, Residual and SuperPos-Prompt, dropout on and off.

Same frozen model for every run (the shipped tiny T5, `builtin:demo_t5_tiny.npz`), same data
order, same prompt length (10); each method with its reference optimizer:

  plain     Lester et al.: Adafactor lr 0.3, sampled-vocabulary init
  residual  bottleneck 128, AdamW lr 0.3, weight decay 1e-5 on all its parameters
  superpos  m = 128, AdamW lr 0.01, weight decay 1e-5 on the coefficients only

Task `demo_sentiment_flipped` (registered here): the synthetic review sentences with the
*opposite* sentiment word as target, so the prompt has to make the frozen model (pretrained on
"sentiment: ..." -> the true sentiment) say the other label. The plain `demo_sentiment` task is
solved by every method within ~20 steps and separates nothing.

    nice -n 10 python benchmarks/methods_convergence.py            # ~3-6 min on 2 CPU cores

Writes benchmarks/results/methods_convergence.{csv,png} (per-step training loss, periodic
validation loss) and methods_convergence_summary.csv (final numbers).
"""

from __future__ import annotations

import argparse
import csv
import os
import sys
import time

import jax
import numpy as np
import seqio
import tensorflow as tf

from prompt_jax.data import metrics, pipeline, synthetic
from prompt_jax.models import t5
from prompt_jax.models.encoder_decoder import EncoderDecoderModel
from prompt_jax.partitioning import Partitioner
from prompt_jax.programs import PromptPrograms
from prompt_jax.prompts import initializers, superpos
from prompt_jax.prompts.base import InputPrompt
from prompt_jax.prompts.plain import Prompt
from prompt_jax.prompts.residual import ResidualPrompt
from prompt_jax.prompts.superpos import SuperPosPrompt
from prompt_jax.serving import evaluators
from prompt_jax.training import optimizers, trainer

TASK = "demo_sentiment_flipped"
FROZEN = "builtin:demo_t5_tiny.npz"
LENGTHS = {"inputs": 64, "targets": 16}
# Ids 0-2 are special and 3-258 the bytes of the tiny model's vocabulary; 259-383 are unused.
POPULATION = 259
RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def register_flipped_task() -> None:
  if TASK in seqio.TaskRegistry.names():
    return
  opposite = {"positive": "negative", "negative": "positive"}

  def dataset_fn(split, shuffle_files, seed=None):
    del shuffle_files, seed
    examples = synthetic.make_examples(split)
    return tf.data.Dataset.from_tensor_slices({
        "inputs": [ex["sentence"] for ex in examples],
        "targets": [opposite[ex["sentiment"]] for ex in examples]})

  seqio.TaskRegistry.add(
      TASK, source=seqio.FunctionDataSource(dataset_fn, splits=sorted(synthetic.SPLIT_SIZES)),
      preprocessors=[seqio.preprocessors.tokenize, seqio.preprocessors.append_eos],
      output_features=synthetic.OUTPUT_FEATURES, metric_fns=[metrics.accuracy])


def methods(prompt_length: int):
  sampled = initializers.sampled_vocabulary(POPULATION)
  return {
      "plain": (Prompt(prompt_length, sampled), trainer.adafactor(learning_rate=0.3)),
      "residual": (ResidualPrompt(prompt_length, 128, sampled), optimizers.adamw(0.3, 1e-5)),
      "superpos": (SuperPosPrompt(prompt_length, 128, POPULATION),
                   optimizers.adamw(0.01, 1e-5,
                                    weight_decay_pattern=superpos.WEIGHT_DECAY_PATTERN)),
  }


def run(method: str, generator, optimizer, dropout_rate: float, args, validation_batches):
  model = EncoderDecoderModel(t5.Transformer(t5.preset("tiny", dropout_rate=dropout_rate),
                                             InputPrompt(generator)))
  pt = PromptPrograms.for_training(model, optimizer, Partitioner(), LENGTHS["inputs"],
                             LENGTHS["targets"], args.batch_size)
  frozen = pt.load_frozen_params(FROZEN)
  state = pt.init_state(frozen, jax.random.key(args.seed))
  batches = pipeline.iterate_batches(pipeline.DatasetConfig(
      TASK, LENGTHS, batch_size=args.batch_size, seed=args.seed))
  rng = jax.random.key(args.seed + 1)

  def validation_loss():
    losses = [float(pt.eval_step(state.prompt_params, frozen, b)["loss"])
              for b in validation_batches]
    return float(np.mean(losses))

  rows = [{"step": 0, "train_loss": "", "validation_loss": validation_loss()}]
  start = time.perf_counter()
  for step in range(1, args.steps + 1):
    state, step_metrics = pt.train_step(state, frozen, next(batches), rng)
    row = {"step": step, "train_loss": float(step_metrics["loss"]), "validation_loss": ""}
    if step % args.eval_every == 0 or step == args.steps:
      row["validation_loss"] = validation_loss()
    rows.append(row)
  seconds = time.perf_counter() - start
  scores = evaluators.TaskEvaluator(
      pipeline.DatasetConfig(TASK, LENGTHS, split="validation", batch_size=args.batch_size,
                             shuffle=False), max_decode_length=LENGTHS["targets"])(
      pt, state.prompt_params, frozen, args.steps)
  train = [r["train_loss"] for r in rows[1:]]
  threshold_step = next((r["step"] for r in rows[1:] if r["validation_loss"] != ""
                         and r["validation_loss"] < args.threshold), "")
  summary = {
      "method": method, "dropout_rate": dropout_rate,
      "trainable_params": pt.param_counts()["trainable"],
      "final_train_loss_last20": float(np.mean(train[-20:])),
      "final_validation_loss": rows[-1]["validation_loss"],
      "validation_accuracy": scores["accuracy"],
      f"first_eval_step_validation_loss_below_{args.threshold}": threshold_step,
      "loop_seconds_incl_compile_and_eval": round(seconds, 1)}
  print(", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                  for k, v in summary.items()), flush=True)
  return rows, summary


def moving_average(values, window):
  values = np.asarray(values, np.float64)
  if len(values) < window:
    return values
  kernel = np.ones(window) / window
  head = np.cumsum(values[:window - 1]) / np.arange(1, window)
  return np.concatenate([head, np.convolve(values, kernel, mode="valid")])


def plot(curves, path, args):
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  colors = {"plain": "tab:gray", "residual": "tab:blue", "superpos": "tab:red"}
  fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), sharey=True)
  for ax, rate in zip(axes, args.dropout_rates):
    for (method, dropout_rate), rows in curves.items():
      if dropout_rate != rate:
        continue
      steps = [r["step"] for r in rows[1:]]
      train = [r["train_loss"] for r in rows[1:]]
      ax.plot(steps, moving_average(train, 10), color=colors[method], alpha=0.9,
              label=f"{method} train (10-step mean)")
      val = [(r["step"], r["validation_loss"]) for r in rows if r["validation_loss"] != ""]
      ax.plot(*zip(*val), "o--", color=colors[method], markersize=3, linewidth=0.8,
              label=f"{method} validation")
    ax.set_yscale("log")
    ax.set_title(f"frozen-model dropout {rate}")
    ax.set_xlabel("step")
    ax.grid(alpha=0.3)
  axes[0].set_ylabel("loss (cross-entropy + z-loss, per target token)")
  axes[-1].legend(fontsize=8)
  fig.suptitle(f"{TASK} on the tiny demo T5: prompt length {args.prompt_length}, "
               f"batch {args.batch_size}, seed {args.seed}")
  fig.tight_layout()
  fig.savefig(path, dpi=120)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--steps", type=int, default=300)
  parser.add_argument("--batch_size", type=int, default=32)
  parser.add_argument("--prompt_length", type=int, default=10)
  parser.add_argument("--eval_every", type=int, default=25)
  parser.add_argument("--threshold", type=float, default=0.1)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--dropout_rates", type=float, nargs="+", default=[0.0, 0.1])
  parser.add_argument("--methods", nargs="+", default=["plain", "residual", "superpos"])
  parser.add_argument("--output_dir", default=RESULTS)
  args = parser.parse_args(argv)

  register_flipped_task()
  validation = pipeline.iterate_batches(pipeline.DatasetConfig(
      TASK, LENGTHS, split="validation", batch_size=args.batch_size, shuffle=False))
  validation_batches = [next(validation) for _ in range(
      synthetic.SPLIT_SIZES["validation"] // args.batch_size)]

  curves, summaries = {}, []
  for rate in args.dropout_rates:
    for method, (generator, optimizer) in methods(args.prompt_length).items():
      if method in args.methods:
        rows, summary = run(method, generator, optimizer, rate, args, validation_batches)
        curves[(method, rate)] = rows
        summaries.append(summary)

  os.makedirs(args.output_dir, exist_ok=True)
  base = os.path.join(args.output_dir, "methods_convergence")
  with open(base + ".csv", "w", newline="") as f:
    writer = csv.writer(f)
    writer.writerow(["method", "dropout_rate", "step", "train_loss", "validation_loss"])
    for (method, rate), rows in curves.items():
      for r in rows:
        writer.writerow([method, rate, r["step"], r["train_loss"], r["validation_loss"]])
  with open(base + "_summary.csv", "w", newline="") as f:
    writer = csv.DictWriter(f, fieldnames=list(summaries[0]))
    writer.writeheader()
    writer.writerows(summaries)
  plot(curves, base + ".png", args)
  print(f"wrote {base}.csv, {base}_summary.csv, {base}.png")
  return 0


if __name__ == "__main__":
  sys.exit(main())
