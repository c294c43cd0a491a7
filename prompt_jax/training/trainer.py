"""The training loop: one program for every regime, and `train`, its prompt-tuning entry point.

`run(regime, ...)` trains any `regimes.Regime` (plain prompt tuning and every prompt method,
prompt banks, SPT's gate search and re-training, full-model pretraining): the loop owns
MODEL_DIR, data position, checkpoints and resume, NaN handling, metrics, evaluation scheduling
and preemption; the regime owns its state, step and batches. The parameter tree is split once
into `prompt_params` (trainable: with their optimizer state they form the state) and
`frozen_params` (an ordinary, non-donated argument of every step: never differentiated, never in
the optimizer state, never copied or saved).
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
import json
import logging
import os
import sys
import time
from typing import Any, Callable, Iterator, Mapping, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from prompt_jax import params as params_lib
from prompt_jax.data import pipeline
from prompt_jax.models.encoder_decoder import EncoderDecoderModel
from prompt_jax.partitioning import Partitioner
from prompt_jax.programs import PromptPrograms, TrainState  # noqa: F401  (TrainState: public)
from prompt_jax.serving import evaluation
from prompt_jax.storage import checkpoints, frozen_models, run_dir
from prompt_jax.training import metric_writer, optimizers, preemption
from prompt_jax.training.metric_writer import MetricWriter
from prompt_jax.training.optimizers import adafactor
from prompt_jax.training.regimes import PromptTuning, Regime

log = logging.getLogger(__name__)

Array = jax.Array


class TrainingDivergedError(RuntimeError):
  """A step's loss or updated prompt became NaN or infinite; nothing of it was saved and the
  last good checkpoint is left as it was."""


class PromptTrainer(PromptPrograms):
  """The programs shaped for one training run (a global batch of `batch_size` rows).

  Args:
    model, optimizer, partitioner, trainable_pattern, frozen_dtype: as `PromptPrograms`.
    input_length, target_length, batch_size: the compiled (global) batch shape; the model is
      traced with it, so the encoder length budget is checked before anything is loaded.
  """

  def __init__(self, model: EncoderDecoderModel, optimizer: optax.GradientTransformation,
               partitioner: Partitioner, input_length: int, target_length: int,
               batch_size: int, trainable_pattern: str = params_lib.DEFAULT_TRAINABLE_PATTERN,
               frozen_dtype: Optional[str] = None):
    if batch_size % partitioner.data_parallel_size:
      raise ValueError(f"batch size {batch_size} is not divisible by the data-parallel size "
                       f"{partitioner.data_parallel_size}")
    super().__init__(model, partitioner, optimizer, trainable_pattern, frozen_dtype,
                     batch_size=batch_size, input_length=input_length,
                     target_length=target_length)
    self.batch_size = batch_size
    self.target_length = target_length


# ---------------------------------------------------------------------------------- the loop

UNTRAINED_EVAL_FILE = run_dir.UNTRAINED_EVAL_FILE
SUMMARY_FILE = run_dir.SUMMARY_FILE


def _progress(total: int, initial: int, label: str = "train"):
  from tqdm import tqdm  # pylint: disable=g-import-not-at-top
  return tqdm(total=total, initial=initial, desc=label, unit="step", dynamic_ncols=True,
              mininterval=0.5, disable=jax.process_index() != 0)


def check_count(name: str, value: Any, minimum: int) -> int:
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


def check_settings(meta: Mapping[str, Any], current: Mapping[str, Any], directory: str) -> None:
  """Raise ValueError when the checkpoints were written by a regime with other settings."""
  saved, settings = meta.get("settings"), current.get("settings")
  if (saved or settings) and saved != settings:
    raise ValueError(f"checkpoints in {directory!r} were written for {saved}, this run is "
                     f"{settings}; use the same settings or another MODEL_DIR")


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
          batch_transforms: Sequence[Callable[[dict], dict]] = (),
          allow_config_change: bool = False,
          config_text: Optional[str] = None,
          divergence_loss_factor: Optional[float] = 10.0,
          divergence_param_factor: Optional[float] = 1e3) -> dict[str, Any]:
  """Prompt-tune `model` for `train_steps` steps; resumes from MODEL_DIR's latest checkpoint.

  `frozen_dtype='bfloat16'` stores the frozen model in bf16 (the prompt and optimizer stay fp32).
  `batch_transforms` map each host-local numpy training batch before the step, in order (e.g.
  `ensemble.ReplicateAcrossPrompts()` then `bucketing.trim_to_bucket`: they compose).
  `allow_config_change` resumes a MODEL_DIR whose record (run.json) differs from this run;
  the change is appended to the record. `config_text` (the CLI's gin config) is written to
  MODEL_DIR/config.gin.

  Safety: MODEL_DIR is locked for the run; a step whose loss or updated prompt is not finite
  stops training without saving (`TrainingDivergedError`), and so does a finite run that runs
  away (`DivergenceGuard`: `divergence_loss_factor`, `divergence_param_factor`; None turns
  each off); SIGINT/SIGTERM save the current step
  and raise `preemption.Preempted`; rerunning a finished run returns its summary, and a run
  whose final evaluation was cut short runs only that.

  Returns a summary: the final training metrics and, when `eval_dataset_cfg` is set, the
  validation metrics of the untrained and of the trained prompt.
  """
  pipeline.check_vocabulary(train_dataset_cfg, model.config.vocab_size)
  lengths = train_dataset_cfg.task_feature_lengths
  programs = PromptTrainer(model, optimizer or adafactor(), partitioner or Partitioner(),
                           lengths["inputs"], lengths["targets"], train_dataset_cfg.batch_size,
                           trainable_pattern, frozen_dtype=frozen_dtype)
  regime = PromptTuning(programs, train_dataset_cfg, batch_transforms)
  return run(regime, model_dir=model_dir, train_steps=train_steps,
             eval_dataset_cfg=eval_dataset_cfg, initial_checkpoint_path=initial_checkpoint_path,
             checkpoint_every_steps=checkpoint_every_steps, keep_checkpoints=keep_checkpoints,
             eval_every_steps=eval_every_steps, eval_at_start=eval_at_start,
             log_every_steps=log_every_steps,
             max_decode_length=max_decode_length or lengths["targets"], seed=seed,
             evaluate_fn=evaluate_fn, allow_config_change=allow_config_change,
             config_text=config_text,
             divergence=DivergenceGuard(divergence_loss_factor, divergence_param_factor)).summary


@dataclasses.dataclass
class RunResult:
  """What `run` ends with: the summary written to summary.json, the final training state (the
  regime's) and the frozen parameters it was trained against."""

  summary: dict[str, Any]
  state: Any
  frozen_params: Any


def run(regime: Regime, *, model_dir: Optional[str], train_steps: int,
        eval_dataset_cfg: Optional[pipeline.DatasetConfig] = None,
        initial_checkpoint_path: Optional[str] = None, checkpoint_every_steps: int = 1000,
        keep_checkpoints: Optional[int] = 3, eval_every_steps: int = 0,
        eval_at_start: bool = True, log_every_steps: int = 10, max_decode_length: int = 8,
        seed: int = 0, evaluate_fn: Optional[Callable] = None,
        allow_config_change: bool = False, label: str = "train",
        config_text: Optional[str] = None,
        divergence: Optional[DivergenceGuard] = None) -> RunResult:
  """The training loop of every regime (`regimes.Regime`): `train_steps` steps of
  `regime.step_fn` in MODEL_DIR, resumed from its newest good checkpoint.

  The loop owns MODEL_DIR and its lock, the data position, checkpoints (every
  `checkpoint_every_steps` and at the end; `keep_checkpoints` kept), resume, the on-device
  finiteness check (`TrainingDivergedError`, nothing non-finite is saved), TensorBoard events,
  evaluation of `eval_dataset_cfg` by `evaluate_fn` (before training, every `eval_every_steps`
  and after), prompt exports and preemption (`preemption.Preempted` after a saved step).
  `label` names the progress bar; `divergence` (default `DivergenceGuard()`) stops a finite run
  that runs away, as a non-finite step does.

  The run record (MODEL_DIR/run.json, `run_record`) is compared before anything is read or
  written: a MODEL_DIR trained with another model, prompt, frozen checkpoint, data, optimizer
  or seed is refused in one line naming each difference (`run_dir.RunMismatchError`) unless
  `allow_config_change`; it is written before the first step with `config_text` as config.gin.
  """
  train_steps = check_count("TRAIN_STEPS", train_steps, 1)
  checkpoint_every_steps = check_count("CHECKPOINT_PERIOD", checkpoint_every_steps, 1)
  eval_every_steps = check_count("EVAL_PERIOD", eval_every_steps or 0, 0)
  log_every_steps = check_count("log_every_steps", log_every_steps, 1)
  model_dir = run_dir.check_model_dir(model_dir)
  with run_dir.RunLock(model_dir):
    return _run(regime, model_dir=model_dir, train_steps=train_steps,
                eval_dataset_cfg=eval_dataset_cfg,
                initial_checkpoint_path=initial_checkpoint_path,
                checkpoint_every_steps=checkpoint_every_steps,
                keep_checkpoints=keep_checkpoints, eval_every_steps=eval_every_steps,
                eval_at_start=eval_at_start, log_every_steps=log_every_steps,
                max_decode_length=max_decode_length, seed=seed, evaluate_fn=evaluate_fn,
                allow_config_change=allow_config_change, label=label,
                config_text=config_text, divergence=divergence or DivergenceGuard())


def run_record(regime: Regime, initial_checkpoint_path: Optional[str], seed: int) -> dict:
  """What defines a run of `regime` (MODEL_DIR/run.json): the model config (how it executes,
  `run_dir.EXECUTION_FIELDS`, apart: it may change on resume), the prompt hook and its
  settings, the frozen checkpoint (path and `run_dir.fingerprint`), the data, the optimizer
  (its state's types and, when built by `optimizers`, its hyperparameters: a resume with
  another learning rate is a difference), the trainable parameters' shapes, the regime's
  settings, the seed, and the package version (informative only)."""
  from prompt_jax import __version__  # pylint: disable=g-import-not-at-top
  programs = regime.programs
  data = getattr(regime, "dataset_cfg", None)
  frozen_path = initial_checkpoint_path
  resolved = frozen_models.resolve_path(frozen_path) if frozen_path else None
  return {
      **run_dir.model_entries(programs.model),
      "frozen_checkpoint": {"path": frozen_path, "fingerprint": run_dir.fingerprint(resolved)},
      "data": None if data is None else {
          "task": data.mixture_or_task_name, "split": data.split,
          "feature_lengths": dict(data.task_feature_lengths), "batch_size": data.batch_size},
      "optimizer": {"state": optimizer_state_types(regime.abstract_state()),
                    "hyperparameters": optimizers.description(programs.optimizer)},
      "trainable": {name: list(shape) for name, shape in
                    params_lib.shapes(programs.abstract_prompt).items()},
      "trainable_pattern": programs.trainable_pattern,
      "settings": _json_value(dict(regime.settings)),
      "seed": int(seed),
      "prompt_jax_version": __version__,
  }


def optimizer_state_types(state: Any) -> list[str]:
  """The names of the optimizer state types in a training state, in tree order (e.g.
  ['FactoredState', ...] for Adafactor, ['ScaleByAdamState', ...] for Adam)."""
  names: list[str] = []

  def walk(node):
    if isinstance(node, tuple) and hasattr(node, "_fields"):
      if type(node).__name__ not in names:
        names.append(type(node).__name__)
      for value in node:
        walk(value)
    elif dataclasses.is_dataclass(node) and not isinstance(node, type):
      for field in dataclasses.fields(node):
        walk(getattr(node, field.name))
    elif isinstance(node, Mapping):
      for value in node.values():
        walk(value)
    elif isinstance(node, (list, tuple)):
      for value in node:
        walk(value)

  walk(state)
  return names


def _run(regime: Regime, *, model_dir, train_steps, eval_dataset_cfg, initial_checkpoint_path,
         checkpoint_every_steps, keep_checkpoints, eval_every_steps, eval_at_start,
         log_every_steps, max_decode_length, seed, evaluate_fn, allow_config_change,
         label, config_text, divergence) -> RunResult:
  programs = regime.programs
  counts = programs.param_counts()
  log.info("parameters: %s frozen, %s trainable", f"{counts['frozen']:,}",
           f"{counts['trainable']:,}")
  print(f"model: {counts['frozen']:,} frozen parameters, {counts['trainable']:,} trainable; "
        f"mesh {dict(programs.partitioner.mesh.shape)}", flush=True)
  summary_path = os.path.join(model_dir, SUMMARY_FILE)
  meta = {"initial_checkpoint_path": initial_checkpoint_path,
          "trainable_pattern": programs.trainable_pattern,
          "config": _json_value(dataclasses.asdict(programs.model.config))}
  if regime.settings:
    meta["settings"] = _json_value(dict(regime.settings))

  record = run_record(regime, initial_checkpoint_path, seed)
  meta["record"] = record  # every checkpoint keeps a copy: run.json can be lost, not the record
  saved_record = run_dir.read_record(model_dir)
  if saved_record is not None and not allow_config_change:
    run_dir.check_record(model_dir, record, saved=saved_record)

  # Resume: the newest checkpoint that restores and is finite (older ones if it does not).
  manager = checkpoints.PromptCheckpointManager(model_dir, checkpoint_every_steps,
                                                keep_checkpoints)
  restored = manager.restore_latest_good(regime.abstract_state())
  start_step, last_metrics, complete = 0, {}, None
  if restored is not None:
    state, restored_meta, latest = restored
    if saved_record is None:  # run.json removed: the checkpoint's copy of the record decides
      saved_record = restored_meta.get("record")
      if saved_record is not None and not allow_config_change:
        run_dir.check_record(model_dir, record, saved=saved_record)
    check_settings(restored_meta, meta, manager.directory)
    if not allow_config_change:
      check_resume_compatible(restored_meta, meta, latest, manager.directory)
    if train_steps < latest:
      raise ValueError(f"TRAIN_STEPS={train_steps} is below the step {latest} restored from "
                       f"{manager.directory}; raise TRAIN_STEPS or use a new MODEL_DIR")
    start_step = int(restored_meta.get("data_position", latest))
    last_metrics = dict(restored_meta.get("train_metrics") or {})
    divergence.reference.update(restored_meta.get("divergence_reference") or {})
    previous = run_dir.read_json(summary_path)
    if latest == train_steps and previous and previous.get("step") == train_steps and (
        not eval_dataset_cfg or "eval_trained" in previous):
      print(f"run in {model_dir} is complete (step {train_steps}); nothing to do", flush=True)
      complete = previous
    else:
      print(f"resumed from {manager.directory} at step {latest}", flush=True)

  rng = jax.random.key(seed)
  init_rng, frozen_rng, step_rng = jax.random.split(rng, 3)
  if initial_checkpoint_path:
    frozen_params = programs.load_frozen_params(initial_checkpoint_path)
  else:
    if counts["frozen"]:
      log.warning("INITIAL_CHECKPOINT_PATH is not set: the frozen model is randomly initialised")
    frozen_params = programs.random_frozen_params(frozen_rng)
  # Everything is checked and loaded. A new run is recorded before its first step; a resumed
  # one records what changed (an allowed config change, another config.gin) with its first
  # save, so a resume that stops before saving anything leaves the record as it was.
  record_pending = jax.process_index() == 0 and complete is None

  def write_record(step: int):
    nonlocal record_pending
    if record_pending:
      run_dir.write_record(model_dir, record, step, saved=saved_record)
      if config_text is not None:
        run_dir.write_config(model_dir, config_text, step)
      record_pending = False

  if restored is None:
    write_record(start_step)
  if jax.process_index() == 0 and complete is None:
    # steps after the resumed one are logged again: no duplicates
    metric_writer.truncate_metrics(model_dir, start_step if start_step else -1)
  if complete is not None:
    manager.close()
    return RunResult(complete, state, frozen_params)
  if restored is None:
    state = regime.init_state(frozen_params, init_rng)
    divergence.start(float(_max_abs(regime.prompt_params(state))))
  else:
    _recreate_missing_exports(regime, manager, frozen_params, model_dir, state, latest)

  evaluate_fn = evaluate_fn or evaluation.evaluate
  summary: dict[str, Any] = {"model_dir": model_dir}
  eval_writer = MetricWriter(model_dir, "eval") if eval_dataset_cfg else None
  progress = None

  def say(line: str):
    (progress.write if progress is not None and not progress.disable else print)(line)
    sys.stdout.flush()

  # One seqio Evaluator per run for the default evaluation (others build their own).
  reuse = {"evaluators": {}} if evaluate_fn is evaluation.evaluate else {}

  evaluated: dict[int, dict] = {}  # step -> validation metrics, this invocation

  def run_eval(what: str, step: int) -> dict:
    scores = evaluate_fn(programs, regime.prompt_params(state), frozen_params,
                         eval_dataset_cfg, max_decode_length=max_decode_length, **reuse)
    eval_writer.write(step, scores)
    evaluated[step] = scores
    say(f"eval ({what}, step {step}): " + ", ".join(
        f"{k} {v:.2f}" for k, v in sorted(scores.items())))
    return scores

  untrained_path = os.path.join(model_dir, UNTRAINED_EVAL_FILE)
  if eval_dataset_cfg and eval_at_start:
    if start_step == 0:
      summary["eval_untrained"] = run_eval("untrained prompt", 0)
      if jax.process_index() == 0:
        run_dir.write_json(untrained_path, summary["eval_untrained"])
    else:
      untrained = run_dir.read_json(untrained_path)
      # The untrained prompt's scores are a baseline only on the data they were measured on.
      same_data = saved_record is None or (
          saved_record.get("data") == record["data"] and not any(
              c["name"].startswith("data.") for change in saved_record.get("changes", [])
              for c in change.get("changed", [])))
      if untrained is not None and same_data:
        summary["eval_untrained"] = untrained

  def save(step: int, metrics: Mapping[str, float]):
    write_record(start_step)
    extra = {"eval_metrics": evaluated[step]} if step in evaluated else {}
    saved = manager.save(step, state, dict(meta, data_position=step,
                                           train_metrics=dict(metrics),
                                           divergence_reference=divergence.reference, **extra),
                         force=True)
    if saved:
      exported = programs.export_prompt(regime.prompt_params(state), frozen_params)
      if exported is not None and jax.process_index() == 0:
        checkpoints.export_prompt_npy(exported, model_dir, step)

  def diverged(step: int, loss: float, prompt_finite: bool,
               reason: Optional[str] = None) -> TrainingDivergedError:
    good = manager.latest_step()
    reason = reason or (f"loss {loss}, updated prompt "
                        f"{'finite' if prompt_finite else 'non-finite'}")
    return TrainingDivergedError(
        f"training diverged at step {step}: {reason}; stopped without saving it. Last good "
        f"checkpoint: {'none' if good is None else f'step {good} in {manager.directory}'}")

  train_writer = MetricWriter(model_dir, "train")
  step = start_step
  if start_step < train_steps:
    batches = regime.batches(start_step, jax.process_index(), jax.process_count())
    # Inputs are sharded onto the devices two steps ahead, and the step's results stay on the
    # devices: the host waits only at log, checkpoint, evaluation and stop points, where
    # `finite` (the first non-finite step, tracked on the devices) is checked before anything
    # is logged as good, saved or evaluated.
    device_inputs = prefetch_to_devices(batches, regime.shard, size=2)
    finite = FiniteTracker()
    progress = _progress(train_steps, start_step, label)
    window_start, window_steps, paused = time.perf_counter(), 0, 0.0

    def checked():
      bad = finite.first_bad()
      if bad is not None:
        raise diverged(*bad)

    def pause(fn, *args):  # time outside training steps does not count in steps/s
      nonlocal paused
      started = time.perf_counter()
      fn(*args)
      paused += time.perf_counter() - started

    try:
      with preemption.StopOnSignal(jax.process_count()) as stop:
        for step in range(start_step + 1, train_steps + 1):
          state, metrics = regime.step_fn(state, frozen_params, next(device_inputs), step_rng)
          finite.update(metrics, step)
          window_steps += 1
          progress.update(1)
          if step % log_every_steps == 0 or step in (start_step + 1, train_steps):
            checked()
            last_metrics = {k: float(v) for k, v in metrics.items() if k not in FLAGS}
            runaway = divergence.check(last_metrics["loss"],
                                       float(_max_abs(regime.prompt_params(state))))
            if runaway:
              raise diverged(step, last_metrics["loss"], True, runaway)
            elapsed = time.perf_counter() - window_start - paused
            if step != start_step + 1:  # the first step's time is mostly compilation
              last_metrics["steps_per_second"] = window_steps / max(elapsed, 1e-9)
            train_writer.write(step, last_metrics)
            progress.set_postfix({k: f"{last_metrics[k]:.4f}" for k in POSTFIX
                                  if k in last_metrics}, **({
                                      "steps_per_s": f"{last_metrics['steps_per_second']:.1f}"}
                                      if "steps_per_second" in last_metrics else {}))
            window_start, window_steps, paused = time.perf_counter(), 0, 0.0
          if stop.requested(step):
            checked()
            save(step, last_metrics)
            raise preemption.Preempted(
                f"stopped by {stop.signal_name or 'a preemption notice'} after step {step}; "
                f"saved a checkpoint in {manager.directory}; rerun the same command to "
                "continue")
          # Evaluation before the save of the same step: the checkpoint keeps its score, by
          # which rotation spares the best one.
          if eval_dataset_cfg and eval_every_steps and step % eval_every_steps == 0 \
              and step != train_steps:
            checked()
            pause(run_eval, "training", step)
          if step % checkpoint_every_steps == 0:
            checked()
            pause(save, step, last_metrics)
    finally:
      progress.close()
      progress = None
      train_writer.close()
    checked()
    if manager.latest_step() != step:
      save(step, last_metrics)
  summary["train"] = last_metrics
  summary["step"] = step
  if eval_dataset_cfg:
    summary["eval_trained"] = run_eval("trained prompt", step)
    eval_writer.close()
    best = manager.rotate({step: summary["eval_trained"]})
    if best is not None:
      summary["best_checkpoint"] = best
  manager.close()
  if jax.process_index() == 0:
    run_dir.write_json(summary_path, summary)
    draw_curves(model_dir)
  return RunResult(summary, state, frozen_params)


def draw_curves(model_dir: str) -> None:
  """MODEL_DIR/curves.png from metrics.jsonl; a failure to draw is reported, not raised (the
  run itself is done and saved)."""
  from prompt_jax.training import curves  # pylint: disable=g-import-not-at-top
  try:
    curves.plot_run(model_dir)
  except Exception as e:  # pylint: disable=broad-except
    log.warning("could not draw %s: %s", os.path.join(model_dir, run_dir.CURVES_FILE), e)


class DivergenceGuard:
  """Stops a run that runs away while staying finite (the on-device check catches NaN/inf).

  Two signs, each switchable off with None:
    loss: the mean of the last `window` logged training losses exceeds `loss_factor` times the
      untrained loss (the first logged loss of the run); training that works lowers the loss,
      so ten times the untrained loss is a run that went wrong, not a slow one.
    parameters: the largest |trainable value| exceeds `param_factor` times its value before
      the first step (at least 1.0); Adafactor and Adam move parameters by about the learning
      rate per step, so a 1000-fold growth is a learning rate that is orders too large (an
      lr of 1e30 leaves the loss near the untrained one, but the prompt at ~1e29).
  `reference` carries the untrained loss and initial size across resumes (saved in each
  checkpoint's metadata).
  """

  def __init__(self, loss_factor: Optional[float] = 10.0, param_factor: Optional[float] = 1e3,
               window: int = 3, reference: Optional[Mapping[str, float]] = None):
    for name, value in (("divergence_loss_factor", loss_factor),
                        ("divergence_param_factor", param_factor)):
      if value is not None and (isinstance(value, bool) or not value > 1):
        raise ValueError(f"{name} must be a number > 1 or None (off), got {value!r}")
    self.loss_factor, self.param_factor = loss_factor, param_factor
    self.window = check_count("divergence window", window, 1)
    self.reference = dict(reference or {})
    self.losses: collections.deque = collections.deque(maxlen=self.window)

  def start(self, max_abs: float) -> None:
    """The trainable parameters' largest |value| before the first step of a fresh run."""
    self.reference.setdefault("initial_max_abs", float(max_abs))

  def check(self, loss: float, max_abs: Optional[float]) -> Optional[str]:
    """Why the run diverged at this log point, or None."""
    self.reference.setdefault("untrained_loss", float(loss))
    self.losses.append(float(loss))
    untrained = self.reference["untrained_loss"]
    if self.loss_factor is not None and len(self.losses) == self.window and untrained > 0:
      mean = sum(self.losses) / self.window
      if mean > self.loss_factor * untrained:
        return (f"mean loss {mean:.4g} over the last {self.window} logged steps is above "
                f"{self.loss_factor:g} x the untrained loss {untrained:.4g}")
    initial = self.reference.get("initial_max_abs")
    if self.param_factor is not None and max_abs is not None and initial is not None:
      limit = self.param_factor * max(initial, 1.0)
      if max_abs > limit:
        return (f"the trainable parameters reached |value| {max_abs:.3g}, above "
                f"{self.param_factor:g} x their initial {max(initial, 1.0):.3g}")
    return None


POSTFIX = ("cross_ent_loss", "loss")  # the training metrics shown beside the progress bar


FLAGS = ("all_finite", "prompt_finite")  # step outputs that are checks, not metrics

_max_abs = jax.jit(params_lib.tree_max_abs)


class FiniteTracker:
  """The first step whose loss or updated prompt was not finite, tracked on the devices (no
  host sync per step); `first_bad()` fetches it."""

  def __init__(self):
    self.state = (jnp.array(0, jnp.int32), jnp.array(0.0, jnp.float32), jnp.array(True))

  def update(self, metrics: Mapping[str, Array], step: int) -> None:
    self.state = _track_first_bad(self.state, metrics["all_finite"], metrics["loss"],
                                  metrics["prompt_finite"], step)

  def first_bad(self) -> Optional[tuple[int, float, bool]]:
    """(step, loss, prompt finite) of the first non-finite step, or None."""
    step, loss, prompt_finite = jax.device_get(self.state)
    return None if int(step) == 0 else (int(step), float(loss), bool(prompt_finite))


@jax.jit
def _track_first_bad(state, all_finite, loss, prompt_finite, step):
  first, first_loss, first_prompt_finite = state
  new = (first == 0) & ~all_finite
  return (jnp.where(new, jnp.asarray(step, jnp.int32), first),
          jnp.where(new, loss.astype(jnp.float32), first_loss),
          jnp.where(new, prompt_finite, first_prompt_finite))


def prefetch_to_devices(batches: Iterator[Mapping[str, np.ndarray]],
                        shard: Callable[[Mapping[str, np.ndarray]], Any],
                        size: int = 2) -> Iterator[Any]:
  """`shard(batch)` of each host batch, `size` batches ahead of the consumer, so the transfer
  of the next batches overlaps the current step (double-buffered with size 2)."""
  queue: collections.deque = collections.deque()
  for batch in itertools.islice(batches, size):
    queue.append(shard(batch))
  while queue:
    yield queue.popleft()
    for batch in itertools.islice(batches, 1):
      queue.append(shard(batch))


def _recreate_missing_exports(regime: Regime, manager, frozen_params, model_dir: str, state,
                              state_step: int) -> None:
  """Write `prompts/prompt_<step>.npy` for every kept checkpoint that lacks it (a kill between
  the checkpoint's commit and its export)."""
  if jax.process_index() != 0:
    return
  for step in manager.all_steps():
    path = run_dir.prompt_export_path(model_dir, step)
    if os.path.exists(path):
      continue
    step_state = state if step == state_step else manager.restore(
        step, regime.abstract_state())[0]
    exported = regime.programs.export_prompt(regime.prompt_params(step_state), frozen_params)
    if exported is not None:
      checkpoints.export_prompt_npy(exported, model_dir, step)
      log.info("re-created the missing export %s", path)
