"""`prompt-jax <command>`: every command's flags and the start-up; the work is in the library.

Each command's argparse parser is built here, from the standard library only, so `--help` is
instant; the library's entry points take the parsed values and built objects. Gin commands take
T5X's flags: `--gin_file` (repeatable), `--gin_bindings` (repeatable), `--gin.NAME=VALUE`
(shorthand for a binding) and `--gin_search_paths` (comma-separated). Only this module parses gin,
through its helper `prompt_jax.gin_utils`, which checks the flags before anything heavy is
imported. Each gin command names the function it configures (`GIN_COMMANDS`); no gin macro
chooses it. Errors print one line, `error: ...`; set PROMPT_JAX_TRACEBACK=1 for the full
traceback. TensorFlow's, libtpu's and gin's start-up messages show with --verbosity=info or
debug (or PROMPT_JAX_VERBOSITY=info).
"""

from __future__ import annotations

import argparse
import contextlib
import difflib
import glob
import importlib
import importlib.util
import logging
import os
import pkgutil
import re
import sys
from pathlib import Path
from typing import Callable, NamedTuple, Optional, Sequence

import prompt_jax
from prompt_jax import host_devices
from prompt_jax.training import preemption


class GinCommand(NamedTuple):
  """A command that calls one gin-configured library function.

  Attributes:
    module, function: what it calls, e.g. 'prompt_jax.training.trainer', 'train'.
    not_empty: macros that must be set (not None or '').
    elsewhere: (selector or '%MACRO', command): a config that configures the selector (or binds
      the macro) belongs to that command; this one refuses it, naming the command to run.
    required: (selector, hint) when the config must configure the function itself.
    trains: the function trains a run: it is passed the gin config (`config_text=`), which it
      writes to MODEL_DIR/config.gin.
    serves: a command that reads a finished run: given only MODEL_DIR (no --gin_file), it
      configures itself from MODEL_DIR/config.gin after this base file (`from_run_directory`).
  """

  module: str
  function: str
  not_empty: tuple[str, ...] = ()
  elsewhere: tuple[tuple[str, str], ...] = ()
  required: Optional[tuple[str, str]] = None
  trains: bool = False
  serves: Optional[str] = None

  @property
  def root(self) -> str:
    """The gin selector of the function, e.g. 'trainer.train'."""
    return f"{self.module.rsplit('.', 1)[-1]}.{self.function}"


GIN_COMMANDS: dict[str, GinCommand] = {
    # runs/spt.gin includes runs/prompt_finetune.gin, so it configures trainer.train too:
    # `train` refuses it (and the TRAIN_FN macro that used to route it) instead of running it.
    "train": GinCommand("prompt_jax.training.trainer", "train", not_empty=("MODEL_DIR",),
                        elsewhere=(("spt_training.train_spt", "spt"), ("%TRAIN_FN", "spt"),
                                   ("multitask_training.train_multitask", "multitask")),
                        trains=True),
    "spt": GinCommand("prompt_jax.training.spt_training", "train_spt", not_empty=("MODEL_DIR",),
                      required=("spt_training.train_spt", "include runs/spt.gin (or its "
                                "spt_training.train_spt block, see docs/spt.md)"), trains=True),
    "multitask": GinCommand("prompt_jax.training.multitask_training", "train_multitask",
                            not_empty=("MODEL_DIR",),
                            required=("multitask_training.train_multitask",
                                      "include runs/multitask.gin (see docs/multitask.md)"),
                            trains=True),
    "pretrain": GinCommand("prompt_jax.training.pretrain", "pretrain", trains=True),
    "eval": GinCommand("prompt_jax.serving.evaluation", "run_evaluation", serves="runs/eval.gin"),
    "infer": GinCommand("prompt_jax.serving.inference", "infer", serves="runs/infer.gin"),
}
# Every command and its line in `prompt-jax --help`.
COMMANDS: dict[str, str] = {
    "train": "prompt-tune a frozen T5 (gin configures trainer.train)",
    "spt": "Selective Prompt Tuning: search gated layers, keep the top K, re-train them (gin)",
    "multitask": "multi-task prompt tuning: a prompt per task of a seqio mixture, one run (gin)",
    "pretrain": "train a small T5 from scratch to serve as a frozen model (gin)",
    "eval": "score a trained prompt on a task's eval split (gin)",
    "infer": "predictions as JSONL: one task (gin) or several tasks in mixed batches",
    "sweep": "a scale-ablation grid of training runs, its results table and plots (gin)",
    "plan": "per-device memory and FLOPs of the programs on a mesh or TPU slice, no weights (gin)",
    "convert": "frozen checkpoints to Orbax; prompts between .npy, PEFT and T5X",
    "export-prompt": "fold a trained prompt of any method into .npy and PEFT files (gin)",
    "infer-multitask": "multi-task serving (the same as `prompt-jax infer --inputs=...`)",
    "curves": "training-loss and validation curves of runs as a PNG, from MODEL_DIR/metrics.jsonl",
}
# OSError: a full disk, a read-only or vanished directory (named by the error's filename).
USER_ERRORS = (ValueError, OSError, KeyError, RuntimeError)
VERBOSITIES = ("debug", "info", "warning", "error")
# The same as prompt_jax.tools.convert.PROMPT_FORMATS, prompt_jax.tools.plan.CHIPS and
# prompt_jax.prompts.base placements (tests/test_cli_errors.py checks), without importing them.
PROMPT_FORMATS = ("npy", "peft", "t5x")
CHIPS = ("a100", "h100", "v4", "v5e", "v5p", "v6e")
PLACEMENTS = ("prefix", "prefix_after_bos", "suffix")


class UsageError(ValueError):
  """A bad command line (argparse's errors, as one line)."""


def _formatter(prog: str) -> argparse.HelpFormatter:
  """Descriptions and examples as written; flag help wrapped at 100 columns."""
  return argparse.RawDescriptionHelpFormatter(prog, max_help_position=26, width=100)


class _Parser(argparse.ArgumentParser):
  """No abbreviated flags, raw description/epilog, errors as `UsageError`."""

  def __init__(self, **kwargs):
    kwargs.setdefault("formatter_class", _formatter)
    kwargs.setdefault("allow_abbrev", False)
    super().__init__(**kwargs)

  def error(self, message):
    raise UsageError(f"{self.prog}: {message} (see {self.prog} --help)")


# ------------------------------------------------------------------------------- help texts

GIN_HELP = """\
--gin.NAME=VALUE        binds a gin macro or parameter, the same as
                        --gin_bindings='NAME = VALUE' (repeatable; applied after the files), e.g.
                        --gin.TRAIN_STEPS=100 or --gin.trainer.train.log_every_steps=1. Values
                        are gin (Python) literals, so a string needs quotes inside the shell's:
                        --gin.MODEL_DIR="'/tmp/run'"."""

GIN_USAGE = ("{prog} --gin_file=FILE [--gin_file=FILE ...] [--gin.NAME=VALUE ...]\n"
             "       [--gin_bindings=BINDING ...] [--gin_search_paths=DIRS] [--verbosity=LEVEL]")

