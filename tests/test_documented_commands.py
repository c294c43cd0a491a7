"""Every shell command shown in README.md and docs/*.md is a test: run, checked, or skipped.

How commands and samples are found (the markdown conventions):
- A command block is a fenced block tagged bash, sh, shell or console, or an untagged one whose
  first line starts like a command (`prompt-jax`, `python`, `pip`, `$ `, `VAR=value cmd`, ...).
  A trailing `\\` continues a line, `&&` separates commands, `# ...` comments are dropped, and a
  line `$ cmd` starts a command whose following lines are its exact output.
- An HTML comment `<!-- output -->` (exact), `<!-- output: tail -->` (the output ends with these
  lines) or `<!-- output: abridged -->` (each line appears, in order; a line `...` is a gap and
  `...` inside a line matches anything) on the line before a fenced block makes that block the
  output of the last command above it, or with `, of: TEXT` (`<!-- output: tail, of: prompt-jax
  train -->`) of the last one above that starts with TEXT. Blank lines and progress bars are
  ignored; `normalise` lists what else may differ. Samples of skipped commands are not compared.
- `/tmp/NAME` is `<one tmp dir per doc>/NAME` (a train and an eval of one doc share it),
  `$(mktemp -d)` is `<that dir>/tmp.XXXX`, `../shared/fixtures` and `/work/shared/fixtures` are
  the fixtures; commands run with that tmp dir as their working directory, in doc order.
- Commands that cannot run here are in SKIPPED (pattern -> reason) and reported as skips; real-model
  recipes (RECIPES) are checked (flags, gin files and bindings, and the parameter count of the
  model file they name) and then skipped. A command that is neither runnable nor listed fails.
- Inline `prompt-jax ... --gin_file=...` spans in prose are checked the same way, not run.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import io
import os
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

import pytest

from tests.conftest import REPO_ROOT, SHARED_FIXTURES

SYNOPSIS = r"<\w+>|\[--|\{\w+,\w+"
DOCS = ["README.md", *sorted(str(p.relative_to(REPO_ROOT)) for p in (REPO_ROOT / "docs").glob(
    "*.md"))]
TINY_FROZEN = 246_784  # the demo model's frozen parameters (README)

# Commands that cannot run on this machine: (regex searched in the command) -> reason.
SKIPPED: list[tuple[str, str]] = [
    (r"hf://", "downloads a model from the Hugging Face Hub: no internet here"),
    (r"^pip install", "installs packages: the environment under test is already installed"),
    (r"^(python -m )?pytest\b", "runs test files of the suite, which runs them itself"),
    (r"^python -m t5x\.train|^--gin\.partitioning\.PjitPartitioner",
     "stock T5X: not on PyPI, cannot be installed here (docs/t5x.md)"),
    (r"prompt_jax\.t5x_compat\.write_checkpoint", "needs T5X, which cannot be installed here"),
    (r"--t5x_checkpoint=/tmp/t5x_demo/", "reads the checkpoint of the T5X run, which cannot run"),
    (r"--topology=", "needs libtpu, the TPU compiler (pip install -e \".[tpu]\"), not installed"),
    (r"--gpu_target_config=", "needs jax-cuda12-plugin (pip install -e \".[gpu-plan]\"), not "
     "installed"),
    (r"scripts/tpu/|^export ACCELERATOR=|^TPU_NAME=", "Cloud TPU: gcloud and a TPU VM"),
    (r"gs://", "Cloud Storage paths: no internet here"),
    (r"download_and_prepare|^export TFDS_DATA_DIR=", "real GLUE data: needs internet to prepare"),
    (r"^python benchmarks/", "a benchmark: minutes to hours, measures speed (some need torch)"),
    (SYNOPSIS, "a synopsis: <placeholders>, [optional] flags or {a,b} alternatives"),
    (r"/path/to/|/runs/sentiment/|/adapters/", "needs a real T5 checkpoint or trained prompts"),
    # Runnable, but too long for the suite even shortened:
    (r"^prompt-jax pretrain --gin_file=runs/pretrain_mini_(5m|20m)\.gin",
     "compiling the 5.5M/21M-parameter model alone takes 1-2 minutes here; the same command for "
     "mini_1m runs (shortened)"),
    (r"^prompt-jax sweep --gin_file=sweeps/mini\.gin", "24 cells on the three mini models (1.6 h "
     "of pretraining); the same sweep machinery runs with sweeps/tiny_demo.gin"),
]
# Real-model recipes: checked (flags, gin, parameter count of the model file), not run.
RECIPES = r"INITIAL_CHECKPOINT_PATH=\"'(/path/to/|/ckpt/|gs://)"

# Runnable commands without a sample output that are too long for the suite, shortened by extra
# flags appended to the command: (regex) -> (flags, reason). Shortened training runs also skip
# evaluation (each would compile its method's decoding for 400 examples it does not show).
TRAIN_SHORT = "--gin.TRAIN_STEPS=2 --gin.trainer.train.eval_dataset_cfg=None"
MULTITASK_SHORT = ("--gin.TRAIN_STEPS=2 "
                   "--gin.multitask_training.train_multitask.eval_dataset_cfg=None")
SHORTENED: list[tuple[str, str, str]] = [
    (r"^prompt-jax pretrain --gin_file=runs/pretrain_demo\.gin", "--gin.TRAIN_STEPS=2",
     "1,000 steps, about 100 s"),
    (r"^prompt-jax pretrain --gin_file=runs/pretrain_mini_", "--gin.TRAIN_STEPS=2 "
     "--gin.LM_ADAPTATION_STEPS=1", "4,000 steps, 21 minutes"),
    (r"^prompt-jax sweep --gin_file=sweeps/tiny_demo\.gin", "--max_cells=1 "
     "--cell_binding='TRAIN_STEPS = 2'", "4 cells of 25-39 s"),
    (r"^prompt-jax multitask --gin_file=runs/multitask_demo\.gin "
     r"--gin\.MODEL_DIR=\"'/tmp/multitask'\"$", MULTITASK_SHORT,
     "600 steps of 32 mixed examples"),
    (r"^prompt-jax multitask --gin_file=runs/multitask_demo\.gin --gin_file=prompts/",
     MULTITASK_SHORT, "600 steps of 32 mixed examples"),
    (r"^prompt-jax train --gin_file=runs/demo\.gin --gin_file=prompts/from_file\.gin",
     TRAIN_SHORT, "300 steps (the demo's)"),
    (r"^prompt-jax train --gin_file=runs/superpos_demo\.gin --gin_file=prompts/(residual|p_tuning)",
     TRAIN_SHORT, "300 steps (the demo's)"),
    (r"--gin_file=prompts/deep\.gin", TRAIN_SHORT, "300 steps"),
    (r"--gin_file=runs/length_buckets\.gin", TRAIN_SHORT, "300 steps (the demo's)"),
    (r"^prompt-jax train --gin_file=runs/demo\.gin --gin\.MODEL_DIR=\"'/tmp/demo'\"$",
     TRAIN_SHORT, "300 steps; docs/decoding.md only needs a prompt to decode with"),
]

SHELL_LANGS = {"bash", "sh", "shell", "console"}
COMMAND_START = re.compile(r"^(\$ |prompt-jax\b|python3?\b|pip\b|pytest\b|bash\b|sh\b|export\b|"
                           r"mkdir\b|echo\b|cat\b|cd\b|nice\b|[A-Z_]+=\S*\s)")
FENCE = re.compile(r"^(`{3,}|~{3,})\s*([\w+-]*)\s*$")
MARKER = re.compile(r"^<!--\s*output(?::\s*(exact|tail|abridged))?(?:\s*,\s*of:\s*(.+?))?\s*-->$")
PROGRESS_BAR = re.compile(r"^[\w /-]*:\s+\d+%\|")
RUNNABLE = re.compile(r"^(prompt-jax|mkdir|echo|cat|export)\b")


@dataclasses.dataclass
class Sample:
  mode: str  # exact | tail | abridged
  text: str
  line: int


@dataclasses.dataclass
class Command:
  doc: str
  line: int
  text: str  # one line: continuations joined, comments dropped
  sample: Optional[Sample] = None

  @property
  def id(self) -> str:
    return f"{self.doc}:{self.line}:{self.text[:60]}"


def _skip_reason(text: str) -> Optional[str]:
  for pattern, reason in SKIPPED:
    if re.search(pattern, text):
      return reason
  return None


def _strip_comment(line: str) -> str:
  """`line` without a trailing `# comment` outside quotes."""
  quote = None
  for i, char in enumerate(line):
    if quote:
      quote = None if char == quote else quote
    elif char in "'\"":
      quote = char
    elif char == "#" and (i == 0 or line[i - 1].isspace()):
      return line[:i].rstrip()
  return line.rstrip()


def _split_and(text: str) -> list[str]:
  """`a && b` -> ['a', 'b'] (outside quotes)."""
  parts, quote, start = [], None, 0
  for i, char in enumerate(text):
    if quote:
      quote = None if char == quote else quote
    elif char in "'\"":
      quote = char
    elif text.startswith("&&", i):
      parts.append(text[start:i])
      start = i + 2
  return [p.strip() for p in [*parts, text[start:]] if p.strip()]


def _shell_commands(body: list[str], first_line: int) -> list[tuple[int, str, Optional[str]]]:
  """(line, command, console output or None) of a command block."""
  commands, current, start, console = [], "", 0, None
  for offset, raw in enumerate(body):
    line_no = first_line + offset
    if console is not None and not raw.startswith("$ "):
      console.append(raw)
      continue
    line = raw
    if raw.startswith("$ "):
      if console is not None:
        commands[-1] = (*commands[-1][:2], "\n".join(console))
      console, line = [], raw[2:]
    stripped = _strip_comment(line)
    if not current and not stripped.strip():
      continue
    if not current:
      start = line_no
    if stripped.endswith("\\"):
      current += stripped[:-1].strip() + " "
      continue
    current += stripped.strip()
    for part in _split_and(current):
      commands.append((start, part, None))
    current = ""
  if console is not None and commands:
    commands[-1] = (*commands[-1][:2], "\n".join(console))
  return commands


def _fenced_blocks(text: str):
  """(first body line, language, body lines, (mode, of) of its output marker or None) per block."""
  lines = text.split("\n")
  i = 0
  while i < len(lines):
    match = FENCE.match(lines[i].strip())
    if not match:
      i += 1
      continue
    fence, lang = match.groups()
    end = i + 1
    while end < len(lines) and not lines[end].strip().startswith(fence):
      end += 1
    before = next((lines[j] for j in range(i - 1, -1, -1) if lines[j].strip()), "")
    marker = MARKER.match(before.strip())
    yield (i + 2, lang, lines[i + 1:end],
           (marker.group(1) or "exact", marker.group(2) or "") if marker else None)
    i = end + 1


def _is_command_block(lang: str, body: list[str]) -> bool:
  if lang in SHELL_LANGS:
    return True
  first = next((line.strip() for line in body if line.strip()), "")
  return not lang and bool(COMMAND_START.match(first))


@functools.cache
def doc_commands(doc: str) -> tuple[Command, ...]:
  """The commands of `doc`'s command blocks, each with the sample output marked after it."""
  commands: list[Command] = []
  for line, lang, body, marker in _fenced_blocks((REPO_ROOT / doc).read_text()):
    if marker:
      mode, of = marker
      above = [c for c in commands if c.text.startswith(of)]
      assert above, f"{doc}:{line}: an output block with no command above it starting {of!r}"
      assert above[-1].sample is None, f"{doc}:{line}: a second output for {above[-1].id}"
      above[-1].sample = Sample(mode, "\n".join(body), line)
    elif _is_command_block(lang, body):
      for start, text, console in _shell_commands(body, line):
        command = Command(doc, start, text)
        if console is not None:
          command.sample = Sample("exact", console, start + 1)
        commands.append(command)
  return tuple(commands)


