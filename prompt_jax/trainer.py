"""Prompt tuning: the train step, the loop, checkpoints and metrics.

The parameter tree is split once into `prompt_params` (trainable: they and their optimizer state
form the `TrainState`) and `frozen_params` (an ordinary, non-donated argument of every step:
never differentiated, never in the optimizer state, never copied or saved).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import sys
import time
from typing import Any, Callable, Mapping, Optional

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax

from prompt_jax import checkpoints, preemption, run_dir
from prompt_jax import params as params_lib
from prompt_jax.data import pipeline
from prompt_jax.metric_writer import MetricWriter
from prompt_jax.models.encoder_decoder import EncoderDecoderModel
from prompt_jax.partitioning import Partitioner

log = logging.getLogger(__name__)

Array = jax.Array


class TrainingDivergedError(RuntimeError):
  """The loss became NaN or infinite; the last good checkpoint is left as it was."""


@flax.struct.dataclass
class TrainState:
  """Everything that trains: the step, the prompt parameters and their optimizer state."""

  step: Array
  prompt_params: Any
  opt_state: Any


def adafactor(learning_rate: float = 0.3, decay_rate: float = 0.8,
              clipping_threshold: float = 1.0, weight_decay_rate: float = 1e-5,
              multiply_by_parameter_scale: bool = False) -> optax.GradientTransformation:
  """Adafactor with Lester et al.'s prompt-tuning settings as defaults."""
  return optax.adafactor(learning_rate=learning_rate, decay_rate=decay_rate,
                         clipping_threshold=clipping_threshold,
                         weight_decay_rate=weight_decay_rate,
                         multiply_by_parameter_scale=multiply_by_parameter_scale)


def _tree_all_finite(tree) -> Array:
  leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree_util.tree_leaves(tree)
            if jnp.issubdtype(x.dtype, jnp.inexact)]
  return jnp.all(jnp.stack(leaves)) if leaves else jnp.array(True)


