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

from prompt_jax import checkpoints, optimizers
from prompt_jax import params as params_lib
from prompt_jax.data import pipeline
from prompt_jax.models import t5
from prompt_jax.models.encoder_decoder import EncoderDecoderModel

log = logging.getLogger(__name__)


def _train_phase(model, optimizer, params, opt_state, dataset_cfg, first_step, steps, seed,
                 log_every_steps, label, after_step):
  """Steps first_step+1 .. steps of one phase; `after_step(i, params, opt_state, metrics)`
  runs after each (checkpointing). The data skips the `first_step` batches already consumed and step
  i's dropout key is fold_in(key(seed + 1), i), so a resumed phase repeats a straight run.
  Returns (params, opt_state, metrics of the last step)."""

  @jax.jit
  def step(params, opt_state, batch, rng):
    (loss, metrics), grads = jax.value_and_grad(model.loss_fn, has_aux=True)(params, batch, rng)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, metrics

  rng = jax.random.key(seed + 1)
  metrics = {}
  batches = pipeline.iterate_batches(dataset_cfg, start_step=first_step)
  tick, tick_step = time.perf_counter(), first_step
  for i in range(first_step + 1, steps + 1):
    batch = {k: jnp.asarray(v) for k, v in next(batches).items()}
    params, opt_state, metrics = step(params, opt_state, batch, jax.random.fold_in(rng, i))
    if i % log_every_steps == 0 or i == steps:
      loss = float(metrics["loss"])
      rate = (i - tick_step) / (time.perf_counter() - tick)
      tick, tick_step = time.perf_counter(), i
      print(f"{label} step {i}/{steps}: loss {loss:.4f} "
            f"token accuracy {float(metrics['token_accuracy']):.3f} ({rate:.2f} steps/s)",
            flush=True)
    after_step(i, params, opt_state, metrics)
  return params, opt_state, metrics


def _eval_token_accuracy(model, params, dataset_cfg) -> float:
  batch = next(pipeline.iterate_batches(dataset_cfg))
  metrics = jax.jit(model.loss_fn)(params, {k: jnp.asarray(v) for k, v in batch.items()}, None)[1]
  return float(metrics["token_accuracy"])


def default_checkpoint_dir(output_path: str) -> str:
  """Where `pretrain` keeps its resumable checkpoints: beside the .npz, `<stem>_checkpoints`."""
  return output_path[:-len(".npz")] + "_checkpoints"


