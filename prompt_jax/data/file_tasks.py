"""seqio Tasks over the user's own files (JSONL, CSV, TSV) or in-memory rows, no Python needed.

A task name that starts with `file:` is a spec: `pipeline.get_task_or_mixture` registers the
task it describes (once per process) and returns it, so anywhere a task name goes:

    --gin.MIXTURE_OR_TASK_NAME="'file:train=data/train.jsonl,validation=data/dev.jsonl'"

Spec keys (`key=value`, joined by commas; `train`, `validation` or `test` at least once):
  train=, validation=, test=  a file per split. The format is the extension: `.jsonl` (one JSON
      object per line), `.csv` / `.tsv` (a header row with the field names, then one row per
      example; Python's csv module, so quote values holding the delimiter). Parquet is not read
      (it would need pyarrow): convert it to JSONL. Relative paths are resolved against the
      working directory when the task is registered.
  input=      the input text: a field name, or a template over fields such as
      `premise: {premise} hypothesis: {hypothesis}` (`{{`/`}}` for literal braces; a template
      may contain commas). Default `inputs`.
  target=     the target field. Default `targets`.
  metrics=    names joined by `+` (`METRICS`): accuracy (default), macro_f1, exact_match, bleu,
      rouge.
  labels=     the label strings joined by `|` (`labels=negative|positive`); every target of
      every file must be one of them.
  scoring=    `generate` (default: decode, then score the text) or `rank` (needs labels=): the
      evaluation splits score every label and the likelier one is the prediction (rank
      classification); training rows stay plain (input, target) pairs.
  vocabulary= `byte`, `t5` (default: `glue.default_vocabulary()`, T5's SentencePiece model
      unless PROMPT_JAX_VOCABULARY names another), a SentencePiece `.model` file, or a directory
      holding `spiece.model` (a Hugging Face model directory or Hub snapshot).

The spec is split on the commas that are followed by `<known key>=`, so only a key may follow a
comma that ends a value. Several specs joined by `;` are a mixture of their tasks, each sampled
in proportion to its number of training rows: `file:train=a.jsonl;file:train=b.csv,input=text`.

Every file is read and checked when the task is registered: a missing or empty file, a line
that is not a JSON object, a CSV whose header looks tab-separated, a row without the input's or
target's field, an empty target or one outside labels= stop registration with a one-line
ValueError naming the file, the line and the field. No row is skipped silently (blank lines
are no rows). The rows are then served from memory.

From Python, `register_file_task` (files) and `register_examples_task` ((input, target) pairs
or dicts) take the same options as keywords and an optional task name, and return the name, so
that file tasks can join `seqio.MixtureRegistry.add(...)` mixtures like any task
(`register_mixture` makes the proportional one).
"""

from __future__ import annotations

import csv
import dataclasses
import functools
import hashlib
import io
import json
import os
import re
import string
from typing import Any, Callable, Mapping, Optional, Sequence, Union

import seqio
import tensorflow as tf

from prompt_jax.data import glue, metrics

PREFIX = "file:"
SPLITS = ("train", "validation", "test")
KEYS = (*SPLITS, "input", "target", "metrics", "labels", "scoring", "vocabulary")
FORMATS = {".jsonl": None, ".csv": ",", ".tsv": "\t"}  # extension -> csv delimiter
METRICS: dict[str, metrics.Metric] = {
    "accuracy": metrics.accuracy,
    "macro_f1": metrics.macro_f1,
    "exact_match": metrics.exact_match,
    "bleu": metrics.bleu,
    "rouge": metrics.rouge,
}
SCORINGS = ("generate", "rank")
SPIECE_MODEL = "spiece.model"  # a Hugging Face T5 directory's SentencePiece model

# One spec from the next: a ';' before 'file:'. One key=value from the next: a ',' before a key.
_SPEC_SEPARATOR = re.compile(rf";\s*(?={re.escape(PREFIX)})")
_KEY_SEPARATOR = re.compile(rf",\s*(?=(?:{'|'.join(KEYS)})\s*=)")
_STRAY_KEY = re.compile(r",\s*([A-Za-z_][\w-]*)\s*=")
# What seqio accepts in a task name (dataset_providers._VALID_TASK_NAME_REGEX), in ASCII.
_NAME_UNSAFE = re.compile(r"[^A-Za-z0-9_.]")