DESCRIPTIONS = {
    "train": """\
Prompt-tune a frozen T5. The gin files configure trainer.train: the model (models/*.gin), the
prompt method (prompts/*.gin) and the run (runs/prompt_finetune.gin: task, steps, batch size,
optimizer). MODEL_DIR receives run.json (the run record) and config.gin, the checkpoints,
prompts/prompt_<step>.npy exports, metrics.jsonl, TensorBoard events, summary.json and
curves.png (docs/runs.md); a run resumes from MODEL_DIR's latest checkpoint, and a MODEL_DIR
whose run.json differs from this command's configuration is refused, naming each difference.
Selective Prompt Tuning (runs/spt.gin, runs/spt_demo.gin) has its own command, `prompt-jax spt`.""",
    "spt": """\
Selective Prompt Tuning (SPT / SPT-DARTS) in one run; the gin files configure
spt_training.train_spt (a models/ file, then runs/spt.gin; runs/spt_demo.gin is the demo on the
shipped tiny model). Phase 1 (MODEL_DIR/search) learns a gate per
candidate layer, the top SPT_NUM_LAYERS layers are kept (printed, and written to
MODEL_DIR/search/selection.json), phase 2 (MODEL_DIR/retrain) re-trains them; rerunning the
same command resumes either phase. Another SPT_NUM_LAYERS on a finished search selects again
from its recorded gates; a MODEL_DIR/retrain of another selection is refused in one line
(remove it, or use another MODEL_DIR), as are other search settings.""",
    "multitask": """\
Multi-task prompt tuning: one prompt per task of a seqio mixture, trained in one run; the gin
files configure multitask_training.train_multitask (a models/ file, then runs/multitask.gin, or
the demo runs/multitask_demo.gin; optionally followed by prompts/multitask_shared.gin or
prompts/mpt.gin). Batches mix the tasks at the mixture's rates
and every prompt trains as it would alone on its task's examples; MODEL_DIR/tasks.json maps
prompt indices to tasks, prompts/<task>.npy and prompts/peft/<task>/ are the tasks' prompts,
evaluation reports every task and the mixture average (docs/multitask.md).""",
    "pretrain": """\
Train a small T5 from scratch (every parameter) to serve as a frozen model; the gin files
configure pretrain.pretrain (runs/pretrain_*.gin). MODEL_DIR receives the resumable checkpoints
and the model as model.npz (or OUTPUT_PATH receives it); an existing .npz is refused unless
--gin.pretrain.pretrain.overwrite=True.""",
    "eval": """\
Score a trained prompt on a task's eval split. Given only a run directory (--model_dir or
--gin.MODEL_DIR), the command is configured from runs/eval.gin and the run's own config
(MODEL_DIR/config.gin): its model, prompt method, frozen checkpoint, task and lengths;
--gin.NAME=VALUE overrides (e.g. --gin.EVAL_SPLIT="'test'"). Otherwise the gin files (the model
and prompt files the prompt was trained with, then runs/eval.gin) configure
evaluation.run_evaluation. The prompt is MODEL_DIR's latest checkpoint (or STEP), or PROMPT_PATH
(a .npy export, FILE.npy#ROW, a PEFT adapter directory or a run directory MODEL_DIR[@STEP]).
A model, prompt or frozen checkpoint that contradicts the run's record (run.json) is refused
unless --gin.ALLOW_CONFIG_CHANGE=True; without any frozen checkpoint the command stops
unless --gin.RANDOM_FROZEN_MODEL=True.""",
    "infer": """\
Predictions of trained prompts, written as JSONL: greedy by default, beam search or sampling
with gin's DECODE_FN (runs/infer.gin) or --decode (multi-task serving). Two forms:

  single task on a run directory: --model_dir=DIR (the run's config.gin, as for eval) with
    --gin.INPUTS_PATH="'in.jsonl'" (or the run's task split) and --gin.OUTPUT_PATH="'out.jsonl'".
  single task (gin): the gin files (the model and prompt files the prompt was trained with, then
    runs/infer.gin) configure inference.infer; inputs are INPUTS_PATH (JSONL of {"inputs": ...}
    lines) or a task split (MIXTURE_OR_TASK_NAME), the prompt is MODEL_DIR's checkpoint or
    PROMPT_PATH, the output OUTPUT_PATH.
  multi-task serving (no gin flags): one frozen model (--checkpoint), a prompt per task
    (--prompt=TASK=PATH, repeatable), and {"task": ..., "inputs": ...} lines from --inputs
    answered in mixed batches into --output (the same as `prompt-jax infer-multitask`).""",
    "sweep": """\
A scale-ablation grid in one command: the sweep gin file configures sweep.SweepConfig (model
sizes, methods, initialisers, prompt lengths, learning rates, seeds); each cell is one
`prompt-jax train` run in <sweep_dir>/<cell>. Every mode ends by writing
<sweep_dir>/results.csv and the plots score_vs_parameters.png, score_vs_prompt_length.png and
score_vs_initializer.png. Finished cells are skipped, so an interrupted sweep resumes; SIGTERM
or SIGINT makes the running cell save and the sweep exit 75. A cell trained with other bindings
is never reused: only more TRAIN_STEPS continue it, other changes are refused in one line.""",
    "plan": """\
What the programs of the training gin config (train step; with --topology also the eval step,
score and predict) cost per device, without allocating a weight: they are compiled ahead of time
on a (data, model) mesh of DATA x MODEL devices. With --topology=v5e:2x4 (v4:2x2x2, v5p:2x2x1,
v6e:2x4, v5e:4x4, ...) the devices are that TPU slice's and the compiler is the TPU compiler
(libtpu: pip install -e ".[tpu]"; no TPU needed): its bytes, its fit or its out-of-memory error
(exit 1). Without it: this machine's devices, or fake CPU devices, which is NOT a TPU plan.
Printed: per-device argument, output, temporary and code bytes, peak, fit, FLOPs and the time at
the chip's peak, and the parameter counts; --max_batch searches the largest batch that fits.""",
    "convert": """\
Frozen weights into our Orbax format, and prompts between formats: `npy` (a [length, embed]
.npy file), `peft` (a PEFT PROMPT_TUNING adapter directory) and `t5x` (a T5X checkpoint).
Outputs are never overwritten.""",
    "export-prompt": """\
Fold a trained prompt of any method into a plain [length, embed] array and write it as .npy and
in the PEFT prompt-tuning format; it serves with a plain prompt (prompts/from_file.gin) at zero
overhead. Given only --model_dir, the model and prompt method come from the run's own config
(MODEL_DIR/config.gin); gin files, when given, must build the model the run trained (its
run.json is checked). The frozen checkpoint is the run's unless --initial_checkpoint_path names
the same file elsewhere.""",
    "infer-multitask": """\
Multi-task serving: one frozen model (--checkpoint), a prompt per task (--prompt=TASK=PATH,
repeatable), and {"task": ..., "inputs": ...} lines from --inputs answered in mixed batches
(prompts of one length share a prompt bank) into --output, which adds "prediction".""",
    "curves": """\
Draw a run's curves from MODEL_DIR/metrics.jsonl (written by every training run; no TensorBoard
needed): the training loss and each validation metric against step, with the untrained prompt's
score dashed. One run redraws MODEL_DIR/curves.png (or --output); several runs are compared in one
figure, a line per run named by its directory, written to --output.""",
}

