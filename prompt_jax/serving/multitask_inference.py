"""Multi-task serving: one frozen model, a prompt per task, every request line in mixed batches.

Input: JSONL lines `{"task": "<name>", "inputs": "<text>", ...}` (other fields are copied to the
output, which adds `prediction`: the best decode of `decoding`, greedy by default, or beam search
/ sampling from `prompt_jax.models.decoding`; `return_all_decodes` adds `predictions` and `scores`,
every decode best first). Prompts: `{task: source}` where a source is any prompt source of
`prompt_jax.storage.prompt_files`: a [length, embed] `.npy` file, `FILE.npy#ROW` (a bank's row), a
PEFT prompt-tuning adapter directory, a run directory (MODEL_DIR: its latest export) or
`MODEL_DIR@STEP`.

All prompts of one length go into one `PromptBank`, so lines of different tasks share batches and
the frozen model runs once per batch; each line gets exactly the prediction it gets alone with its
task's prompt. Prompts of different lengths form separate banks (mixing lengths would shift
relative positions or let the decoder attend to padding), each still serving its tasks mixed.

`infer_multitask` is the function to route a front end to; `main` is `prompt-jax
infer-multitask`.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from typing import Any, Mapping, Optional, Sequence

import jax
import numpy as np
import seqio

from prompt_jax.models import decoding as decoding_lib
from prompt_jax.models import t5
from prompt_jax.models.encoder_decoder import EncoderDecoderModel
from prompt_jax.partitioning import Partitioner
from prompt_jax.programs import PromptPrograms
from prompt_jax.prompts import base
from prompt_jax.prompts.bank import PromptBank
from prompt_jax.serving import inference, loading
from prompt_jax.storage import frozen_models, output_paths, prompt_files, run_dir

log = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------ prompts


def check_output(output_path: str, inputs_path: str, prompts: Mapping[str, str],
                 overwrite: bool = False) -> None:
  """Refuse (ValueError naming the path) an --output that is --inputs or a file a prompt is
  read from, is a directory or lies under a file, or exists (unless `overwrite`)."""
  for task, source in prompts.items():
    for path in prompt_files.source_files(source):
      if output_paths.same_file(output_path, path):
        raise ValueError(f"--output {output_path!r} is the prompt file {path!r} of task "
                         f"{task!r}; writing it would overwrite the prompt")
  inference.check_output_path(
      output_path, inputs_path, "--output", "--inputs", exists_hint=None if overwrite else
      "pass --overwrite to replace it, or choose another --output")


def group_by_length(prompts: Mapping[str, np.ndarray]) -> dict[int, list[str]]:
  """{prompt length: [task, ...]} in the order the tasks were given."""
  groups: dict[int, list[str]] = {}
  for task, prompt in prompts.items():
    groups.setdefault(int(prompt.shape[0]), []).append(task)
  return groups


# ------------------------------------------------------------------------------------ serving


def _bank_programs(model: EncoderDecoderModel, num_prompts: int, length: int, placement: str,
                   input_length: int, max_decode_length: int,
                   partitioner: Partitioner) -> PromptPrograms:
  """The programs of `model` with a bank of `num_prompts` prompts of `length` tokens."""
  bank = PromptBank(num_prompts=num_prompts, length=length, placement=placement)
  bank_model = dataclasses.replace(model, module=model.module.clone(prompt=bank))
  return PromptPrograms(bank_model, partitioner, input_length=input_length,
                        target_length=max_decode_length)


def check_records(records: Sequence[Mapping[str, Any]], tasks: Sequence[str],
                  path: Optional[str] = None, line_numbers: Optional[Sequence[int]] = None) -> None:
  """Every record needs a string `task` among `tasks` and a string `inputs`. Errors name
  `path` and the record's line (`line_numbers[i]`, default its 1-based position)."""
  known = set(tasks)
  where = f"{path}: " if path else ""
  for index, record in enumerate(records):
    number = line_numbers[index] if line_numbers is not None else index + 1
    if not isinstance(record.get("inputs"), str):
      raise ValueError(f"{where}line {number}: expected a string 'inputs', got "
                       f"{record.get('inputs')!r}")
    if not isinstance(record.get("task"), str):
      raise ValueError(f"{where}line {number}: expected a string 'task' (one of {sorted(known)}), "
                       f"got {record.get('task')!r}")
    if record.get("task") not in known:
      raise ValueError(f"{where}line {number}: task {record.get('task')!r} has no prompt; prompts "
                       f"are given for {sorted(known)}")


