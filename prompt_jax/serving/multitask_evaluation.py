"""A multi-task run's evaluator: every task of the mixture with its own prompt (the bank's row
for that task, served exactly as its export is), and the mixture average (the mean over tasks
of each task's mean metric, as T5's GLUE average)."""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Optional

import numpy as np

from prompt_jax.data import mixtures, pipeline
from prompt_jax.models.encoder_decoder import EncoderDecoderModel
from prompt_jax.programs import PromptPrograms
from prompt_jax.prompts.base import InputPrompt
from prompt_jax.prompts.hook import MultiPromptHook
from prompt_jax.prompts.plain import Prompt
from prompt_jax.serving import evaluators, loading


def check_bank(model: EncoderDecoderModel, tasks):
  """The model's multi-task hook: it must read `prompt_ids` and hold one prompt per task."""
  hook = model.module.prompt
  if not isinstance(hook, MultiPromptHook) or mixtures.TASK_FEATURE not in hook.input_features:
    raise ValueError("multi-task prompt tuning needs a prompt hook that reads prompt_ids and "
                     "holds one prompt per task (a bank.PromptBank, prompts/ensemble.gin; "
                     "prompts/multitask_shared.gin; prompts/mpt.gin), got "
                     f"{type(hook).__name__}")
  if hook.num_prompts != len(tasks):
    raise ValueError(f"the mixture has {len(tasks)} tasks ({', '.join(tasks)}) but the prompt "
                     f"hook holds {hook.num_prompts} prompts; set NUM_TASKS = {len(tasks)}")
  return hook



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


class MultitaskEvaluator:
  """`evaluators.Evaluator` of a multi-task run (a bank of one prompt per task of
  `dataset_cfg`'s mixture): the scores the run itself reports, every task with its own prompt ->
  {'<task>/<metric>': value, ..., 'average': mixture average}. Each task is scored by a
  `evaluators.TaskEvaluator` (its own metrics, `decoding`); with `log_dir`, each task's
  predictions go there as `<task>-<step>.jsonl`."""

  def __init__(self, dataset_cfg: pipeline.DatasetConfig, *, max_decode_length: int,
               decoding: Optional[Any] = None, log_dir: Optional[str] = None):
    self.tasks = mixtures.task_names(dataset_cfg)
    self.per_task = {task: evaluators.TaskEvaluator(
        mixtures.task_config(dataset_cfg, task), max_decode_length=max_decode_length,
        decoding=decoding, log_dir=log_dir) for task in self.tasks}
    self._single: Optional[tuple[PromptPrograms, PromptPrograms]] = None

  def __call__(self, programs, prompt_params, frozen_params, step: int) -> dict[str, float]:
    if self._single is None or self._single[0] is not programs:
      check_bank(programs.model, self.tasks)
      self._single = (programs, single_prompt_programs(programs))
    single = self._single[1]
    per_task = {}
    for task, prompt in task_prompts(programs, prompt_params, frozen_params, self.tasks).items():
      params = loading.prompt_params_from_array(single, prompt)
      per_task[task] = self.per_task[task](single, params, frozen_params, step)
    scores = {f"{task}/{name}": value for task, metrics in per_task.items()
              for name, value in metrics.items()}
    scores["average"] = mixture_average(per_task)
    return scores
