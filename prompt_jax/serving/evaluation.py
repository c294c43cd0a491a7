"""The evaluators by name (`EVALUATORS`, chosen in gin as `evaluator = 'ensemble'`), and
`run_evaluation`, the gin entry point of `prompt-jax eval`."""

from __future__ import annotations

import os
from typing import Any, Callable, Optional, Union

from prompt_jax import params as params_lib
from prompt_jax.data import pipeline
from prompt_jax.models import decoding as decoding_lib
from prompt_jax.models.encoder_decoder import EncoderDecoderModel
from prompt_jax.partitioning import Partitioner
from prompt_jax.serving import ensemble, evaluators, loading, multitask_evaluation
from prompt_jax.storage.metric_writer import MetricWriter

# name -> class implementing `evaluators.Evaluator`, built as (dataset_cfg, max_decode_length=,
# decoding=, log_dir=).
EVALUATORS: dict[str, Callable[..., evaluators.Evaluator]] = {
    "task": evaluators.TaskEvaluator,  # the task's own metrics (the default)
    "ensemble": ensemble.EnsembleEvaluator,  # a prompt bank: each prompt, mean, best, vote
    "multitask": multitask_evaluation.MultitaskEvaluator,  # each task with its own prompt
}

EvaluatorChoice = Union[str, Callable[..., evaluators.Evaluator]]


def make_evaluator(evaluator: EvaluatorChoice, dataset_cfg: pipeline.DatasetConfig, *,
                   max_decode_length: int, decoding: Optional[Any] = None,
                   log_dir: Optional[str] = None) -> evaluators.Evaluator:
  """The evaluator named `evaluator` (a key of `EVALUATORS`), or built by `evaluator` itself
  when it is a class (any callable taking the same arguments), for `dataset_cfg`."""
  if isinstance(evaluator, str):
    if evaluator not in EVALUATORS:
      raise ValueError(f"unknown evaluator {evaluator!r}; known: {', '.join(EVALUATORS)}")
    evaluator = EVALUATORS[evaluator]
  return evaluator(dataset_cfg, max_decode_length=max_decode_length, decoding=decoding,
                   log_dir=log_dir)


def run_evaluation(*, model: EncoderDecoderModel, dataset_cfg: pipeline.DatasetConfig,
                   initial_checkpoint_path: Optional[str] = None,
                   model_dir: Optional[str] = None, prompt_path: Optional[str] = None,
                   step: Optional[int] = None, output_dir: Optional[str] = None,
                   max_decode_length: Optional[int] = None,
                   partitioner: Optional[Partitioner] = None,
                   trainable_pattern: str = params_lib.DEFAULT_TRAINABLE_PATTERN,
                   write_predictions: bool = True, seed: int = 0,
                   evaluator: EvaluatorChoice = "task",
                   decoding: Optional[Any] = None, random_frozen_model: bool = False,
                   allow_config_change: bool = False) -> dict[str, Any]:
  """`prompt-jax eval`: metrics of a trained prompt on `dataset_cfg`'s task and split.

  The frozen model is `initial_checkpoint_path`, else the one MODEL_DIR's run was trained on;
  a model or checkpoint that contradicts MODEL_DIR's record is refused unless
  `allow_config_change`, and no checkpoint at all is an error unless `random_frozen_model`.
  The prompt comes from `prompt_path` (a prompt source of `prompt_files`, e.g. a `.npy` export)
  or MODEL_DIR's checkpoint at `step` (default: the latest; only its prompt is read, so no
  optimizer is needed).

  `evaluator` (`EVALUATORS`: 'task', 'ensemble' for a prompt bank, 'multitask') scores it,
  decoding generative tasks with `decoding` (gin: `DECODE_FN`, a `prompt_jax.models.decoding`
  object; None is greedy). Metrics go to TensorBoard and metrics.jsonl under
  `<output_dir or model_dir>/eval_<split>` (for a `prompt_path`, only to `output_dir`),
  predictions (with `write_predictions`) to `<task>-<step>.jsonl` beside them, and a table to
  stdout. Returns {'metrics': {...}, 'step': step, 'task': name, 'split': split}.
  """
  pipeline.check_vocabulary(dataset_cfg, model.config.vocab_size)
  decoding = decoding_lib.resolve(decoding)
  # A prompt given by PROMPT_PATH is not the run's: its scores and predictions stay out of
  # MODEL_DIR (its metrics.jsonl is the run's record) unless OUTPUT_DIR asks for a place.
  out_dir = output_dir or (None if prompt_path else model_dir)
  log_dir = os.path.join(out_dir, f"eval_{dataset_cfg.split}") if out_dir else None
  score = make_evaluator(
      evaluator, dataset_cfg,
      max_decode_length=max_decode_length or dataset_cfg.task_feature_lengths["targets"],
      decoding=decoding, log_dir=log_dir if write_predictions else None)
  programs, frozen = loading.build_programs(model, initial_checkpoint_path, partitioner,
                                            trainable_pattern, seed, model_dir=model_dir,
                                            random_frozen_model=random_frozen_model,
                                            allow_config_change=allow_config_change)
  prompt, step = loading.load_prompt_params(programs, frozen, model_dir=model_dir,
                                            prompt_path=prompt_path, step=step, seed=seed)
  scores = score(programs, prompt, frozen, step)
  if log_dir:
    writer = MetricWriter(out_dir, f"eval_{dataset_cfg.split}")
    writer.write(step, scores)
    writer.close()
  decoded_with = "" if decoding == decoding_lib.Greedy() else f", decoded with {decoding}"
  print(f"\n{dataset_cfg.mixture_or_task_name} ({dataset_cfg.split}), prompt at step {step}"
        f"{decoded_with}")
  print(evaluators.format_metrics_table(scores), flush=True)
  return {"metrics": scores, "step": step, "task": dataset_cfg.mixture_or_task_name,
          "split": dataset_cfg.split}