def predict_multitask(model: EncoderDecoderModel, records: Sequence[Mapping[str, Any]],
                      prompts: Mapping[str, np.ndarray], initial_checkpoint_path: Optional[str],
                      vocabulary: seqio.Vocabulary, *, input_length: int = 512,
                      max_decode_length: int = 32, batch_size: int = 32,
                      placement: str = "prefix", partitioner: Optional[Partitioner] = None,
                      seed: int = 0, decoding: Optional[Any] = None) -> list[str]:
  """One prediction (the best decode of `decoding`, default greedy) per record
  (`{'task', 'inputs'}`), in order; records of all tasks with prompts of one length share
  batches (`prompt_ids` select each line's prompt)."""
  decodes = decode_multitask(model, records, prompts, initial_checkpoint_path, vocabulary,
                             input_length=input_length, max_decode_length=max_decode_length,
                             batch_size=batch_size, placement=placement,
                             partitioner=partitioner, seed=seed, decoding=decoding)
  return [d[0][0] if d else "" for d in decodes]


def decode_multitask(model: EncoderDecoderModel, records: Sequence[Mapping[str, Any]],
                     prompts: Mapping[str, np.ndarray], initial_checkpoint_path: Optional[str],
                     vocabulary: seqio.Vocabulary, *, input_length: int = 512,
                     max_decode_length: int = 32, batch_size: int = 32,
                     placement: str = "prefix", partitioner: Optional[Partitioner] = None,
                     seed: int = 0, decoding: Optional[Any] = None
                     ) -> list[list[tuple[str, float]]]:
  """`predict_multitask` with every decode: per record, [(text, score), ...] best first (every
  beam or sample of a line uses that line's prompt)."""
  check_records(records, list(prompts))
  decoding = decoding_lib.resolve(decoding)
  partitioner = partitioner or Partitioner()
  predictions: list[Optional[list[tuple[str, float]]]] = [None] * len(records)
  frozen = None
  for length, tasks in group_by_length(prompts).items():
    programs = _bank_programs(model, len(tasks), length, placement, input_length,
                             max_decode_length, partitioner)
    if frozen is None:  # the frozen tree does not depend on the prompt: load it once
      if initial_checkpoint_path:
        frozen = programs.load_frozen_params(initial_checkpoint_path)
      else:
        log.warning("no frozen checkpoint given: the frozen model is randomly initialised")
        frozen = programs.random_frozen_params(jax.random.key(seed))
    prompt_params = loading.prompt_params_from_array(
        programs, np.stack([prompts[t] for t in tasks]))
    rows = [i for i, r in enumerate(records) if r["task"] in tasks]
    if not rows:
      continue
    ids = np.array([tasks.index(records[i]["task"]) for i in rows], np.int32)
    decodes = inference.predict_decodes(programs, prompt_params, frozen,
                                        [records[i]["inputs"] for i in rows], vocabulary,
                                        input_length, max_decode_length, prompt_ids=ids,
                                        batch_size=batch_size, decoding=decoding)
    for i, decoded in zip(rows, decodes):
      predictions[i] = decoded
  return predictions  # type: ignore[return-value]


def infer_multitask(*, model: EncoderDecoderModel, inputs_path: str, output_path: str,
                    prompts: Mapping[str, str], vocabulary: seqio.Vocabulary,
                    initial_checkpoint_path: Optional[str] = None, input_length: int = 512,
                    max_decode_length: int = 32, batch_size: int = 32,
                    placement: str = "prefix", partitioner: Optional[Partitioner] = None,
                    seed: int = 0, decoding: Optional[Any] = None,
                    return_all_decodes: bool = False, overwrite: bool = True
                    ) -> dict[str, Any]:
  """Answer every `{task, inputs}` line of `inputs_path` with its task's prompt (sources in
  `prompts`, see the module docstring) and write JSONL with `prediction` to `output_path`
  (the best decode of `decoding`, default greedy; `return_all_decodes` adds `predictions` and
  `scores`). `output_path` must not be `inputs_path` or a prompt's file; an existing file is
  replaced only with `overwrite`.

  `model` is any `EncoderDecoderModel`; its prompt hook is replaced by the banks."""
  if not prompts:
    raise ValueError("infer-multitask needs at least one task prompt, got none")
  decoding = decoding_lib.resolve(decoding)
  check_output(output_path, inputs_path, prompts, overwrite)  # before reading anything
  inference.check_model_vocabulary(vocabulary, model.config.vocab_size, "--vocabulary")
  loaded = {task: prompt_files.read_prompt(source) for task, source in prompts.items()}
  dims = {task: p.shape[1] for task, p in loaded.items() if p.shape[1] != model.config.emb_dim}
  if dims:
    raise ValueError(f"prompt widths {dims} differ from the model's emb_dim "
                     f"{model.config.emb_dim}")
  for task, prompt in loaded.items():
    try:
      base.check_encoder_length(int(prompt.shape[0]), input_length)
    except ValueError as e:
      raise ValueError(f"prompt source {prompts[task]!r} (task {task!r}): {e}") from None
  numbered = inference.read_jsonl_lines(inputs_path, ("inputs",))
  records = [record for _, record in numbered]
  check_records(records, list(loaded), inputs_path, [number for number, _ in numbered])
  decodes = decode_multitask(model, records, loaded, initial_checkpoint_path, vocabulary,
                             input_length=input_length, max_decode_length=max_decode_length,
                             batch_size=batch_size, placement=placement,
                             partitioner=partitioner, seed=seed, decoding=decoding)
  count = inference.write_jsonl(
      (dict(r, **inference.decode_fields(d, return_all_decodes)) for r, d in zip(records, decodes)),
      output_path)
  groups = group_by_length(loaded)
  print(f"wrote {count} predictions for {len(loaded)} tasks ({len(groups)} prompt bank"
        f"{'s' if len(groups) != 1 else ''}) to {output_path}", flush=True)
  return {"output_path": output_path, "count": count, "tasks": sorted(loaded),
          "banks": {length: tasks for length, tasks in groups.items()}}


