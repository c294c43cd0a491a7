"""The training loop: one program for every regime, and `train`, its prompt-tuning entry point.

`run(regime, ...)` trains any `regimes.Regime` (plain prompt tuning and every prompt method,
prompt banks, SPT's gate search and re-training, full-model pretraining): the loop owns
MODEL_DIR, data position, checkpoints and resume, NaN handling, metrics, evaluation scheduling
and preemption; the regime owns its state, step and batches. The parameter tree is split once
into `prompt_params` (trainable: with their optimizer state they form the state) and
`frozen_params` (an ordinary, non-donated argument of every step: never differentiated, never in
the optimizer state, never copied or saved).

The loop (`_run`) reads top to bottom from its named pieces: `Checkpointer` (the record, resume,
save + export, rotation), `EvalSchedule` (which steps are evaluated, by which evaluator, written
where), `Console` (the progress bar and the lines printed beside it) and `_train_steps` (the
steps between a start and `train_steps`, with logging, guards and preemption).
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import itertools
import logging
import os
import sys
import time
from typing import Any, Callable, Iterator, Mapping, Optional, Sequence

import jax
import numpy as np
import optax
from tqdm.auto import tqdm

from prompt_jax import params as params_lib
from prompt_jax.data import pipeline
from prompt_jax.models.encoder_decoder import EncoderDecoderModel
from prompt_jax.partitioning import Partitioner
from prompt_jax.programs import PromptPrograms, TrainState  # noqa: F401  (TrainState: public)
from prompt_jax.serving import evaluation
from prompt_jax.storage import checkpoints, curves, metric_writer, run_dir
from prompt_jax.storage.metric_writer import MetricWriter
from prompt_jax.training import preemption
from prompt_jax.training.guards import (
  DivergenceGuard,
  FiniteTracker,
  TrainingDivergedError,
  check_count,
  max_abs,
)
from prompt_jax.training.optimizers import adafactor
from prompt_jax.training.regimes import PromptTuning, Regime
from prompt_jax.training.run_record import (
  check_resume_compatible,
  check_settings,
  json_value,
  run_record,
)

log = logging.getLogger(__name__)

POSTFIX = ("cross_ent_loss", "loss")  # the training metrics shown beside the progress bar
FLAGS = ("all_finite", "prompt_finite")  # step outputs that are checks, not metrics


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
          evaluator: evaluation.EvaluatorChoice = "task",
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
  `evaluator` scores `eval_dataset_cfg` (`evaluation.EVALUATORS`: 'task', 'ensemble' for a
  prompt bank, 'multitask'; or an evaluator class). `allow_config_change` resumes a MODEL_DIR
  whose record (run.json) differs from this run; the change is appended to the record.
  `config_text` (the CLI's gin config) is written to MODEL_DIR/config.gin.

  Safety: MODEL_DIR is locked for the run; a step whose loss or updated prompt is not finite
  stops training without saving (`TrainingDivergedError`), and so does a finite run that runs
  away (`DivergenceGuard`: `divergence_loss_factor`, `divergence_param_factor`; None turns
  each off); SIGINT/SIGTERM save the current step and raise `preemption.Preempted`; rerunning
  a finished run returns its summary, and a run whose final evaluation was cut short runs only
  that.

  Returns a summary: the final training metrics and, when `eval_dataset_cfg` is set, the
  validation metrics of the untrained and of the trained prompt.
  """
  pipeline.check_vocabulary(train_dataset_cfg, model.config.vocab_size)
  lengths = train_dataset_cfg.task_feature_lengths
  programs = PromptPrograms.for_training(
      model, optimizer or adafactor(), partitioner, lengths["inputs"], lengths["targets"],
      train_dataset_cfg.batch_size, trainable_pattern, frozen_dtype=frozen_dtype)
  regime = PromptTuning(programs, train_dataset_cfg, batch_transforms)
  return run(regime, model_dir=model_dir, train_steps=train_steps,
             eval_dataset_cfg=eval_dataset_cfg, initial_checkpoint_path=initial_checkpoint_path,
             checkpoint_every_steps=checkpoint_every_steps, keep_checkpoints=keep_checkpoints,
             eval_every_steps=eval_every_steps, eval_at_start=eval_at_start,
             log_every_steps=log_every_steps,
             max_decode_length=max_decode_length or lengths["targets"], seed=seed,
             evaluator=evaluator, allow_config_change=allow_config_change,
             config_text=config_text,
             divergence=DivergenceGuard(divergence_loss_factor, divergence_param_factor)).summary