Example = Union[tuple[str, str], Sequence[str], Mapping[str, Any]]
# name -> the normalised options it was registered with (same options: the same task, reused).
_REGISTERED: dict[str, str] = {}


@dataclasses.dataclass(frozen=True)
class Row:
  """One example: its input and target text and where it came from ('path, line 3')."""

  inputs: str
  targets: str
  where: str


@dataclasses.dataclass(frozen=True)
class Options:
  """The checked options of a file or examples task (see the module docstring)."""

  input: str
  target: str
  metrics: tuple[str, ...]
  labels: Optional[tuple[str, ...]]
  scoring: str
  vocabulary: str  # 'byte', 't5:<resolved>' or a SentencePiece model path: part of the name

  @property
  def template(self) -> bool:
    return "{" in self.input or "}" in self.input


# ------------------------------------------------------------------------------------ specs


def is_file_spec(name: Any) -> bool:
  """Whether `name` is a `file:` spec (or several joined by ';') rather than a task name."""
  return isinstance(name, str) and name.lstrip().startswith(PREFIX)


def parse_spec(spec: str) -> dict[str, str]:
  """`file:key=value,...` -> {key: value}; unknown or repeated keys raise one line."""
  spec = spec.strip()
  if not spec.startswith(PREFIX):
    raise ValueError(f"a file task spec starts with {PREFIX!r}, got {spec!r}")
  body = spec[len(PREFIX):].strip()
  if not body:
    raise ValueError(f"empty spec {spec!r}; expected e.g. "
                     "'file:train=train.jsonl,validation=dev.jsonl'")
  options: dict[str, str] = {}
  for part in _KEY_SEPARATOR.split(body):
    key, sep, value = part.partition("=")
    key = key.strip()
    if not sep or not re.fullmatch(r"[A-Za-z_][\w-]*", key):
      raise ValueError(f"spec {spec!r}: expected key=value, got {part!r} (keys: "
                       f"{', '.join(KEYS)})")
    if key not in KEYS:
      raise ValueError(f"spec {spec!r}: unknown key {key!r}; known keys: {', '.join(KEYS)}")
    if key in options:
      raise ValueError(f"spec {spec!r}: key {key!r} given twice")
    # A comma followed by an unknown `key=` did not split: name that key. In a template only
    # the text after its last field is checked (a template may hold ', x=').
    checked = value.rpartition("}")[2] if key == "input" else value
    stray = _STRAY_KEY.search(checked)
    if stray:
      raise ValueError(f"spec {spec!r}: unknown key {stray.group(1)!r}; known keys: "
                       f"{', '.join(KEYS)}")
    if key != "input" and ";" in value:
      raise ValueError(f"spec {spec!r}: {key}={value.strip()!r} holds a ';'; specs are joined as "
                       "'file:...;file:...', each starting with 'file:'")
    options[key] = value if key == "input" else value.strip()
  return options


def register_spec(spec: str) -> str:
  """Register the task of one `file:` spec (idempotent); returns its name."""
  options = parse_spec(spec)
  return register_file_task(
      train=options.get("train"), validation=options.get("validation"),
      test=options.get("test"), input=options.get("input", "inputs"),
      target=options.get("target", "targets"), metrics=options.get("metrics", "accuracy"),
      labels=options.get("labels"), scoring=options.get("scoring"),
      vocabulary=options.get("vocabulary", "t5"))


def get_or_register(spec: str):
  """The seqio Task of a `file:` spec, or the Mixture of several joined by ';' (rates: their
  training rows), registered on first use.

  The spec string itself is also entered in seqio's registry, pointing at the same Task or
  Mixture, so that code handed the spec as MIXTURE_OR_TASK_NAME (`seqio.get_dataset`,
  `seqio.Evaluator`) finds it; the Task's own name is a valid seqio name."""
  names = [register_spec(part) for part in _SPEC_SEPARATOR.split(spec.strip())]
  if len(names) == 1:
    registry, provider = seqio.TaskRegistry, seqio.TaskRegistry.get(names[0])
  else:
    registry, provider = seqio.MixtureRegistry, seqio.MixtureRegistry.get(register_mixture(names))
  if spec in registry.names() and registry.get(spec) is not provider:
    registry.remove(spec)  # the same relative paths from another working directory
  if spec not in registry.names():
    registry.add_provider(spec, provider)
  return provider


