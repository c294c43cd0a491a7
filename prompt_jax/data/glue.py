"""GLUE as seqio Tasks in T5's text-to-text format, plus the variants prompt tuning needs.

Every task reads tensorflow-datasets (`glue/<config>:2.0.0`; set `TFDS_DATA_DIR` or tfds'
default data dir to where the data is prepared) and turns an example into T5's strings, e.g.
`sst2 sentence: it 's a charming journey .` -> `positive`, with T5's postprocessors and metrics,
so the numbers compare with published T5 / prompt-tuning results.

Names (each also with the `suffix` given to `register`):
  glue_<config>_v002                  T5's task (same name as in t5.data)
  taskless_glue_<config>_v002         the same without the leading task name ("sst2"), which
                                      the prompt replaces (google-research/prompt-tuning's name)
  [taskless_]glue_<config>_v002_rank  evaluation-only rank classification: every label string
                                      is scored and the most likely one is the prediction
  [taskless_]glue_v002_proportional   T5's mixture, rates proportional to the train sizes

The vocabulary is chosen at registration: `register(vocabulary, suffix)`. `tasks.py` registers
T5's names with `default_vocabulary()` (T5's SentencePiece model, or the `PROMPT_JAX_VOCABULARY`
environment variable: a SentencePiece model path or `byte`) and the same tasks with the byte
vocabulary under the suffix `_bytes` (for the tiny byte-level demo model).
"""

from __future__ import annotations

import dataclasses
import functools
import os
from typing import Callable, Optional, Sequence

import seqio
import tensorflow as tf

from prompt_jax.data import metrics

DEFAULT_SENTENCEPIECE_MODEL = "gs://t5-data/vocabs/cc_all.32000.100extra/sentencepiece.model"
VOCABULARY_ENV = "PROMPT_JAX_VOCABULARY"
GLUE_TFDS_VERSION = "2.0.0"

AUTOTUNE = tf.data.AUTOTUNE
STANDARD_SPLITS = ("train", "validation", "test")


# ------------------------------------------------------------------------------- vocabulary


def vocabulary_from_spec(spec: str) -> seqio.Vocabulary:
  """`byte` -> seqio.ByteVocabulary; anything else is a SentencePiece model path (or gs:// URL)
  with T5's 100 extra ids."""
  if not spec:
    raise ValueError(f"{VOCABULARY_ENV}: expected 'byte' or a SentencePiece model path, got ''")
  if spec == "byte":
    return seqio.ByteVocabulary()
  return seqio.SentencePieceVocabulary(spec)


def default_vocabulary() -> seqio.Vocabulary:
  """T5's SentencePiece vocabulary, unless `PROMPT_JAX_VOCABULARY` names another one."""
  return vocabulary_from_spec(os.environ.get(VOCABULARY_ENV, DEFAULT_SENTENCEPIECE_MODEL))


def output_features(vocabulary: seqio.Vocabulary) -> dict[str, seqio.Feature]:
  return {"inputs": seqio.Feature(vocabulary, add_eos=True, required=False),
          "targets": seqio.Feature(vocabulary, add_eos=True)}


# ---------------------------------------------------------------------------- preprocessors


def _label_string(label: tf.Tensor, label_names: Sequence[str]) -> tf.Tensor:
  """The label's name; '<unk>' for unlabelled (-1) examples such as the test splits."""
  names = tf.constant(list(label_names))
  return tf.cond(tf.equal(label, -1), lambda: tf.constant("<unk>"),
                 lambda: tf.gather(names, label))


def text_to_text(x, benchmark_name: str, label_names: Sequence[str],
                 feature_names: Optional[Sequence[str]] = None):
  """T5's `glue` preprocessor: '<benchmark> <key1>: <text1> <key2>: <text2> ...' -> label name.

  Keys are `feature_names` in order, else every text feature sorted by name. MultiRC drops its
  HTML markup and keeps its (paragraph, question, answer) ids for the grouped metrics.
  """
  keys = feature_names or sorted(set(x.keys()) - {"label", "idx"})
  parts = [benchmark_name]
  for key in keys:
    parts += [f"{key}:", x[key]]
  joined = tf.strings.join(parts, separator=" ")
  example = {}
  if benchmark_name == "multirc":
    joined = tf.strings.regex_replace(joined, "<br>", " ")
    joined = tf.strings.regex_replace(joined, "<(/)?b>", "")
    for key in ("paragraph", "question", "answer"):
      example[f"idx/{key}"] = x["idx"][key]
  else:
    example["idx"] = x["idx"]
  example["inputs"] = joined
  example["targets"] = _label_string(x["label"], label_names)
  return example


def glue_text(dataset: tf.data.Dataset, benchmark_name: str, label_names: Sequence[str],
              feature_names: Optional[Sequence[str]] = None) -> tf.data.Dataset:
  fn = functools.partial(text_to_text, benchmark_name=benchmark_name, label_names=label_names,
                         feature_names=feature_names)
  return dataset.map(fn, num_parallel_calls=AUTOTUNE)


