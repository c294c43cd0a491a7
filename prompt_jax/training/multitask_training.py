"""Multi-task prompt tuning: one prompt per task of a seqio mixture, trained in one run.

The model's prompt hook is e.g. a `PromptBank` with one prompt per task; every example carries its
task's index as `prompt_ids` (`data.mixtures`), so one batch mixes tasks and the frozen model
runs once per batch. Two things make each task's prompt train exactly as it would alone on the
same examples:

  loss      sum_t L_t, where L_t is task t's loss normalised over task t's rows only
            (`losses.grouped_loss_and_metrics`); dL/dprompt_t = dL_t/dprompt_t.
  optimizer `optimizers.per_task(inner, task_paths)`: each task's rows get their own optimizer
            state (no coupling through e.g. Adafactor's update clipping), shared leaves one;
            a task absent from a batch keeps its rows and their optimizer state unchanged (its
            step is skipped, not a zero-gradient step).

The model's hook may be any multi-task hook that reads `prompt_ids`: a leaf whose first logical
axis is `prompts` holds one row per task, every other trainable leaf is shared by all tasks
(`task_leaf_paths`).

`MultiTaskTuning` is that regime of the one training loop (`trainer.run`); `train_multitask` is
its gin entry point (`prompt-jax multitask`). MODEL_DIR/tasks.json records the task of every
prompt index; the run exports each task's prompt as MODEL_DIR/prompts/<task>.npy (a plain
[length, embed] array that `prompt-jax infer-multitask --prompt=task=...` serves unchanged) and
as a PEFT adapter MODEL_DIR/prompts/peft/<task>/ (the loop's prompts/prompt_<step>.npy are the
whole bank), and evaluates every task with its own prompt, plus the mixture average (the mean
over tasks of each task's mean metric, as T5's GLUE average).
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Callable, Iterator, Mapping, Optional

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax

from prompt_jax import params as params_lib
from prompt_jax.data import mixtures, pipeline
from prompt_jax.interop import peft
from prompt_jax.models import losses
from prompt_jax.models.encoder_decoder import EncoderDecoderModel
from prompt_jax.partitioning import Partitioner
from prompt_jax.programs import PromptPrograms, TrainState
from prompt_jax.prompts.base import InputPrompt
from prompt_jax.prompts.plain import Prompt
from prompt_jax.serving import evaluation
from prompt_jax.storage import run_dir
from prompt_jax.training import optimizers, trainer

Array = jax.Array
TASKS_FILE = "tasks.json"


def check_bank(model: EncoderDecoderModel, tasks):
  """The model's multi-task hook: it must read `prompt_ids` and hold one prompt per task."""
  hook = model.module.prompt
  if (hook is None or mixtures.TASK_FEATURE not in getattr(hook, "input_features", ())
      or not hasattr(hook, "num_prompts")):
    raise ValueError("multi-task prompt tuning needs a prompt hook that reads prompt_ids and "
                     "holds one prompt per task (a bank.PromptBank, prompts/ensemble.gin; "
                     "prompts/multitask_shared.gin; prompts/mpt.gin), got "
                     f"{type(hook).__name__}")
  if hook.num_prompts != len(tasks):
    raise ValueError(f"the mixture has {len(tasks)} tasks ({', '.join(tasks)}) but the prompt "
                     f"hook holds {hook.num_prompts} prompts; set NUM_TASKS = {len(tasks)}")
  return hook


TASK_AXIS = "prompts"  # the logical axis of a per-task leaf's rows (a bank's prompt axis)


def task_leaf_paths(model: EncoderDecoderModel,
                    trainable_pattern: str = params_lib.DEFAULT_TRAINABLE_PATTERN) -> list[str]:
  """'/'-joined paths (relative to the trainable tree) of the trainable leaves with one row per
  task: those whose first logical axis is `TASK_AXIS`. The other trainable leaves are shared."""
  boxed = model.init_abstract(model.dummy_batch(1, 8, 8))
  trainable, _ = params_lib.split_params(boxed, trainable_pattern)
  flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(trainable), sep="/")
  return sorted(path for path, leaf in flat.items()
                if tuple(getattr(leaf, "names", ()))[:1] == (TASK_AXIS,))