@dataclasses.dataclass
class RunResult:
  """What `run` ends with: the summary written to summary.json, the final training state (the
  regime's) and the frozen parameters it was trained against."""

  summary: dict[str, Any]
  state: Any
  frozen_params: Any


@dataclasses.dataclass
class RunSettings:
  """How `run` trains, checked once (`run` takes them as keywords)."""

  train_steps: int
  eval_dataset_cfg: Optional[pipeline.DatasetConfig] = None
  initial_checkpoint_path: Optional[str] = None
  checkpoint_every_steps: int = 1000
  keep_checkpoints: Optional[int] = 3
  eval_every_steps: int = 0
  eval_at_start: bool = True
  log_every_steps: int = 10
  max_decode_length: int = 8
  seed: int = 0
  evaluator: evaluation.EvaluatorChoice = "task"
  allow_config_change: bool = False
  label: str = "train"
  config_text: Optional[str] = None
  divergence: Optional[DivergenceGuard] = None

  def __post_init__(self):
    self.train_steps = check_count("TRAIN_STEPS", self.train_steps, 1)
    self.checkpoint_every_steps = check_count("CHECKPOINT_PERIOD", self.checkpoint_every_steps,
                                              1)
    self.eval_every_steps = check_count("EVAL_PERIOD", self.eval_every_steps or 0, 0)
    self.log_every_steps = check_count("log_every_steps", self.log_every_steps, 1)
    self.divergence = self.divergence or DivergenceGuard()


def run(regime: Regime, *, model_dir: Optional[str], **settings: Any) -> RunResult:
  """The training loop of every regime (`regimes.Regime`): `train_steps` steps of
  `regime.step_fn` in MODEL_DIR, resumed from its newest good checkpoint (`RunSettings` lists
  the keywords and their defaults).

  The loop owns MODEL_DIR and its lock, the data position, checkpoints (every
  `checkpoint_every_steps` and at the end; `keep_checkpoints` kept, and the best by validation
  score), resume, the on-device finiteness check (`TrainingDivergedError`, nothing non-finite
  is saved), metrics, evaluation of `eval_dataset_cfg` by `evaluator` (before training, every
  `eval_every_steps` and after), prompt exports and preemption (`preemption.Preempted` after a
  saved step). `label` names the progress bar; `divergence` (default `DivergenceGuard()`)
  stops a finite run that runs away, as a non-finite step does.

  The run record (MODEL_DIR/run.json, `run_record`) is compared before anything is read or
  written: a MODEL_DIR trained with another model, prompt, frozen checkpoint, data, optimizer
  or seed is refused in one line naming each difference (`run_dir.RunMismatchError`) unless
  `allow_config_change`; it is written before the first step with `config_text` as config.gin.
  """
  config = RunSettings(**settings)
  model_dir = run_dir.check_model_dir(model_dir)
  with run_dir.RunLock(model_dir):
    return _run(regime, model_dir, config)