def inline_commands(doc: str) -> list[Command]:
  """`prompt-jax ... --gin_file=...` spans in `doc`'s prose (outside fenced blocks)."""
  text = (REPO_ROOT / doc).read_text()
  prose = text.split("\n")
  for start, _, body, _ in _fenced_blocks(text):
    for i in range(start - 2, start + len(body)):
      prose[i] = ""
  joined = "\n".join(prose)
  found = []
  for match in re.finditer(r"`(prompt-jax [^`]*--gin_file=[^`]*)`", joined):
    line = joined.count("\n", 0, match.start()) + 1
    found.append(Command(doc, line, " ".join(match.group(1).split())))
  return found


ALL_COMMANDS = [c for doc in DOCS for c in doc_commands(doc)]
INLINE_COMMANDS = [c for doc in DOCS for c in inline_commands(doc)]


# ------------------------------------------------------------------------------ checking


def _argv(text: str) -> list[str]:
  """`prompt-jax`'s arguments in a command line (after any VAR=value prefixes)."""
  words = shlex.split(text)
  while words and re.match(r"^[A-Z_]+=", words[0]):  # VAR=value prefixes
    words = words[1:]
  assert words and words[0] == "prompt-jax", text
  return words[1:]


def static_check(text: str):
  """The CLI's own checks of a `prompt-jax` command, without running it: its flags (argparse)
  and its gin files and bindings (gin_utils: files, syntax, unused or unset macros, types, a
  config for another command). -> (command, parsed args)."""
  from prompt_jax import cli, gin_utils  # pylint: disable=g-import-not-at-top
  argv = _argv(text)
  command, rest = argv[0], argv[1:]
  assert command in cli.COMMANDS, f"unknown command {command!r}: {text}"
  if command == "infer" and not any(a.startswith("--gin") for a in rest):
    command = "infer-multitask"
  err = io.StringIO()
  try:
    with contextlib.redirect_stderr(err):
      args = cli.parse(command, rest)
  except SystemExit:
    pytest.fail(f"prompt-jax {command} rejects the flags: {err.getvalue().strip()}\n{text}")
  try:
    if command in cli.GIN_COMMANDS:
      spec = cli.GIN_COMMANDS[command]
      config = gin_utils.read_config(args.gin_file, args.gin_bindings, args.search_paths)
      gin_utils.check_command(config, command, elsewhere=dict(spec.elsewhere),
                              required=spec.required)
      gin_utils.check_config(config, roots=[spec.root], not_empty=spec.not_empty)
    elif command == "plan":
      gin_utils.check(args.gin_file, args.gin_bindings, args.search_paths,
                      roots=["trainer.train"], optional=["MODEL_DIR", "MIXTURE_OR_TASK_NAME"],
                      extra_bindings=["NUM_PARTITIONS = 1"])
    elif command == "sweep":
      gin_utils.check(args.gin_file, args.gin_bindings, args.search_paths,
                      roots=["sweep.SweepConfig"])
    elif command == "export-prompt":
      gin_utils.check(args.gin_file, args.gin_bindings, args.search_paths, roots=["%MODEL"],
                      optional=["MODEL_DIR"])
  except ValueError as e:
    pytest.fail(f"gin check: {e}\n{text}")
  return command, args