def register_mixture(task_names: Sequence[str], name: Optional[str] = None) -> str:
  """A seqio Mixture of registered file tasks, each at the rate of its number of training rows
  (0 without a train file); idempotent. Returns its name (default: from the task names)."""
  if len(set(task_names)) != len(task_names):
    raise ValueError(f"a mixture lists a task twice: {list(task_names)}")
  name = name or f"file_mixture_{_short_hash(list(task_names))}"
  if name in seqio.MixtureRegistry.names():
    registered = sorted(t.name for t in seqio.MixtureRegistry.get(name).tasks)
    if registered != sorted(task_names):
      raise ValueError(f"mixture {name!r} is already registered with the tasks {registered}")
    return name
  seqio.MixtureRegistry.add(name, [(task, float(_train_rows(task))) for task in task_names])
  return name


def _train_rows(task_name: str) -> int:
  task = seqio.TaskRegistry.get(task_name)
  if "train" not in task.splits:
    return 0
  rows = task.source.num_input_examples("train")
  if rows is None:
    raise ValueError(f"task {task_name!r} does not know its number of training examples; give "
                     "the rates to seqio.MixtureRegistry.add yourself")
  return rows


# ---------------------------------------------------------------------------- registration


def register_file_task(name: Optional[str] = None, *, train: Optional[str] = None,
                       validation: Optional[str] = None, test: Optional[str] = None,
                       input: str = "inputs", target: str = "targets",
                       metrics: Union[str, Sequence[str]] = ("accuracy",),
                       labels: Union[None, str, Sequence[str]] = None,
                       scoring: Optional[str] = None,
                       vocabulary: Union[str, seqio.Vocabulary] = "t5") -> str:
  """Register a seqio Task reading JSONL/CSV/TSV files (once per process); returns its name.

  Args:
    name: the task name; default `file_<train file stem>_<hash of the options>`.
    train, validation, test: the file of each split (at least one).
    input: a field name or a template over fields ('question: {q} context: {c}').
    target: the target field.
    metrics: names of `METRICS`, a sequence or joined by '+'.
    labels: the allowed targets, a sequence or joined by '|'.
    scoring: 'generate' (None) or 'rank' (rank classification over `labels`).
    vocabulary: 'byte', 't5', a SentencePiece model path or a directory with spiece.model, or a
      seqio.Vocabulary.
  Every file is read and checked now; see the module docstring for the errors.
  """
  paths = {split: path for split, path in
           (("train", train), ("validation", validation), ("test", test)) if path is not None}
  if not paths:
    raise ValueError("a file task needs a train=, validation= or test= file")
  for split, path in paths.items():
    if not isinstance(path, (str, os.PathLike)) or not str(path).strip():
      raise ValueError(f"{split}= must be a file path, got {path!r}")
  paths = {split: os.path.abspath(os.path.expanduser(str(path).strip()))
           for split, path in paths.items()}
  options, vocab = _options(input, target, metrics, labels, scoring, vocabulary)
  key = json.dumps({"files": paths, **dataclasses.asdict(options)}, sort_keys=True)
  stem = os.path.splitext(os.path.basename(paths.get("train") or next(iter(paths.values()))))[0]
  name = _name(name, "file", stem, key)
  if _already_registered(name, key):
    return name
  rows = {split: _checked(read_rows(path, options), options) for split, path in paths.items()}
  _add_task(name, key, rows, options, vocab)
  return name