EXAMPLES = {
    "train": """\
  prompt-jax train --gin_file=runs/demo.gin --gin.MODEL_DIR="'/tmp/demo'"
  prompt-jax train --gin_file=models/t5_1_1_lm_adapted_base.gin \\
    --gin_file=prompts/class_labels.gin --gin_file=runs/prompt_finetune.gin \\
    --gin.MODEL_DIR="'/tmp/run'" --gin.MIXTURE_OR_TASK_NAME="'taskless_glue_sst2_v002'" \\
    --gin.INITIAL_CHECKPOINT_PATH="'/path/to/frozen/checkpoint'" --gin.TRAIN_STEPS=1000""",
    "spt": """\
  prompt-jax spt --gin_file=runs/spt_demo.gin --gin.MODEL_DIR="'/tmp/spt'"
  prompt-jax spt --gin_file=runs/spt_demo.gin --gin.MODEL_DIR="'/tmp/spt'" \\
    --gin.SPT_SEARCH_MODE="'joint'" --gin.SPT_NUM_LAYERS=2 --gin.SPT_SEARCH_STEPS=200""",
    "multitask": """\
  prompt-jax multitask --gin_file=runs/multitask_demo.gin --gin.MODEL_DIR="'/tmp/multitask'"
  prompt-jax multitask --gin_file=runs/multitask_demo.gin --gin_file=prompts/mpt.gin \
    --gin.MODEL_DIR="'/tmp/multitask_mpt'\"""",
    "pretrain": """\
  prompt-jax pretrain --gin_file=runs/pretrain_demo.gin --gin.MODEL_DIR="'/tmp/tiny'\"""",
    "eval": """\
  prompt-jax eval --model_dir=/tmp/demo
  prompt-jax eval --gin_file=runs/demo.gin --gin_file=runs/eval.gin \\
    --gin.MODEL_DIR="'/tmp/demo'" --gin.MIXTURE_OR_TASK_NAME="'demo_sentiment'" \\
    --gin.INITIAL_CHECKPOINT_PATH="'builtin:demo_t5_tiny.npz'" \\
    --gin.TASK_FEATURE_LENGTHS="{'inputs': 64, 'targets': 16}\"""",
    "infer": """\
  prompt-jax infer --gin_file=models/t5_1_1_tiny.gin --gin_file=prompts/uniform.gin \\
    --gin_file=runs/infer.gin --gin.PROMPT_LENGTH=10 --gin.MODEL_DIR="'/tmp/demo'" \\
    --gin.INITIAL_CHECKPOINT_PATH="'builtin:demo_t5_tiny.npz'" \\
    --gin.INPUTS_PATH="'inputs.jsonl'" --gin.OUTPUT_PATH="'predictions.jsonl'"
  prompt-jax infer --inputs=requests.jsonl --output=answers.jsonl \\
    --prompt=sentiment=/tmp/demo/prompts/prompt_300.npy --prompt=nli=peft_dir \\
    --checkpoint=builtin:demo_t5_tiny.npz --model=tiny""",
    "sweep": """\
  prompt-jax sweep --gin_file=sweeps/tiny_demo.gin --sweep_dir=/tmp/sweep_tiny
  prompt-jax sweep --gin_file=sweeps/lester_scale.gin --mode=commands --sweep_dir=gs://b/sweep
  prompt-jax sweep --gin_file=sweeps/tiny_demo.gin --sweep_dir=/tmp/sweep_tiny \\
    --select=prompt_length=2 --cell_binding='TRAIN_STEPS = 5'""",
    "plan": """\
  prompt-jax plan --gin_file=runs/scale_xxl.gin --mesh=2x4 --topology=v5e:2x4 --json=/tmp/plan.json
  prompt-jax plan --gin_file=models/t5_1_1_lm_adapted_base.gin --gin_file=runs/scale.gin \\
    --mesh=4x2 --topology=v4:2x2x2 --programs=train --max_batch
  prompt-jax plan --gin_file=runs/demo.gin --mesh=4x2 --platform=tpu   (fake CPU devices)""",
    "convert": """\
  prompt-jax convert hf-to-orbax HF_DIR OUT_DIR
  prompt-jax convert t5x-to-orbax T5X_CHECKPOINT OUT_DIR --config t5_1_1_base [--set emb_dim=4]
  prompt-jax convert prompt SRC DST [--to npy|peft|t5x] [--base_model_name_or_path NAME]""",
    "export-prompt": """\
  prompt-jax export-prompt --model_dir=/tmp/run [--step=300] [--output=prompt.npy] \\
    [--peft_dir=peft/] [--base_model_name_or_path=google/t5-base-lm-adapt] [--format=npy]""",
    "infer-multitask": """\
  prompt-jax infer-multitask --inputs=requests.jsonl --output=answers.jsonl \\
    --prompt=sentiment=a.npy --prompt=nli=peft_dir --checkpoint=builtin:demo_t5_tiny.npz""",
    "curves": """\
  prompt-jax curves /tmp/demo
  prompt-jax curves /tmp/run_a /tmp/run_b --output=compare.png""",
}


def _epilog(command: str) -> str:
  return "example:\n" + EXAMPLES[command]


# ---------------------------------------------------------------------------- flag helpers


def _count_at_least(minimum: int) -> Callable[[str], int]:
  def parse(text: str) -> int:
    try:
      value = int(text)
    except ValueError:
      value = None
    if value is None or value < minimum:
      raise argparse.ArgumentTypeError(f"expected an integer >= {minimum}, got {text!r}")
    return value
  return parse


def _task_prompt(text: str) -> tuple[str, str]:
  task, sep, source = text.partition("=")
  if not sep or not task or not source:
    raise argparse.ArgumentTypeError(f"expected TASK=PATH, got {text!r}")
  return task, source


def _add_verbosity(parser: argparse.ArgumentParser) -> None:
  parser.add_argument("--verbosity", choices=VERBOSITIES, metavar="LEVEL",
                      help="log level: debug, info, warning or error (default: "
                           "$PROMPT_JAX_VERBOSITY, else warning); info and debug also show "
                           "TensorFlow's, libtpu's and gin's start-up messages")


# Commands that run compiled programs on this host: they take --host_devices.
RUNS_PROGRAMS = ("train", "eval", "infer", "spt", "multitask", "pretrain", "infer-multitask",
                 "sweep")


def _add_host_devices(parser: argparse.ArgumentParser) -> None:
  parser.add_argument("--host_devices", metavar="N", default=None,
                      help="CPU only: split the CPU into N XLA devices on the mesh's data axis, "
                           "so the batch's shards compute at the same time ('auto', the "
                           "default: one per usable core, at most "
                           f"{host_devices.MAX_AUTO_DEVICES}; $PROMPT_JAX_HOST_DEVICES). A "
                           "device count already in XLA_FLAGS is kept unless this is given. A "
                           "training batch that does not divide uses the most devices that "
                           "divide it; serving batches are padded")


def _add_gin_flags(parser: argparse.ArgumentParser, title: str = "gin configuration") -> None:
  group = parser.add_argument_group(title, GIN_HELP)
  group.add_argument("--gin_file", action="append", default=[], metavar="FILE",
                     help="a gin file (repeatable; later files and bindings override earlier "
                          "ones); relative paths are looked up in the current directory, "
                          "--gin_search_paths and the repository's gin_configs/")
  group.add_argument("--gin_bindings", action="append", default=[], metavar="BINDING",
                     help="a gin binding such as 'TRAIN_STEPS = 100' (repeatable)")
  group.add_argument("--gin_search_paths", default="", metavar="DIRS",
                     help="comma-separated directories for gin files and their includes")


def _add_multitask_flags(parser: argparse.ArgumentParser, required: bool = True,
                         title: Optional[str] = None) -> None:
  group = parser.add_argument_group(title) if title else parser
  group.add_argument("--inputs", required=required, metavar="IN.jsonl",
                     help='JSONL of {"task": ..., "inputs": ...} lines')
  group.add_argument("--output", required=required, metavar="OUT.jsonl",
                     help="JSONL to write: each input line with 'prediction' added")
  group.add_argument("--prompt", action="append", type=_task_prompt, default=[],
                     required=required, metavar="TASK=PATH",
                     help="a task's prompt (repeatable): a .npy [length, embed] file, "
                          "FILE.npy#ROW of a prompt bank, a PEFT adapter directory, a run "
                          "directory (its latest prompts/prompt_<step>.npy) or MODEL_DIR@STEP")
  group.add_argument("--checkpoint", required=required, metavar="CHECKPOINT",
                     help="the frozen model: .npz, Orbax, T5X or Hugging Face checkpoint, or "
                          "builtin:<name> (e.g. builtin:demo_t5_tiny.npz)")
  group.add_argument("--model", default="tiny", metavar="PRESET",
                     help="T5 preset of the frozen model (prompt_jax.models.t5; default tiny)")
  group.add_argument("--vocabulary", default="byte", metavar="byte|FILE",
                     help="'byte' (default) or a SentencePiece .model file")
  group.add_argument("--input_length", type=_count_at_least(1), default=512, metavar="N",
                     help="tokens per input, longer inputs are truncated (default 512)")
  group.add_argument("--max_decode_length", type=_count_at_least(1), default=32, metavar="N",
                     help="tokens per prediction (default 32)")
  group.add_argument("--batch_size", type=_count_at_least(1), default=32, metavar="N",
                     help="lines per batch, of any tasks (default 32)")
  group.add_argument("--placement", default="prefix", choices=PLACEMENTS, metavar="PLACE",
                     help="where the prompts go: prefix (default), prefix_after_bos or suffix")
  group.add_argument("--decode", default="greedy", metavar="SPEC",
                     help="greedy (default), 'beam_search(num_decodes=4, alpha=0.6)' or "
                          "'temperature_sample(temperature=0.7, topk=40, seed=1)'")
  group.add_argument("--return_all_decodes", action="store_true",
                     help="also write every decode and its score per line, best first")
  group.add_argument("--overwrite", action="store_true",
                     help="replace an existing --output (default: refuse it)")