@functools.cache
def _frozen_count(gin_files: tuple[str, ...], bindings: tuple[str, ...] = ()) -> int:
  """Frozen parameters of the model the gin files and bindings build, from shapes only."""
  import gin  # pylint: disable=g-import-not-at-top

  from prompt_jax import gin_utils  # pylint: disable=g-import-not-at-top
  from prompt_jax import params as params_lib  # pylint: disable=g-import-not-at-top
  gin.clear_config()
  try:
    config = gin_utils.read_config(gin_files, bindings)
    init = config.final("PROMPT_INIT")[0]
    if re.search(r"class_labels|from_string|from_array", str(init)):
      # These read a vocabulary or a file to build the prompt; the frozen model is the same.
      gin.parse_config(["from __gin__ import dynamic_registration",
                        "from prompt_jax.prompts import initializers",
                        "initializers.uniform.minval = -0.5"])
      bindings = (*bindings, "PROMPT_INIT = @initializers.uniform()")
    model, _ = gin_utils.model_from_gin(gin_files, bindings)
    shapes = model.init_abstract(model.dummy_batch(1, 8, 4))
    _, frozen = params_lib.split_params(params_lib.unbox(shapes))
    return params_lib.count(frozen)
  finally:
    gin.clear_config()


def check_recipe(text: str) -> None:
  """A real-model recipe builds the model of the models/*.gin file it names."""
  command, args = static_check(text)
  models = [f for f in args.gin_file if f.startswith("models/")]
  if command not in ("train", "spt", "multitask", "eval", "infer", "plan") or not models:
    return
  assert "models/t5_1_1_tiny.gin" not in models, text
  expected = _frozen_count((models[-1], "prompts/uniform.gin"))
  built = _frozen_count(tuple(args.gin_file), tuple(args.gin_bindings))
  assert built == expected > 100 * TINY_FROZEN, (
      f"{text}\nbuilds a model of {built:,} frozen parameters; {models[-1]} has {expected:,}")