def register_examples_task(name: Optional[str] = None, *,
                           train: Optional[Sequence[Example]] = None,
                           validation: Optional[Sequence[Example]] = None,
                           test: Optional[Sequence[Example]] = None,
                           input: str = "inputs", target: str = "targets",
                           metrics: Union[str, Sequence[str]] = ("accuracy",),
                           labels: Union[None, str, Sequence[str]] = None,
                           scoring: Optional[str] = None,
                           vocabulary: Union[str, seqio.Vocabulary] = "t5") -> str:
  """Register a seqio Task over in-memory rows (once per process for the same rows and options);
  returns its name (default `examples_<hash>`).

  Each split is a sequence of (input, target) string pairs, or of mappings read like a file's
  rows (`input` a field or template, `target` a field). The other options are
  `register_file_task`'s; errors name the row as `train[3]`."""
  given = {split: examples for split, examples in
           (("train", train), ("validation", validation), ("test", test))
           if examples is not None}
  if not given:
    raise ValueError("an examples task needs train=, validation= or test= rows")
  options, vocab = _options(input, target, metrics, labels, scoring, vocabulary)
  rows = {}
  for split, examples in given.items():
    if isinstance(examples, (str, bytes, Mapping)) or not isinstance(examples, Sequence):
      raise ValueError(f"{split}= must be a list of (input, target) pairs or of dicts, got "
                       f"{type(examples).__name__}")
    rows[split] = _checked([_example_row(f"{split}[{i}]", example, options, input, target)
                            for i, example in enumerate(examples)], options,
                           empty=f"{split}= has no rows")
  content = {split: [(r.inputs, r.targets) for r in split_rows]
             for split, split_rows in rows.items()}
  key = json.dumps({"rows": _short_hash(content, 16), **dataclasses.asdict(options)},
                   sort_keys=True)
  name = _name(name, "examples", "", key)
  if not _already_registered(name, key):
    _add_task(name, key, rows, options, vocab)
  return name


def _short_hash(value: Any, n: int = 8) -> str:
  return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()[:n]


def _name(name: Optional[str], kind: str, stem: str, key: str) -> str:
  if name is not None:
    if not isinstance(name, str) or not re.fullmatch(r"[\w.:#]+", name):
      raise ValueError(f"task name {name!r}: seqio allows letters, digits and _ . : # only")
    return name
  stem = _NAME_UNSAFE.sub("_", stem).strip("_")[:40]
  return "_".join(part for part in (kind, stem, _short_hash(key)) if part)


def _already_registered(name: str, key: str) -> bool:
  """True when `name` is this process's task for the same options; an error when the name is
  taken by another task."""
  if _REGISTERED.get(name) == key:
    return True
  if name in seqio.TaskRegistry.names() or name in seqio.MixtureRegistry.names():
    how = ("a file task with other files or options" if name in _REGISTERED else
           "another task or mixture")
    raise ValueError(f"task name {name!r} is already registered by {how}; choose another name")
  return False


def _options(input_: str, target: str, metric_names, labels, scoring,
             vocabulary) -> tuple[Options, seqio.Vocabulary]:
  """The checked, normalised options and the vocabulary they name."""
  if not isinstance(input_, str) or not input_.strip():
    raise ValueError(f"input= must be a field name or a template, got {input_!r}")
  if not isinstance(target, str) or not target.strip():
    raise ValueError(f"target= must be a field name, got {target!r}")
  if "{" in input_ or "}" in input_:
    template_fields(input_)  # raises on a malformed template
  else:
    input_ = input_.strip()  # a field name
  if isinstance(metric_names, str):
    metric_names = metric_names.split("+")
  metric_names = tuple(m.strip() for m in metric_names)
  unknown = [m for m in metric_names if m not in METRICS]
  if unknown or not metric_names:
    raise ValueError(f"unknown metric {unknown[0] if unknown else ''!r}; known metrics: "
                     f"{', '.join(METRICS)} (join several with '+')")
  if labels is not None:
    labels = tuple(x.strip() for x in labels.split("|")) if isinstance(labels, str) else (
        tuple(labels))
    if not labels or any(not isinstance(x, str) or not x.strip() for x in labels):
      raise ValueError(f"labels= must be non-empty strings joined by '|', got {labels!r}")
    if len(set(labels)) != len(labels):
      raise ValueError(f"labels= lists a label twice: {'|'.join(labels)}")
  scoring = scoring or "generate"
  if scoring not in SCORINGS:
    raise ValueError(f"unknown scoring {scoring!r}; known: {', '.join(SCORINGS)}")
  if scoring == "rank" and not labels:
    raise ValueError("scoring=rank needs labels= (the candidates to rank, joined by '|')")
  vocab, vocab_id = resolve_vocabulary(vocabulary)
  return Options(input_, target.strip(), metric_names, labels, scoring, vocab_id), vocab


