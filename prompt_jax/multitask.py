"""Multi-task serving: one frozen model, a prompt per task, every request line in mixed batches.

Input: JSONL lines `{"task": "<name>", "inputs": "<text>", ...}` (other fields are copied to the
output, which adds `prediction`). Prompts: `{task: source}` where a source is
  - a `.npy` file holding [length, embed] (our `prompts/prompt_<step>.npy` exports, released
    prompts), or `<file>.npy#<i>` for row i of a prompt bank's [N, length, embed] export;
  - a PEFT prompt-tuning adapter directory (`adapter_config.json` + safetensors);
  - one of our run directories (MODEL_DIR): its latest `prompts/prompt_<step>.npy`.

All prompts of one length go into one `PromptBank`, so lines of different tasks share batches and
the frozen model runs once per batch; each line gets exactly the prediction it gets alone with its
task's prompt. Prompts of different lengths form separate banks (mixing lengths would shift
relative positions or let the decoder attend to padding), each still serving its tasks mixed.

`infer_multitask` is the function to route a front end to; `main` is `prompt-jax
infer-multitask`.
"""

from __future__ import annotations

import argparse
import dataclasses
import glob
import logging
import os
import re
from typing import Any, Mapping, Optional, Sequence

import jax
import numpy as np
import optax
import seqio

from prompt_jax import evaluation, inference
from prompt_jax.models import t5
from prompt_jax.models.encoder_decoder import EncoderDecoderModel
from prompt_jax.partitioning import Partitioner
from prompt_jax.prompts.bank import PromptBank
from prompt_jax.trainer import PromptTrainer

log = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------ prompts


def _latest_export(model_dir: str) -> str:
  paths = glob.glob(os.path.join(model_dir, "prompts", "prompt_*.npy"))
  steps = {int(m.group(1)): p for p in paths
           if (m := re.search(r"prompt_(\d+)\.npy$", p))}
  if not steps:
    raise FileNotFoundError(f"{model_dir!r} has no prompts/prompt_<step>.npy export and is not "
                            "a PEFT adapter directory")
  return steps[max(steps)]


def load_prompt(source: str) -> np.ndarray:
  """A prompt source (see the module docstring) -> float32 [length, embed]."""
  from prompt_jax.interop import peft  # pylint: disable=g-import-not-at-top
  path, _, row = source.partition("#")
  if os.path.isdir(path):
    if row:
      raise ValueError(f"prompt source {source!r}: '#<row>' only applies to .npy files")
    if os.path.exists(os.path.join(path, peft.CONFIG_FILE)):
      return peft.load_prompt(path)
    path = _latest_export(path)
  if not os.path.exists(path):
    raise FileNotFoundError(f"prompt source {source!r} does not exist")
  try:
    array = np.load(path)
  except ValueError as e:
    raise ValueError(f"prompt source {path!r} is not a .npy array: {e}") from e
  if row:
    if array.ndim != 3 or not row.isdigit() or int(row) >= array.shape[0]:
      raise ValueError(f"prompt source {source!r}: '#<row>' needs a [N, length, embed] bank "
                       f"export and 0 <= row < N; got shape {array.shape} and row {row!r}")
    array = array[int(row)]
  if array.ndim != 2:
    raise ValueError(f"prompt source {source!r} must hold [length, embed], got shape "
                     f"{array.shape} (a bank export needs '#<row>')")
  return np.asarray(array, np.float32)


def group_by_length(prompts: Mapping[str, np.ndarray]) -> dict[int, list[str]]:
  """{prompt length: [task, ...]} in the order the tasks were given."""
  groups: dict[int, list[str]] = {}
  for task, prompt in prompts.items():
    groups.setdefault(int(prompt.shape[0]), []).append(task)
  return groups


# ------------------------------------------------------------------------------------ serving


def _bank_trainer(model: EncoderDecoderModel, num_prompts: int, length: int, placement: str,
                  input_length: int, max_decode_length: int, batch_size: int,
                  partitioner: Partitioner) -> PromptTrainer:
  bank = PromptBank(num_prompts=num_prompts, length=length, placement=placement)
  bank_model = dataclasses.replace(model, module=model.module.clone(prompt=bank))
  return PromptTrainer(bank_model, optax.identity(), partitioner, input_length,
                       max_decode_length, batch_size)


def check_records(records: Sequence[Mapping[str, Any]], tasks: Sequence[str]) -> None:
  """Every record needs a string `task` among `tasks` and a string `inputs`."""
  known = set(tasks)
  for number, record in enumerate(records, 1):
    if not isinstance(record.get("inputs"), str):
      raise ValueError(f"line {number}: expected a string 'inputs', got {record.get('inputs')!r}")
    if record.get("task") not in known:
      raise ValueError(f"line {number}: task {record.get('task')!r} has no prompt; prompts are "
                       f"given for {sorted(known)}")


