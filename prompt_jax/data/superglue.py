"""SuperGLUE as seqio Tasks in T5's text-to-text format (`super_glue/<config>:1.0.2`).

Same naming and variants as `prompt_jax.data.glue` (`super_glue_<config>_v102`, `taskless_...`,
`..._rank`, `[taskless_]super_glue_v102_proportional`). As in T5:
  * WSC is the "simple" formulation of `wsc.fixed`: the input marks the pronoun
    (`wsc: The city councilmen refused the demonstrators a permit because *they* feared
    violence.`) and the target is the referent's text. `super_glue_wsc_v102_simple_train` keeps
    only examples whose candidate is the true referent; `super_glue_wsc_v102_simple_eval`
    (validation/test) keeps all and scores whether the generated referent matches.
  * ReCoRD emits one example per answer; evaluation keeps one per (passage, query) and takes the
    max over all answers of SQuAD's exact match and F1.
  * MultiRC is scored per answer (F1a) and per question (exact match of all its answers).
  * AX-b and AX-g (test only, no metrics) are cast as RTE.
"""

from __future__ import annotations

import functools
from typing import Optional

import seqio
import tensorflow as tf

from prompt_jax.data import glue, metrics

SUPER_GLUE_TFDS_VERSION = "1.0.2"
AUTOTUNE = tf.data.AUTOTUNE

# T5's determiners ignored when comparing a generated WSC referent with the true one.
_DETERMINERS = frozenset({
    "a", "an", "few", "her", "his", "each", "every", "many", "much", "my", "our", "some", "that",
    "the", "their", "these", "this", "those", "which", "whose", "your"})

# Two wsc.fixed sentences whose span2_index does not point at the pronoun (T5's fix-ups).
_WSC_SPECIAL_CASES = {
    "The boy continued to whip the pony , and eventually the pony threw him over. John laughed "
    "out quite loud. \"Good for him,\" he said. ":
    "The boy continued to whip the pony , and eventually the pony threw him over. John laughed "
    "out quite loud. \"Good for X ,\" he said.",
    "When they had eventually calmed down a bit , and had gotten home, Mr. Farley put the magic "
    "pebble in an iron safe . Some day they might want to use it , but really for now, what more "
    "could they wish for?":
    "When they had eventually calmed down a bit , and had gotten home, Mr. Farley put the magic "
    "pebble in an iron safe . Some day they might want to use X , but really for now, what more "
    "could they wish for?",
}


# ---------------------------------------------------------------------------- preprocessors


def _wsc_blank_pronoun(x) -> tf.Tensor:
  """The text with the word at `span2_index` (the pronoun) replaced by 'X'."""
  words = tf.strings.split(x["text"], sep=" ")
  index = x["span2_index"]
  blanked = tf.strings.join([tf.strings.reduce_join(words[:index], separator=" "), "X",
                             tf.strings.reduce_join(words[index + 1:], separator=" ")],
                            separator=" ")
  for text, fixed in _WSC_SPECIAL_CASES.items():
    blanked = tf.where(tf.equal(x["text"], text), tf.constant(fixed), blanked)
  return blanked


def wsc_simple(dataset: tf.data.Dataset, correct_referent_only: bool) -> tf.data.Dataset:
  """'wsc: <text with *pronoun* marked>' -> the candidate referent (`span1_text`)."""
  if correct_referent_only:
    dataset = dataset.filter(lambda x: tf.equal(x["label"], 1))

  def fn(x):
    marked = tf.strings.regex_replace(_wsc_blank_pronoun(x), " X ",
                                      tf.strings.join([" *", x["span2_text"], "* "]))
    return {"inputs": tf.strings.join(["wsc:", marked], separator=" "),
            "targets": tf.reshape(x["span1_text"], []), "label": x["label"], "idx": x["idx"]}
  return dataset.map(fn, num_parallel_calls=AUTOTUNE)


def record(dataset: tf.data.Dataset) -> tf.data.Dataset:
  """'record query: <query> entities: <e1>, <e2> passage: <passage>' -> one row per answer
  ('<unk>' when there is none), keeping all `answers` and the (passage, query) ids."""
  def per_answer(x):
    n = tf.maximum(tf.size(x["answers"]), 1)
    passage = tf.strings.regex_replace(x["passage"], r"(\.|\?|\!|\"|\')\n@highlight\n", r"\1 ")
    passage = tf.strings.regex_replace(passage, r"\n@highlight\n", ". ")
    inputs = tf.strings.join(
        ["record query:", x["query"], "entities:",
         tf.strings.reduce_join(x["entities"], separator=", "), "passage:", passage],
        separator=" ")
    targets = tf.cond(tf.size(x["answers"]) > 0, lambda: x["answers"],
                      lambda: tf.constant(["<unk>"]))
    answers = tf.repeat(tf.expand_dims(x["answers"], 0), n, axis=0)
    return tf.data.Dataset.from_tensor_slices({
        "inputs": tf.fill([n], inputs), "targets": targets, "answers": answers,
        "idx/passage": tf.fill([n], x["idx"]["passage"]),
        "idx/query": tf.fill([n], x["idx"]["query"])})
  return dataset.flat_map(per_answer)


# --------------------------------------------------------------------------- postprocessors


def multirc_postprocessor(label: str, example=None, is_target: bool = False):
  """{'value': class id} plus, for targets, the question id to group by."""
  result = {"value": glue.string_label_to_class_id(label, ("False", "True"))}
  if is_target:
    result["group"] = int(example["idx/question"])
  return result