RUN_USAGE = "{prog} --model_dir=DIR [--gin.NAME=VALUE ...] [--verbosity=LEVEL]"


def _add_model_dir_flag(parser: argparse.ArgumentParser) -> None:
  parser.add_argument("--model_dir", default=None, metavar="DIR",
                      help="a training run directory: without --gin_file the command is "
                           "configured from DIR/config.gin, the run's own gin config (the same "
                           "as --gin.MODEL_DIR=\"'DIR'\")")


MULTITASK_USAGE = ("{prog} --inputs=IN.jsonl --output=OUT.jsonl --prompt=TASK=PATH ...\n"
                   "       --checkpoint=CHECKPOINT [--model=PRESET] [--vocabulary=byte|FILE]\n"
                   "       [--input_length=N] [--max_decode_length=N] [--batch_size=N] "
                   "[--placement=PLACE] ...")


# ------------------------------------------------------------------------------ the parsers


def _new(command: str, prog: Optional[str] = None, usage: Optional[str] = None) -> _Parser:
  prog = prog or f"prompt-jax {command}"
  return _Parser(prog=prog, usage=usage.format(prog=prog) if usage else None,
                 description=DESCRIPTIONS[command], epilog=_epilog(command))


def build_parser(command: str, prog: Optional[str] = None) -> argparse.ArgumentParser:
  """The parser of `prompt-jax <command>` (`prog`: its name in messages)."""
  if command not in COMMANDS:
    raise UsageError(_unknown_command(command))
  if command in ("train", "spt", "multitask", "pretrain"):
    parser = _new(command, prog, GIN_USAGE)
    _add_gin_flags(parser)
  elif command == "eval":
    parser = _new(command, prog, RUN_USAGE + "\n   or: " + GIN_USAGE)
    _add_gin_flags(parser)
    _add_model_dir_flag(parser)
  elif command == "infer":
    parser = _new(command, prog, RUN_USAGE + "\n   or: " + GIN_USAGE + "\n   or: " +
                  MULTITASK_USAGE)
    _add_gin_flags(parser, "single task: gin configuration")
    _add_model_dir_flag(parser)
    _add_multitask_flags(parser, required=False, title="multi-task serving (no gin flags)")
  elif command == "infer-multitask":
    parser = _new(command, prog, MULTITASK_USAGE)
    _add_multitask_flags(parser)
  elif command in _PARSERS:
    parser = _PARSERS[command](command, prog)
  else:  # convert; its sub-commands take --verbosity
    parser = _new(command, prog, "{prog} {{hf-to-orbax,t5x-to-orbax,prompt}} ...")
    _add_convert_commands(parser)
    return parser
  _add_verbosity(parser)
  if command in RUNS_PROGRAMS:
    _add_host_devices(parser)
  return parser


def _sweep_parser(command: str, prog: Optional[str]) -> argparse.ArgumentParser:
  """`prompt-jax sweep`: the sweep's gin file and how to run its cells."""
  parser = _new(command, prog, GIN_USAGE.replace(
      "[--verbosity=LEVEL]", "[--mode=MODE] [--sweep_dir=DIR] ..."))
  _add_gin_flags(parser, "gin configuration (the sweep file)")
  parser.add_argument("--mode", default="local", choices=("local", "commands", "collect"),
                      help="local: run the unfinished cells here, one after another "
                           "(default); commands: write <sweep_dir>/commands.sh, one job line "
                           "per unfinished cell, and run nothing; collect: only gather results")
  parser.add_argument("--sweep_dir", default=None, metavar="DIR",
                      help="overrides SweepConfig.sweep_dir (local path or gs://)")
  parser.add_argument("--max_cells", type=_count_at_least(0), default=None, metavar="N",
                      help="run at most N unfinished cells, then collect")
  parser.add_argument("--stop_on_error", action="store_true",
                      help="stop at the first failed cell (default: record it in "
                           "<cell>/sweep_error.json and go on)")
  parser.add_argument("--select", action="append", default=[], metavar="AXIS=V1,V2",
                      help="only cells with these values (repeatable), e.g. "
                           "--select=size=mini_1m --select=prompt_length=1,20")
  parser.add_argument("--cell_binding", action="append", default=[], metavar="BINDING",
                      help="a gin binding added to every cell after the sweep's own "
                           "(repeatable), e.g. --cell_binding='TRAIN_STEPS = 5'")
  return parser


def _plan_parser(command: str, prog: Optional[str]) -> argparse.ArgumentParser:
  """`prompt-jax plan`: the training config, the mesh and what to compile for."""
  parser = _new(command, prog, GIN_USAGE.replace(
      "[--verbosity=LEVEL]", "--mesh=DATAxMODEL\n       [--topology=GEN:GRID] "
      "[--programs=train,eval,score,predict] [--max_batch]\n       [--platform=cpu|gpu|tpu] "
      "[--chip=CHIP] [--gpu_target_config=FILE] [--json=FILE] [--verbosity=LEVEL]"))
  _add_gin_flags(parser, "gin configuration (the training config)")
  parser.add_argument("--mesh", required=True, metavar="DATAxMODEL",
                      help="the (data, model) mesh, e.g. 4x2 (required)")
  parser.add_argument("--topology", default=None, metavar="GEN:GRID",
                      help="a TPU slice compiled for by the TPU compiler (needs libtpu), e.g. "
                           "v5e:2x4, v4:2x2x2, v5p:2x2x1, v6e:2x4, v5e:4x4; DATA x MODEL must "
                           "be its chip count")
  parser.add_argument("--programs", default=None, metavar="LIST",
                      help="comma-separated subset of train,eval,score,predict (default: all "
                           "four with --topology, else train)")
  parser.add_argument("--max_batch", action="store_true",
                      help="also search (doubling, then bisection over compiles) the largest "
                           "global batch whose train step fits (needs --topology)")
  parser.add_argument("--platform", default="cpu", choices=("cpu", "gpu", "tpu"),
                      help="without --topology: the platform planned for (default cpu)")
  parser.add_argument("--chip", default=None, choices=CHIPS,
                      help="without --topology: accelerator whose memory and peak FLOP/s the "
                           "plan is compared with (default: v5e for tpu, h100 for gpu)")
  parser.add_argument("--gpu_target_config", default=None, metavar="FILE",
                      help="compile for GPUs without a GPU: an XLA GpuTargetConfigProto text "
                           "file (e.g. XLA's xla/backends/gpu/target_config/specs/"
                           "h100_sxm.txtpb); needs jax-cuda12-plugin")
  parser.add_argument("--json", default=None, metavar="FILE",
                      help="also write the numbers to this JSON file")
  return parser


def _export_parser(command: str, prog: Optional[str]) -> argparse.ArgumentParser:
  """`prompt-jax export-prompt`: which run and step, and what to write."""
  parser = _new(command, prog, "{prog} --model_dir=DIR [--step=N] [--output=FILE.npy] "
                "[--peft_dir=DIR] [--format=both|npy|peft] ...\n   or: " + GIN_USAGE.replace(
                    "[--verbosity=LEVEL]", "[--model_dir=DIR] [--step=N]\n       "
                    "[--output=FILE.npy] [--peft_dir=DIR] [--format=both|npy|peft] ..."))
  _add_gin_flags(parser, "gin configuration (the run's model and prompt files)")
  parser.add_argument("--model_dir", metavar="DIR",
                      help="the training run directory (default: gin MODEL_DIR)")
  parser.add_argument("--step", type=_count_at_least(0), metavar="N",
                      help="checkpoint step (default: the latest)")
  parser.add_argument("--output", metavar="FILE.npy",
                      help=".npy path (default MODEL_DIR/export/prompt_<step>.npy)")
  parser.add_argument("--peft_dir", metavar="DIR",
                      help="PEFT directory (default MODEL_DIR/export/peft_<step>)")
  parser.add_argument("--base_model_name_or_path", metavar="NAME",
                      help="recorded in the PEFT adapter config, e.g. google/t5-base-lm-adapt")
  parser.add_argument("--initial_checkpoint_path", metavar="CHECKPOINT",
                      help="the frozen checkpoint (default: the one the run recorded)")
  parser.add_argument("--random_frozen_model", action="store_true",
                      help="fold against a randomly initialised frozen model when the run "
                           "records no frozen checkpoint (otherwise an error)")
  parser.add_argument("--format", choices=("both", "npy", "peft"), default="both",
                      help="what to write (default both)")
  parser.add_argument("--t5x_checkpoint", metavar="DIR",
                      help="fold the prompt of a T5X prompt-tuning checkpoint_<step> instead "
                           "of a prompt_jax run (writes --output; no t5x needed)")
  return parser