# ---------------------------------------------------------------------------------------- CLI


def _vocabulary(spec: str) -> seqio.Vocabulary:
  if spec == "byte":
    return seqio.ByteVocabulary()
  if not os.path.exists(spec):
    raise FileNotFoundError(f"--vocabulary must be 'byte' or a SentencePiece model file; "
                            f"{spec!r} does not exist")
  if os.path.isdir(spec):
    raise ValueError(f"--vocabulary {spec!r} is a directory, not a SentencePiece model file")
  vocabulary = seqio.SentencePieceVocabulary(spec)
  try:
    _ = vocabulary.tokenizer  # seqio loads the model lazily: load it now
  except Exception as e:  # pylint: disable=broad-except  # protobuf, sentencepiece, tf errors
    raise ValueError(f"--vocabulary {spec!r} is not a SentencePiece model file "
                     f"({type(e).__name__})") from e
  return vocabulary


def check_against_runs(prompts: Mapping[str, str], checkpoint: str, placement: str) -> None:
  """Refuse (ValueError naming the task and both values) a prompt exported by a run whose
  record says it was trained with another placement or on another frozen checkpoint (by
  fingerprint: the same file elsewhere is fine) than this serving uses."""
  served = run_dir.fingerprint(frozen_models.resolve_path(checkpoint))
  for task, source in prompts.items():
    record = prompt_files.run_record_of(source)
    if record is None:
      continue
    trained_placement = (record.get("prompt") or {}).get("placement")
    if trained_placement and trained_placement != placement:
      raise ValueError(f"the prompt of task {task!r} ({source}) was trained with placement "
                       f"{trained_placement!r}, this serving uses {placement!r}; pass "
                       f"--placement={trained_placement}")
    frozen = record.get("frozen_checkpoint") or {}
    if served and frozen.get("fingerprint") and frozen["fingerprint"] != served:
      raise ValueError(f"the prompt of task {task!r} ({source}) was trained on the frozen "
                       f"checkpoint {frozen.get('path')!r}; --checkpoint {checkpoint!r} is "
                       "another file")


def main(*, inputs: str, output: str, prompts: Sequence[tuple[str, str]], checkpoint: str,
         model: str = "tiny", vocabulary: str = "byte", input_length: int = 512,
         max_decode_length: int = 32, batch_size: int = 32, placement: str = "prefix",
         decode: str = "greedy", return_all_decodes: bool = False,
         overwrite: bool = False) -> int:
  """`prompt-jax infer-multitask` (and `prompt-jax infer --inputs=...`): `prompts` are
  (task, source) pairs; `model` a T5 preset name (prompt_jax.models.t5), `vocabulary` 'byte' or
  a SentencePiece model file; `decode` a decoding spec for `prompt_jax.models.decoding.parse`
  ('greedy', 'beam_search(num_decodes=4, alpha=0.6)', 'temperature_sample(topk=40, seed=1)');
  an existing `output` is replaced only with `overwrite`."""
  decoding = decoding_lib.parse(decode)
  by_task = dict(prompts)
  if len(by_task) != len(prompts):
    raise ValueError(f"--prompt names a task twice: {[t for t, _ in prompts]}")
  check_output(output, inputs, by_task, overwrite)  # before the vocabulary and model load
  check_against_runs(by_task, checkpoint, placement)
  frozen_model = EncoderDecoderModel(t5.Transformer(t5.preset(model)))
  infer_multitask(model=frozen_model, inputs_path=inputs, output_path=output, prompts=by_task,
                  vocabulary=_vocabulary(vocabulary), initial_checkpoint_path=checkpoint,
                  input_length=input_length, max_decode_length=max_decode_length,
                  batch_size=batch_size, placement=placement, decoding=decoding,
                  return_all_decodes=return_all_decodes, overwrite=overwrite)
  return 0
