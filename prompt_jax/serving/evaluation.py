"""Validation metrics: a seqio task's eval split, decoded with the KV cache (greedily by default;
`decoding` chooses beam search or sampling, whose best decode is the prediction) or scored label
by label for `_rank` tasks, measured by the task's own metric functions through
`seqio.Evaluator`; and `run_evaluation`, the gin entry point of `prompt-jax eval`.
"""

from __future__ import annotations

import inspect
import logging
import os
from typing import Any, Callable, Mapping, Optional

import jax
import numpy as np
import seqio

from prompt_jax import params as params_lib
from prompt_jax.data import pipeline
from prompt_jax.models import decoding as decoding_lib
from prompt_jax.models.encoder_decoder import EncoderDecoderModel
from prompt_jax.partitioning import Partitioner
from prompt_jax.programs import PromptPrograms
from prompt_jax.storage import checkpoints, frozen_models, prompt_files, run_dir
from prompt_jax.training.metric_writer import MetricWriter

log = logging.getLogger(__name__)


def _batches(ds, batch_size: int):
  """seqio's (index, features) pairs -> (indices, padded numpy batch, real rows)."""
  indices, examples = [], []
  for index, example in ds.as_numpy_iterator():
    indices.append(int(index))
    examples.append(example)
    if len(examples) == batch_size:
      yield indices, *_stack(examples, batch_size)
      indices, examples = [], []
  if examples:
    yield indices, *_stack(examples, batch_size)


def _stack(examples, batch_size):
  batch = {k: np.stack([ex[k] for ex in examples]) for k in examples[0]}
  return pipeline.pad_batch(batch, batch_size)


def make_predict_fn(programs, prompt_params, frozen_params, batch_size: int,
                    max_decode_length: int, decoding: Optional[Any] = None):
  """seqio `PredictFnCallable`: dataset -> [(index, token ids)] with the KV cache: the best
  decode of `decoding` (a `prompt_jax.models.decoding` object; None is greedy)."""
  decoding = decoding_lib.resolve(decoding)

  def predict_fn(ds, model_params: Optional[Any] = None):
    del model_params
    outputs = []
    for indices, batch, real in _batches(ds, batch_size):
      tokens = programs.predict(prompt_params, frozen_params, batch, max_decode_length,
                                decoding)
      outputs.extend((i, [int(t) for t in row]) for i, row in zip(indices, tokens[:real]))
    return outputs
  return predict_fn


def make_score_fn(programs, prompt_params, frozen_params, batch_size: int):
  """seqio `ScoreFnCallable`: dataset -> [(index, log-likelihood of the targets)]."""
  def score_fn(ds, model_params: Optional[Any] = None):
    del model_params
    outputs = []
    for indices, batch, real in _batches(ds, batch_size):
      scores = programs.score(prompt_params, frozen_params, batch)
      outputs.extend(zip(indices, scores[:real].tolist()))
    return outputs
  return score_fn


def count_truncated(evaluator: seqio.Evaluator,
                    feature_lengths: Mapping[str, int]) -> dict[str, dict[str, int]]:
  """Per task and feature, how many eval examples were cut to the feature length (logged)."""
  counts = {}
  for task in evaluator.eval_tasks:
    over = {k: 0 for k in feature_lengths}
    total = 0
    for ex in evaluator.cached_task_datasets[task.name].as_numpy_iterator():
      total += 1
      for key, length in feature_lengths.items():
        text = ex.get(f"{key}_pretokenized")
        if key in ex and text is not None and len(ex[key]) >= length:
          vocab = task.output_features[key].vocabulary
          over[key] += len(vocab.encode(text.decode("utf-8"))) + 1 > length
    for key, n in over.items():
      if n:
        log.warning("%s: %d of %d evaluation examples have %r longer than %d tokens; they are "
                    "truncated", task.name, n, total, key, feature_lengths[key])
    counts[task.name] = over
  return counts