# ------------------------------------------------------------------------------ running


@dataclasses.dataclass
class DocState:
  """One doc's tmp dir (its commands' /tmp and working directory), environment and failures."""
  root: Path
  env: dict
  failed: list


@pytest.fixture(scope="module")
def doc_states(tmp_path_factory):
  states: dict[str, DocState] = {}

  def get(doc: str) -> DocState:
    if doc not in states:
      root = tmp_path_factory.mktemp(Path(doc).stem)
      env = dict(os.environ)
      env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
      states[doc] = DocState(root, env, [])
    return states[doc]

  return get


def map_paths(text: str, root: Path) -> str:
  """The doc's paths -> this run's: /tmp/NAME, $(mktemp -d), the shared fixtures, and the
  checkout's examples/ (commands run in the tmp dir, docs name the files from the checkout)."""
  text = re.sub(r"(?<![\w.~/-])/tmp/", f"{root}/", text)  # before root (under /tmp) appears
  text = re.sub(r"(?<![\w.~/-])examples/", f"{REPO_ROOT}/examples/", text)
  text = text.replace("$(mktemp -d)", f"{root}/tmp.XXXX")
  # One pass: a second replace would match "/work/shared/fixtures" inside the first's result
  # when the checkout lives under a directory named work (CI's /check/work/...).
  return re.sub(r"(?<![\w.~/-])(\.\./shared/fixtures|/work/shared/fixtures)",
                lambda _: str(SHARED_FIXTURES), text)


