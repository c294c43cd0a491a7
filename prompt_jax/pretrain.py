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
import optax

from prompt_jax import checkpoints
from prompt_jax import params as params_lib
from prompt_jax.data import pipeline
from prompt_jax.models import t5
from prompt_jax.models.encoder_decoder import EncoderDecoderModel

log = logging.getLogger(__name__)


def _train_phase(model, params, dataset_cfg, steps, learning_rate, warmup_steps, seed,
                 log_every_steps, label):
  """`steps` AdamW steps (warmup + cosine decay) on `dataset_cfg`; returns (params, metrics)."""
  schedule = optax.warmup_cosine_decay_schedule(0.0, learning_rate,
                                                max(min(warmup_steps, steps - 1), 0), steps)
  optimizer = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(schedule, weight_decay=0.01))
  opt_state = optimizer.init(params)

  @jax.jit
  def step(params, opt_state, batch, rng):
    (loss, metrics), grads = jax.value_and_grad(model.loss_fn, has_aux=True)(params, batch, rng)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, metrics

  rng = jax.random.key(seed + 1)
  metrics = {}
  batches = pipeline.iterate_batches(dataset_cfg)
  for i in range(1, steps + 1):
    batch = {k: jnp.asarray(v) for k, v in next(batches).items()}
    params, opt_state, metrics = step(params, opt_state, batch, jax.random.fold_in(rng, i))
    if i % log_every_steps == 0 or i == steps:
      print(f"{label} step {i}/{steps}: loss {float(metrics['loss']):.4f} "
            f"token accuracy {float(metrics['token_accuracy']):.3f}", flush=True)
  return params, metrics


def _eval_token_accuracy(model, params, dataset_cfg) -> float:
  batch = next(pipeline.iterate_batches(dataset_cfg))
  metrics = jax.jit(model.loss_fn)(params, {k: jnp.asarray(v) for k, v in batch.items()}, None)[1]
  return float(metrics["token_accuracy"])


def pretrain(*, config: t5.T5Config, dataset_cfg: pipeline.DatasetConfig, train_steps: int,
             output_path: str, learning_rate: float = 1e-3, warmup_steps: int = 200,
             seed: int = 0, log_every_steps: int = 100,
             eval_dataset_cfg: Optional[pipeline.DatasetConfig] = None,
             lm_adaptation_dataset_cfg: Optional[pipeline.DatasetConfig] = None,
             lm_adaptation_steps: int = 0,
             lm_adaptation_eval_dataset_cfg: Optional[pipeline.DatasetConfig] = None) -> dict:
  """Train all parameters with AdamW and a cosine schedule; save them to `output_path` (.npz).

  With `lm_adaptation_steps > 0`, a second phase ("LM adaptation", Lester et al. Sec. 3.2)
  continues training on `lm_adaptation_dataset_cfg` (a prefix-LM task) with a fresh schedule
  (warmup: a tenth of its steps).

  Returns {'loss': final training loss, 'seconds': wall time, 'parameters': count} plus
  'eval_token_accuracy' (and 'lm_adaptation_eval_token_accuracy') when eval sets are given.
  """
  if not output_path.endswith(".npz"):
    raise ValueError(f"pretrain output_path must end in .npz, got {output_path!r}")
  if lm_adaptation_steps and lm_adaptation_dataset_cfg is None:
    raise ValueError(f"lm_adaptation_steps={lm_adaptation_steps} needs "
                     "lm_adaptation_dataset_cfg (a prefix-LM task)")
  model = EncoderDecoderModel(t5.Transformer(config), z_loss=1e-4)
  lengths = dataset_cfg.task_feature_lengths
  dummy = model.dummy_batch(dataset_cfg.batch_size, lengths["inputs"], lengths["targets"])
  params = params_lib.unbox(model.init(jax.random.key(seed), dummy))
  print(f"pretrain: {params_lib.count(params):,} parameters", flush=True)
  start = time.perf_counter()
  params, metrics = _train_phase(model, params, dataset_cfg, train_steps, learning_rate,
                                 warmup_steps, seed, log_every_steps, "pretrain")
  result = {"loss": float(metrics["loss"])}
  if lm_adaptation_steps:
    params, metrics = _train_phase(model, params, lm_adaptation_dataset_cfg, lm_adaptation_steps,
                                   learning_rate, max(lm_adaptation_steps // 10, 1), seed + 7,
                                   log_every_steps,
                                   "lm adaptation")
    result["lm_adaptation_loss"] = float(metrics["loss"])
  os.makedirs(os.path.dirname(os.path.abspath(output_path)), exist_ok=True)
  checkpoints.save_params_npz(jax.device_get(params), output_path)
  result.update(seconds=time.perf_counter() - start, parameters=params_lib.count(params))
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