def seqio_evaluator(dataset_cfg: pipeline.DatasetConfig,
                    log_dir: Optional[str] = None) -> seqio.Evaluator:
  """The seqio Evaluator of `dataset_cfg`'s eval split (its examples tokenized and cached in
  memory); truncated examples are counted in the log once, here."""
  provider = pipeline.get_task_or_mixture(dataset_cfg.mixture_or_task_name, dataset_cfg.module)
  if log_dir:
    os.makedirs(log_dir, exist_ok=True)
  evaluator = seqio.Evaluator(
      mixture_or_task_name=dataset_cfg.mixture_or_task_name,
      feature_converter=seqio.EncDecFeatureConverter(pack=False),
      eval_split=dataset_cfg.split, use_cached=dataset_cfg.use_cached,
      sequence_length=dict(dataset_cfg.task_feature_lengths), log_dir=log_dir,
      logger_cls=(seqio.JSONLogger,) if log_dir else (), async_compute_metrics=False)
  if not evaluator.eval_tasks:
    splits = sorted({s for t in getattr(provider, "tasks", [provider]) for s in t.splits})
    raise ValueError(f"{dataset_cfg.mixture_or_task_name!r} has no task with metrics and a "
                     f"{dataset_cfg.split!r} split to evaluate (its splits: {splits})")
  count_truncated(evaluator, dataset_cfg.task_feature_lengths)
  return evaluator


def evaluate(programs, prompt_params, frozen_params, dataset_cfg: pipeline.DatasetConfig,
             max_decode_length: int, log_dir: Optional[str] = None,
             step: Optional[int] = None, decoding: Optional[Any] = None,
             evaluators: Optional[dict] = None) -> dict[str, float]:
  """Metrics of every task in `dataset_cfg.mixture_or_task_name` on its eval split; generative
  tasks are decoded with `decoding` (None: greedy) and scored on its best decode.

  Keys are `<metric>` for a single task and `<task>/<metric>` for a mixture. With `log_dir`,
  seqio's JSONLogger writes every input, target and prediction there (`<task>-<step>.jsonl`).
  `evaluators`: a dict the caller keeps for one run, so that its periodic evaluations reuse one
  seqio Evaluator (and its cached examples) per dataset, as T5X's train loop does; building one
  costs seconds even for a small eval split.
  """
  key = (repr(dataset_cfg), log_dir)  # the config holds a dict: not hashable itself
  if evaluators is not None and key in evaluators:
    evaluator = evaluators[key]
  else:
    evaluator = seqio_evaluator(dataset_cfg, log_dir)
    if evaluators is not None:
      evaluators[key] = evaluator
  predict_fn = make_predict_fn(programs, prompt_params, frozen_params, dataset_cfg.batch_size,
                               max_decode_length, decoding)
  score_fn = make_score_fn(programs, prompt_params, frozen_params, dataset_cfg.batch_size)
  all_metrics, _ = evaluator.evaluate(compute_metrics=True, predict_fn=predict_fn,
                                      score_fn=score_fn, step=step)
  return flatten_metrics(all_metrics.result())


def flatten_metrics(results: Mapping[str, Mapping[str, Any]]) -> dict[str, float]:
  flat = {}
  single = len(results) == 1
  for task, metrics in results.items():
    for name, value in metrics.items():
      value = getattr(value, "value", value)
      if np.ndim(value) == 0:
        flat[name if single else f"{task}/{name}"] = float(value)
  return flat


def format_metrics_table(scores: Mapping[str, float], title: str = "metric") -> str:
  """A plain-text two-column table, one metric per row."""
  width = max([len(title)] + [len(k) for k in scores])
  lines = [f"{title:<{width}}  {'value':>8}", f"{'-' * width}  {'-' * 8}"]
  lines += [f"{name:<{width}}  {value:8.2f}" for name, value in sorted(scores.items())]
  return "\n".join(lines)


# --------------------------------------------------------------------- loading a trained prompt