class PromptTrainer:
  """Builds the sharded, jitted steps for one model, optimizer and mesh.

  Args:
    model: the `EncoderDecoderModel` (frozen T5 plus prompt hook).
    optimizer: an optax transformation, applied to the trainable parameters only.
    partitioner: mesh and logical axis rules.
    input_length, target_length, batch_size: the compiled (global) batch shape.
    trainable_pattern: regex over '/'-joined parameter paths selecting the trainable leaves.
    frozen_dtype: store the frozen parameters in this dtype (e.g. 'bfloat16', cast once when
      they are loaded); None keeps float32. The prompt and its optimizer state stay float32.
  """

  def __init__(self, model: EncoderDecoderModel, optimizer: optax.GradientTransformation,
               partitioner: Partitioner, input_length: int, target_length: int,
               batch_size: int, trainable_pattern: str = params_lib.DEFAULT_TRAINABLE_PATTERN,
               frozen_dtype: Optional[str] = None):
    self.model = model
    try:
      self.frozen_dtype = None if frozen_dtype is None else jnp.dtype(frozen_dtype)
    except TypeError as e:
      raise ValueError(f"frozen_dtype must be a floating dtype name such as 'bfloat16' or None, "
                       f"got {frozen_dtype!r}") from e
    if self.frozen_dtype is not None and not jnp.issubdtype(self.frozen_dtype, jnp.floating):
      raise ValueError(f"frozen_dtype must be a floating dtype, got {frozen_dtype!r}")
    self.optimizer = optimizer
    self.partitioner = partitioner
    self.trainable_pattern = trainable_pattern
    self.batch_size = batch_size
    self.target_length = target_length
    if batch_size % partitioner.data_parallel_size:
      raise ValueError(f"batch size {batch_size} is not divisible by the data-parallel size "
                       f"{partitioner.data_parallel_size}")
    self.dummy_batch = model.dummy_batch(batch_size, input_length, target_length)
    with partitioner.axis_rules():
      boxed = model.init_abstract(self.dummy_batch)
    boxed_trainable, boxed_frozen = params_lib.split_params(boxed, trainable_pattern)
    if not jax.tree_util.tree_leaves(boxed_trainable):
      raise ValueError(f"no parameter matches the trainable pattern {trainable_pattern!r}; "
                       "is a prompt configured?")
    self.abstract_frozen = params_lib.unbox(boxed_frozen)  # float32, as checkpoints store them
    self.abstract_prompt = params_lib.unbox(boxed_trainable)
    self.frozen_shardings = partitioner.shardings_for(boxed_frozen)
    self.prompt_shardings = partitioner.shardings_for(boxed_trainable)
    abstract_opt = jax.eval_shape(optimizer.init, self.abstract_prompt)
    replicated = partitioner.replicated()
    self.state_shardings = TrainState(
        step=replicated, prompt_params=self.prompt_shardings,
        opt_state=jax.tree_util.tree_map(lambda _: replicated, abstract_opt))
    self._train_step = jax.jit(
        self._train_step_impl,
        in_shardings=(self.state_shardings, self.frozen_shardings, None, replicated),
        out_shardings=(self.state_shardings, replicated), donate_argnums=(0,))
    self._eval_step = jax.jit(
        self._eval_step_impl,
        in_shardings=(self.prompt_shardings, self.frozen_shardings, None),
        out_shardings=replicated)
    self._predict = {}

  # --------------------------------------------------------------------------- initialisation

  def param_counts(self) -> dict[str, int]:
    return {"frozen": params_lib.count(self.abstract_frozen),
            "trainable": params_lib.count(self.abstract_prompt)}

  def random_frozen_params(self, rng: Array):
    """Randomly initialised frozen parameters, created directly in their shardings."""
    def init(rng):
      with self.partitioner.axis_rules():
        boxed = self.model.init(rng, self.dummy_batch)
      frozen = params_lib.unbox(params_lib.split_params(boxed, self.trainable_pattern)[1])
      return self.cast_frozen(frozen)
    return jax.jit(init, out_shardings=self.frozen_shardings)(rng)

  def cast_frozen(self, frozen_params):
    """Floating leaves -> `frozen_dtype` (identity when it is None); works on numpy and jax."""
    if self.frozen_dtype is None:
      return frozen_params
    return jax.tree_util.tree_map(
        lambda x: x.astype(self.frozen_dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x,
        frozen_params)

  def frozen_structs(self):
    """ShapeDtypeStructs of the frozen parameters as the steps see them (dtype and sharding)."""
    def struct(s, sharding):
      floating = jnp.issubdtype(s.dtype, jnp.floating)
      dtype = self.frozen_dtype if floating and self.frozen_dtype is not None else s.dtype
      return jax.ShapeDtypeStruct(s.shape, dtype, sharding=sharding)
    return jax.tree_util.tree_map(struct, self.abstract_frozen, self.frozen_shardings)

  def load_frozen_params(self, path: str):
    """Frozen parameters from a checkpoint path, checked against the config and sharded."""
    loaded = checkpoints.load_frozen_params(path, self.model.config, self.frozen_structs(),
                                            self.partitioner)
    return checkpoints.device_put_tree(self.cast_frozen(loaded), self.frozen_shardings)

  def init_state(self, frozen_params, rng: Array) -> TrainState:
    """Fresh prompt (its initialiser sees the frozen embedding) and optimizer state."""
    def init(frozen_params, rng):
      with self.partitioner.axis_rules():
        full = self.model.init_missing(rng, frozen_params, self.dummy_batch)
      prompt = params_lib.unbox(params_lib.split_params(full, self.trainable_pattern)[0])
      # Initialisers reading a bf16 embedding table would give a bf16 prompt; it trains in fp32.
      prompt = jax.tree_util.tree_map(
          lambda x: x.astype(jnp.float32) if jnp.issubdtype(x.dtype, jnp.floating) else x,
          prompt)
      return TrainState(step=jnp.array(0, jnp.int32), prompt_params=prompt,
                        opt_state=self.optimizer.init(prompt))
    return jax.jit(init, in_shardings=(self.frozen_shardings, self.partitioner.replicated()),
                   out_shardings=self.state_shardings)(frozen_params, rng)

  def abstract_state(self) -> TrainState:
    """ShapeDtypeStructs (with shardings) of the state, for restoring a checkpoint."""
    shapes = jax.eval_shape(
        lambda p: TrainState(step=jnp.array(0, jnp.int32), prompt_params=p,
                             opt_state=self.optimizer.init(p)), self.abstract_prompt)
    return jax.tree_util.tree_map(
        lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes,
        self.state_shardings)

  # ------------------------------------------------------------------------------------ steps

  def _loss(self, prompt_params, frozen_params, batch, dropout_rng):
    params = params_lib.merge_params(prompt_params, frozen_params)
    with self.partitioner.axis_rules():
      return self.model.loss_fn(params, batch, dropout_rng)

  def _train_step_impl(self, state: TrainState, frozen_params, batch, rng):
    dropout_rng = jax.random.fold_in(rng, state.step)
    grad_fn = jax.value_and_grad(self._loss, has_aux=True)
    (_, metrics), grads = grad_fn(state.prompt_params, frozen_params, batch, dropout_rng)
    updates, opt_state = self.optimizer.update(grads, state.opt_state, state.prompt_params)
    prompt_params = optax.apply_updates(state.prompt_params, updates)
    # Checked on the device: the loss before the update and the prompt after it. A finite loss
    # with an update that overflows the prompt must not be saved as "good".
    finite = jnp.isfinite(metrics["loss"]) & _tree_all_finite(prompt_params)
    metrics = dict(metrics, grad_norm=optax.global_norm(grads), all_finite=finite)
    return TrainState(step=state.step + 1, prompt_params=prompt_params,
                      opt_state=opt_state), metrics

  def _eval_step_impl(self, prompt_params, frozen_params, batch):
    return self._loss(prompt_params, frozen_params, batch, None)[1]

  def shard_batch(self, batch: Mapping[str, np.ndarray]) -> dict[str, Array]:
    """Host-local numpy batch -> global arrays split over the data axis."""
    return {k: jax.make_array_from_process_local_data(
        self.partitioner.data_sharding(np.ndim(v)), np.asarray(v)) for k, v in batch.items()}

  def train_step(self, state: TrainState, frozen_params, batch, rng):
    return self._train_step(state, frozen_params, self.shard_batch(batch), rng)

  def eval_step(self, prompt_params, frozen_params, batch):
    return self._eval_step(prompt_params, frozen_params, self.shard_batch(batch))

  def predict(self, prompt_params, frozen_params, batch, max_decode_length: int) -> np.ndarray:
    """Greedy decoding -> [batch, max_decode_length] token ids."""
    if max_decode_length not in self._predict:
      def predict(prompt_params, frozen_params, inputs):
        params = params_lib.merge_params(prompt_params, frozen_params)
        with self.partitioner.axis_rules():
          return self.model.predict_batch(params, inputs, max_decode_length)
      self._predict[max_decode_length] = jax.jit(
          predict, in_shardings=(self.prompt_shardings, self.frozen_shardings, None),
          out_shardings=self.partitioner.replicated())
    inputs = self.shard_batch({k: batch[k] for k in ("encoder_input_tokens", "prompt_ids")
                               if k in batch})
    return np.asarray(self._predict[max_decode_length](prompt_params, frozen_params, inputs))

  def export_prompt(self, prompt_params, frozen_params) -> Optional[np.ndarray]:
    """The prompt as a plain [length, embed] array (methods fold their reparameterisation)."""
    params = params_lib.merge_params(prompt_params, frozen_params)
    exported = self.model.module.apply({"params": params},
                                       method=self.model.module.export_prompt)
    return None if exported is None else np.asarray(exported)


# ---------------------------------------------------------------------------------- the loop

UNTRAINED_EVAL_FILE = "eval_untrained.json"
SUMMARY_FILE = "summary.json"


def _progress(total: int, initial: int):
  from tqdm import tqdm  # pylint: disable=g-import-not-at-top
  return tqdm(total=total, initial=initial, desc="train", unit="step", dynamic_ncols=True,
              mininterval=0.5, disable=jax.process_index() != 0)


def _check_count(name: str, value: Any, minimum: int) -> int:
  """`value` as an int >= minimum, else a ValueError naming the macro and the value."""
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
    raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
  return int(value)


def _json_value(value: Any) -> Any:
  return json.loads(json.dumps(value, default=str))


def check_resume_compatible(meta: Mapping[str, Any], current: Mapping[str, Any], step: int,
                            directory: str) -> None:
  """Raise ValueError where the run being resumed was trained from another frozen checkpoint
  or model config than the one configured now (naming the first difference)."""
  saved_path = meta.get("initial_checkpoint_path")
  if "initial_checkpoint_path" in meta and saved_path != current["initial_checkpoint_path"]:
    raise ValueError(
        f"checkpoint step {step} in {directory} was trained from INITIAL_CHECKPOINT_PATH="
        f"{saved_path!r}, this run sets {current['initial_checkpoint_path']!r}; use the same "
        "path, a new MODEL_DIR, or --gin.trainer.train.allow_config_change=True")
  saved_config, config = meta.get("config"), _json_value(current["config"])
  if isinstance(saved_config, dict):
    for name in sorted(set(saved_config) | set(config)):
      if saved_config.get(name) != config.get(name):
        raise ValueError(
            f"checkpoint step {step} in {directory} was trained with model config {name}="
            f"{saved_config.get(name)!r}, this run has {config.get(name)!r}; use the same model "
            "gin, a new MODEL_DIR, or --gin.trainer.train.allow_config_change=True")


def train(*, model: EncoderDecoderModel, model_dir: Optional[str], train_steps: int,
          train_dataset_cfg: pipeline.DatasetConfig,
          eval_dataset_cfg: Optional[pipeline.DatasetConfig] = None,
          initial_checkpoint_path: Optional[str] = None,
          optimizer: Optional[optax.GradientTransformation] = None,
          partitioner: Optional[Partitioner] = None,
          trainable_pattern: str = params_lib.DEFAULT_TRAINABLE_PATTERN,
          checkpoint_every_steps: int = 1000, keep_checkpoints: Optional[int] = 3,
          eval_every_steps: int = 0, eval_at_start: bool = True, log_every_steps: int = 10,
          max_decode_length: Optional[int] = None, seed: int = 0,
          evaluate_fn: Optional[Callable] = None,
          frozen_dtype: Optional[str] = None,
          batch_transform: Optional[Callable[[dict], dict]] = None,
          allow_config_change: bool = False) -> dict[str, Any]:
  """Prompt-tune `model` for `train_steps` steps; resumes from MODEL_DIR's latest checkpoint.

  `frozen_dtype='bfloat16'` stores the frozen model in bf16 (the prompt and optimizer stay fp32).
  `batch_transform` maps each host-local numpy training batch before the step (e.g.
  `ensemble.ReplicateAcrossPrompts`). `allow_config_change` resumes a MODEL_DIR whose
  checkpoint records another INITIAL_CHECKPOINT_PATH or model config.

  Safety: MODEL_DIR is locked for the run; a step whose loss or updated prompt is not finite
  stops training without saving (`TrainingDivergedError`); SIGINT/SIGTERM save the current step
  and raise `preemption.Preempted`; rerunning a finished run returns its summary, and a run
  whose final evaluation was cut short runs only that.

  Returns a summary: the final training metrics and, when `eval_dataset_cfg` is set, the
  validation metrics of the untrained and of the trained prompt.
  """
  train_steps = _check_count("TRAIN_STEPS", train_steps, 1)
  checkpoint_every_steps = _check_count("CHECKPOINT_PERIOD", checkpoint_every_steps, 1)
  eval_every_steps = _check_count("EVAL_PERIOD", eval_every_steps or 0, 0)
  log_every_steps = _check_count("log_every_steps", log_every_steps, 1)
  model_dir = run_dir.check_model_dir(model_dir)
  with run_dir.RunLock(model_dir):
    return _train(model=model, model_dir=model_dir, train_steps=train_steps,
                  train_dataset_cfg=train_dataset_cfg, eval_dataset_cfg=eval_dataset_cfg,
                  initial_checkpoint_path=initial_checkpoint_path, optimizer=optimizer,
                  partitioner=partitioner, trainable_pattern=trainable_pattern,
                  checkpoint_every_steps=checkpoint_every_steps,
                  keep_checkpoints=keep_checkpoints, eval_every_steps=eval_every_steps,
                  eval_at_start=eval_at_start, log_every_steps=log_every_steps,
                  max_decode_length=max_decode_length, seed=seed, evaluate_fn=evaluate_fn,
                  frozen_dtype=frozen_dtype, batch_transform=batch_transform,
                  allow_config_change=allow_config_change)


def _train(*, model, model_dir, train_steps, train_dataset_cfg, eval_dataset_cfg,
           initial_checkpoint_path, optimizer, partitioner, trainable_pattern,
           checkpoint_every_steps, keep_checkpoints, eval_every_steps, eval_at_start,
           log_every_steps, max_decode_length, seed, evaluate_fn, frozen_dtype,
           batch_transform, allow_config_change) -> dict[str, Any]:
  pipeline.check_vocabulary(train_dataset_cfg, model.config.vocab_size)
  optimizer = optimizer or adafactor()
  partitioner = partitioner or Partitioner()
  lengths = train_dataset_cfg.task_feature_lengths
  trainer = PromptTrainer(model, optimizer, partitioner, lengths["inputs"], lengths["targets"],
                          train_dataset_cfg.batch_size, trainable_pattern,
                          frozen_dtype=frozen_dtype)
  counts = trainer.param_counts()
  log.info("parameters: %s frozen, %s trainable", f"{counts['frozen']:,}",
           f"{counts['trainable']:,}")
  print(f"model: {counts['frozen']:,} frozen parameters, {counts['trainable']:,} trainable; "
        f"mesh {dict(partitioner.mesh.shape)}", flush=True)
  summary_path = os.path.join(model_dir, SUMMARY_FILE)
  meta = {"initial_checkpoint_path": initial_checkpoint_path,
          "trainable_pattern": trainable_pattern,
          "config": _json_value(dataclasses.asdict(model.config))}

  # Resume: the newest checkpoint that restores and is finite (older ones if it does not).
  manager = checkpoints.PromptCheckpointManager(model_dir, checkpoint_every_steps,
                                                keep_checkpoints)
  restored = manager.restore_latest_good(trainer.abstract_state())
  start_step, last_metrics = 0, {}
  if restored is not None:
    state, restored_meta, latest = restored
    if not allow_config_change:
      check_resume_compatible(restored_meta, meta, latest, manager.directory)
    if train_steps < latest:
      raise ValueError(f"TRAIN_STEPS={train_steps} is below the step {latest} restored from "
                       f"{manager.directory}; raise TRAIN_STEPS or use a new MODEL_DIR")
    start_step = int(restored_meta.get("data_position", latest))
    last_metrics = dict(restored_meta.get("train_metrics") or {})
    previous = run_dir.read_json(summary_path)
    if latest == train_steps and previous and previous.get("step") == train_steps and (
        not eval_dataset_cfg or "eval_trained" in previous):
      print(f"run in {model_dir} is complete (step {train_steps}); nothing to do", flush=True)
      manager.close()
      return previous
    print(f"resumed from {manager.directory} at step {latest}", flush=True)

  rng = jax.random.key(seed)
  init_rng, frozen_rng, step_rng = jax.random.split(rng, 3)
  if initial_checkpoint_path:
    frozen_params = trainer.load_frozen_params(initial_checkpoint_path)
  else:
    log.warning("INITIAL_CHECKPOINT_PATH is not set: the frozen model is randomly initialised")
    frozen_params = trainer.random_frozen_params(frozen_rng)
  if restored is None:
    state = trainer.init_state(frozen_params, init_rng)
  else:
    _recreate_missing_exports(trainer, manager, frozen_params, model_dir, state, latest)

  if evaluate_fn is None:
    from prompt_jax import evaluation  # pylint: disable=g-import-not-at-top
    evaluate_fn = evaluation.evaluate
  decode_length = max_decode_length or lengths["targets"]
  summary: dict[str, Any] = {"model_dir": model_dir}
  eval_writer = MetricWriter(model_dir, "eval") if eval_dataset_cfg else None
  progress = None

  def say(line: str):
    (progress.write if progress is not None and not progress.disable else print)(line)
    sys.stdout.flush()

  def run_eval(label: str, step: int) -> dict:
    scores = evaluate_fn(trainer, state.prompt_params, frozen_params, eval_dataset_cfg,
                         max_decode_length=decode_length)
    eval_writer.write(step, scores)
    say(f"eval ({label}, step {step}): " + ", ".join(
        f"{k} {v:.2f}" for k, v in sorted(scores.items())))
    return scores

  untrained_path = os.path.join(model_dir, UNTRAINED_EVAL_FILE)
  if eval_dataset_cfg and eval_at_start:
    if start_step == 0:
      summary["eval_untrained"] = run_eval("untrained prompt", 0)
      if jax.process_index() == 0:
        run_dir.write_json(untrained_path, summary["eval_untrained"])
    elif run_dir.read_json(untrained_path) is not None:
      summary["eval_untrained"] = run_dir.read_json(untrained_path)

  def save(step: int, metrics: Mapping[str, float]):
    saved = manager.save(step, state, dict(meta, data_position=step,
                                           train_metrics=dict(metrics)), force=True)
    if saved:
      exported = trainer.export_prompt(state.prompt_params, frozen_params)
      if exported is not None and jax.process_index() == 0:
        checkpoints.export_prompt_npy(exported, model_dir, step)

  def diverged(step: int, metrics: Mapping[str, Any]) -> TrainingDivergedError:
    good = manager.latest_step()
    return TrainingDivergedError(
        f"training diverged at step {step}: loss {float(metrics['loss'])}, updated prompt "
        f"{'finite' if checkpoints.all_finite(state.prompt_params) else 'non-finite'}; "
        "stopped without saving it. Last good checkpoint: "
        f"{'none' if good is None else f'step {good} in {manager.directory}'}")

  train_writer = MetricWriter(model_dir, "train")
  step = start_step
  if start_step < train_steps:
    batches = pipeline.iterate_batches(train_dataset_cfg, start_step=start_step,
                                       shard_id=jax.process_index(),
                                       num_shards=jax.process_count())
    progress = _progress(train_steps, start_step)
    window_time, window_steps = 0.0, 0
    try:
      with preemption.StopOnSignal(jax.process_count()) as stop:
        for step in range(start_step + 1, train_steps + 1):
          batch = next(batches)
          if batch_transform is not None:  # e.g. replicate examples across a prompt bank
            batch = batch_transform(batch)
          started = time.perf_counter()
          state, metrics = trainer.train_step(state, frozen_params, batch, step_rng)
          if not bool(metrics["all_finite"]):
            raise diverged(step, metrics)
          window_time += time.perf_counter() - started
          window_steps += 1
          progress.update(1)
          if step % log_every_steps == 0 or step == train_steps:
            last_metrics = {k: float(v) for k, v in metrics.items() if k != "all_finite"}
            last_metrics["steps_per_second"] = window_steps / max(window_time, 1e-9)
            train_writer.write(step, last_metrics)
            progress.set_postfix(ce=f"{last_metrics['cross_ent_loss']:.4f}",
                                 loss=f"{last_metrics['loss']:.4f}",
                                 steps_per_s=f"{last_metrics['steps_per_second']:.1f}")
            window_time, window_steps = 0.0, 0
          if stop.requested(step):
            save(step, last_metrics)
            raise preemption.Preempted(
                f"stopped by {stop.signal_name or 'a preemption notice'} after step {step}; "
                f"saved a checkpoint in {manager.directory}; rerun the same command to "
                "continue")
          if step % checkpoint_every_steps == 0:
            save(step, last_metrics)
          if eval_dataset_cfg and eval_every_steps and step % eval_every_steps == 0 \
              and step != train_steps:
            run_eval("training", step)
    finally:
      progress.close()
      progress = None
      train_writer.close()
    if manager.latest_step() != step:
      save(step, last_metrics)
  manager.close()
  summary["train"] = last_metrics
  summary["step"] = step
  if eval_dataset_cfg:
    summary["eval_trained"] = run_eval("trained prompt", step)
    eval_writer.close()
  if jax.process_index() == 0:
    run_dir.write_json(summary_path, summary)
  return summary


def _recreate_missing_exports(trainer, manager, frozen_params, model_dir: str, state,
                              state_step: int) -> None:
  """Write `prompts/prompt_<step>.npy` for every kept checkpoint that lacks it (a kill between
  the checkpoint's commit and its export)."""
  if jax.process_index() != 0:
    return
  for step in manager.all_steps():
    path = os.path.join(model_dir, "prompts", f"prompt_{step}.npy")
    if os.path.exists(path):
      continue
    step_state = state if step == state_step else manager.restore(
        step, trainer.abstract_state())[0]
    exported = trainer.export_prompt(step_state.prompt_params, frozen_params)
    if exported is not None:
      checkpoints.export_prompt_npy(exported, model_dir, step)
      log.info("re-created the missing export %s", path)