class MultiTaskTuning:
  """A prompt per task, per-task losses and optimizer steps (see the module docstring).

  Args:
    programs: `PromptPrograms` of a multi-task model, built with
      `optimizers.per_task(inner, task_paths)`.
    dataset_cfg: the training mixture.
    tasks: the mixture's task names; index t is prompt t.
    task_paths: the per-task trainable leaves (`task_leaf_paths`); the others are shared.
  """

  def __init__(self, programs: PromptPrograms, dataset_cfg: Optional[pipeline.DatasetConfig],
               tasks, task_paths):
    if programs.optimizer is None:
      raise ValueError("MultiTaskTuning needs PromptPrograms built with an optimizer")
    self.programs = programs
    self.dataset_cfg = dataset_cfg
    self.tasks = tuple(tasks)
    self.task_paths = frozenset(task_paths)
    self.settings = {"tasks": list(self.tasks)}
    flat = flax.traverse_util.flatten_dict(programs.abstract_prompt, sep="/")
    for path in sorted(self.task_paths):
      if path not in flat or flat[path].shape[:1] != (len(self.tasks),):
        raise ValueError(f"the per-task parameter {path} must be [num_tasks={len(self.tasks)}, "
                         f"...], got {getattr(flat.get(path), 'shape', 'no such parameter')}")
    self.abstract_state = programs.abstract_state
    self.init_state = programs.init_state
    self.shard = programs.shard_batch
    replicated = programs.partitioner.replicated()
    self.step_fn = jax.jit(
        self._step, in_shardings=(programs.state_shardings, programs.frozen_shardings, None,
                                  replicated),
        out_shardings=(programs.state_shardings, replicated), donate_argnums=(0,))

  def loss(self, prompt_params, frozen_params, batch, dropout_rng):
    """-> (sum of the per-task losses, metrics with `group_loss` [tasks])."""
    model = self.programs.model
    params = params_lib.merge_params(prompt_params, frozen_params)
    with self.programs.partitioner.axis_rules():
      logits = model.logits(params, batch, dropout_rng)
    return losses.grouped_loss_and_metrics(
        logits, batch["decoder_target_tokens"], batch.get("decoder_loss_weights"),
        batch[mixtures.TASK_FEATURE], len(self.tasks), model.z_loss,
        model.loss_normalizing_factor)

  def _step(self, state: TrainState, frozen_params, batch, rng):
    dropout_rng = jax.random.fold_in(rng, state.step)
    (_, metrics), grads = jax.value_and_grad(self.loss, has_aux=True)(
        state.prompt_params, frozen_params, batch, dropout_rng)
    updates, opt_state = self.programs.optimizer.update(grads, state.opt_state,
                                                        state.prompt_params)
    prompt_params = optax.apply_updates(state.prompt_params, updates)
    present = metrics.pop("group_present")

    def keep_absent(new, old):  # [tasks, ...] leaves: an absent task's row is unchanged
      mask = present.reshape((-1,) + (1,) * (jnp.ndim(new) - 1))
      return jnp.where(mask, new, old)
    new_flat = flax.traverse_util.flatten_dict(prompt_params, sep="/")
    old_flat = flax.traverse_util.flatten_dict(state.prompt_params, sep="/")
    prompt_params = flax.traverse_util.unflatten_dict(
        {path: keep_absent(leaf, old_flat[path]) if path in self.task_paths else leaf
         for path, leaf in new_flat.items()}, sep="/")
    opt_state = dict(opt_state, tasks=jax.tree_util.tree_map(keep_absent, opt_state["tasks"],
                                                             state.opt_state["tasks"]))
    group_loss = metrics.pop("group_loss")
    metrics.update({f"loss/{task}": group_loss[t] for t, task in enumerate(self.tasks)})
    prompt_finite = params_lib.tree_all_finite(prompt_params)
    metrics.update(grad_norm=optax.global_norm(grads), prompt_finite=prompt_finite,
                   all_finite=jnp.isfinite(metrics["loss"]) & prompt_finite)
    return TrainState(step=state.step + 1, prompt_params=prompt_params,
                      opt_state=opt_state), metrics

  def batches(self, start_step: int, shard_id: int, num_shards: int
              ) -> Iterator[dict[str, np.ndarray]]:
    return mixtures.iterate_tagged_batches(self.dataset_cfg, start_step=start_step,
                                           shard_id=shard_id, num_shards=num_shards)

  def prompt_params(self, state: TrainState):
    return state.prompt_params