def resolve_vocabulary(spec: Union[str, seqio.Vocabulary]) -> tuple[seqio.Vocabulary, str]:
  """(vocabulary, a string identifying it) for 'byte', 't5', a .model path or a directory."""
  if isinstance(spec, seqio.Vocabulary):
    model = getattr(spec, "sentencepiece_model_file", "")
    return spec, f"{type(spec).__name__}:{model}:{getattr(spec, 'extra_ids', 0)}"
  if not isinstance(spec, str) or not spec.strip():
    raise ValueError(f"vocabulary= must be byte, t5, a SentencePiece model or a directory "
                     f"with {SPIECE_MODEL}, got {spec!r}")
  spec = spec.strip()
  if spec == "byte":
    return seqio.ByteVocabulary(), "byte"
  if spec == "t5":
    return glue.default_vocabulary(), "t5:" + os.environ.get(glue.VOCABULARY_ENV, "")
  if "://" in spec:  # gs://, a URL: read by SentencePiece's loader when first used
    return glue.vocabulary_from_spec(spec), spec
  path = os.path.abspath(os.path.expanduser(spec))
  if os.path.isdir(path):
    if not os.path.isfile(os.path.join(path, SPIECE_MODEL)):
      raise ValueError(f"vocabulary= directory {path} has no {SPIECE_MODEL}")
    path = os.path.join(path, SPIECE_MODEL)
  elif not os.path.isfile(path):
    raise ValueError(f"vocabulary= {spec!r}: no such file or directory (resolved to {path}); "
                     f"expected byte, t5, a SentencePiece .model file or a directory with "
                     f"{SPIECE_MODEL}")
  return glue.vocabulary_from_spec(path), path


# ------------------------------------------------------------------------------- templates


def template_fields(template: str) -> list[str]:
  """The `{field}` names of an input template, in order (a malformed one raises one line)."""
  try:
    parsed = list(string.Formatter().parse(template))
  except ValueError as e:
    raise ValueError(f"input template {template!r}: {e} (write {{{{ and }}}} for literal "
                     "braces)") from None
  fields = []
  for _, field, spec, conversion in parsed:
    if field is None:
      continue
    plain = field.strip() and not field.isdigit() and not re.search(r"[.\[\]]", field)
    if not plain or spec or conversion:
      raise ValueError(f"input template {template!r}: only plain {{field}} placeholders are "
                       f"allowed, got {{{field}{'!' + conversion if conversion else ''}"
                       f"{':' + spec if spec else ''}}}")
    fields.append(field)
  return fields


def render(template: str, values: Mapping[str, str]) -> str:
  """`template` with each `{field}` replaced by `values[field]` (a template of one field name
  without braces is that field's value)."""
  if "{" not in template and "}" not in template:
    return values[template]
  return template.format_map({field: values[field] for field in template_fields(template)})


# ----------------------------------------------------------------------------------- files


def read_rows(path: str, options: Options) -> list[Row]:
  """The (input, target) rows of a JSONL/CSV/TSV file; the first bad row raises one line."""
  return [_row(where, fields, options) for where, fields in read_records(path)]


def read_records(path: str) -> list[tuple[str, dict[str, Any]]]:
  """('<path>, line N', {field: value}) for every row of a JSONL/CSV/TSV file (blank lines are
  no rows); a missing file, an unknown format or a malformed row raises one line."""
  suffix = os.path.splitext(path)[1].lower()
  if suffix not in FORMATS:
    hint = (" (Parquet would need pyarrow: convert it to JSONL, e.g. "
            "pandas.read_parquet(p).to_json(out, orient='records', lines=True))"
            if suffix == ".parquet" else "")
    raise ValueError(f"{path}: unknown format {suffix or '(no extension)'!r}; expected "
                     f"{', '.join(FORMATS)}{hint}")
  if not os.path.exists(path):
    raise ValueError(f"file not found: {path} (relative paths are resolved against the working "
                     f"directory {os.getcwd()})")
  if os.path.isdir(path):
    raise ValueError(f"{path} is a directory, not a {suffix} file")
  with open(path, "rb") as f:
    data = f.read()
  try:
    text = data.decode("utf-8-sig")
  except UnicodeDecodeError as e:
    line = data.count(b"\n", 0, e.start) + 1
    raise ValueError(f"{path}, line {line}: not UTF-8 text ({e.reason} at byte {e.start})"
                     ) from None
  records = _jsonl(path, text) if FORMATS[suffix] is None else _delimited(path, text, suffix)
  if not records:
    raise ValueError(f"{path}: the file is empty (no rows)")
  return records


