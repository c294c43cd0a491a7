"""`prompt-jax <command>`: every command's flags and the start-up; the work is in the library.

Each command's argparse parser is built here, from the standard library only, so `--help` is
instant; the library's entry points take the parsed values. Gin commands take T5X's flags:
`--gin_file` (repeatable), `--gin_bindings` (repeatable), `--gin.NAME=VALUE` (shorthand for a
binding) and `--gin_search_paths` (comma-separated); `prompt_jax.gin_utils` checks them before
anything heavy is imported. Errors print one line, `error: ...`; set PROMPT_JAX_TRACEBACK=1 for
the full traceback. TensorFlow's and gin's start-up messages show with --verbosity=info or debug.
"""

from __future__ import annotations

import argparse
import contextlib
import difflib
import importlib
import importlib.abc
import importlib.machinery
import logging
import os
import re
import sys
import tempfile
from pathlib import Path
from typing import Callable, Optional, Sequence

from prompt_jax import preemption

# Gin commands: command -> (module, gin-configured function).
GIN_COMMANDS: dict[str, tuple[str, str]] = {
    "train": ("prompt_jax.trainer", "train"),
    "pretrain": ("prompt_jax.pretrain", "pretrain"),
    "eval": ("prompt_jax.evaluation", "run_evaluation"),
    "infer": ("prompt_jax.inference", "infer"),
}
# Every command and its line in `prompt-jax --help`.
COMMANDS: dict[str, str] = {
    "train": "prompt-tune a frozen T5 (gin configures trainer.train)",
    "pretrain": "train a small T5 from scratch to serve as a frozen model (gin)",
    "eval": "score a trained prompt on a task's eval split (gin)",
    "infer": "predictions as JSONL: one task (gin) or several tasks in mixed batches",
    "sweep": "a scale-ablation grid of training runs, its results table and plots (gin)",
    "plan": "per-device memory and FLOPs of a train step on a mesh, without weights (gin)",
    "convert": "frozen checkpoints to Orbax; prompts between .npy, PEFT and T5X",
    "export-prompt": "fold a trained prompt of any method into .npy and PEFT files (gin)",
    "infer-multitask": "multi-task serving (the same as `prompt-jax infer --inputs=...`)",
}
USER_ERRORS = (ValueError, FileNotFoundError, KeyError, RuntimeError)
VERBOSITIES = ("debug", "info", "warning", "error")
# The same as prompt_jax.interop.convert.PROMPT_FORMATS, prompt_jax.plan.CHIPS and
# prompt_jax.prompts.base placements (tests/test_cli_errors.py checks), without importing them.
PROMPT_FORMATS = ("npy", "peft", "t5x")
CHIPS = ("a100", "h100", "v4", "v5e", "v5p")
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
optimizer). MODEL_DIR receives the checkpoints, prompts/prompt_<step>.npy exports, TensorBoard
events and summary.json; a run resumes from MODEL_DIR's latest checkpoint. A gin file may replace
trainer.train with TRAIN_FN = @... (e.g. runs/spt.gin).""",
    "pretrain": """\
Train a small T5 from scratch (every parameter) to serve as a frozen model; the gin files
configure pretrain.pretrain (runs/pretrain_*.gin) and OUTPUT_PATH receives the .npz.""",
    "eval": """\
Score a trained prompt on a task's eval split; the gin files (the model and prompt files the
prompt was trained with, then runs/eval.gin) configure evaluation.run_evaluation. The prompt is
MODEL_DIR's latest checkpoint (or STEP), or PROMPT_PATH (a .npy export).""",
    "infer": """\
Greedy predictions of trained prompts, written as JSONL. Two forms:

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
score_vs_initializer.png. Finished cells are skipped, so an interrupted sweep resumes.""",
    "plan": """\
What one train step costs per device, without allocating a weight: the training gin config is
compiled ahead of time on a (data, model) mesh of DATA x MODEL devices (fake CPU devices when
the machine has fewer); printed are the per-device bytes of the compiled step, the parameter
counts and the FLOPs per step (XLA's and the analytic count).""",
    "convert": """\
Frozen weights into our Orbax format, and prompts between formats: `npy` (a [length, embed]
.npy file), `peft` (a PEFT PROMPT_TUNING adapter directory) and `t5x` (a T5X checkpoint).
Outputs are never overwritten.""",
    "export-prompt": """\
Fold a trained prompt of any method into a plain [length, embed] array and write it as .npy and
in the PEFT prompt-tuning format; it serves with a plain prompt (prompts/from_file.gin) at zero
overhead. The gin files are the run's model and prompt files (they say which method made the
prompt); the frozen checkpoint comes from the run's metadata unless --initial_checkpoint_path
is given.""",
    "infer-multitask": """\
Multi-task serving: one frozen model (--checkpoint), a prompt per task (--prompt=TASK=PATH,
repeatable), and {"task": ..., "inputs": ...} lines from --inputs answered in mixed batches
(prompts of one length share a prompt bank) into --output, which adds "prediction".""",
}

