"""Train a small T5 from scratch (every parameter trainable) to serve as a frozen model.

No pretrained weights can be downloaded on every machine, so the demo ships a tiny model made
by this function; larger "mini" models for scale studies are made the same way.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Optional

import jax
import jax.numpy as jnp

from prompt_jax.data import pipeline
from prompt_jax.models import t5
from prompt_jax.models.encoder_decoder import EncoderDecoderModel
from prompt_jax.programs import PromptPrograms
from prompt_jax.storage import frozen_models
from prompt_jax.training import optimizers, regimes, trainer

log = logging.getLogger(__name__)

EVERY_PARAMETER = r".*"  # the trainable pattern of pretraining: nothing is frozen


def _eval_token_accuracy(model, params, dataset_cfg) -> float:
  batch = next(pipeline.iterate_batches(dataset_cfg))
  metrics = jax.jit(model.loss_fn)(params, {k: jnp.asarray(v) for k, v in batch.items()}, None)[1]
  return float(metrics["token_accuracy"])


OUTPUT_NAME = "model.npz"  # the trained model's file in MODEL_DIR


def default_checkpoint_dir(output_path: str) -> str:
  """Where `pretrain` keeps its resumable checkpoints when given only an output path: beside the
  .npz, `<stem>_checkpoints`."""
  return output_path[:-len(".npz")] + "_checkpoints"


def output_paths(model_dir: Optional[str], output_path: Optional[str],
                 checkpoint_dir: Optional[str], overwrite: bool) -> tuple[str, str]:
  """(the .npz to write, the checkpoint directory) of a pretraining run; ValueError in one line
  when neither MODEL_DIR nor OUTPUT_PATH is given, or when the .npz exists and `overwrite` is
  off (checked before any work)."""
  if not model_dir and not output_path:
    raise ValueError("pretrain needs MODEL_DIR (the model goes to MODEL_DIR/model.npz, the "
                     "checkpoints beside it) or OUTPUT_PATH; pass --gin.MODEL_DIR=\"'/tmp/mini'\"")
  output_path = output_path or os.path.join(model_dir, OUTPUT_NAME)
  if not output_path.endswith(".npz"):
    raise ValueError(f"pretrain output_path must end in .npz, got {output_path!r}")
  if os.path.exists(output_path) and not overwrite:
    raise ValueError(f"pretrain output {output_path} exists; pass "
                     "--gin.pretrain.pretrain.overwrite=True to replace it, or another "
                     "MODEL_DIR or OUTPUT_PATH")
  return output_path, checkpoint_dir or model_dir or default_checkpoint_dir(output_path)


def pretrain(*, config: t5.T5Config, dataset_cfg: pipeline.DatasetConfig, train_steps: int,
             model_dir: Optional[str] = None, output_path: Optional[str] = None,
             overwrite: bool = False, learning_rate: float = 1e-3, warmup_steps: int = 200,
             seed: int = 0, log_every_steps: int = 100,
             eval_dataset_cfg: Optional[pipeline.DatasetConfig] = None,
             lm_adaptation_dataset_cfg: Optional[pipeline.DatasetConfig] = None,
             lm_adaptation_steps: int = 0,
             lm_adaptation_eval_dataset_cfg: Optional[pipeline.DatasetConfig] = None,
             checkpoint_every_steps: int = 500,
             checkpoint_dir: Optional[str] = None,
             checkpoint_keep: Optional[int] = 2, config_text: Optional[str] = None) -> dict:
  """Train all parameters with AdamW and a cosine schedule; save them to `output_path` (.npz;
  default `MODEL_DIR/model.npz`). An existing output is refused unless `overwrite`.

  Pretraining is a regime of the one training loop (`trainer.run`): plain `PromptTuning` whose
  trainable pattern matches every parameter (nothing is frozen). With `lm_adaptation_steps > 0`
  a second phase ("LM adaptation", Lester et al. Sec. 3.2) continues from the first phase's
  parameters on `lm_adaptation_dataset_cfg` (a prefix-LM task) with a fresh schedule (warmup: a
  tenth of its steps).

  Each phase is a run in its own directory under `checkpoint_dir` (default `model_dir`, else
  `default_checkpoint_dir(output_path)`): `pretrain/` and `lm_adaptation/`, checkpointed every
  `checkpoint_every_steps` steps of the phase and at its end (Orbax, the last `checkpoint_keep`
  kept, None for all; 0 saves only each phase's end). Rerunning the same command resumes from
  the latest one, repeating a straight run's data order and dropout keys.

  `config_text` (the CLI's gin config) is written to each phase directory's config.gin.

  Returns {'loss': final training loss, 'seconds': wall time of this invocation,
  'parameters': count} plus 'lm_adaptation_loss', 'eval_token_accuracy' and
  'lm_adaptation_eval_token_accuracy' when those phases and eval sets are given.
  """
  output_path, directory = output_paths(model_dir, output_path, checkpoint_dir, overwrite)
  if lm_adaptation_steps and lm_adaptation_dataset_cfg is None:
    raise ValueError(f"lm_adaptation_steps={lm_adaptation_steps} needs "
                     "lm_adaptation_dataset_cfg (a prefix-LM task)")
  if checkpoint_every_steps < 0:
    raise ValueError(f"pretrain checkpoint_every_steps must be >= 0, got "
                     f"{checkpoint_every_steps}")
  model = EncoderDecoderModel(t5.Transformer(config), z_loss=1e-4)
  # (directory, data, steps, warmup, seed)
  phases = [("pretrain", dataset_cfg, train_steps, warmup_steps, seed)]
  if lm_adaptation_steps:
    phases.append(("lm_adaptation", lm_adaptation_dataset_cfg, lm_adaptation_steps,
                   max(lm_adaptation_steps // 10, 1), seed + 7))
  settings = {"train_steps": train_steps, "lm_adaptation_steps": lm_adaptation_steps,
              "learning_rate": learning_rate, "seed": seed}

  start = time.perf_counter()
  result, params, parameters = {}, None, 0
  for name, data_cfg, steps, warmup, phase_seed in phases:
    lengths = data_cfg.task_feature_lengths
    programs = PromptPrograms(model, optimizer=optimizers.warmup_cosine_adamw(
        learning_rate, warmup, steps), trainable_pattern=EVERY_PARAMETER,
        batch_size=data_cfg.batch_size, input_length=lengths["inputs"],
        target_length=lengths["targets"])
    parameters = programs.param_counts()["trainable"]
    regime = regimes.PromptTuning(programs, data_cfg, initial_params=params,
                                  settings=dict(settings, phase=name))
    run = trainer.run(regime, model_dir=os.path.join(directory, name), train_steps=steps,
                      checkpoint_every_steps=checkpoint_every_steps or steps,
                      keep_checkpoints=checkpoint_keep, log_every_steps=log_every_steps,
                      seed=phase_seed, label=name.replace("_", " "), config_text=config_text)
    params = run.state.prompt_params
    result["loss" if name == "pretrain" else "lm_adaptation_loss"] = run.summary["train"]["loss"]
  frozen_models.save_params_npz(jax.device_get(params), output_path)
  result.update(seconds=time.perf_counter() - start, parameters=parameters)
  if eval_dataset_cfg is not None:
    result["eval_token_accuracy"] = _eval_token_accuracy(model, params, eval_dataset_cfg)
  if lm_adaptation_eval_dataset_cfg is not None:
    result["lm_adaptation_eval_token_accuracy"] = _eval_token_accuracy(
        model, params, lm_adaptation_eval_dataset_cfg)
  print(f"saved {result['parameters']:,} parameters to {output_path} "
        f"({result['seconds']:.0f} s): " + ", ".join(
            f"{k} {v:.4f}" for k, v in sorted(result.items()) if k not in ("parameters",)),
        flush=True)
  return result