def _json_type(value: Any) -> str:
  kinds = ((bool, "boolean"), (dict, "object"), (list, "array"), (str, "string"),
           ((int, float), "number"), (type(None), "null"))
  return next(name for kind, name in kinds if isinstance(value, kind))


def _jsonl(path: str, text: str) -> list[tuple[str, dict[str, Any]]]:
  records = []
  # Lines end at '\n' only: str.splitlines would also break at U+2028 inside a JSON string.
  for number, line in enumerate(text.split("\n"), 1):
    if not line.strip():
      continue
    try:
      value = json.loads(line)
    except json.JSONDecodeError as e:
      raise ValueError(f"{path}, line {number}: not valid JSON ({e.msg} at column {e.colno})"
                       ) from None
    if not isinstance(value, dict):
      kind = _json_type(value)
      article = "an" if kind[0] in "aeiou" else "a"
      raise ValueError(f"{path}, line {number}: not a JSON object (got {article} {kind}); "
                       "a .jsonl file holds one {\"field\": value, ...} per line")
    records.append((f"{path}, line {number}", value))
  return records


_OTHER_DELIMITERS = {"\t": ("tab", ".tsv"), ",": ("comma", ".csv"), ";": ("semicolon", None)}


def _delimited(path: str, text: str, suffix: str) -> list[tuple[str, dict[str, Any]]]:
  delimiter = FORMATS[suffix]
  reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter)
  header, records, end = None, [], 0
  try:
    for row in reader:
      start, end = end + 1, reader.line_num
      if not row or (len(row) == 1 and not row[0].strip()):
        continue  # a blank line
      if header is None:
        header = row
        _check_header(path, header, delimiter, suffix)
        continue
      if len(row) != len(header):
        raise ValueError(f"{path}, line {start}: {len(row)} values but the header has "
                         f"{len(header)} fields ({', '.join(header)}); quote values that hold "
                         f"{'a tab' if delimiter == chr(9) else 'a comma'}")
      records.append((f"{path}, line {start}", dict(zip(header, row))))
  except csv.Error as e:
    raise ValueError(f"{path}, line {reader.line_num}: not valid {suffix[1:].upper()} ({e})"
                     ) from None
  if header is not None and not records:
    raise ValueError(f"{path}: the file has a header ({', '.join(header)}) but no rows")
  return records


def _check_header(path: str, header: list[str], delimiter: str, suffix: str) -> None:
  if len(header) == 1:
    for other, (what, extension) in _OTHER_DELIMITERS.items():
      if other != delimiter and other in header[0]:
        fix = f"name it {extension}" if extension else "use commas (.csv) or tabs (.tsv)"
        raise ValueError(f"{path}, line 1: the header is one field {header[0][:60]!r} that looks "
                         f"{what}-separated, but {suffix} files are "
                         f"{'comma' if delimiter == ',' else 'tab'}-separated: {fix}")
  duplicates = sorted({h for h in header if header.count(h) > 1})
  if duplicates:
    raise ValueError(f"{path}, line 1: the header repeats the field {duplicates[0]!r}")


# ------------------------------------------------------------------------------------ rows


def _text(where: str, fields: Mapping[str, Any], field: str, role: str) -> str:
  """A row's `field` as text (JSON numbers and booleans written as in JSON)."""
  if field not in fields:
    have = ", ".join(repr(f) for f in fields) or "none"
    raise ValueError(f"{where}: field {field!r} ({role}) is missing; the row has fields {have}")
  value = fields[field]
  if isinstance(value, str):
    return value
  if isinstance(value, (bool, int, float)):
    return json.dumps(value)
  raise ValueError(f"{where}: field {field!r} ({role}) is a JSON {_json_type(value)}, not text")


def _row(where: str, fields: Mapping[str, Any], options: Options) -> Row:
  if options.template:
    values = {f: _text(where, fields, f, f"in input={options.input}")
              for f in template_fields(options.input)}
    inputs = render(options.input, values)
  else:
    inputs = _text(where, fields, options.input, "input")
  targets = _text(where, fields, options.target, "target")
  return Row(inputs, targets, where)