def _run(regime: Regime, model_dir: str, config: RunSettings) -> RunResult:
  programs = regime.programs
  _print_model(programs)
  checkpointer = Checkpointer(regime, model_dir, config)
  start = checkpointer.resume(config.train_steps, config.eval_dataset_cfg is not None)
  init_rng, frozen_rng, step_rng = jax.random.split(jax.random.key(config.seed), 3)
  frozen_params = programs.frozen_params(config.initial_checkpoint_path, frozen_rng,
                                         random_ok=True)
  if start.complete is not None:
    checkpointer.close()
    return RunResult(start.complete, start.state, frozen_params)
  checkpointer.begin(start, frozen_params)
  state = start.state
  if state is None:
    state = regime.init_state(frozen_params, init_rng)
    config.divergence.start(float(max_abs(regime.prompt_params(state))))
  else:
    checkpointer.recreate_missing_exports(state, start.restored_step)

  console = Console()
  schedule = EvalSchedule(config, model_dir, console)
  summary: dict[str, Any] = {"model_dir": model_dir}
  if schedule.enabled and config.eval_at_start:
    untrained = schedule.untrained(start.step, programs, regime.prompt_params(state),
                                   frozen_params, checkpointer.same_data())
    if untrained is not None:
      summary["eval_untrained"] = untrained
  state, step, last_metrics = _train_steps(regime, state, frozen_params, step_rng, start,
                                           config, checkpointer, schedule, console)
  summary["train"], summary["step"] = last_metrics, step
  if schedule.enabled:
    summary["eval_trained"] = schedule.evaluate("trained prompt", step, programs,
                                                regime.prompt_params(state), frozen_params)
    schedule.close()
    best = checkpointer.rotate({step: summary["eval_trained"]})
    if best is not None:
      summary["best_checkpoint"] = best
  checkpointer.close()
  if jax.process_index() == 0:
    run_dir.write_json(os.path.join(model_dir, run_dir.SUMMARY_FILE), summary)
    draw_curves(model_dir)
  return RunResult(summary, state, frozen_params)


def _train_steps(regime: Regime, state, frozen_params, step_rng, start: Start,
                 config: RunSettings, checkpointer: Checkpointer, schedule: EvalSchedule,
                 console: Console) -> tuple[Any, int, dict]:
  """Steps `start.step + 1 .. train_steps` -> (state, last step, last logged metrics).

  Inputs are sharded onto the devices two steps ahead and the step's results stay on the
  devices: the host waits only at log, checkpoint, evaluation and stop points, where the first
  non-finite step (`FiniteTracker`) is checked before anything is logged as good, saved or
  evaluated. The last step is saved when no checkpoint holds it."""
  step, last_metrics = start.step, start.last_metrics
  if start.step >= config.train_steps:
    return state, step, last_metrics
  batches = regime.batches(start.step, jax.process_index(), jax.process_count())
  device_inputs = prefetch_to_devices(batches, regime.shard, size=2)
  finite, rate = FiniteTracker(), StepRate()
  train_writer = MetricWriter(checkpointer.model_dir, "train")
  console.open(config.train_steps, start.step, config.label)

  def checked():
    bad = finite.first_bad()
    if bad is not None:
      raise checkpointer.diverged(*bad)

  try:
    with preemption.StopOnSignal(jax.process_count()) as stop:
      for step in range(start.step + 1, config.train_steps + 1):
        state, metrics = regime.step_fn(state, frozen_params, next(device_inputs), step_rng)
        finite.update(metrics, step)
        rate.count()
        console.advance()
        if step % config.log_every_steps == 0 or step in (start.step + 1, config.train_steps):
          checked()
          last_metrics = _log_step(step, metrics, regime.prompt_params(state), config,
                                   checkpointer, rate, step == start.step + 1, train_writer,
                                   console)
        if stop.requested(step):
          checked()
          checkpointer.save(step, state, last_metrics, schedule.scores)
          raise preemption.Preempted(
              f"stopped by {stop.signal_name or 'a preemption notice'} after step {step}; "
              f"saved a checkpoint in {checkpointer.directory}; rerun the same command to "
              "continue")
        # Evaluation before the save of the same step: the checkpoint keeps its score, by
        # which rotation spares the best one.
        if schedule.due(step):
          checked()
          with rate.paused():
            schedule.evaluate("training", step, regime.programs, regime.prompt_params(state),
                              frozen_params)
        if step % config.checkpoint_every_steps == 0:
          checked()
          with rate.paused():
            checkpointer.save(step, state, last_metrics, schedule.scores)
  finally:
    console.close()
    train_writer.close()
  checked()
  if checkpointer.latest_step() != step:
    checkpointer.save(step, state, last_metrics, schedule.scores)
  return state, step, last_metrics


