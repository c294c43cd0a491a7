"""SPT layer selection on a tiny frozen T5: learned gates per layer, and SPT vs plain vs deep.

    python benchmarks/spt_layers.py   # pretraining once ~20 min, then ~4 min (2 busy cores)

The shipped demo model has only 2 encoder layers, so this first pretrains (once, cached in
--cache_dir) a tiny T5 1.1 with 6 encoder layers on the prefixed synthetic tasks, exactly as
the demo model is made (`prompt_jax.training.pretrain`). Then, on `demo_sentiment` (no task prefix;
the prompt has to stand in for it), with the same prompt length and step budget:

  plain      input prompt only (Lester et al.)
  deep-all   input prompt + a free prompt before every encoder layer 1..5 (P-tuning v2 style)
  spt-darts  SPT-DARTS search (gates on a held-out 20% of the training split), keep the top K,
             re-train them (`spt_training.train_spt`)

Writes to --out: spt_gates.png (learned gate a_l per layer), spt_layers.json and spt_layers.md
(validation accuracy, trainable-parameter counts, selected layers, wall time).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time

import jax

from prompt_jax import params as params_lib
from prompt_jax.data import pipeline, synthetic  # noqa: F401  (registers the demo tasks)
from prompt_jax.models import t5
from prompt_jax.models.encoder_decoder import EncoderDecoderModel
from prompt_jax.prompts import deep, initializers, spt
from prompt_jax.prompts.base import InputPrompt
from prompt_jax.prompts.plain import Prompt
from prompt_jax.training import pretrain, spt_training, trainer

LENGTHS = {"inputs": 64, "targets": 16}
ENCODER_LAYERS = 6


def frozen_config():
  return t5.preset("tiny", num_encoder_layers=ENCODER_LAYERS)


def pretrained_model(cache_dir: str, steps: int) -> str:
  path = os.path.join(cache_dir, f"tiny_enc{ENCODER_LAYERS}_{steps}.npz")
  if not os.path.exists(path):
    os.makedirs(cache_dir, exist_ok=True)
    print(f"pretraining the frozen model ({steps} steps) -> {path}", flush=True)
    data = lambda split, batch, shuffle: pipeline.DatasetConfig(
        "demo_pretrain_mixture", LENGTHS, split=split, batch_size=batch, shuffle=shuffle,
        module="prompt_jax.data.synthetic")
    pretrain.pretrain(config=frozen_config(), dataset_cfg=data("train", 64, True),
                      eval_dataset_cfg=data("validation", 256, False), train_steps=steps,
                      learning_rate=3e-3, output_path=path, log_every_steps=200)
  return path


def data(split: str, batch_size: int) -> pipeline.DatasetConfig:
  return pipeline.DatasetConfig("demo_sentiment", LENGTHS, split=split, batch_size=batch_size,
                                shuffle=split == "train", module="prompt_jax.data.synthetic")


def model_with(hook) -> EncoderDecoderModel:
  return EncoderDecoderModel(t5.Transformer(frozen_config(), hook))


def trainable_count(model: EncoderDecoderModel, batch_size: int) -> int:
  boxed = model.init_abstract(model.dummy_batch(batch_size, LENGTHS["inputs"],
                                                LENGTHS["targets"]))
  return params_lib.count(params_lib.unbox(params_lib.split_params(boxed)[0]))


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out", default="benchmarks/results")
  parser.add_argument("--cache_dir", default="/tmp/prompt_jax_bench")
  parser.add_argument("--pretrain_steps", type=int, default=1000)
  parser.add_argument("--steps", type=int, default=100, help="training steps per method")
  parser.add_argument("--search_steps", type=int, default=100)
  parser.add_argument("--k", type=int, default=2, help="SPT layer budget K")
  parser.add_argument("--prompt_length", type=int, default=4)
  parser.add_argument("--bottleneck", type=int, default=32)
  parser.add_argument("--batch_size", type=int, default=16)
  parser.add_argument("--seed", type=int, default=0)
  args = parser.parse_args(argv)
  os.makedirs(args.out, exist_ok=True)
  checkpoint = pretrained_model(args.cache_dir, args.pretrain_steps)
  runs_dir = os.path.join(args.cache_dir, "runs")
  shutil.rmtree(runs_dir, ignore_errors=True)
  train_cfg, eval_cfg = data("train", args.batch_size), data("validation", 100)
  common = dict(train_steps=args.steps, train_dataset_cfg=train_cfg, eval_dataset_cfg=eval_cfg,
                initial_checkpoint_path=checkpoint, checkpoint_every_steps=args.steps,
                eval_at_start=False, log_every_steps=max(args.steps // 5, 1), seed=args.seed)
  input_prompt = lambda: Prompt(args.prompt_length, initializers.uniform())
  results = {}

  def record(name, model, summary, seconds, **extra):
    results[name] = dict(accuracy=summary["eval_trained"]["accuracy"],
                         trainable_parameters=trainable_count(model, args.batch_size),
                         final_loss=summary["train"].get("loss"), seconds=round(seconds, 1),
                         **extra)
    print(f"== {name}: {results[name]}", flush=True)

  start = time.perf_counter()
  model = model_with(InputPrompt(input_prompt()))
  summary = trainer.train(model=model, model_dir=os.path.join(runs_dir, "plain"), **common)
  record("plain", model, summary, time.perf_counter() - start, layers=[0])

  start = time.perf_counter()
  all_layers = tuple(range(1, ENCODER_LAYERS))
  model = model_with(deep.DeepPrompt(input_prompt(), layers=all_layers))
  summary = trainer.train(model=model, model_dir=os.path.join(runs_dir, "deep"), **common)
  record("deep-all", model, summary, time.perf_counter() - start, layers=[0, *all_layers])

  start = time.perf_counter()
  model = model_with(spt.SelectivePrompt(input_prompt(), bottleneck=args.bottleneck))
  summary = spt_training.train_spt(
      model=model, model_dir=os.path.join(runs_dir, "spt"), search_steps=args.search_steps,
      num_layers_to_keep=args.k, search_mode="darts", held_out_fraction=0.2, **common)
  selected = summary["selected_layers"]
  record("spt-darts", spt_training.retrain_model(model, selected), summary,
         time.perf_counter() - start, layers=[0, *selected],
         search_trainable_parameters=trainable_count(model, args.batch_size),
         gates=summary["gates"])

  gates = {int(k): v for k, v in summary["gates"].items()}
  plot_gates(gates, selected, os.path.join(args.out, "spt_gates.png"))
  report = dict(config=vars(args), frozen_model=f"tiny T5 1.1, {ENCODER_LAYERS} encoder layers",
                task="demo_sentiment (validation, 400 examples)", backend=jax.default_backend(),
                results=results)
  with open(os.path.join(args.out, "spt_layers.json"), "w") as f:
    json.dump(report, f, indent=2, default=float)
  with open(os.path.join(args.out, "spt_layers.md"), "w") as f:
    f.write(markdown(report))
  print(markdown(report))
  return 0


def plot_gates(gates: dict[int, float], selected, path: str) -> None:
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  layers = sorted(gates)
  fig, ax = plt.subplots(figsize=(6, 3.2))
  colors = ["tab:orange" if layer in selected else "tab:blue" for layer in layers]
  ax.bar([str(layer) for layer in layers], [gates[layer] for layer in layers], color=colors)
  ax.axhline(0.5, color="gray", lw=0.8, ls="--", label="initial a_l = 0.5")
  ax.set_xlabel("encoder layer l")
  ax.set_ylabel("gate a_l = sigmoid(g_l)")
  ax.set_ylim(0, 1)
  ax.set_title(f"SPT-DARTS learned gates (kept, orange: {list(selected)})")
  ax.legend(loc="upper right", fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def markdown(report: dict) -> str:
  lines = [f"Frozen model: {report['frozen_model']}; task: {report['task']}; "
           f"settings: {json.dumps({k: v for k, v in report['config'].items() if k != 'out'})}",
           "", "| method | prompt layers | trainable params | val. accuracy | final loss | "
           "wall s |", "|---|---|---|---|---|---|"]
  for name, r in report["results"].items():
    params = f"{r['trainable_parameters']:,}"
    if "search_trainable_parameters" in r:
      params += f" (search: {r['search_trainable_parameters']:,})"
    lines.append(f"| {name} | {r['layers']} | {params} | {r['accuracy']:.2f} | "
                 f"{r['final_loss']:.4f} | {r['seconds']} |")
  gates = report["results"].get("spt-darts", {}).get("gates")
  if gates:
    lines += ["", "SPT-DARTS gates a_l: " + ", ".join(f"layer {k}: {v:.3f}"
                                                    for k, v in gates.items())]
  return "\n".join(lines) + "\n"


if __name__ == "__main__":
  sys.exit(main())