def stsb_text(dataset: tf.data.Dataset) -> tf.data.Dataset:
  """STS-B: the similarity rounded to the nearest 0.2 and written with one decimal ('3.4')."""
  def fn(x):
    joined = tf.strings.join(["stsb sentence1:", x["sentence1"], "sentence2:", x["sentence2"]],
                             separator=" ")
    label = tf.strings.as_string(tf.round(x["label"] * 5) / 5, precision=1)
    return {"inputs": joined, "targets": label, "idx": x["idx"]}
  return dataset.map(fn, num_parallel_calls=AUTOTUNE)


def rekey(dataset: tf.data.Dataset, key_map: dict[str, str]) -> tf.data.Dataset:
  """New example {new_key: x[old_key]}."""
  return dataset.map(lambda x: {new: x[old] for new, old in key_map.items()},
                     num_parallel_calls=AUTOTUNE)


def remove_task_prefix(dataset: tf.data.Dataset) -> tf.data.Dataset:
  """Drop the first word of `inputs` (T5's task name, e.g. 'sst2' or 'wsc:')."""
  def fn(x):
    return dict(x, inputs=tf.strings.regex_replace(x["inputs"], r"^\S+\s+", ""))
  return dataset.map(fn, num_parallel_calls=AUTOTUNE)


def expand_label_candidates(dataset: tf.data.Dataset,
                            label_names: Sequence[str]) -> tf.data.Dataset:
  """One row per (example, candidate label): `targets` becomes each label name in turn, the
  example's own target moves to `rank_gold` and its position to `rank_example`."""
  names = tf.constant(list(label_names))

  def fn(position, x):
    n = len(label_names)
    rows = {k: tf.repeat(tf.expand_dims(v, 0), n, axis=0) for k, v in x.items()}
    rows["rank_gold"] = rows.pop("targets")
    rows["targets"] = names
    rows["rank_example"] = tf.fill([n], position)
    return tf.data.Dataset.from_tensor_slices(rows)
  return dataset.enumerate().flat_map(fn)


# --------------------------------------------------------------------------- postprocessors


def string_label_to_class_id(label: str, label_classes: Sequence[str], default: int = -1,
                             **unused_kwargs) -> int:
  """Index of `label` in `label_classes`; `default` (-1, always wrong) if it is none of them."""
  return list(label_classes).index(label) if label in label_classes else default


def string_to_float(text: str, default: float = -1.0, **unused_kwargs) -> float:
  try:
    return float(text)
  except ValueError:
    return default


def as_text(value) -> str:
  return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def rank_classification_postprocessor(output, example=None, is_target: bool = False, *,
                                      base_postprocess_fn: Callable):
  """Targets of a rank task: which example, its real target and this row's candidate value
  (both through the free-decoding task's postprocessor). Scores pass through."""
  if not is_target:
    return output
  gold = as_text(example["rank_gold"])
  gold_example = dict(example, targets_pretokenized=gold)
  return {"example": int(example["rank_example"]),
          "target": base_postprocess_fn(gold, example=gold_example, is_target=True),
          "candidate": base_postprocess_fn(as_text(example["targets_pretokenized"]),
                                           example=example, is_target=False)}


# ------------------------------------------------------------------------------ registration


@dataclasses.dataclass(frozen=True)
class TaskSpec:
  """One T5 GLUE/SuperGLUE task.

  Attributes:
    name: T5's registry name, e.g. 'glue_sst2_v002'.
    tfds_name: e.g. 'glue/sst2:2.0.0'.
    splits: the tfds splits the task reads.
    text_preprocessors: dataset -> dataset functions producing `inputs`/`targets` strings.
    postprocess_fn: decoded string -> value the metrics compare.
    metric_fns: seqio metric functions (none for test-only diagnostics).
    label_names: the label strings of a classification task (enables the `_rank` variant).
    rate: the task's weight in the proportional mixture (its number of train examples).
  """

  name: str
  tfds_name: str
  splits: Sequence[str]
  text_preprocessors: Sequence[Callable]
  postprocess_fn: Optional[Callable]
  metric_fns: Sequence[Callable]
  label_names: Optional[Sequence[str]] = None
  rate: float = 0.0


def _add_task(name: str, spec: TaskSpec, preprocessors: Sequence[Callable], vocabulary,
              splits: Sequence[str], postprocess_fn, metric_fns) -> None:
  if name in seqio.TaskRegistry.names():
    return
  seqio.TaskRegistry.add(
      name, source=seqio.TfdsDataSource(tfds_name=spec.tfds_name, splits=list(splits)),
      preprocessors=[*preprocessors, seqio.preprocessors.tokenize,
                     seqio.CacheDatasetPlaceholder(), seqio.preprocessors.append_eos_after_trim],
      output_features=output_features(vocabulary), postprocess_fn=postprocess_fn,
      metric_fns=list(metric_fns))


def task_names(spec: TaskSpec, suffix: str = "") -> list[str]:
  """The names `add_task_variants` registers for `spec`."""
  names = [spec.name + suffix, f"taskless_{spec.name}{suffix}"]
  if spec.label_names and spec.metric_fns:
    names += [f"{spec.name}_rank{suffix}", f"taskless_{spec.name}_rank{suffix}"]
  return names