# What legitimately differs between runs, replaced in the output and in the sample alike.
VOLATILE = [
    (re.compile(r"\b\d+(\.\d+)? ?(s|ms|steps?/s)\b"), "<time>"),  # wall-clock figures
    # The data axis is the machine's host device count (`prompt-jax --host_devices`: one per
    # core by default), so a doc written on 2 cores shows 2 and an 8-core machine prints 8.
    (re.compile(r"mesh \{'data': \d+,"), "mesh {'data': <host devices>,"),
]


def normalise(text: str, root: Optional[Path] = None) -> list[str]:
  """Lines of `text`: this run's tmp dir shown as /tmp, no progress bars or blank lines, the
  VOLATILE values replaced."""
  if root is not None:
    text = text.replace(str(root), "/tmp").replace(str(SHARED_FIXTURES), "../shared/fixtures")
  lines = []
  for line in re.split(r"[\r\n]", text):
    line = line.rstrip()
    if not line.strip() or PROGRESS_BAR.match(line.strip()):
      continue
    for pattern, replacement in VOLATILE:
      line = pattern.sub(replacement, line)
    lines.append(line)
  return lines


def _line_pattern(line: str) -> re.Pattern:
  return re.compile(".*?".join(re.escape(part) for part in line.split("...")))


def compare(sample: Sample, output: list[str]) -> Optional[str]:
  """Why `output` (normalised) does not show `sample`, or None."""
  expected = normalise(sample.text)
  if sample.mode == "exact" and output != expected:
    return "the output is not the sample"
  if sample.mode == "tail" and output[-len(expected):] != expected:
    return "the output does not end with the sample"
  if sample.mode == "abridged":
    position = 0
    for line in expected:
      if line.strip() == "...":
        continue
      pattern = _line_pattern(line)
      while position < len(output) and not pattern.fullmatch(output[position]):
        position += 1
      if position == len(output):
        return f"no line {line!r} (after the lines matched before it)"
      position += 1
  return None