EXAMPLES = {
    "train": """\
  prompt-jax train --gin_file=runs/demo.gin --gin.MODEL_DIR="'/tmp/demo'"
  prompt-jax train --gin_file=models/t5_1_1_lm_adapted_base.gin \\
    --gin_file=prompts/class_labels.gin --gin_file=runs/prompt_finetune.gin \\
    --gin.MODEL_DIR="'/tmp/run'" --gin.MIXTURE_OR_TASK_NAME="'taskless_glue_sst2_v002'" \\
    --gin.INITIAL_CHECKPOINT_PATH="'/path/to/frozen/checkpoint'" --gin.TRAIN_STEPS=1000""",
    "pretrain": """\
  prompt-jax pretrain --gin_file=runs/pretrain_demo.gin --gin.OUTPUT_PATH="'/tmp/tiny.npz'\"""",
    "eval": """\
  prompt-jax eval --gin_file=runs/demo.gin --gin_file=runs/eval.gin \\
    --gin.MODEL_DIR="'/tmp/demo'" --gin.MIXTURE_OR_TASK_NAME="'demo_sentiment'" \\
    --gin.INITIAL_CHECKPOINT_PATH="'builtin:demo_t5_tiny.npz'\"""",
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
  prompt-jax plan --gin_file=runs/demo.gin --mesh=4x2 --platform=tpu
  prompt-jax plan --gin_file=runs/scale_xxl.gin --mesh=2x4 --platform=tpu --chip=v5e \\
    --json=/tmp/plan.json""",
    "convert": """\
  prompt-jax convert hf-to-orbax HF_DIR OUT_DIR
  prompt-jax convert t5x-to-orbax T5X_CHECKPOINT OUT_DIR --config t5_1_1_base [--set emb_dim=4]
  prompt-jax convert prompt SRC DST [--to npy|peft|t5x] [--base_model_name_or_path NAME]""",
    "export-prompt": """\
  prompt-jax export-prompt --gin_file=models/t5_1_1_tiny.gin --gin_file=prompts/superpos.gin \\
    --model_dir=/tmp/run [--step=300] [--output=prompt.npy] [--peft_dir=peft/] \\
    [--base_model_name_or_path=google/t5-base-lm-adapt] [--format=both|npy|peft]""",
    "infer-multitask": """\
  prompt-jax infer-multitask --inputs=requests.jsonl --output=answers.jsonl \\
    --prompt=sentiment=a.npy --prompt=nli=peft_dir --checkpoint=builtin:demo_t5_tiny.npz""",
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
  parser.add_argument("--verbosity", default="warning", choices=VERBOSITIES, metavar="LEVEL",
                      help="log level: debug, info, warning (default) or error; info and debug "
                           "also show TensorFlow's and gin's start-up messages")


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
                          "FILE.npy#ROW of a prompt bank, a PEFT adapter directory or a run "
                          "directory (its latest prompts/prompt_<step>.npy)")
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
  if command in ("train", "pretrain", "eval"):
    parser = _new(command, prog, GIN_USAGE)
    _add_gin_flags(parser)
  elif command == "infer":
    parser = _new(command, prog, GIN_USAGE + "\n   or: " + MULTITASK_USAGE)
    _add_gin_flags(parser, "single task: gin configuration")
    _add_multitask_flags(parser, required=False, title="multi-task serving (no gin flags)")
  elif command == "infer-multitask":
    parser = _new(command, prog, MULTITASK_USAGE)
    _add_multitask_flags(parser)
  elif command == "sweep":
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
  elif command == "plan":
    parser = _new(command, prog, GIN_USAGE.replace(
        "[--verbosity=LEVEL]", "--mesh=DATAxMODEL\n       [--platform=cpu|gpu|tpu] "
        "[--chip=CHIP] [--json=FILE] [--verbosity=LEVEL]"))
    _add_gin_flags(parser, "gin configuration (the training config)")
    parser.add_argument("--mesh", required=True, metavar="DATAxMODEL",
                        help="the (data, model) mesh, e.g. 4x2 (required)")
    parser.add_argument("--platform", default="cpu", choices=("cpu", "gpu", "tpu"),
                        help="the platform planned for (default cpu)")
    parser.add_argument("--chip", default=None, choices=CHIPS,
                        help="accelerator whose memory and peak FLOP/s the plan is compared "
                             "with (default: v5e for tpu, h100 for gpu)")
    parser.add_argument("--json", default=None, metavar="FILE",
                        help="also write the numbers to this JSON file")
  elif command == "export-prompt":
    parser = _new(command, prog, GIN_USAGE.replace(
        "[--verbosity=LEVEL]", "[--model_dir=DIR] [--step=N]\n       [--output=FILE.npy] "
        "[--peft_dir=DIR] [--format=both|npy|peft] ..."))
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
    parser.add_argument("--format", choices=("both", "npy", "peft"), default="both",
                        help="what to write (default both)")
  else:  # convert; its sub-commands take --verbosity
    parser = _new(command, prog, "{prog} {{hf-to-orbax,t5x-to-orbax,prompt}} ...")
    _add_convert_commands(parser)
    return parser
  _add_verbosity(parser)
  return parser


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
  p.add_argument("src", help=".npy file, PEFT adapter directory or T5X checkpoint")
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

# TensorFlow's C++ start-up lines (absl logs everything before InitializeLog, ignoring
# TF_CPP_MIN_LOG_LEVEL): the InitializeLog warning and INFO lines such as oneDNN and CUDA's.
_TF_NOISE = re.compile(r"WARNING: All log messages before absl::InitializeLog\(\) is called"
                       r"|I\d{4} \d\d:\d\d:\d+\.\d+ +\d+ \S+:\d+\] ")


class _QuietTensorFlowImport(importlib.abc.MetaPathFinder):
  """Drops TensorFlow's C++ start-up INFO lines from stderr while `tensorflow` is imported
  (whoever imports it); its other output, warnings and errors included, is kept."""

  def find_spec(self, fullname, path=None, target=None):
    if fullname != "tensorflow":
      return None
    if self in sys.meta_path:
      sys.meta_path.remove(self)
    spec = importlib.machinery.PathFinder.find_spec(fullname, path)
    if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
      return spec
    exec_module = spec.loader.exec_module

    def quiet_exec_module(module):
      with _filtered_stderr():
        exec_module(module)

    spec.loader.exec_module = quiet_exec_module
    return spec


@contextlib.contextmanager
def _filtered_stderr():
  """File descriptor 2 into a temporary file; afterwards its lines, minus `_TF_NOISE`, go on."""
  sys.stderr.flush()
  saved = os.dup(2)
  with tempfile.TemporaryFile() as captured:
    os.dup2(captured.fileno(), 2)
    try:
      yield
    finally:
      sys.stderr.flush()
      os.dup2(saved, 2)
      os.close(saved)
      captured.seek(0)
      lines = captured.read().decode("utf-8", "replace").splitlines(keepends=True)
      kept = "".join(line for line in lines if not _TF_NOISE.match(line))
      if kept:
        os.write(2, kept.encode())


def configure_output(verbosity: str = "warning") -> None:
  """Logging at `verbosity`; below info, no TensorFlow start-up lines, absl warnings or gin
  search-path misses."""
  level = getattr(logging, verbosity.upper())
  quiet = level > logging.INFO
  if "tensorflow" not in sys.modules:
    os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3" if quiet else "0"
    if quiet and not any(isinstance(f, _QuietTensorFlowImport) for f in sys.meta_path):
      sys.meta_path.insert(0, _QuietTensorFlowImport())
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
  from prompt_jax import distributed  # pylint: disable=g-import-not-at-top
  distributed.maybe_initialize()  # multi-host runs: before anything touches the devices


def run_gin_command(function: Callable, argv: Sequence[str]):
  """The gin-configured `function` as a gin command with T5X flags `argv`; its result."""
  from prompt_jax import gin_utils  # pylint: disable=g-import-not-at-top
  args = parse("train", argv, prog=f"prompt-jax {function.__name__}")
  configure_output(args.verbosity)
  result = gin_utils.run_configured(function, args.gin_file, args.gin_bindings,
                                    args.search_paths)
  if isinstance(result, dict):
    gin_utils.print_summary(result)
  return result


def _run_gin(command: str, args: argparse.Namespace) -> int:
  from prompt_jax import gin_utils  # pylint: disable=g-import-not-at-top
  module_name, function_name = GIN_COMMANDS[command]
  gin_utils.check(args.gin_file, args.gin_bindings, args.search_paths,
                  **gin_utils.command_checks(module_name, function_name))
  _initialize_distributed()
  function = getattr(_import(command, module_name), function_name)
  result = gin_utils.run_configured(function, args.gin_file, args.gin_bindings,
                                    args.search_paths)
  if isinstance(result, dict):
    gin_utils.print_summary(result)
  return 0


def _run(command: str, args: argparse.Namespace) -> int:
  if command in GIN_COMMANDS:
    return _run_gin(command, args)
  if command == "infer-multitask":
    if "://" not in args.inputs and not os.path.isfile(args.inputs):
      raise FileNotFoundError(f"--inputs {args.inputs!r} does not exist")
    _initialize_distributed()
    multitask = _import(command, "prompt_jax.multitask")
    return int(multitask.main(
        inputs=args.inputs, output=args.output, prompts=args.prompt, checkpoint=args.checkpoint,
        model=args.model, vocabulary=args.vocabulary, input_length=args.input_length,
        max_decode_length=args.max_decode_length, batch_size=args.batch_size,
        placement=args.placement) or 0)
  _initialize_distributed()
  if command == "plan":
    plan = _import(command, "prompt_jax.plan")
    return int(plan.main(gin_files=args.gin_file, gin_bindings=args.gin_bindings,
                         search_paths=args.search_paths, mesh=args.mesh,
                         platform=args.platform, chip=args.chip, json_path=args.json) or 0)
  if command == "sweep":
    sweep = _import(command, "prompt_jax.sweep")
    return int(sweep.main(gin_files=args.gin_file, gin_bindings=args.gin_bindings,
                          search_paths=args.search_paths, mode=args.mode,
                          sweep_dir=args.sweep_dir, max_cells=args.max_cells,
                          stop_on_error=args.stop_on_error, select=args.select,
                          cell_bindings=args.cell_binding) or 0)
  if command == "export-prompt":
    export = _import(command, "prompt_jax.export")
    return int(export.main(gin_files=args.gin_file, gin_bindings=args.gin_bindings,
                           search_paths=args.search_paths, model_dir=args.model_dir,
                           step=args.step, output=args.output, peft_dir=args.peft_dir,
                           base_model_name_or_path=args.base_model_name_or_path,
                           initial_checkpoint_path=args.initial_checkpoint_path,
                           fmt=args.format) or 0)
  convert = _import(command, "prompt_jax.interop.convert")
  return int(convert.main(args) or 0)


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
  if command == "infer" and not any(a.startswith("--gin") for a in rest):
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
        "--inputs", "--output", "--prompt", "--checkpoint", "--model", "--vocabulary")]
    if given:
      raise UsageError(f"prompt-jax infer: {given[0]} is a multi-task serving flag, which takes "
                       "no gin flags; single-task inference sets gin macros such as "
                       "--gin.INPUTS_PATH=\"'in.jsonl'\" (see prompt-jax infer --help)")
  if hasattr(args, "gin_file") and not args.gin_file:
    name = prog or f"prompt-jax {command}"
    raise ValueError(f"no --gin_file given (see {name} --help)")
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