def predict_multitask(model: EncoderDecoderModel, records: Sequence[Mapping[str, Any]],
                      prompts: Mapping[str, np.ndarray], initial_checkpoint_path: Optional[str],
                      vocabulary: seqio.Vocabulary, *, input_length: int = 512,
                      max_decode_length: int = 32, batch_size: int = 32,
                      placement: str = "prefix", partitioner: Optional[Partitioner] = None,
                      seed: int = 0) -> list[str]:
  """One prediction per record (`{'task', 'inputs'}`), in order; records of all tasks with
  prompts of one length share batches (`prompt_ids` select each line's prompt)."""
  check_records(records, list(prompts))
  partitioner = partitioner or Partitioner()
  predictions: list[Optional[str]] = [None] * len(records)
  frozen = None
  for length, tasks in group_by_length(prompts).items():
    trainer = _bank_trainer(model, len(tasks), length, placement, input_length,
                            max_decode_length, batch_size, partitioner)
    if frozen is None:  # the frozen tree does not depend on the prompt: load it once
      if initial_checkpoint_path:
        frozen = trainer.load_frozen_params(initial_checkpoint_path)
      else:
        log.warning("no frozen checkpoint given: the frozen model is randomly initialised")
        frozen = trainer.random_frozen_params(jax.random.key(seed))
    prompt_params = evaluation.prompt_params_from_array(
        trainer, np.stack([prompts[t] for t in tasks]))
    rows = [i for i, r in enumerate(records) if r["task"] in tasks]
    if not rows:
      continue
    ids = np.array([tasks.index(records[i]["task"]) for i in rows], np.int32)
    texts = inference.predict_texts(trainer, prompt_params, frozen,
                                    [records[i]["inputs"] for i in rows], vocabulary,
                                    input_length, max_decode_length, prompt_ids=ids)
    for i, text in zip(rows, texts):
      predictions[i] = text
  return predictions  # type: ignore[return-value]


def infer_multitask(*, model: EncoderDecoderModel, inputs_path: str, output_path: str,
                    prompts: Mapping[str, str], vocabulary: seqio.Vocabulary,
                    initial_checkpoint_path: Optional[str] = None, input_length: int = 512,
                    max_decode_length: int = 32, batch_size: int = 32,
                    placement: str = "prefix", partitioner: Optional[Partitioner] = None,
                    seed: int = 0) -> dict[str, Any]:
  """Answer every `{task, inputs}` line of `inputs_path` with its task's prompt (sources in
  `prompts`, see the module docstring) and write JSONL with `prediction` to `output_path`.

  `model` is any `EncoderDecoderModel`; its prompt hook is replaced by the banks."""
  if not prompts:
    raise ValueError("infer-multitask needs at least one task prompt, got none")
  loaded = {task: load_prompt(source) for task, source in prompts.items()}
  dims = {task: p.shape[1] for task, p in loaded.items() if p.shape[1] != model.config.emb_dim}
  if dims:
    raise ValueError(f"prompt widths {dims} differ from the model's emb_dim "
                     f"{model.config.emb_dim}")
  records = inference.read_jsonl(inputs_path)
  predictions = predict_multitask(model, records, loaded, initial_checkpoint_path, vocabulary,
                                  input_length=input_length,
                                  max_decode_length=max_decode_length, batch_size=batch_size,
                                  placement=placement, partitioner=partitioner, seed=seed)
  count = inference.write_jsonl((dict(r, prediction=p) for r, p in zip(records, predictions)),
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
  return seqio.SentencePieceVocabulary(spec)


def _task_prompt(text: str) -> tuple[str, str]:
  task, sep, source = text.partition("=")
  if not sep or not task or not source:
    raise argparse.ArgumentTypeError(f"expected TASK=PATH, got {text!r}")
  return task, source


def main(argv: Sequence[str]) -> int:
  """`prompt-jax infer-multitask --inputs=IN.jsonl --output=OUT.jsonl --prompt=TASK=PATH ...`"""
  parser = argparse.ArgumentParser(prog="prompt-jax infer-multitask",
                                   description=__doc__.split("\n")[0])
  parser.add_argument("--inputs", required=True, help="JSONL of {task, inputs} lines")
  parser.add_argument("--output", required=True, help="JSONL to write (adds 'prediction')")
  parser.add_argument("--prompt", action="append", type=_task_prompt, default=[],
                      required=True, help="TASK=PATH (.npy, .npy#row, PEFT dir, run dir)")
  parser.add_argument("--checkpoint", required=True, help="frozen model (npz, Orbax, T5X, HF, "
                      "builtin:<name>)")
  parser.add_argument("--model", default="tiny", help="T5 preset name (prompt_jax.models.t5)")
  parser.add_argument("--vocabulary", default="byte", help="'byte' or a SentencePiece .model")
  parser.add_argument("--input_length", type=int, default=512)
  parser.add_argument("--max_decode_length", type=int, default=32)
  parser.add_argument("--batch_size", type=int, default=32)
  parser.add_argument("--placement", default="prefix",
                      choices=("prefix", "prefix_after_bos", "suffix"))
  args = parser.parse_args(list(argv))
  prompts = dict(args.prompt)
  if len(prompts) != len(args.prompt):
    raise ValueError(f"--prompt names a task twice: {[t for t, _ in args.prompt]}")
  model = EncoderDecoderModel(t5.Transformer(t5.preset(args.model)))
  infer_multitask(model=model, inputs_path=args.inputs, output_path=args.output,
                  prompts=prompts, vocabulary=_vocabulary(args.vocabulary),
                  initial_checkpoint_path=args.checkpoint, input_length=args.input_length,
                  max_decode_length=args.max_decode_length, batch_size=args.batch_size,
                  placement=args.placement)
  return 0