# ------------------------------------------------------------------------- evaluation, export


def single_prompt_programs(programs: PromptPrograms) -> PromptPrograms:
  """The programs of the bank's model with one plain prompt of the bank's length and placement
  (task t is evaluated and served with the bank's row t, exactly as an exported prompt is)."""
  model = programs.model
  bank = model.module.prompt
  hook = InputPrompt(Prompt(bank.length), bank.placement)
  single = dataclasses.replace(model, module=model.module.clone(prompt=hook))
  batch = programs.dummy_batch
  return PromptPrograms(single, programs.partitioner,
                        batch_size=batch["encoder_input_tokens"].shape[0],
                        input_length=batch["encoder_input_tokens"].shape[1],
                        target_length=batch["decoder_target_tokens"].shape[1])


def task_prompts(programs: PromptPrograms, prompt_params, frozen_params, tasks
                 ) -> dict[str, np.ndarray]:
  """{task: its plain [length, embed] prompt} from the bank."""
  bank = np.asarray(programs.export_prompt(prompt_params, frozen_params))
  return {task: bank[t] for t, task in enumerate(tasks)}


def mixture_average(per_task: Mapping[str, Mapping[str, float]]) -> float:
  """T5's GLUE-style average: each task's metrics averaged first, then the mean over tasks."""
  return float(np.mean([np.mean(list(scores.values())) for scores in per_task.values()]))


def make_evaluate_fn(tasks, single: PromptPrograms,
                     evaluate_fn: Optional[Callable] = None) -> Callable:
  """A `trainer.run` evaluate_fn: every task of the mixture with its own prompt ->
  {'<task>/<metric>': value, ..., 'average': mixture average}."""
  evaluate_fn = evaluate_fn or evaluation.evaluate

  def evaluate(programs, prompt_params, frozen_params, dataset_cfg, max_decode_length):
    per_task = {}
    for task, prompt in task_prompts(programs, prompt_params, frozen_params, tasks).items():
      params = evaluation.prompt_params_from_array(single, prompt)
      per_task[task] = evaluate_fn(single, params, frozen_params,
                                   mixtures.task_config(dataset_cfg, task),
                                   max_decode_length=max_decode_length)
    scores = {f"{task}/{name}": value for task, metrics in per_task.items()
              for name, value in metrics.items()}
    scores["average"] = mixture_average(per_task)
    return scores
  return evaluate


def evaluate_per_task(programs: PromptPrograms, prompt_params, frozen_params,
                      dataset_cfg: pipeline.DatasetConfig, max_decode_length: int,
                      log_dir: Optional[str] = None, step: Optional[int] = None
                      ) -> dict[str, float]:
  """`evaluation.run_evaluation`'s evaluate_fn for a multi-task run (a bank of one prompt per
  task of `dataset_cfg`'s mixture): the scores the run itself reports, every task with its
  own prompt -> {'<task>/<metric>': value, ..., 'average': mixture average}. `log_dir` and
  `step` are accepted for the interface; predictions are not logged per task."""
  del log_dir, step
  tasks = mixtures.task_names(dataset_cfg)
  check_bank(programs.model, tasks)
  evaluate = make_evaluate_fn(tasks, single_prompt_programs(programs))
  return evaluate(programs, prompt_params, frozen_params, dataset_cfg, max_decode_length)


def export_task_prompts(programs: PromptPrograms, prompt_params, frozen_params, tasks,
                        model_dir: str) -> dict[str, str]:
  """MODEL_DIR/prompts/<task>.npy and the PEFT adapter MODEL_DIR/prompts/peft/<task>/ of every
  task (the loop's prompts/prompt_<step>.npy exports are the whole bank)."""
  paths = {}
  for task, prompt in task_prompts(programs, prompt_params, frozen_params, tasks).items():
    paths[task] = run_dir.write_npy(
        os.path.join(model_dir, run_dir.PROMPTS_DIR, f"{task}.npy"), prompt)
    peft.save_prompt(prompt, os.path.join(model_dir, run_dir.PROMPTS_DIR, "peft", task))
  return paths