def prompt_params_from_array(programs, prompt: np.ndarray):
  """A prompt array (a [length, embed] `.npy` export, or a bank's [num_prompts, length, embed])
  as the programs' prompt parameter tree.

  Only for methods whose trainable parameters are that one array (Lester et al.'s, a bank)."""
  prompt = np.asarray(prompt, np.float32)
  shapes = params_lib.shapes(programs.abstract_prompt)
  if len(shapes) != 1 or next(iter(shapes.values())) != prompt.shape:
    raise ValueError(f"prompt array of shape {prompt.shape} does not fit the configured prompt "
                     f"parameters {shapes}; restore from MODEL_DIR instead")
  tree = jax.tree_util.tree_map(lambda leaf: prompt.astype(leaf.dtype), programs.abstract_prompt)
  return frozen_models.device_put_tree(tree, programs.prompt_shardings)


def load_prompt_params(programs, frozen_params, *, model_dir: Optional[str] = None,
                       prompt_path: Optional[str] = None, step: Optional[int] = None,
                       seed: int = 0):
  """The prompt to evaluate and its step: from `prompt_path`, any prompt source of
  `prompt_files` (a [length, embed] or bank `.npy`, `FILE.npy#ROW`, a PEFT adapter directory, a
  run directory `MODEL_DIR[@STEP]`; its step is `prompt_files.step_of`, else 0), else MODEL_DIR's
  checkpoint (`step`, default the latest), else a freshly initialised (untrained) prompt."""
  if prompt_path:
    prompt = prompt_files.read_prompt(prompt_path, allow_bank=True)
    if step is None:
      step = prompt_files.step_of(prompt_path)
    return prompt_params_from_array(programs, prompt), 0 if step is None else step
  if model_dir:
    if not os.path.isdir(model_dir):
      raise ValueError(f"MODEL_DIR {model_dir!r} does not exist (or is not a directory); "
                       "check the path or set PROMPT_PATH")
    manager = checkpoints.PromptCheckpointManager(model_dir, 1, None)
    try:
      steps = manager.all_steps()
      if not steps:
        raise ValueError(f"no checkpoint in {manager.directory}; train first or set "
                         "PROMPT_PATH")
      step = max(steps) if step is None else step
      if step not in steps:
        raise ValueError(f"no checkpoint for step {step} in {manager.directory}; have {steps}")
      prompt = manager.restore_prompt_params(step, programs.prompt_structs(),
                                             programs.partitioner.replicated())
    finally:
      manager.close()
    return prompt, step
  log.warning("neither MODEL_DIR nor PROMPT_PATH is set: evaluating an untrained prompt")
  return programs.init_prompt(frozen_params, jax.random.key(seed)), 0


RANDOM_FROZEN_HINT = ("set INITIAL_CHECKPOINT_PATH, or score a randomly initialised frozen "
                      "model on purpose with --gin.RANDOM_FROZEN_MODEL=True")


def recorded_frozen_checkpoint(model_dir: str) -> tuple[Optional[str], Optional[str]]:
  """(path, fingerprint) of the frozen checkpoint a run in MODEL_DIR was trained on: from its
  record (run.json), else its latest checkpoint's metadata (runs written before records);
  (None, None) when neither names one."""
  record = run_dir.read_record(model_dir)
  if record is not None:
    frozen = record.get("frozen_checkpoint") or {}
    return frozen.get("path"), frozen.get("fingerprint")
  manager = checkpoints.PromptCheckpointManager(model_dir, 1, None)
  try:
    steps = manager.all_steps()
    meta = manager.restore_meta(max(steps)) if steps else {}
  finally:
    manager.close()
  return meta.get("initial_checkpoint_path"), None


