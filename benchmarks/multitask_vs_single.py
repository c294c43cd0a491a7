"""Multi-task prompt tuning vs one run per task: validation accuracy of every task.

The shipped tiny T5 (`builtin:demo_t5_tiny.npz`, pretrained on the *prefixed* synthetic tasks)
and three synthetic tasks on the same sentences without a task prefix -- sentiment (2 labels),
topic (4), adjective (24): only the prompt tells the model which label set to answer in.

  single   one Lester et al. prompt per task, `trainer.train`, batch B, S steps
  multi    one bank of three prompts, `multitask_training.train_multitask` on
           `demo_multitask_mixture` (equal rates), batch 3B, S steps: every task sees about as
           many examples as its single run

Same prompt length (10), initialiser (uniform +-0.5), Adafactor (lr 0.3, Lester et al.), seed.

    nice -n 10 python benchmarks/multitask_vs_single.py     # ~5-10 min on 2 CPU cores

Prints a table and writes benchmarks/results/multitask_vs_single.csv.
"""

from __future__ import annotations

import argparse
import csv
import os
import tempfile

from prompt_jax.data import mixtures, pipeline, synthetic
from prompt_jax.models import t5
from prompt_jax.models.encoder_decoder import EncoderDecoderModel
from prompt_jax.prompts import initializers
from prompt_jax.prompts.bank import PromptBank
from prompt_jax.prompts.base import InputPrompt
from prompt_jax.prompts.plain import Prompt
from prompt_jax.training import multitask_training, optimizers, trainer

CHECKPOINT = "builtin:demo_t5_tiny.npz"
LENGTHS = {"inputs": 64, "targets": 16}


def _cfg(name, split, batch_size):
  return pipeline.DatasetConfig(name, LENGTHS, split=split, batch_size=batch_size,
                                shuffle=split == "train")


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--steps", type=int, default=300)
  parser.add_argument("--batch_size", type=int, default=32, help="per task")
  parser.add_argument("--prompt_length", type=int, default=10)
  args = parser.parse_args()
  init = initializers.uniform(-0.5, 0.5)
  work = tempfile.mkdtemp(prefix="multitask_vs_single_")
  tasks = mixtures.task_names(_cfg(synthetic.MULTITASK_MIXTURE, "train", 1))
  common = dict(train_steps=args.steps, initial_checkpoint_path=CHECKPOINT,
                checkpoint_every_steps=args.steps, eval_at_start=False, log_every_steps=50)

  single = {}
  for task in tasks:
    model = EncoderDecoderModel(t5.Transformer(t5.preset("tiny"),
                                               InputPrompt(Prompt(args.prompt_length, init))))
    summary = trainer.train(model=model, model_dir=os.path.join(work, task),
                            train_dataset_cfg=_cfg(task, "train", args.batch_size),
                            eval_dataset_cfg=_cfg(task, "validation", 100),
                            optimizer=optimizers.adafactor(), **common)
    single[task] = summary["eval_trained"]["accuracy"]

  bank = PromptBank(num_prompts=len(tasks), length=args.prompt_length, init_fn=init)
  model = EncoderDecoderModel(t5.Transformer(t5.preset("tiny"), bank))
  summary = multitask_training.train_multitask(
      model=model, model_dir=os.path.join(work, "multi"),
      train_dataset_cfg=_cfg(synthetic.MULTITASK_MIXTURE, "train",
                             args.batch_size * len(tasks)),
      eval_dataset_cfg=_cfg(synthetic.MULTITASK_MIXTURE, "validation", 100), **common)
  multi = {task: summary["eval_trained"][f"{task}/accuracy"] for task in tasks}

  rows = [(task, single[task], multi[task], multi[task] - single[task]) for task in tasks]
  print(f"{'task':<16} {'single':>8} {'multi':>8} {'diff':>7}")
  for task, s, m, d in rows:
    print(f"{task:<16} {s:8.2f} {m:8.2f} {d:+7.2f}")
  print(f"mixture average (multi): {summary['eval_trained']['average']:.2f}; steps {args.steps},"
        f" batch {args.batch_size} per task")
  out = os.path.join(os.path.dirname(__file__), "results", "multitask_vs_single.csv")
  with open(out, "w", newline="") as f:
    writer = csv.writer(f)
    writer.writerow(["task", "single_accuracy", "multitask_accuracy", "difference"])
    writer.writerows(rows)
  print(f"wrote {out}")


if __name__ == "__main__":
  main()