# ------------------------------------------------------------------------------- entry point


def train_multitask(*, model: EncoderDecoderModel, model_dir: Optional[str], train_steps: int,
                    train_dataset_cfg: pipeline.DatasetConfig,
                    eval_dataset_cfg: Optional[pipeline.DatasetConfig] = None,
                    initial_checkpoint_path: Optional[str] = None,
                    optimizer: Optional[optax.GradientTransformation] = None,
                    partitioner: Optional[Partitioner] = None,
                    checkpoint_every_steps: int = 1000, keep_checkpoints: Optional[int] = 3,
                    eval_every_steps: int = 0, eval_at_start: bool = True,
                    log_every_steps: int = 10, max_decode_length: Optional[int] = None,
                    seed: int = 0, frozen_dtype: Optional[str] = None,
                    allow_config_change: bool = False,
                    config_text: Optional[str] = None) -> dict[str, Any]:
  """Train a prompt per task of `train_dataset_cfg`'s mixture in one run (see the module
  docstring); `optimizer` is each prompt's optimizer (default: Lester et al.'s Adafactor),
  given its own state per task by `optimizers.per_task`. Returns the loop's summary plus
  `tasks` and the exported `prompts`."""
  model_dir = run_dir.check_model_dir(model_dir)
  mixtures.check_trainable_mixture(train_dataset_cfg)
  tasks = mixtures.task_names(train_dataset_cfg)
  check_bank(model, tasks)
  pipeline.check_vocabulary(train_dataset_cfg, model.config.vocab_size)
  lengths = train_dataset_cfg.task_feature_lengths
  task_paths = task_leaf_paths(model)
  programs = trainer.PromptTrainer(
      model, optimizers.per_task(optimizer or optimizers.adafactor(), task_paths),
      partitioner or Partitioner(), lengths["inputs"], lengths["targets"],
      train_dataset_cfg.batch_size, frozen_dtype=frozen_dtype)
  saved = run_dir.read_json(os.path.join(model_dir, TASKS_FILE))
  if saved is not None and saved["tasks"] != tasks:
    raise ValueError(f"{model_dir} was trained on the tasks {saved['tasks']}, the mixture "
                     f"{train_dataset_cfg.mixture_or_task_name!r} has {tasks}; use a new MODEL_DIR")
  print(f"multi-task prompt tuning: {len(tasks)} tasks, one prompt each: {', '.join(tasks)}",
        flush=True)
  single = single_prompt_programs(programs) if eval_dataset_cfg else None
  result = trainer.run(
      MultiTaskTuning(programs, train_dataset_cfg, tasks, task_paths), model_dir=model_dir,
      train_steps=train_steps, eval_dataset_cfg=eval_dataset_cfg,
      initial_checkpoint_path=initial_checkpoint_path,
      checkpoint_every_steps=checkpoint_every_steps, keep_checkpoints=keep_checkpoints,
      eval_every_steps=eval_every_steps, eval_at_start=eval_at_start,
      log_every_steps=log_every_steps,
      max_decode_length=max_decode_length or lengths["targets"], seed=seed,
      evaluate_fn=make_evaluate_fn(tasks, single) if single is not None else None,
      allow_config_change=allow_config_change, label="multi-task", config_text=config_text)
  paths = {}
  if jax.process_index() == 0:
    # Written after the loop (which checked the run record under the lock): a refused command
    # leaves another run's directory untouched. The record's settings hold the tasks meanwhile.
    run_dir.write_json(os.path.join(model_dir, TASKS_FILE), {
        "mixture": train_dataset_cfg.mixture_or_task_name, "tasks": tasks,
        "rates": mixtures.task_rates(train_dataset_cfg)})
    paths = export_task_prompts(programs, result.state.prompt_params, result.frozen_params,
                                tasks, model_dir)
  summary = dict(result.summary, tasks=tasks, prompts=paths)
  if jax.process_index() == 0:
    run_dir.write_json(os.path.join(model_dir, trainer.SUMMARY_FILE), summary)
  return summary