def _curves_parser(command: str, prog: Optional[str]) -> argparse.ArgumentParser:
  """`prompt-jax curves`: run directories and the image."""
  parser = _new(command, prog, "{prog} MODEL_DIR [MODEL_DIR ...] [--output=PNG] [--overwrite]")
  parser.add_argument("model_dirs", nargs="+", metavar="MODEL_DIR",
                      help="a training run directory (with metrics.jsonl); several: compared")
  parser.add_argument("--output", default=None, metavar="PNG",
                      help="the image to write (default MODEL_DIR/curves.png for one run, "
                           "redrawn; required for several); never an existing file unless "
                           "--overwrite")
  parser.add_argument("--overwrite", action="store_true",
                      help="replace an existing --output")
  return parser


_PARSERS = {"sweep": _sweep_parser, "plan": _plan_parser, "export-prompt": _export_parser,
            "curves": _curves_parser}


def _add_convert_commands(parser: argparse.ArgumentParser) -> None:
  sub = parser.add_subparsers(dest="action", required=True, prog=parser.prog,
                              metavar="{hf-to-orbax,t5x-to-orbax,prompt}",
                              help="what to convert (`prompt-jax convert ACTION --help`)")
  examples = EXAMPLES["convert"].splitlines()
  p = sub.add_parser("hf-to-orbax", help="Hugging Face T5 directory -> Orbax frozen checkpoint",
                     description="A Hugging Face T5 (config.json + model.safetensors) as an "
                                 "Orbax frozen checkpoint.", epilog="example:\n" + examples[0])
  p.add_argument("src", help="directory with config.json and model.safetensors (or shards)")
  p.add_argument("out", help="new Orbax checkpoint directory")
  p = sub.add_parser("t5x-to-orbax", help="T5X checkpoint (legacy or Orbax) -> Orbax params",
                     description="A T5X checkpoint's parameters as an Orbax frozen checkpoint.",
                     epilog="example:\n" + examples[1])
  p.add_argument("src", help="checkpoint_<step> directory (or its msgpack / state item)")
  p.add_argument("out", help="new Orbax checkpoint directory")
  p.add_argument("--config", required=True, metavar="PRESET",
                 help="T5 preset name, e.g. t5_1_1_base (required)")
  p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                 help="override a T5Config field (repeatable), e.g. --set emb_dim=4")
  p = sub.add_parser("prompt", help="a prompt between .npy, PEFT and T5X formats",
                     description="A prompt from one format to another. The source format is "
                                 "detected; the destination is npy\nwhen DST ends in .npy, "
                                 "otherwise --to names it.", epilog="example:\n" + examples[2])
  p.add_argument("src", help=".npy file (or FILE.npy#ROW), PEFT adapter directory, run "
                             "directory (MODEL_DIR or MODEL_DIR@STEP) or T5X checkpoint")
  p.add_argument("dst", help="output path (.npy file or directory)")
  p.add_argument("--to", choices=PROMPT_FORMATS, help="output format (default: from dst)")
  p.add_argument("--base_model_name_or_path", default=None, metavar="NAME",
                 help="recorded in the PEFT adapter config, e.g. google/t5-base-lm-adapt")
  p.add_argument("--step", type=_count_at_least(0), default=0, metavar="N",
                 help="step of a written T5X checkpoint (default 0)")
  for action in sub.choices.values():
    _add_verbosity(action)


def top_parser() -> argparse.ArgumentParser:
  """`prompt-jax --help`: the commands."""
  parser = _Parser(prog="prompt-jax", usage="prompt-jax [--version] COMMAND [flags]",
                   description="Soft prompt tuning of frozen T5 models in JAX/Flax.",
                   epilog="`prompt-jax COMMAND --help` describes a command's flags. Gin "
                          "commands take --gin_file=FILE,\n--gin.NAME=VALUE (e.g. "
                          "--gin.MODEL_DIR=\"'/tmp/run'\"), --gin_bindings=... and "
                          "--gin_search_paths=DIRS.\nexample:\n" + EXAMPLES["train"].split(
                              "\n")[0])
  parser.add_argument("--version", action="store_true", help="print the version and exit")
  sub = parser.add_subparsers(title="commands", metavar="COMMAND", prog="prompt-jax")
  for name, summary in COMMANDS.items():
    sub.add_parser(name, help=summary)
  return parser


def _unknown_command(command: str) -> str:
  close = difflib.get_close_matches(command, list(COMMANDS), 1)
  hint = f"; did you mean {close[0]}?" if close else ""
  return f"unknown command {command!r}{hint} (commands: {', '.join(COMMANDS)})"


def parse(command: str, argv: Sequence[str], prog: Optional[str] = None) -> argparse.Namespace:
  """`prompt-jax <command> <argv>` -> its values; `--gin.NAME=VALUE` flags are appended to
  `gin_bindings` as 'NAME = VALUE'."""
  parser = build_parser(command, prog)
  takes_gin = any(a.dest == "gin_file" for a in parser._actions)  # pylint: disable=protected-access
  if not takes_gin:
    return parser.parse_args(list(argv))
  args, rest = parser.parse_known_args(list(argv))
  for flag in rest:
    if not flag.startswith("--gin."):
      parser.error(f"unrecognised argument {flag!r}")
    name, sep, value = flag[len("--gin."):].partition("=")
    if not name or not sep:
      parser.error(f"{flag!r} needs a value: --gin.{name or 'NAME'}=VALUE")
    args.gin_bindings.append(f"{name} = {value}")
  args.search_paths = [p for p in args.gin_search_paths.split(",") if p]
  return args


# ----------------------------------------------------------------------------- quiet start-up

_NVIDIA_DEVICES = ("/dev/nvidia0", "/dev/nvidiactl", "/dev/dxg")  # jax's test for a GPU


def _tpu_backend_cannot_start() -> bool:
  """Whether jax would try libtpu (installed; JAX_PLATFORMS unset) where no accelerator can
  start: no TPU (/dev/accel*, /dev/vfio) or NVIDIA device, no jax plugin but CUDA's. There libtpu
  fails after writing errors (host bounds, TPU_WORKER_HOSTNAMES) to stderr that no log level
  (TF_CPP_MIN_LOG_LEVEL, TPU_MIN_LOG_LEVEL, TPU_STDERR_LOG_LEVEL) hides."""
  if "JAX_PLATFORMS" in os.environ or "JAX_FORCE_TPU_INIT" in os.environ:
    return False
  if glob.glob("/dev/accel*") or any(map(os.path.exists, ("/dev/vfio", *_NVIDIA_DEVICES))):
    return False
  if importlib.util.find_spec("libtpu") is None and not os.environ.get("TPU_LIBRARY_PATH"):
    return False
  from importlib import metadata  # pylint: disable=g-import-not-at-top
  plugins = [e.name for e in metadata.entry_points(group="jax_plugins")]
  spec = importlib.util.find_spec("jax_plugins")
  if spec is not None and spec.submodule_search_locations:
    plugins += [m.name for m in pkgutil.iter_modules(spec.submodule_search_locations)]
  return all("cuda" in name for name in plugins)  # jax skips CUDA's without an NVIDIA device


