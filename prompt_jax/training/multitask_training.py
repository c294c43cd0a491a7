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
whole bank), and evaluates every task with its own prompt, plus the mixture average
(`serving.multitask_evaluation`).
"""

from __future__ import annotations

import os
from typing import Any, Iterator, Optional

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
from prompt_jax.serving import multitask_evaluation
from prompt_jax.storage import run_dir
from prompt_jax.training import optimizers, trainer

Array = jax.Array
TASKS_FILE = "tasks.json"


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


def export_task_prompts(programs: PromptPrograms, prompt_params, frozen_params, tasks,
                        model_dir: str) -> dict[str, str]:
  """MODEL_DIR/prompts/<task>.npy and the PEFT adapter MODEL_DIR/prompts/peft/<task>/ of every
  task (the loop's prompts/prompt_<step>.npy exports are the whole bank)."""
  paths = {}
  prompts = multitask_evaluation.task_prompts(programs, prompt_params, frozen_params, tasks)
  for task, prompt in prompts.items():
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
  multitask_evaluation.check_bank(model, tasks)
  pipeline.check_vocabulary(train_dataset_cfg, model.config.vocab_size)
  lengths = train_dataset_cfg.task_feature_lengths
  task_paths = task_leaf_paths(model)
  programs = PromptPrograms.for_training(
      model, optimizers.per_task(optimizer or optimizers.adafactor(), task_paths),
      partitioner, lengths["inputs"], lengths["targets"], train_dataset_cfg.batch_size,
      frozen_dtype=frozen_dtype)
  saved = run_dir.read_json(os.path.join(model_dir, TASKS_FILE))
  if saved is not None and saved["tasks"] != tasks:
    raise ValueError(f"{model_dir} was trained on the tasks {saved['tasks']}, the mixture "
                     f"{train_dataset_cfg.mixture_or_task_name!r} has {tasks}; use a new MODEL_DIR")
  print(f"multi-task prompt tuning: {len(tasks)} tasks, one prompt each: {', '.join(tasks)}",
        flush=True)
  result = trainer.run(
      MultiTaskTuning(programs, train_dataset_cfg, tasks, task_paths), model_dir=model_dir,
      train_steps=train_steps, eval_dataset_cfg=eval_dataset_cfg,
      initial_checkpoint_path=initial_checkpoint_path,
      checkpoint_every_steps=checkpoint_every_steps, keep_checkpoints=keep_checkpoints,
      eval_every_steps=eval_every_steps, eval_at_start=eval_at_start,
      log_every_steps=log_every_steps,
      max_decode_length=max_decode_length or lengths["targets"], seed=seed,
      evaluator="multitask",
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
    run_dir.write_json(os.path.join(model_dir, run_dir.SUMMARY_FILE), summary)
  return summary