def _log_step(step: int, metrics: Mapping[str, Any], prompt_params, config: RunSettings,
              checkpointer: Checkpointer, rate: StepRate, first: bool,
              writer: MetricWriter, console: Console) -> dict[str, float]:
  """A log point: the step's metrics fetched, checked for a run-away run, written and shown."""
  logged = {k: float(v) for k, v in metrics.items() if k not in FLAGS}
  runaway = config.divergence.check(logged["loss"], float(max_abs(prompt_params)))
  if runaway:
    raise checkpointer.diverged(step, logged["loss"], True, runaway)
  steps_per_second = rate.window_rate()
  if not first:  # the first step's time is mostly compilation
    logged["steps_per_second"] = steps_per_second
  writer.write(step, logged)
  console.show(logged)
  return logged


def _print_model(programs: PromptPrograms) -> None:
  counts = programs.param_counts()
  log.info("parameters: %s frozen, %s trainable", f"{counts['frozen']:,}",
           f"{counts['trainable']:,}")
  print(f"model: {counts['frozen']:,} frozen parameters, {counts['trainable']:,} trainable; "
        f"mesh {dict(programs.partitioner.mesh.shape)}", flush=True)


# ------------------------------------------------------------------------------ the pieces


@dataclasses.dataclass
class Start:
  """Where a run starts: step 0 (no state yet), a restored state, or a finished run."""

  step: int = 0
  state: Any = None
  restored_step: Optional[int] = None
  last_metrics: dict = dataclasses.field(default_factory=dict)
  complete: Optional[dict] = None  # the summary of a run that has nothing left to do