def configure_output(verbosity: Optional[str] = None) -> None:
  """Logging at `verbosity` (None: $PROMPT_JAX_VERBOSITY, else warning); below info, no
  TensorFlow start-up lines, no libtpu on a host without TPUs (jax on CPU, see
  `_tpu_backend_cannot_start`), no absl warnings or gin search-path misses."""
  verbosity = verbosity or os.environ.get(prompt_jax.VERBOSITY_ENV, "").strip() or "warning"
  if verbosity.lower() not in VERBOSITIES:
    raise ValueError(f"{prompt_jax.VERBOSITY_ENV} must be one of {', '.join(VERBOSITIES)}, "
                     f"got {verbosity!r}")
  level = getattr(logging, verbosity.upper())
  quiet = level > logging.INFO
  if "tensorflow" not in sys.modules:
    os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3" if quiet else "0"
    prompt_jax.quiet_tensorflow_import(quiet)
  if quiet and _tpu_backend_cannot_start():
    import jax  # pylint: disable=g-import-not-at-top
    if jax.config.jax_platforms is None:
      jax.config.update("jax_platforms", "cpu")
  logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
  logging.getLogger("absl").setLevel(logging.ERROR if quiet else level)
  from prompt_jax import gin_utils  # pylint: disable=g-import-not-at-top
  gin_utils.install_gin_log_filter()


# ------------------------------------------------------------------------------- the commands


def _import(command: str, module_name: str):
  try:
    return importlib.import_module(module_name)
  except ModuleNotFoundError as e:
    if e.name and module_name.startswith(e.name):
      raise ValueError(f"command {command!r} is not available in this version") from e
    raise


def _initialize_distributed() -> None:
  from prompt_jax.tools import distributed  # pylint: disable=g-import-not-at-top
  distributed.maybe_initialize()  # multi-host runs: before anything touches the devices


def print_summary(summary: dict) -> None:
  """The final result table of a training run."""
  before, after = summary.get("eval_untrained"), summary.get("eval_trained")
  if after:
    print("\nvalidation metric        untrained prompt   trained prompt")
    for name in sorted(after):
      b = f"{before[name]:16.2f}" if before and name in before else f"{'-':>16}"
      print(f"{name:24} {b}   {after[name]:14.2f}")
  train = summary.get("train") or {}
  if "loss" in train:
    ce = f" (cross-entropy {train['cross_ent_loss']:.4f})" if "cross_ent_loss" in train else ""
    print(f"final training loss {train['loss']:.4f}{ce} at step {summary.get('step')}; "
          f"run directory {summary.get('model_dir')}")


def _check_gin(command: str, args: argparse.Namespace) -> None:
  """A gin command's static checks (milliseconds, nothing heavy imported): the config is this
  command's, then `gin_utils.check_config`."""
  from prompt_jax import gin_utils  # pylint: disable=g-import-not-at-top
  spec = GIN_COMMANDS[command]
  if not args.gin_file:
    raise ValueError(f"no --gin_file given (see prompt-jax {command} --help)")
  config = gin_utils.read_config(args.gin_file, args.gin_bindings, args.search_paths)
  gin_utils.check_command(config, command, elsewhere=dict(spec.elsewhere),
                          required=spec.required)
  gin_utils.check_config(config, roots=[spec.root], not_empty=spec.not_empty)


def _run_gin(command: str, args: argparse.Namespace, function: Optional[Callable] = None):
  """Check, configure gin and call the command's function (`function`: already imported); its
  result, whose summary table is printed when it is a dict."""
  from prompt_jax import gin_utils  # pylint: disable=g-import-not-at-top
  spec = GIN_COMMANDS[command]
  _check_gin(command, args)
  _initialize_distributed()
  if function is None:
    function = getattr(_import(command, spec.module), spec.function)
  result = gin_utils.run_configured(function, args.gin_file, args.gin_bindings,
                                    args.search_paths, roots=[spec.root],
                                    not_empty=spec.not_empty, pass_config_text=spec.trains)
  if isinstance(result, dict):
    print_summary(result)
  return result


def run_gin_command(function: Callable, argv: Sequence[str]):
  """The gin command whose function is `function` (e.g. evaluation.run_evaluation for `eval`),
  run with T5X flags `argv`; its result."""
  commands = [c for c, spec in GIN_COMMANDS.items()
              if (spec.module, spec.function) == (function.__module__, function.__name__)]
  if not commands:
    known = ", ".join(f"{c}: {spec.module}.{spec.function}" for c, spec in GIN_COMMANDS.items())
    raise ValueError(f"{function.__module__}.{function.__name__} is no gin command's function "
                     f"({known})")
  args = parse(commands[0], argv)
  configure_output(args.verbosity)
  return _run_gin(commands[0], args, function)


def configure_host_devices(requested: Optional[str], command: str) -> Optional[int]:
  """Before jax starts: XLA_FLAGS asking for the host devices of `host_devices` (--host_devices
  `requested`, $PROMPT_JAX_HOST_DEVICES, else one per core), for commands that run programs.
  The count set, or None when XLA_FLAGS stays (another command, the count it already asks for,
  or jax already imported in this process, e.g. `cli.main` called from Python: its devices are
  fixed, and a flag given then is an error)."""
  if command not in RUNS_PROGRAMS:
    return None
  return host_devices.apply(requested, os.environ, jax_started="jax" in sys.modules)


def configure_compilation_cache() -> Optional[str]:
  """XLA's persistent compilation cache, so that rerunning the same programs (the same model,
  shapes and mesh) reads them instead of compiling: `JAX_COMPILATION_CACHE_DIR` when set (jax
  reads it; empty turns the cache off), else `$XDG_CACHE_HOME/prompt_jax/xla` (~/.cache/...).
  The directory in use, or None."""
  if "JAX_COMPILATION_CACHE_DIR" in os.environ:
    return os.environ["JAX_COMPILATION_CACHE_DIR"] or None
  cache_home = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
  path = os.path.join(cache_home, "prompt_jax", "xla")
  import jax  # pylint: disable=g-import-not-at-top
  jax.config.update("jax_compilation_cache_dir", path)
  return path


def bound_model_dir(gin_bindings: Sequence[str]) -> Optional[str]:
  """The last `MODEL_DIR = '...'` of the bindings (e.g. from --gin.MODEL_DIR), or None."""
  import ast  # pylint: disable=g-import-not-at-top
  found = None
  for binding in gin_bindings:
    name, sep, value = binding.partition("=")
    if sep and name.strip() == "MODEL_DIR":
      try:
        found = ast.literal_eval(value.strip())
      except (ValueError, SyntaxError):
        found = None  # gin reports the bad value
  return found if isinstance(found, str) and found else None


def run_evaluator(config_text: str) -> Optional[str]:
  """How to score a run the way its training did, from its config.gin: the training's own
  evaluator as a gin value (`trainer.train.evaluator`, e.g. 'ensemble'), 'multitask' for a
  multi-task run (every task with its own prompt), else None (the default evaluation)."""
  match = re.search(r"^trainer\.train\.evaluator = ('\w+')\s*$", config_text, re.MULTILINE)
  if match:
    return match.group(1)
  if re.search(r"^multitask_training\.train_multitask\.", config_text, re.MULTILINE):
    return "'multitask'"
  return None


def spt_retrain_bindings(model_dir: str) -> list[str]:
  """For an SPT run's re-training phase (MODEL_DIR/retrain, whose config.gin is the `spt`
  command's and so builds the search model): the bindings that build the re-trained model,
  hard gates at the layers MODEL_DIR/search/selection.json selected. [] for other runs."""
  from prompt_jax.storage import run_dir  # pylint: disable=g-import-not-at-top
  if os.path.basename(os.path.normpath(model_dir)) != "retrain":
    return []
  selection = run_dir.read_json(os.path.join(os.path.dirname(os.path.normpath(model_dir)),
                                             "search", "selection.json"))
  if selection is None:
    return []
  layers = tuple(int(layer) for layer in selection["selected_layers"])
  return [f"spt.SelectivePrompt.layers = {layers!r}", "spt.SelectivePrompt.hard = True"]