def _example_row(where: str, example: Example, options: Options, input_: str,
                 target: str) -> Row:
  """A row of `register_examples_task`: an (input, target) pair or a mapping."""
  if isinstance(example, Mapping):
    return _row(where, example, options)
  if isinstance(example, (str, bytes)) or not isinstance(example, Sequence) or (
      len(example) != 2):
    raise ValueError(f"{where}: expected an (input, target) pair or a dict, got "
                     f"{type(example).__name__} {str(example)[:60]!r}")
  if input_ != "inputs" or target != "targets":
    raise ValueError(f"{where}: input= and target= choose fields of dict rows; an (input, "
                     "target) pair has none")
  for value, role in zip(example, ("input", "target")):
    if not isinstance(value, str):
      raise ValueError(f"{where}: the {role} must be a string, got {type(value).__name__} "
                       f"{value!r}")
  return Row(example[0], example[1], where)


def _checked(rows: list[Row], options: Options, empty: str = "") -> list[Row]:
  """`rows`, after checking that none has an empty target or one outside `options.labels`."""
  if not rows:
    raise ValueError(empty or "no rows")
  for row in rows:
    if not row.targets.strip():
      raise ValueError(f"{row.where}: the target (field {options.target!r}) is empty")
    if options.labels and row.targets not in options.labels:
      raise ValueError(f"{row.where}: target {row.targets!r} (field {options.target!r}) is not "
                       f"one of labels={'|'.join(options.labels)}")
  return rows


# ----------------------------------------------------------------------------------- tasks


def expand_for_ranking(rows: Sequence[Row], labels: Sequence[str]) -> dict[str, list]:
  """The columns of an evaluation split scored by rank classification: one row per (example,
  label) with the label as `targets`, the example's own target as `rank_gold` and its position
  as `rank_example` (what `glue.expand_label_candidates` makes in TensorFlow)."""
  columns: dict[str, list] = {"inputs": [], "targets": [], "rank_gold": [], "rank_example": []}
  for position, row in enumerate(rows):
    for label in labels:
      columns["inputs"].append(row.inputs)
      columns["targets"].append(label)
      columns["rank_gold"].append(row.targets)
      columns["rank_example"].append(position)
  return columns


def _columns(split: str, rows: Sequence[Row], options: Options) -> dict[str, list]:
  if options.scoring == "rank" and split != "train":
    return expand_for_ranking(rows, options.labels)
  return {"inputs": [r.inputs for r in rows], "targets": [r.targets for r in rows]}


def _identity(text, **unused_kwargs):
  return text


def _add_task(name: str, key: str, rows: Mapping[str, list[Row]], options: Options,
              vocabulary: seqio.Vocabulary) -> None:
  columns = {split: _columns(split, split_rows, options) for split, split_rows in rows.items()}

  def dataset_fn(split: str, shuffle_files: bool, seed: Optional[int] = None):
    del shuffle_files, seed  # one in-memory shard; the Task shuffles the rows
    return tf.data.Dataset.from_tensor_slices(columns[split])

  metric_fns: list[Callable] = [METRICS[m] for m in options.metrics]
  postprocess_fn = None
  if options.scoring == "rank":
    metric_fns = [metrics.rank_classification(metric_fns)]
    postprocess_fn = functools.partial(glue.rank_classification_postprocessor,
                                       base_postprocess_fn=_identity)
  sizes = {split: len(c["inputs"]) for split, c in columns.items()}
  seqio.TaskRegistry.add(
      name, source=seqio.FunctionDataSource(dataset_fn, splits=list(columns),
                                            num_input_examples=sizes),
      preprocessors=[seqio.preprocessors.tokenize, seqio.preprocessors.append_eos_after_trim],
      output_features=glue.output_features(vocabulary), postprocess_fn=postprocess_fn,
      metric_fns=metric_fns,
      # The whole split fits the buffer: a full shuffle, whatever the file's order.
      shuffle_buffer_size=max(seqio.SHUFFLE_BUFFER_SIZE, *sizes.values()))
  _REGISTERED[name] = key
