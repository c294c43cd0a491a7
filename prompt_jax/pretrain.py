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


def pretrain(*, config: t5.T5Config, dataset_cfg: pipeline.DatasetConfig, train_steps: int,
             output_path: str, learning_rate: float = 1e-3, warmup_steps: int = 200,
             seed: int = 0, log_every_steps: int = 100,
             eval_dataset_cfg: Optional[pipeline.DatasetConfig] = None) -> dict:
  """Train all parameters with AdamW and a cosine schedule; save them to `output_path` (.npz).

  Returns {'loss': final training loss, 'seconds': wall time, 'parameters': count}.
  """
  if not output_path.endswith(".npz"):
    raise ValueError(f"pretrain output_path must end in .npz, got {output_path!r}")
  model = EncoderDecoderModel(t5.Transformer(config), z_loss=1e-4)
  lengths = dataset_cfg.task_feature_lengths
  dummy = model.dummy_batch(dataset_cfg.batch_size, lengths["inputs"], lengths["targets"])
  params = params_lib.unbox(model.init(jax.random.key(seed), dummy))
  schedule = optax.warmup_cosine_decay_schedule(0.0, learning_rate, warmup_steps, train_steps)
  optimizer = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(schedule, weight_decay=0.01))
  opt_state = optimizer.init(params)

  @jax.jit
  def step(params, opt_state, batch, rng):
    (loss, metrics), grads = jax.value_and_grad(model.loss_fn, has_aux=True)(params, batch, rng)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, metrics

  rng = jax.random.key(seed + 1)
  start = time.perf_counter()
  metrics = {}
  batches = pipeline.iterate_batches(dataset_cfg)
  for i in range(1, train_steps + 1):
    batch = {k: jnp.asarray(v) for k, v in next(batches).items()}
    params, opt_state, metrics = step(params, opt_state, batch, jax.random.fold_in(rng, i))
    if i % log_every_steps == 0 or i == train_steps:
      print(f"pretrain step {i}/{train_steps}: loss {float(metrics['loss']):.4f} "
            f"token accuracy {float(metrics['token_accuracy']):.3f}", flush=True)
  os.makedirs(os.path.dirname(os.path.abspath(output_path)), exist_ok=True)
  checkpoints.save_params_npz(jax.device_get(params), output_path)
  result = {"loss": float(metrics["loss"]), "seconds": time.perf_counter() - start,
            "parameters": params_lib.count(params)}
  if eval_dataset_cfg is not None:
    eval_batch = next(pipeline.iterate_batches(eval_dataset_cfg))
    eval_metrics = jax.jit(model.loss_fn)(params, {k: jnp.asarray(v)
                                                   for k, v in eval_batch.items()}, None)[1]
    result["eval_token_accuracy"] = float(eval_metrics["token_accuracy"])
  print(f"saved {result['parameters']:,} parameters to {output_path} "
        f"({result['seconds']:.0f} s)", flush=True)
  return result