def pretrain(*, config: t5.T5Config, dataset_cfg: pipeline.DatasetConfig, train_steps: int,
             output_path: str, learning_rate: float = 1e-3, warmup_steps: int = 200,
             seed: int = 0, log_every_steps: int = 100,
             eval_dataset_cfg: Optional[pipeline.DatasetConfig] = None,
             lm_adaptation_dataset_cfg: Optional[pipeline.DatasetConfig] = None,
             lm_adaptation_steps: int = 0,
             lm_adaptation_eval_dataset_cfg: Optional[pipeline.DatasetConfig] = None,
             checkpoint_every_steps: int = 500,
             checkpoint_dir: Optional[str] = None,
             checkpoint_keep: Optional[int] = 2) -> dict:
  """Train all parameters with AdamW and a cosine schedule; save them to `output_path` (.npz).

  With `lm_adaptation_steps > 0`, a second phase ("LM adaptation", Lester et al. Sec. 3.2)
  continues training on `lm_adaptation_dataset_cfg` (a prefix-LM task) with a fresh schedule
  (warmup: a tenth of its steps).

  Every `checkpoint_every_steps` steps (counted over both phases) and at the end of each phase,
  the parameters, optimizer state and step go to `checkpoint_dir` (default
  `default_checkpoint_dir(output_path)`; Orbax, the last `checkpoint_keep` kept, None for all).
  Rerunning the same command resumes from the latest one, repeating a straight run's data order
  and dropout keys. 0 turns checkpointing off.

  Returns {'loss': final training loss, 'seconds': wall time of this invocation,
  'parameters': count} plus 'lm_adaptation_loss', 'eval_token_accuracy' and
  'lm_adaptation_eval_token_accuracy' when those phases and eval sets are given.
  """
  if not output_path.endswith(".npz"):
    raise ValueError(f"pretrain output_path must end in .npz, got {output_path!r}")
  if lm_adaptation_steps and lm_adaptation_dataset_cfg is None:
    raise ValueError(f"lm_adaptation_steps={lm_adaptation_steps} needs "
                     "lm_adaptation_dataset_cfg (a prefix-LM task)")
  if checkpoint_every_steps < 0:
    raise ValueError(f"pretrain checkpoint_every_steps must be >= 0, got "
                     f"{checkpoint_every_steps}")
  model = EncoderDecoderModel(t5.Transformer(config), z_loss=1e-4)
  lengths = dataset_cfg.task_feature_lengths
  dummy = model.dummy_batch(dataset_cfg.batch_size, lengths["inputs"], lengths["targets"])
  params = params_lib.unbox(model.init(jax.random.key(seed), dummy))
  parameters = params_lib.count(params)
  print(f"pretrain: {parameters:,} parameters", flush=True)
  # (label, data, steps, warmup, seed); phase 2's steps are numbered after phase 1's.
  phases = [("pretrain", dataset_cfg, train_steps, warmup_steps, seed)]
  if lm_adaptation_steps:
    phases.append(("lm adaptation", lm_adaptation_dataset_cfg, lm_adaptation_steps,
                   max(lm_adaptation_steps // 10, 1), seed + 7))
  run = {"train_steps": train_steps, "lm_adaptation_steps": lm_adaptation_steps,
         "learning_rate": learning_rate, "seed": seed, "parameters": parameters}

  manager, restored_step, opt_state, meta = None, 0, None, {"run": run, "losses": {}}
  if checkpoint_every_steps:
    directory = checkpoint_dir or default_checkpoint_dir(output_path)
    manager = checkpoints.PromptCheckpointManager(directory, checkpoint_every_steps,
                                                   keep=checkpoint_keep)
    restored_step = manager.latest_step() or 0
  if restored_step:
    # Any phase: the optimizer state has the same tree.
    optimizer = optimizers.warmup_cosine_adamw(learning_rate, warmup_steps, train_steps)
    abstract = jax.eval_shape(lambda p: {"params": p, "opt_state": optimizer.init(p)}, params)
    state, meta = manager.restore(restored_step, abstract)
    if meta["run"] != run:
      raise ValueError(f"pretrain checkpoints in {manager.directory!r} were written for "
                       f"{meta['run']}, this run is {run}; use the same settings or another "
                       "output_path / checkpoint_dir")
    params, opt_state = state["params"], state["opt_state"]
    print(f"pretrain: resuming from step {restored_step} of "
          f"{train_steps + lm_adaptation_steps} ({manager.directory})", flush=True)

  start = time.perf_counter()
  offset = 0
  for label, data_cfg, steps, warmup, phase_seed in phases:
    key = "loss" if label == "pretrain" else "lm_adaptation_loss"
    first_step = min(max(restored_step - offset, 0), steps)
    if first_step < steps:
      optimizer = optimizers.warmup_cosine_adamw(learning_rate, warmup, steps)
      if first_step == 0:
        opt_state = optimizer.init(params)

      def after_step(i, params, opt_state, metrics, offset=offset, steps=steps, key=key):
        if manager is None or not ((offset + i) % checkpoint_every_steps == 0 or i == steps):
          return
        meta["losses"][key] = float(metrics["loss"])
        manager.save(offset + i, {"params": params, "opt_state": opt_state}, meta,
                     force=i == steps)

      params, opt_state, metrics = _train_phase(
          model, optimizer, params, opt_state, data_cfg, first_step, steps, phase_seed,
          log_every_steps, label, after_step)
      meta["losses"][key] = float(metrics["loss"])
    offset += steps
  if manager is not None:
    manager.close()
  result = dict(meta["losses"])
  os.makedirs(os.path.dirname(os.path.abspath(output_path)), exist_ok=True)
  checkpoints.save_params_npz(jax.device_get(params), output_path)
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