def _set_model_dir(args: argparse.Namespace, model_dir: str) -> None:
  if getattr(args, "model_dir", None):
    args.model_dir = model_dir
  args.gin_bindings[:] = [b for b in args.gin_bindings
                          if b.partition("=")[0].strip() != "MODEL_DIR"]
  args.gin_bindings.append(f"MODEL_DIR = {model_dir!r}")


def from_run_directory(command: str, args: argparse.Namespace) -> None:
  """`eval`, `infer` and `export-prompt` given a run directory (--model_dir or a MODEL_DIR
  binding) and no --gin_file: configured from MODEL_DIR/config.gin, the training run's own gin
  config, after the command's base file (runs/eval.gin, runs/infer.gin), so the model, prompt,
  frozen checkpoint, task and lengths are the run's, and `eval` scores it with the run's own
  evaluator (`run_evaluator`); --gin.NAME=VALUE still overrides."""
  spec = GIN_COMMANDS.get(command)
  if not (spec and spec.serves) and command != "export-prompt":
    return
  model_dir = getattr(args, "model_dir", None) or bound_model_dir(args.gin_bindings)
  if not model_dir:
    return
  if spec and spec.serves and args.model_dir:
    args.gin_bindings.insert(0, f"MODEL_DIR = {model_dir!r}")
  if args.gin_file:
    return
  if not os.path.isdir(model_dir):
    raise ValueError(f"MODEL_DIR {model_dir!r} does not exist (or is not a directory)")
  from prompt_jax.storage import run_dir  # pylint: disable=g-import-not-at-top
  retrain = os.path.join(model_dir, "retrain")
  if not os.path.exists(os.path.join(model_dir, run_dir.CONFIG_FILE)) and os.path.isfile(
      os.path.join(retrain, run_dir.CONFIG_FILE)):  # an SPT run: serve its re-trained phase
    model_dir = retrain
    _set_model_dir(args, model_dir)
  config = os.path.join(model_dir, run_dir.CONFIG_FILE)
  if not os.path.isfile(config):
    raise ValueError(f"MODEL_DIR {model_dir!r} has no {run_dir.CONFIG_FILE} (not a training run "
                     "directory, or trained by an older version or through the Python API); "
                     "pass the gin files it was trained with (--gin_file=...)")
  args.gin_file = [*([spec.serves] if spec and spec.serves else []), config]
  args.gin_bindings[:0] = spt_retrain_bindings(model_dir)
  if command == "eval":
    evaluator = run_evaluator(Path(config).read_text())
    if evaluator:
      args.gin_bindings.insert(0, f"evaluation.run_evaluation.evaluator = {evaluator}")
  if command == "infer" and any(b.split("=")[0].strip() == "INPUTS_PATH"
                                for b in args.gin_bindings):
    args.gin_bindings.append("MIXTURE_OR_TASK_NAME = None")  # inputs instead of the run's task


def _run(command: str, args: argparse.Namespace) -> int:
  if command == "curves":  # matplotlib only: no jax, no compilation cache
    return _run_curves(args)
  if command != "plan":  # a plan measures the compiler, and compile-only programs never run
    configure_compilation_cache()
  if command in GIN_COMMANDS:
    _run_gin(command, args)
    return 0
  if command == "infer-multitask":
    if "://" not in args.inputs and not os.path.isfile(args.inputs):
      raise FileNotFoundError(f"--inputs {args.inputs!r} does not exist")
    _initialize_distributed()
    multitask = _import(command, "prompt_jax.serving.multitask_inference")
    return int(multitask.main(
        inputs=args.inputs, output=args.output, prompts=args.prompt, checkpoint=args.checkpoint,
        model=args.model, vocabulary=args.vocabulary, input_length=args.input_length,
        max_decode_length=args.max_decode_length, batch_size=args.batch_size,
        placement=args.placement, decode=args.decode,
        return_all_decodes=args.return_all_decodes, overwrite=args.overwrite) or 0)
  _initialize_distributed()
  if command == "plan":
    if args.json:  # before any compile
      from prompt_jax.storage import output_paths  # pylint: disable=g-import-not-at-top
      output_paths.check_output_path(args.json, "--json")
    # The plan compiles trainer.train's programs: gin is parsed here, the library gets objects.
    from prompt_jax import gin_utils  # pylint: disable=g-import-not-at-top
    plan = _import(command, "prompt_jax.tools.plan")
    request = plan.request(mesh=args.mesh, topology=args.topology, platform=args.platform,
                           chip=args.chip, programs=args.programs, max_batch=args.max_batch,
                           gpu_target_config=args.gpu_target_config)
    checks = {"roots": ["trainer.train"], "optional": ["MODEL_DIR", "MIXTURE_OR_TASK_NAME"],
              "extra_bindings": [f"NUM_PARTITIONS = {request.model}"]}
    gin_utils.check(args.gin_file, args.gin_bindings, args.search_paths, **checks)
    again = [*(f"--gin_file={f}" for f in args.gin_file),  # for a child with fake CPU devices
             *(f"--gin_bindings={b}" for b in args.gin_bindings),
             f"--gin_search_paths={','.join(args.search_paths)}", f"--mesh={args.mesh}",
             f"--platform={args.platform}", *([f"--chip={args.chip}"] if args.chip else []),
             *([f"--programs={args.programs}"] if args.programs else []),
             *([f"--json={args.json}"] if args.json else [])]
    target = _plan_target(plan, request, again)
    import gin  # pylint: disable=g-import-not-at-top
    gin_utils.configure_gin(args.gin_file, args.gin_bindings, args.search_paths, **checks)
    for macro, value in (("MODEL_DIR", "None"), ("MIXTURE_OR_TASK_NAME", "'plan_only'")):
      try:  # the plan reads and writes no data: fill what a run would require
        bound = gin.query_parameter(f"%{macro}")
      except ValueError:
        bound = gin.REQUIRED
      if bound is gin.REQUIRED or repr(bound) == repr(gin.REQUIRED):
        gin.parse_config(f"{macro} = {value}")
    with contextlib.suppress(ValueError, KeyError):  # only its axis rules are used: build it
      gin.bind_parameter("partitioning.Partitioner.num_partitions", 1)  # on any device count
    _bind_planned_activation_dtype(gin, request.platform)
    from prompt_jax.training import trainer  # pylint: disable=g-import-not-at-top
    bound = gin.get_bindings(trainer.train)
    data_cfg = bound["train_dataset_cfg"]
    lengths = data_cfg.task_feature_lengths
    return int(plan.main(
        model=bound["model"], target=target, batch_size=data_cfg.batch_size,
        input_length=lengths["inputs"], target_length=lengths["targets"],
        optimizer=bound.get("optimizer"),
        logical_axis_rules=getattr(bound.get("partitioner"), "logical_axis_rules", None),
        trainable_pattern=bound.get("trainable_pattern"), frozen_dtype=bound.get("frozen_dtype"),
        programs=request.programs, max_batch=request.max_batch, json_path=args.json) or 0)
  if command == "sweep":
    return _run_sweep(args)
  if command == "export-prompt":
    return _run_export(args)
  convert = _import(command, "prompt_jax.tools.convert")
  return int(convert.main(args) or 0)


def _bind_planned_activation_dtype(gin, platform: str) -> None:
  """ACTIVATION_DTYPE 'auto' (the real-model files) is the planned platform's dtype, not this
  host's: bfloat16 for TPUs and for the planned GPUs (a100, h100: Ampere or later), the host
  CPU's for --platform=cpu."""
  from prompt_jax.models import activation_dtype  # pylint: disable=g-import-not-at-top
  try:
    requested = gin.query_parameter("%ACTIVATION_DTYPE")
  except ValueError:  # a model file without the macro
    return
  if activation_dtype.is_auto(requested):
    planned = activation_dtype.resolve(
        requested, platform, activation_dtype.cpu_flags(),
        gpu_compute_capability=activation_dtype.GPU_BF16_MIN_COMPUTE_CAPABILITY)
    gin.parse_config(f"ACTIVATION_DTYPE = '{planned}'")