def frozen_checkpoint_of(model_dir: Optional[str], initial_checkpoint_path: Optional[str], *,
                         random_frozen_model: bool = False,
                         allow_config_change: bool = False) -> Optional[str]:
  """The frozen checkpoint to serve a run with: `initial_checkpoint_path` when given (refused,
  `run_dir.RunMismatchError`, when MODEL_DIR was trained on another file, unless
  `allow_config_change`), else the one MODEL_DIR records. None (a randomly initialised frozen
  model) only with `random_frozen_model`; otherwise no checkpoint is a ValueError."""
  recorded, recorded_fingerprint = (None, None)
  if model_dir and os.path.isdir(model_dir):
    recorded, recorded_fingerprint = recorded_frozen_checkpoint(model_dir)
  if initial_checkpoint_path:
    given = run_dir.fingerprint(frozen_models.resolve_path(initial_checkpoint_path))
    # (a path that does not exist is left to the loader, which says so)
    if recorded and initial_checkpoint_path != recorded and given and not allow_config_change:
      if given != recorded_fingerprint:
        raise run_dir.RunMismatchError(
            f"MODEL_DIR {model_dir!r} was trained on the frozen checkpoint {recorded!r}, "
            f"INITIAL_CHECKPOINT_PATH is {initial_checkpoint_path!r}"
            f"{' (another file)' if recorded_fingerprint else ''}; leave it unset to use the "
            "run's, or pass --gin.ALLOW_CONFIG_CHANGE=True")
    return initial_checkpoint_path
  if recorded:
    return recorded
  if random_frozen_model:
    log.warning("no frozen checkpoint: the frozen model is randomly initialised "
                "(RANDOM_FROZEN_MODEL)")
    return None
  where = f"MODEL_DIR {model_dir!r} records none" if model_dir else "no MODEL_DIR is set"
  raise ValueError(f"no frozen checkpoint: INITIAL_CHECKPOINT_PATH is not set and {where}; "
                   f"{RANDOM_FROZEN_HINT}")


def check_model_against_run(model: EncoderDecoderModel, model_dir: Optional[str]) -> None:
  """Raise `run_dir.RunMismatchError` naming each difference when `model` (its T5 config and
  prompt hook) is not the one MODEL_DIR's record says the run trained."""
  if model_dir and os.path.isdir(model_dir):
    run_dir.check_record(model_dir, run_dir.model_entries(model), keys=("model", "prompt"),
                         allow_flag="--gin.ALLOW_CONFIG_CHANGE=True")


def build_programs(model: EncoderDecoderModel, initial_checkpoint_path: Optional[str],
                   partitioner: Optional[Partitioner] = None,
                   trainable_pattern: str = params_lib.DEFAULT_TRAINABLE_PATTERN,
                   seed: int = 0, *, model_dir: Optional[str] = None,
                   random_frozen_model: bool = False,
                   allow_config_change: bool = False) -> tuple[PromptPrograms, Any]:
  """The model's programs (no optimizer: nothing here trains) and its frozen parameters.

  With `model_dir`, the model must be the one its run trained and the frozen checkpoint
  defaults to the run's (`check_model_against_run`, `frozen_checkpoint_of`, both relaxed by
  `allow_config_change`); without any checkpoint the frozen model is random only with
  `random_frozen_model`."""
  if not allow_config_change:
    check_model_against_run(model, model_dir)
  programs = PromptPrograms(model, partitioner, trainable_pattern=trainable_pattern)
  path = frozen_checkpoint_of(model_dir, initial_checkpoint_path,
                              random_frozen_model=random_frozen_model,
                              allow_config_change=allow_config_change)
  if path:
    frozen = programs.load_frozen_params(path)
  else:
    frozen = programs.random_frozen_params(jax.random.key(seed))
  return programs, frozen