def _shortening(text: str) -> Optional[tuple[str, str, str]]:
  for entry in SHORTENED:
    if re.search(entry[0], text):
      return entry
  return None


def run_command(command: Command, state: DocState) -> None:
  text = map_paths(command.text, state.root)
  if "tmp.XXXX" in text:
    (state.root / "tmp.XXXX").mkdir(exist_ok=True)
  shortened = _shortening(command.text)
  if shortened:
    assert command.sample is None, f"{command.id} shows an output: it cannot be shortened"
    text += " " + map_paths(shortened[1], state.root)
  if command.text.startswith("export "):
    for assignment in shlex.split(text)[1:]:
      name, _, value = assignment.partition("=")
      if value.startswith("/"):
        assert Path(value).exists(), f"{command.id}: {value} does not exist"
      state.env[name] = value
    return
  start = time.monotonic()
  proc = subprocess.run(["bash", "-c", text], cwd=state.root, env=state.env, timeout=1800,
                        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  seconds = time.monotonic() - start
  earlier = f" (failed earlier in this doc: {state.failed})" if state.failed else ""
  if proc.returncode != 0:
    state.failed.append(command.line)
    pytest.fail(f"exit {proc.returncode} after {seconds:.0f} s{earlier}: {text}\n"
                f"{proc.stdout[-4000:]}")
  if command.sample is not None:
    output = normalise(proc.stdout, state.root)
    problem = compare(command.sample, output)
    if problem:
      pytest.fail(f"{problem}: {command.doc}:{command.sample.line} ({command.sample.mode}) vs "
                  f"the output of {text}\n--- sample\n" +
                  "\n".join(normalise(command.sample.text)) + "\n--- output\n" +
                  "\n".join(output))


# A doc's commands build on each other (a run directory an earlier command made): under
# pytest-xdist they run in order on one worker (tests/conftest.py's scheduler).
@pytest.mark.parametrize("command", ALL_COMMANDS, ids=lambda c: c.id)
def test_documented_command(command, doc_states):
  """Runs the command (comparing its sample output), or checks and skips it with the reason."""
  reason = _skip_reason(command.text)
  if re.match(r"^([A-Z_]+=\S*\s+)*prompt-jax ", command.text) and \
      not re.search(SYNOPSIS, command.text):
    if re.search(RECIPES, command.text):
      check_recipe(command.text)
      pytest.skip(f"checked, not run (a real T5 checkpoint): {command.id}")
    elif reason:
      static_check(command.text)
  if reason:
    unchecked = f" (its output, line {command.sample.line}, is not compared)" \
        if command.sample else ""
    pytest.skip(f"{reason}: {command.id}{unchecked}")
  same = [c.line for c in doc_commands(command.doc) if c.text == command.text]
  if same[0] != command.line:
    pytest.skip(f"the same command as {command.doc}:{same[0]}, which runs: {command.id}")
  if re.search(r"\.\./shared/fixtures|/work/shared/fixtures", command.text) and \
      not SHARED_FIXTURES.exists():
    pytest.skip(f"needs {SHARED_FIXTURES} (../shared beside the repository): {command.id}")
  assert RUNNABLE.match(command.text), (
      f"{command.id}: neither runnable here nor listed in SKIPPED with a reason")
  run_command(command, doc_states(command.doc))


@pytest.mark.parametrize("command", INLINE_COMMANDS, ids=lambda c: c.id)
def test_inline_command_parses(command):
  """A `prompt-jax ... --gin_file=...` span in prose names flags and gin that the CLI accepts."""
  reason = _skip_reason(command.text)
  if reason:
    pytest.skip(f"{reason}: {command.id}")
  if re.search(RECIPES, command.text):
    check_recipe(command.text)
  else:
    static_check(command.text)


def test_every_table_entry_is_used():
  """No stale entry: each SKIPPED and SHORTENED pattern matches a documented command."""
  texts = [c.text for c in [*ALL_COMMANDS, *INLINE_COMMANDS]]
  for pattern, *_ in [*SKIPPED, *SHORTENED]:
    assert any(re.search(pattern, t) for t in texts), f"no documented command matches {pattern!r}"


def test_no_sample_belongs_to_a_command_that_cannot_run():
  """A sample marked after a real-model recipe is a marker pointing at the wrong command."""
  for command in ALL_COMMANDS:
    if command.sample is not None:
      assert not re.search(RECIPES, command.text), (
          f"{command.doc}:{command.sample.line}: the output marked there belongs to {command.id}, "
          "which cannot run; name the command with `, of: ...` in the marker")


def test_commands_name_gin_files_from_the_shipped_configs():
  """`--gin_file=runs/demo.gin`, not `gin_configs/runs/demo.gin` (found from any directory)."""
  for command in [*ALL_COMMANDS, *INLINE_COMMANDS]:
    if command.text.startswith("prompt-jax"):
      assert "--gin_file=gin_configs/" not in command.text, command.id
      assert "--gin_search_paths=gin_configs" not in command.text, command.id


def test_the_parser_finds_commands_samples_and_markers():
  """The conventions above, on a made-up doc (the parser must see what the docs show)."""
  doc = ("x\n```bash\nprompt-jax train --a \\\n  --b  # c\npip install x && prompt-jax eval\n```\n"
         "<!-- output: abridged -->\n```\nline ... 1\n```\n```\n$ prompt-jax plan\nout\n```\n")
  blocks = list(_fenced_blocks(doc))
  assert [b[3] for b in blocks] == [None, ("abridged", ""), None]
  assert _shell_commands(blocks[0][2], blocks[0][0]) == [
      (3, "prompt-jax train --a --b", None), (5, "pip install x", None),
      (5, "prompt-jax eval", None)]
  assert _shell_commands(blocks[2][2], blocks[2][0]) == [(12, "prompt-jax plan", "out")]
  assert MARKER.match("<!-- output: tail, of: prompt-jax train -->").groups() == (
      "tail", "prompt-jax train")
  assert compare(Sample("abridged", "a ...\n...\nc", 1), ["a b", "x", "c"]) is None
  assert compare(Sample("abridged", "c\na", 1), ["a", "c"]) is not None
  assert compare(Sample("tail", "b\nc", 1), ["a", "b", "c"]) is None
  assert compare(Sample("exact", "b\nc", 1), ["a", "b", "c"]) is not None
  assert map_paths("--gin.MODEL_DIR=\"'/tmp/x'\" $(mktemp -d)/d", Path("/tmp/r")) == (
      "--gin.MODEL_DIR=\"'/tmp/r/x'\" /tmp/r/tmp.XXXX/d")
  assert normalise("train:  5%|#  | 1/2\nrun directory /r/x in 3.5 s\n", Path("/r")) == [
      "run directory /tmp/x in <time>"]
  assert _skip_reason("gcloud compute tpus list") is None
  assert not RUNNABLE.match("gcloud compute tpus list")  # an unlisted command fails


def test_fixture_paths_are_mapped_once_wherever_the_checkout_lives(monkeypatch):
  """CI checks out under /check/work: ../shared/fixtures becomes a path that itself contains
  /work/shared/fixtures, which must not be mapped a second time."""
  monkeypatch.setattr(sys.modules[__name__], "SHARED_FIXTURES",
                      Path("/check/work/shared/fixtures"))
  assert map_paths("a ../shared/fixtures/p.npy /work/shared/fixtures/q", Path("/tmp/r")) == (
      "a /check/work/shared/fixtures/p.npy /check/work/shared/fixtures/q")


def test_a_recipe_whose_run_file_replaces_the_model_fails():
  """The recipe check is not vacuous: runs/demo.gin includes the tiny model, which wins."""
  with pytest.raises(AssertionError, match="builds a model of 246,784 frozen parameters"):
    check_recipe("prompt-jax train --gin_file=models/t5_1_1_base.gin --gin_file=runs/demo.gin "
                 "--gin.MODEL_DIR=\"'/tmp/x'\" --gin.INITIAL_CHECKPOINT_PATH=\"'/path/to/c'\"")