class Checkpointer:
  """A run's record and checkpoints: compares the run record before anything is read, resumes
  from the newest good checkpoint, writes the record (before the first step of a new run, with
  the first save of a resumed one, so a resume that stops before saving leaves it as it was),
  saves the state with its metadata and exports the prompt, and rotates at the end."""

  def __init__(self, regime: Regime, model_dir: str, config: RunSettings):
    self.regime, self.model_dir, self.config = regime, model_dir, config
    programs = regime.programs
    self.record = run_record(regime, config.initial_checkpoint_path, config.seed)
    self.meta = {"initial_checkpoint_path": config.initial_checkpoint_path,
                 "trainable_pattern": programs.trainable_pattern,
                 "config": json_value(dataclasses.asdict(programs.model.config)),
                 # every checkpoint keeps a copy: run.json can be lost, not the record
                 "record": self.record}
    if regime.settings:
      self.meta["settings"] = json_value(dict(regime.settings))
    self.saved_record = run_dir.read_record(model_dir)
    if self.saved_record is not None and not config.allow_config_change:
      run_dir.check_record(model_dir, self.record, saved=self.saved_record)
    self.manager = checkpoints.PromptCheckpointManager(model_dir, config.checkpoint_every_steps,
                                                       config.keep_checkpoints)
    self.directory = self.manager.directory
    self._record_pending = False
    self._start_step, self.frozen_params = 0, None

  def resume(self, train_steps: int, evaluates: bool) -> Start:
    """The newest checkpoint that restores and is finite (older ones if it does not), checked
    against this run; a run that is complete (with its final evaluation, when `evaluates`)
    returns its summary."""
    restored = self.manager.restore_latest_good(self.regime.abstract_state())
    if restored is None:
      return Start()
    state, meta, latest = restored
    if self.saved_record is None:  # run.json removed: the checkpoint's copy of the record decides
      self.saved_record = meta.get("record")
      if self.saved_record is not None and not self.config.allow_config_change:
        run_dir.check_record(self.model_dir, self.record, saved=self.saved_record)
    check_settings(meta, self.meta, self.directory)
    if not self.config.allow_config_change:
      check_resume_compatible(meta, self.meta, latest, self.directory)
    if train_steps < latest:
      raise ValueError(f"TRAIN_STEPS={train_steps} is below the step {latest} restored from "
                       f"{self.directory}; raise TRAIN_STEPS or use a new MODEL_DIR")
    start = Start(step=int(meta.get("data_position", latest)), state=state, restored_step=latest,
                  last_metrics=dict(meta.get("train_metrics") or {}))
    self.config.divergence.reference.update(meta.get("divergence_reference") or {})
    previous = run_dir.read_json(os.path.join(self.model_dir, run_dir.SUMMARY_FILE))
    if latest == train_steps and previous and previous.get("step") == train_steps and (
        not evaluates or "eval_trained" in previous):
      print(f"run in {self.model_dir} is complete (step {train_steps}); nothing to do",
            flush=True)
      start.complete = previous
    else:
      print(f"resumed from {self.directory} at step {latest}", flush=True)
    return start

  def begin(self, start: Start, frozen_params) -> None:
    """Everything is checked and loaded: a new run is recorded now (a resumed one with its
    first save); metrics logged after the start step by an earlier attempt are dropped."""
    self._start_step, self.frozen_params = start.step, frozen_params
    self._record_pending = jax.process_index() == 0
    if start.state is None:
      self.write_record()
    if jax.process_index() == 0:
      metric_writer.truncate_metrics(self.model_dir, start.step if start.step else -1)

  def write_record(self) -> None:
    if self._record_pending:
      run_dir.write_record(self.model_dir, self.record, self._start_step,
                           saved=self.saved_record)
      if self.config.config_text is not None:
        run_dir.write_config(self.model_dir, self.config.config_text, self._start_step)
      self._record_pending = False

  def same_data(self) -> bool:
    """Whether the recorded run trained on this run's data (an untrained baseline measured on
    other data is no baseline)."""
    saved = self.saved_record
    return saved is None or (saved.get("data") == self.record["data"] and not any(
        c["name"].startswith("data.") for change in saved.get("changes", [])
        for c in change.get("changed", [])))

  def save(self, step: int, state, metrics: Mapping[str, float],
           scores: Mapping[int, Mapping[str, float]]) -> None:
    """Checkpoint `state` at `step` (with its validation scores, when evaluated) and export
    its prompt as prompts/prompt_<step>.npy."""
    self.write_record()
    extra = {"eval_metrics": scores[step]} if step in scores else {}
    saved = self.manager.save(step, state, dict(
        self.meta, data_position=step, train_metrics=dict(metrics),
        divergence_reference=self.config.divergence.reference, **extra), force=True)
    if saved:
      self._export(step, state)

  def _export(self, step: int, state) -> None:
    programs = self.regime.programs
    exported = programs.export_prompt(self.regime.prompt_params(state), self.frozen_params)
    if exported is not None and jax.process_index() == 0:
      checkpoints.export_prompt_npy(exported, self.model_dir, step)

  def recreate_missing_exports(self, state, state_step: int) -> None:
    """Write `prompts/prompt_<step>.npy` for every kept checkpoint that lacks it (a kill
    between the checkpoint's commit and its export)."""
    if jax.process_index() != 0:
      return
    for step in self.manager.all_steps():
      path = run_dir.prompt_export_path(self.model_dir, step)
      if os.path.exists(path):
        continue
      step_state = state if step == state_step else self.manager.restore(
          step, self.regime.abstract_state())[0]
      self._export(step, step_state)
      log.info("re-created the missing export %s", path)

  def diverged(self, step: int, loss: float, prompt_finite: bool,
               reason: Optional[str] = None) -> TrainingDivergedError:
    good = self.manager.latest_step()
    reason = reason or (f"loss {loss}, updated prompt "
                        f"{'finite' if prompt_finite else 'non-finite'}")
    return TrainingDivergedError(
        f"training diverged at step {step}: {reason}; stopped without saving it. Last good "
        f"checkpoint: {'none' if good is None else f'step {good} in {self.directory}'}")

  def latest_step(self) -> Optional[int]:
    return self.manager.latest_step()

  def rotate(self, scores: Mapping[int, Mapping[str, float]]) -> Optional[dict]:
    return self.manager.rotate(scores)

  def close(self) -> None:
    self.manager.close()


