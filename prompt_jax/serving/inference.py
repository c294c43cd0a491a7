"""`prompt-jax infer`: predictions of a trained prompt, written as JSONL.

Inputs are either a JSONL file of `{"inputs": "<text>", ...}` lines (other fields are copied to
the output) or a seqio task split (`{"inputs", "targets", "prediction"}` per example). Decoding
is greedy unless `decoding` (gin: `DECODE_FN`) says otherwise (`prompt_jax.models.decoding`: beam
search, sampling); `prediction` is the best decode, and `return_all_decodes` also writes every
decode, best first, with its score (`predictions`, `scores`).
`predict_texts` / `predict_decodes` are the plain functions to route other front ends to (e.g.
multi-task serving).
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any, Iterable, Iterator, Optional, Sequence

import numpy as np
import seqio

from prompt_jax import params as params_lib
from prompt_jax.data import pipeline
from prompt_jax.models import decoding as decoding_lib
from prompt_jax.models.encoder_decoder import EncoderDecoderModel
from prompt_jax.partitioning import Partitioner
from prompt_jax.serving import loading
from prompt_jax.storage import output_paths, prompt_files

log = logging.getLogger(__name__)


def encode_inputs(texts: Sequence[str], vocabulary: seqio.Vocabulary,
                  input_length: int) -> np.ndarray:
  """[len(texts), input_length] token ids with EOS, zero-padded; longer texts are truncated
  (keeping EOS) and counted in the log."""
  tokens = np.zeros((len(texts), input_length), np.int32)
  truncated = 0
  for row, text in enumerate(texts):
    ids = list(vocabulary.encode(text))
    if len(ids) + 1 > input_length:
      truncated += 1
      ids = ids[:input_length - 1]
    ids.append(vocabulary.eos_id)
    tokens[row, :len(ids)] = ids
  if truncated:
    log.warning("%d of %d inputs are longer than %d tokens; they are truncated", truncated,
                len(texts), input_length)
  return tokens


def predict_tokens(programs, prompt_params, frozen_params, encoder_input_tokens: np.ndarray,
                   max_decode_length: int, prompt_ids: Optional[np.ndarray] = None, *,
                   batch_size: int = 32, decoding: Optional[Any] = None,
                   return_scores: bool = False):
  """Decoding (`decoding`, default greedy) of [n, input_length] tokens in `batch_size` chunks
  -> the best decodes [n, max]; with `return_scores`, (every decode [n, k, max], scores [n, k]),
  best first (k = the decoding's `num_decodes`)."""
  decoding = decoding_lib.resolve(decoding)
  tokens, scores = [], []
  size = batch_size
  for start in range(0, len(encoder_input_tokens), size):
    batch = {"encoder_input_tokens": encoder_input_tokens[start:start + size]}
    if prompt_ids is not None:
      batch["prompt_ids"] = np.asarray(prompt_ids[start:start + size], np.int32)
    batch, real = pipeline.pad_batch(batch, size)
    out, score = programs.predict(prompt_params, frozen_params, batch, max_decode_length,
                                  decoding, return_scores=True)
    tokens.append(out[:real])
    scores.append(score[:real])
  if not tokens:
    k = getattr(decoding, "num_decodes", 1)
    tokens, scores = [np.zeros((0, k, max_decode_length), np.int32)], [np.zeros((0, k))]
  tokens, scores = np.concatenate(tokens), np.concatenate(scores)
  return (tokens, scores) if return_scores else tokens[:, 0]


def predict_decodes(programs, prompt_params, frozen_params, texts: Sequence[str],
                    vocabulary: seqio.Vocabulary, input_length: int, max_decode_length: int,
                    prompt_ids: Optional[np.ndarray] = None, *, batch_size: int = 32,
                    decoding: Optional[Any] = None) -> list[list[tuple[str, float]]]:
  """Texts in; per text, every decode of `decoding` (text up to the first EOS, score), best
  first. Empty beam slots (a search space smaller than the beam) are left out."""
  tokens = encode_inputs(texts, vocabulary, input_length)
  predicted, scores = predict_tokens(programs, prompt_params, frozen_params, tokens,
                                     max_decode_length, prompt_ids, batch_size=batch_size,
                                     decoding=decoding, return_scores=True)
  return [[(vocabulary.decode([int(t) for t in row]), float(score))
           for row, score in zip(rows, row_scores) if np.isfinite(score)]
          for rows, row_scores in zip(predicted, scores)]


def predict_texts(programs, prompt_params, frozen_params, texts: Sequence[str],
                  vocabulary: seqio.Vocabulary, input_length: int, max_decode_length: int,
                  prompt_ids: Optional[np.ndarray] = None, *, batch_size: int = 32,
                  decoding: Optional[Any] = None) -> list[str]:
  """Texts in, the best decode of `decoding` (default greedy) out (up to the first EOS),
  `batch_size` at a time."""
  tokens = encode_inputs(texts, vocabulary, input_length)
  predicted = predict_tokens(programs, prompt_params, frozen_params, tokens, max_decode_length,
                             prompt_ids, batch_size=batch_size, decoding=decoding)
  return [vocabulary.decode([int(t) for t in row]) for row in predicted]


def decode_fields(decodes: Sequence[tuple[str, float]],
                  return_all_decodes: bool) -> dict[str, Any]:
  """The output fields of one input: `prediction` (the best decode), and with
  `return_all_decodes` also `predictions` and `scores` (every decode, best first)."""
  fields: dict[str, Any] = {"prediction": decodes[0][0] if decodes else ""}
  if return_all_decodes:
    fields["predictions"] = [text for text, _ in decodes]
    fields["scores"] = [score for _, score in decodes]
  return fields


def read_jsonl_lines(path: str, required: Sequence[str] = ("inputs",)
                     ) -> list[tuple[int, dict[str, Any]]]:
  """(1-based line number, record) for every non-blank line of a JSONL file; each record must be
  a JSON object with a string value for every key in `required`. Malformed JSON, bytes that are
  not UTF-8 and missing keys raise ValueError naming `path:<line>`."""
  if not os.path.exists(path):
    raise FileNotFoundError(f"JSONL file {path!r} does not exist")
  if os.path.isdir(path):
    raise ValueError(f"JSONL file {path!r} is a directory")
  records = []
  with open(path, "rb") as f:
    for number, raw in enumerate(f, 1):
      try:
        line = raw.decode("utf-8")
      except UnicodeDecodeError as e:
        raise ValueError(f"{path}:{number}: not UTF-8 (byte {raw[e.start]:#04x} at column "
                         f"{e.start + 1})") from None
      if number == 1:
        line = line.removeprefix("\ufeff")  # a UTF-8 byte-order mark
      if not line.strip():
        continue
      try:
        record = json.loads(line)
      except json.JSONDecodeError as e:
        raise ValueError(f"{path}:{number}: not valid JSON: {e.msg} (column {e.colno})"
                         ) from None
      missing = [k for k in required if not isinstance(record, dict)
                 or not isinstance(record.get(k), str)]
      if missing:
        keys = " and ".join(repr(k) for k in required)
        raise ValueError(f"{path}:{number}: expected a JSON object with a string {keys}, got "
                         f"{line.strip()[:80]!r}")
      records.append((number, record))
  return records


def read_jsonl(path: str, required: Sequence[str] = ("inputs",)) -> list[dict[str, Any]]:
  """JSONL records, each needing a string `inputs` (or every key in `required`); errors name
  the file and line (see `read_jsonl_lines`)."""
  return [record for _, record in read_jsonl_lines(path, required)]


def check_output_path(output_path: str, inputs_path: Optional[str],
                      output_name: str = "OUTPUT_PATH", inputs_name: str = "INPUTS_PATH", *,
                      exists_hint: Optional[str] = None) -> None:
  """Refuse (ValueError) an output that would overwrite the inputs, is a directory, lies under
  a file, or (with `exists_hint`, what to do instead) exists (`output_paths.check_output_path`)."""
  if not isinstance(output_path, str) or not output_path:
    raise ValueError(f"{output_name} must be a file path, got {output_path!r}")
  if inputs_path and output_paths.same_file(output_path, inputs_path):
    raise ValueError(f"{output_name} {output_path!r} is the input file {inputs_name} "
                     f"{inputs_path!r}; writing it would overwrite the inputs")
  output_paths.check_output_path(output_path, output_name, exists_hint=exists_hint)


def check_model_vocabulary(vocabulary: seqio.Vocabulary, vocab_size: int,
                           source: str = "VOCABULARY") -> None:
  """Refuse a vocabulary with more ids than the model's embedding rows (naming both)."""
  size = int(vocabulary.vocab_size)
  if size > vocab_size:
    raise ValueError(f"{source} ({type(vocabulary).__name__}) has {size} ids but the model's "
                     f"embedding has {vocab_size} rows (T5Config.vocab_size)")


def task_records(dataset_cfg: pipeline.DatasetConfig) -> Iterator[dict[str, str]]:
  """{'inputs', 'targets'} strings of a task split, in order."""
  task = pipeline.get_task_or_mixture(dataset_cfg.mixture_or_task_name, dataset_cfg.module)
  ds = task.get_dataset(dict(dataset_cfg.task_feature_lengths), split=dataset_cfg.split,
                        shuffle=False, num_epochs=1, use_cached=dataset_cfg.use_cached)
  for ex in ds.as_numpy_iterator():
    record = {"inputs": ex["inputs_pretokenized"].decode("utf-8")}
    if "targets_pretokenized" in ex:
      record["targets"] = ex["targets_pretokenized"].decode("utf-8")
    yield record


def write_jsonl(records: Iterable[dict], path: str) -> int:
  directory = os.path.dirname(os.path.abspath(path))
  os.makedirs(directory, exist_ok=True)
  count = 0
  with open(path, "w") as f:
    for record in records:
      f.write(json.dumps(record, ensure_ascii=False) + "\n")
      count += 1
  return count


def infer(*, model: EncoderDecoderModel, output_path: str,
          initial_checkpoint_path: Optional[str] = None, inputs_path: Optional[str] = None,
          task: Optional[str] = None, split: str = "validation",
          task_module: Optional[str] = "prompt_jax.tasks",
          vocabulary: Optional[seqio.Vocabulary] = None,
          input_length: int = 512, max_decode_length: int = 32, batch_size: int = 32,
          model_dir: Optional[str] = None, prompt_path: Optional[str] = None,
          step: Optional[int] = None, partitioner: Optional[Partitioner] = None,
          trainable_pattern: str = params_lib.DEFAULT_TRAINABLE_PATTERN,
          seed: int = 0, decoding: Optional[Any] = None,
          return_all_decodes: bool = False, random_frozen_model: bool = False,
          allow_config_change: bool = False, overwrite: bool = False) -> dict[str, Any]:
  """Predict for every record of `inputs_path` (JSONL; needs `vocabulary`) or of `task`'s
  `split` (the task's own vocabulary), and write `output_path`: JSONL, one line per input with
  `prediction` added (the best decode of `decoding`, default greedy; with `return_all_decodes`
  also `predictions` and `scores`, every decode best first). The prompt and the frozen model
  are loaded as in `prompt-jax eval` (`evaluation.run_evaluation`). An existing `output_path`
  is replaced only with `overwrite`."""
  decoding = decoding_lib.resolve(decoding)
  if bool(inputs_path) == bool(task):
    raise ValueError("infer needs exactly one of INPUTS_PATH (a JSONL file) or "
                     f"MIXTURE_OR_TASK_NAME; got {inputs_path!r} and {task!r}")
  check_output_path(output_path, inputs_path, exists_hint=None if overwrite else (  # first
      "pass --gin.OVERWRITE=True to replace it, or choose another OUTPUT_PATH"))
  if task:
    task_cfg = pipeline.DatasetConfig(
        mixture_or_task_name=task, batch_size=batch_size, split=split,
        task_feature_lengths={"inputs": input_length, "targets": max_decode_length},
        shuffle=False, module=task_module)
    provider = pipeline.get_task_or_mixture(task, task_module)
    pipeline.check_vocabulary(task_cfg, model.config.vocab_size)
    vocabulary = provider.output_features["inputs"].vocabulary
    records = list(task_records(task_cfg))
  else:
    if vocabulary is None:
      raise ValueError("infer from INPUTS_PATH needs the model's VOCABULARY, got None")
    check_model_vocabulary(vocabulary, model.config.vocab_size)
    records = read_jsonl(inputs_path)
  if prompt_path:  # fail on a bad prompt file before the model is built
    prompt_files.read_prompt(prompt_path, allow_bank=True)
  programs, frozen = loading.build_programs(
      model, initial_checkpoint_path, partitioner, trainable_pattern, seed, model_dir=model_dir,
      random_frozen_model=random_frozen_model, allow_config_change=allow_config_change)
  prompt, step = loading.load_prompt_params(programs, frozen, model_dir=model_dir,
                                               prompt_path=prompt_path, step=step, seed=seed)
  decodes = predict_decodes(programs, prompt, frozen, [r["inputs"] for r in records],
                            vocabulary, input_length, max_decode_length, batch_size=batch_size,
                            decoding=decoding)
  count = write_jsonl((dict(r, **decode_fields(d, return_all_decodes))
                       for r, d in zip(records, decodes)), output_path)
  print(f"wrote {count} predictions (prompt at step {step}) to {output_path}", flush=True)
  return {"output_path": output_path, "count": count, "step": step}