def record_postprocessor(answer: str, example=None, is_target: bool = False):
  """Targets: all answers of the query and its (passage, query) group; predictions: the text."""
  if is_target:
    return {"value": [glue.as_text(a) for a in example["answers"]],
            "group": (int(example["idx/passage"]), int(example["idx/query"]))}
  return {"value": answer}


def _clean_referent(text: str) -> str:
  words = glue.as_text(text).strip().lower().split(" ")
  return " ".join(w for w in words if w not in _DETERMINERS)


def wsc_simple_postprocessor(prediction: str, example=None, is_target: bool = False) -> int:
  """Targets: the label (is the candidate the referent). Predictions: 1 iff the generated text
  names the candidate (word sets nested, ignoring case and determiners), else 0; -1 if empty."""
  if is_target:
    return int(example["label"])
  prediction = _clean_referent(prediction)
  if not prediction:
    return -1
  referent = _clean_referent(example["targets_pretokenized"])
  if ("'" in prediction) != ("'" in referent):
    return 0
  predicted, actual = set(prediction.split(" ")), set(referent.split(" "))
  return int(predicted <= actual or actual <= predicted)


# ------------------------------------------------------------------------------------ tasks


def _classification(config: str, benchmark: str, labels, metric_fns, rate: float,
                    feature_names=None, splits=glue.STANDARD_SPLITS, pre=()) -> glue.TaskSpec:
  return glue.TaskSpec(
      name=f"super_glue_{config}_v102",
      tfds_name=f"super_glue/{config}:{SUPER_GLUE_TFDS_VERSION}", splits=splits,
      text_preprocessors=[*pre, functools.partial(glue.glue_text, benchmark_name=benchmark,
                                                  label_names=labels,
                                                  feature_names=feature_names)],
      postprocess_fn=functools.partial(glue.string_label_to_class_id, label_classes=labels),
      metric_fns=metric_fns, label_names=labels, rate=rate)


def super_glue_specs() -> list[glue.TaskSpec]:
  true_false = ("False", "True")
  nli = ("entailment", "not_entailment")
  axb_as_rte = functools.partial(glue.rekey, key_map={
      "premise": "sentence1", "hypothesis": "sentence2", "label": "label", "idx": "idx"})
  wsc_tfds = f"super_glue/wsc.fixed:{SUPER_GLUE_TFDS_VERSION}"
  return [
      _classification("boolq", "boolq", true_false, (metrics.accuracy,), 9_427.),
      _classification("cb", "cb", ("entailment", "contradiction", "neutral"),
                      (metrics.mean_multiclass_f1(3), metrics.accuracy), 250.),
      _classification("copa", "copa", ("choice1", "choice2"), (metrics.accuracy,), 400.),
      glue.TaskSpec(
          name="super_glue_multirc_v102",
          tfds_name=f"super_glue/multirc:{SUPER_GLUE_TFDS_VERSION}",
          splits=glue.STANDARD_SPLITS,
          text_preprocessors=[functools.partial(
              glue.glue_text, benchmark_name="multirc", label_names=true_false,
              feature_names=("question", "answer", "paragraph"))],
          postprocess_fn=multirc_postprocessor,
          metric_fns=(metrics.multirc_f1_over_all_answers, metrics.multirc_exact_match),
          label_names=true_false, rate=27_243.),
      glue.TaskSpec(
          name="super_glue_record_v102",
          tfds_name=f"super_glue/record:{SUPER_GLUE_TFDS_VERSION}",
          splits=glue.STANDARD_SPLITS, text_preprocessors=[record],
          postprocess_fn=record_postprocessor, metric_fns=(metrics.record_max_over_answers,),
          rate=138_854.),
      _classification("rte", "rte", nli, (metrics.accuracy,), 2_490.),
      _classification("wic", "wic", true_false, (metrics.accuracy,), 5_428.,
                      feature_names=("sentence1", "sentence2", "word")),
      _classification("axb", "rte", nli, (), 0., splits=("test",), pre=(axb_as_rte,)),
      _classification("axg", "rte", nli, (), 0., splits=("test",)),
      glue.TaskSpec(
          name="super_glue_wsc_v102_simple_train", tfds_name=wsc_tfds, splits=("train",),
          text_preprocessors=[functools.partial(wsc_simple, correct_referent_only=True)],
          postprocess_fn=None, metric_fns=(), rate=259.),
      glue.TaskSpec(
          name="super_glue_wsc_v102_simple_eval", tfds_name=wsc_tfds,
          splits=("validation", "test"),
          text_preprocessors=[functools.partial(wsc_simple, correct_referent_only=False)],
          postprocess_fn=wsc_simple_postprocessor, metric_fns=(metrics.accuracy,), rate=0.),
  ]


def register(vocabulary: Optional[seqio.Vocabulary] = None, suffix: str = "") -> list[str]:
  """Register every SuperGLUE task variant and mixture (idempotent); returns the task names."""
  vocabulary = vocabulary or glue.default_vocabulary()
  specs = super_glue_specs()
  for spec in specs:
    glue.add_task_variants(spec, vocabulary, suffix)
  glue.add_proportional_mixture("super_glue_v102_proportional", specs, suffix)
  return [name for spec in specs for name in glue.task_names(spec, suffix)]