class EvalSchedule:
  """Which steps are evaluated (the untrained prompt at step 0, every `eval_every_steps` but
  the last, the trained prompt at the end), by the run's evaluator; scores go to
  MODEL_DIR/eval_* and metrics.jsonl, and are kept by step for the checkpoints."""

  def __init__(self, config: RunSettings, model_dir: str, console: Console):
    self.config, self.model_dir, self.console = config, model_dir, console
    self.enabled = config.eval_dataset_cfg is not None
    self.scores: dict[int, dict] = {}  # step -> validation metrics, this invocation
    self.evaluator = self.writer = None
    if self.enabled:
      self.evaluator = evaluation.make_evaluator(config.evaluator, config.eval_dataset_cfg,
                                                 max_decode_length=config.max_decode_length)
      self.writer = MetricWriter(model_dir, "eval")

  def due(self, step: int) -> bool:
    every = self.config.eval_every_steps
    return self.enabled and bool(every) and step % every == 0 and step != self.config.train_steps

  def evaluate(self, what: str, step: int, programs, prompt_params, frozen_params) -> dict:
    scores = self.evaluator(programs, prompt_params, frozen_params, step)
    self.writer.write(step, scores)
    self.scores[step] = scores
    self.console.say(f"eval ({what}, step {step}): " + ", ".join(
        f"{k} {v:.2f}" for k, v in sorted(scores.items())))
    return scores

  def untrained(self, start_step: int, programs, prompt_params, frozen_params,
                same_data: bool) -> Optional[dict]:
    """The untrained prompt's scores: measured (and kept in MODEL_DIR) by a run that starts at
    step 0, read back by a resumed one when it trains on the same data."""
    path = os.path.join(self.model_dir, run_dir.UNTRAINED_EVAL_FILE)
    if start_step == 0:
      scores = self.evaluate("untrained prompt", 0, programs, prompt_params, frozen_params)
      if jax.process_index() == 0:
        run_dir.write_json(path, scores)
      return scores
    saved = run_dir.read_json(path)
    return saved if saved is not None and same_data else None

  def close(self) -> None:
    if self.writer is not None:
      self.writer.close()


class Console:
  """The progress bar (process 0) and the lines printed beside it."""

  def __init__(self):
    self.progress = None

  def open(self, total: int, initial: int, label: str) -> None:
    self.progress = tqdm(total=total, initial=initial, desc=label, unit="step",
                         dynamic_ncols=True, mininterval=0.5, disable=jax.process_index() != 0)

  def advance(self) -> None:
    self.progress.update(1)

  def show(self, metrics: Mapping[str, float]) -> None:
    shown = {k: f"{metrics[k]:.4f}" for k in POSTFIX if k in metrics}
    if "steps_per_second" in metrics:
      shown["steps_per_s"] = f"{metrics['steps_per_second']:.1f}"
    self.progress.set_postfix(shown)

  def say(self, line: str) -> None:
    progress = self.progress
    (progress.write if progress is not None and not progress.disable else print)(line)
    sys.stdout.flush()

  def close(self) -> None:
    if self.progress is not None:
      self.progress.close()
    self.progress = None


class StepRate:
  """Training steps per second over a log window; time spent in evaluation and saving
  (`paused`) does not count."""

  def __init__(self):
    self.started, self.steps, self.paused_for = time.perf_counter(), 0, 0.0

  def count(self) -> None:
    self.steps += 1

  @contextlib.contextmanager
  def paused(self):
    started = time.perf_counter()
    try:
      yield
    finally:
      self.paused_for += time.perf_counter() - started

  def window_rate(self) -> float:
    """Steps per second since the last call (or the start), then a new window."""
    elapsed = time.perf_counter() - self.started - self.paused_for
    rate = self.steps / max(elapsed, 1e-9)
    self.started, self.steps, self.paused_for = time.perf_counter(), 0, 0.0
    return rate


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


def draw_curves(model_dir: str) -> None:
  """MODEL_DIR/curves.png from metrics.jsonl; a failure to draw is reported, not raised (the
  run itself is done and saved)."""
  try:
    curves.plot_run(model_dir)
  except Exception as e:  # pylint: disable=broad-except
    log.warning("could not draw %s: %s", os.path.join(model_dir, run_dir.CURVES_FILE), e)