def _plan_target(plan, request, reexec_argv: Sequence[str]):
  """`plan.target(request)`, the devices `prompt-jax plan` compiles for, after the process-wide
  settings a compile-only plan needs: the library returns them (`plan.settings`), the command
  sets them here, before jax touches a device. jax_platforms (compile only: do not open this
  host's TPU runtime or look for a GPU) and XLA_FLAGS stay; libtpu's start-up environment is
  set while the TPU slice is described, then removed."""
  settings = plan.settings(request, os.environ)  # first: its error if the compiler is missing
  if settings.xla_flags is not None:
    os.environ["XLA_FLAGS"] = settings.xla_flags
  if settings.jax_platforms is not None:
    import jax  # pylint: disable=g-import-not-at-top
    jax.config.update("jax_platforms", settings.jax_platforms)
  os.environ.update(settings.libtpu_environ)
  try:
    return plan.target(request, reexec_argv)
  finally:
    for name in settings.libtpu_environ:
      os.environ.pop(name, None)


def _run_sweep(args: argparse.Namespace) -> int:
  """`prompt-jax sweep`: the SweepConfig of the sweep's gin file (`--sweep_dir` overrides its
  sweep_dir) and a parameter counter for its sizes, both parsing gin in child processes."""
  from prompt_jax import gin_utils  # pylint: disable=g-import-not-at-top
  sweep = _import("sweep", "prompt_jax.tools.sweep")
  bindings = list(args.gin_bindings)
  if args.sweep_dir:
    bindings.append(f"sweep.SweepConfig.sweep_dir = {args.sweep_dir!r}")
  cfg = gin_utils.sweep_config(args.gin_file, bindings, args.search_paths)

  def count_parameters(cell) -> int:
    return gin_utils.frozen_parameter_count(cell.gin_files, cell.bindings, args.search_paths)

  return int(sweep.main(cfg, search_paths=args.search_paths, mode=args.mode,
                        max_cells=args.max_cells, stop_on_error=args.stop_on_error,
                        select=args.select, cell_bindings=args.cell_binding,
                        count_parameters=count_parameters) or 0)


def _run_curves(args: argparse.Namespace) -> int:
  """`prompt-jax curves`: one run -> MODEL_DIR/curves.png (or --output); several -> --output."""
  curves = _import("curves", "prompt_jax.storage.curves")
  if len(args.model_dirs) == 1:
    path = curves.plot_run(args.model_dirs[0], args.output, overwrite=args.overwrite)
  elif not args.output:
    raise ValueError(f"comparing {len(args.model_dirs)} runs needs --output=PNG")
  else:
    path = curves.plot_runs(args.model_dirs, args.output, overwrite=args.overwrite)
  print(f"wrote {path}")
  return 0


def _run_export(args: argparse.Namespace) -> int:
  """`prompt-jax export-prompt`: the run's model (and gin MODEL_DIR) from its gin files."""
  from prompt_jax import gin_utils  # pylint: disable=g-import-not-at-top
  export = _import("export-prompt", "prompt_jax.serving.prompt_export")
  if args.output:  # refused before the gin files build a model (export.save_npy checks again)
    from prompt_jax.storage import output_paths  # pylint: disable=g-import-not-at-top
    output_paths.check_output_path(output_paths.npy_path(args.output), "--output",
                                   exists_hint=output_paths.EXISTING_NPY_HINT)
  model, gin_model_dir = gin_utils.model_from_gin(args.gin_file, args.gin_bindings,
                                                  args.search_paths)
  if args.t5x_checkpoint:
    if not args.output:
      raise ValueError("--t5x_checkpoint needs --output=FILE.npy")
    t5x_export = _import("export-prompt", "prompt_jax.t5x_compat.export_prompt")
    prompt = t5x_export.export_t5x_prompt(model, args.t5x_checkpoint)
    print(f"wrote {export.save_npy(prompt, args.output)} {prompt.shape}")
    return 0
  return int(export.main(model, args.model_dir or gin_model_dir, step=args.step,
                         output=args.output, peft_dir=args.peft_dir,
                         base_model_name_or_path=args.base_model_name_or_path,
                         initial_checkpoint_path=args.initial_checkpoint_path,
                         fmt=args.format, random_frozen_model=args.random_frozen_model) or 0)


def package_version() -> str:
  """The installed prompt-jax version, else pyproject.toml's (a source checkout)."""
  from importlib import metadata  # pylint: disable=g-import-not-at-top
  try:
    return metadata.version("prompt-jax")
  except metadata.PackageNotFoundError:
    pyproject = Path(__file__).resolve().parent.parent / "pyproject.toml"
    if pyproject.is_file():
      match = re.search(r'^version\s*=\s*"([^"]+)"', pyproject.read_text(), re.MULTILINE)
      if match:
        return match.group(1)
    return "unknown"


def _first_line(error: BaseException) -> str:
  text = str(error).strip() or type(error).__name__
  return text.splitlines()[0]


def _main(argv: list[str]) -> int:
  if not argv:
    print(top_parser().format_usage().rstrip() + "\n(prompt-jax --help lists the commands)",
          file=sys.stderr)
    return 2
  if argv[0] in ("-h", "--help"):
    top_parser().print_help()
    return 0
  if argv[0] == "--version":
    print(f"prompt-jax {package_version()}")
    return 0
  command, rest = argv[0], argv[1:]
  if command.startswith("-"):
    raise UsageError(f"expected a command before {command!r} (commands: "
                     f"{', '.join(COMMANDS)})")
  if command not in COMMANDS:
    raise UsageError(_unknown_command(command))
  prog = None
  if command == "infer" and not any(a.startswith(("--gin", "--model_dir")) for a in rest):
    if not rest:
      raise UsageError("prompt-jax infer needs --gin_file=... (single-task inference) or "
                       "--inputs, --output, --prompt and --checkpoint (multi-task serving); "
                       "see prompt-jax infer --help")
    if not any(a in ("-h", "--help") for a in rest):
      # `prompt-jax infer --inputs=x.jsonl --prompt=task=path ...` serves several tasks, each
      # with its own prompt, in mixed batches; with gin flags it is single-task inference.
      command, prog = "infer-multitask", "prompt-jax infer"
  args = parse(command, rest, prog)
  if command == "infer":
    given = [a.split("=", 1)[0] for a in rest if a.split("=", 1)[0] in (
        "--inputs", "--output", "--prompt", "--checkpoint", "--model", "--vocabulary",
        "--overwrite")]
    if given:
      raise UsageError(f"prompt-jax infer: {given[0]} is a multi-task serving flag, which takes "
                       "no gin flags; single-task inference sets gin macros such as "
                       "--gin.INPUTS_PATH=\"'in.jsonl'\" (see prompt-jax infer --help)")
  from_run_directory(command, args)
  if hasattr(args, "gin_file") and not args.gin_file:
    name = prog or f"prompt-jax {command}"
    raise ValueError(f"no --gin_file given (see {name} --help)")
  configure_host_devices(getattr(args, "host_devices", None), command)
  configure_output(args.verbosity)
  return _run(command, args)


def main(argv: Optional[Sequence[str]] = None) -> int:
  """`prompt-jax <command> [flags]`; the exit code."""
  argv = list(sys.argv[1:] if argv is None else argv)
  try:
    return _main(argv)
  except UsageError as e:
    print(f"error: {_first_line(e)}", file=sys.stderr)
    return 2
  except preemption.Preempted as e:  # saved; the same command continues
    print(_first_line(e), file=sys.stderr)
    return e.exit_code
  except USER_ERRORS as e:
    if os.environ.get("PROMPT_JAX_TRACEBACK"):
      raise
    print(f"error: {_first_line(e)}", file=sys.stderr)
    return 1
  except KeyboardInterrupt:
    if os.environ.get("PROMPT_JAX_TRACEBACK"):
      raise
    print("error: interrupted (a second signal stops without saving; rerun to continue from "
          "the last checkpoint)", file=sys.stderr)
    return 130


if __name__ == "__main__":
  sys.exit(main())