def run_evaluation(*, model: EncoderDecoderModel, dataset_cfg: pipeline.DatasetConfig,
                   initial_checkpoint_path: Optional[str] = None,
                   model_dir: Optional[str] = None, prompt_path: Optional[str] = None,
                   step: Optional[int] = None, output_dir: Optional[str] = None,
                   max_decode_length: Optional[int] = None,
                   partitioner: Optional[Partitioner] = None,
                   trainable_pattern: str = params_lib.DEFAULT_TRAINABLE_PATTERN,
                   write_predictions: bool = True, seed: int = 0,
                   evaluate_fn: Optional[Callable] = None,
                   decoding: Optional[Any] = None, random_frozen_model: bool = False,
                   allow_config_change: bool = False) -> dict[str, Any]:
  """`prompt-jax eval`: metrics of a trained prompt on `dataset_cfg`'s task and split.

  The frozen model is `initial_checkpoint_path`, else the one MODEL_DIR's run was trained on;
  a model or checkpoint that contradicts MODEL_DIR's record is refused unless
  `allow_config_change`, and no checkpoint at all is an error unless `random_frozen_model`.

  The prompt comes from `prompt_path` (a prompt source of `prompt_files`, e.g. a `.npy` export)
  or MODEL_DIR's checkpoint at `step`
  (default: the latest; only its prompt is read, so no optimizer is needed). Metrics go to
  TensorBoard under `<output_dir or model_dir>/eval_<split>` (for a `prompt_path`, only to
  `output_dir`), predictions (with
  `write_predictions`) to `<task>-<step>.jsonl` beside them, and a table to stdout.
  `evaluate_fn` replaces `evaluate` (same arguments), e.g. `ensemble.evaluate_ensemble` for a
  prompt bank. `decoding` (gin: `DECODE_FN`, a `prompt_jax.models.decoding` object; None or
  `Greedy()` is greedy) decodes generative tasks; an `evaluate_fn` gets it only if it takes a
  `decoding` argument (one that does not supports greedy only).
  Returns {'metrics': {...}, 'step': step, 'task': name, 'split': split}.
  """
  pipeline.check_vocabulary(dataset_cfg, model.config.vocab_size)
  decoding = decoding_lib.resolve(decoding)
  evaluate_fn = evaluate_fn or evaluate
  extra = {}
  if "decoding" in inspect.signature(evaluate_fn).parameters:
    extra["decoding"] = decoding
  elif decoding != decoding_lib.Greedy():
    raise ValueError(f"DECODE_FN {decoding!r}: evaluate_fn "
                     f"{getattr(evaluate_fn, '__name__', evaluate_fn)} decodes greedily only; "
                     "use DECODE_FN = @decoding.Greedy()")
  programs, frozen = build_programs(model, initial_checkpoint_path, partitioner,
                                   trainable_pattern, seed, model_dir=model_dir,
                                   random_frozen_model=random_frozen_model,
                                   allow_config_change=allow_config_change)
  prompt, step = load_prompt_params(programs, frozen, model_dir=model_dir,
                                    prompt_path=prompt_path, step=step, seed=seed)
  # A prompt given by PROMPT_PATH is not the run's: its scores and predictions stay out of
  # MODEL_DIR (its metrics.jsonl is the run's record) unless OUTPUT_DIR asks for a place.
  out_dir = output_dir or (None if prompt_path else model_dir)
  log_dir = os.path.join(out_dir, f"eval_{dataset_cfg.split}") if out_dir else None
  scores = evaluate_fn(
      programs, prompt, frozen, dataset_cfg,
      max_decode_length or dataset_cfg.task_feature_lengths["targets"],
      log_dir=log_dir if write_predictions else None, step=step, **extra)
  if log_dir:
    writer = MetricWriter(out_dir, f"eval_{dataset_cfg.split}")
    writer.write(step, scores)
    writer.close()
  decoded_with = "" if decoding == decoding_lib.Greedy() else f", decoded with {decoding}"
  print(f"\n{dataset_cfg.mixture_or_task_name} ({dataset_cfg.split}), prompt at step {step}"
        f"{decoded_with}")
  print(format_metrics_table(scores), flush=True)
  return {"metrics": scores, "step": step, "task": dataset_cfg.mixture_or_task_name,
          "split": dataset_cfg.split}