def add_task_variants(spec: TaskSpec, vocabulary: seqio.Vocabulary, suffix: str = "") -> None:
  """Register T5's task, its taskless twin and (for classification) both rank variants."""
  for taskless in (False, True):
    prefix = "taskless_" if taskless else ""
    text = list(spec.text_preprocessors) + ([remove_task_prefix] if taskless else [])
    _add_task(f"{prefix}{spec.name}{suffix}", spec, text, vocabulary, spec.splits,
              spec.postprocess_fn, spec.metric_fns)
    if spec.label_names and spec.metric_fns:
      base_postprocess = spec.postprocess_fn or (lambda s, **_: s)
      _add_task(
          f"{prefix}{spec.name}_rank{suffix}", spec,
          [*text, functools.partial(expand_label_candidates, label_names=spec.label_names)],
          vocabulary, [s for s in spec.splits if s != "train"],
          functools.partial(rank_classification_postprocessor,
                            base_postprocess_fn=base_postprocess),
          [metrics.rank_classification(spec.metric_fns)])


def add_proportional_mixture(name: str, specs: Sequence[TaskSpec], suffix: str = "") -> None:
  """`name` and `taskless_<name>` (each + suffix), rates = the tasks' train sizes."""
  for prefix in ("", "taskless_"):
    mixture = f"{prefix}{name}{suffix}"
    if mixture not in seqio.MixtureRegistry.names():
      seqio.MixtureRegistry.add(mixture, [(f"{prefix}{s.name}{suffix}", s.rate) for s in specs])


# ------------------------------------------------------------------------------------- GLUE

# (config, label names (None: regression), metrics, train size = mixture rate (T5's weights;
# 0 for evaluation-only tasks), benchmark name in the input (T5 casts the MNLI evaluation sets
# and AX as MNLI)).
_GLUE = (
    ("cola", ("unacceptable", "acceptable"), (metrics.matthews_corrcoef,), 8_551., "cola"),
    ("sst2", ("negative", "positive"), (metrics.accuracy,), 67_349., "sst2"),
    ("mrpc", ("not_equivalent", "equivalent"),
     (metrics.f1_score_with_invalid, metrics.accuracy), 3_668., "mrpc"),
    ("qqp", ("not_duplicate", "duplicate"),
     (metrics.f1_score_with_invalid, metrics.accuracy), 363_849., "qqp"),
    ("stsb", None, (metrics.pearson_corrcoef, metrics.spearman_corrcoef), 5_749., "stsb"),
    ("mnli", ("entailment", "neutral", "contradiction"), (metrics.accuracy,), 392_702., "mnli"),
    ("mnli_mismatched", ("entailment", "neutral", "contradiction"), (metrics.accuracy,), 0.,
     "mnli"),
    ("mnli_matched", ("entailment", "neutral", "contradiction"), (metrics.accuracy,), 0.,
     "mnli"),
    ("qnli", ("entailment", "not_entailment"), (metrics.accuracy,), 104_743., "qnli"),
    ("rte", ("entailment", "not_entailment"), (metrics.accuracy,), 2_490., "rte"),
    ("wnli", ("not_entailment", "entailment"), (metrics.accuracy,), 0., "wnli"),
    ("ax", ("entailment", "neutral", "contradiction"), (), 0., "mnli"),
)

_GLUE_SPLITS = {
    "mnli": ("train", "validation_matched", "validation_mismatched", "test_matched",
             "test_mismatched"),
    "mnli_matched": ("validation", "test"),
    "mnli_mismatched": ("validation", "test"),
    "ax": ("test",),
}


def glue_specs() -> list[TaskSpec]:
  specs = []
  for config, labels, metric_fns, rate, benchmark in _GLUE:
    if labels is None:
      text, postprocess = [stsb_text], string_to_float
    else:
      text = [functools.partial(glue_text, benchmark_name=benchmark, label_names=labels)]
      postprocess = functools.partial(string_label_to_class_id, label_classes=labels)
    specs.append(TaskSpec(
        name=f"glue_{config}_v002", tfds_name=f"glue/{config}:{GLUE_TFDS_VERSION}",
        splits=_GLUE_SPLITS.get(config, STANDARD_SPLITS), text_preprocessors=text,
        postprocess_fn=postprocess, metric_fns=metric_fns, label_names=labels, rate=rate))
  return specs


def register(vocabulary: Optional[seqio.Vocabulary] = None, suffix: str = "") -> list[str]:
  """Register every GLUE task variant and mixture (idempotent); returns the task names.

  Args:
    vocabulary: of inputs and targets; `default_vocabulary()` when None.
    suffix: appended to every name, to register the tasks again with another vocabulary.
  """
  vocabulary = vocabulary or default_vocabulary()
  specs = glue_specs()
  for spec in specs:
    add_task_variants(spec, vocabulary, suffix)
  add_proportional_mixture("glue_v002_proportional", specs, suffix)
  return [name for spec in specs for name in task_names(spec, suffix)]
