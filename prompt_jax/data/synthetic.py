"""Synthetic English review sentences: the demo's tasks, needing no download.

Sentences such as "the soup was really dreadful and bland" carry a topic (movie, food, travel,
book) and a sentiment. Three prefixed tasks (`demo_pretrain_mixture`) teach the tiny frozen demo
model to follow a task prefix; `demo_sentiment` has *no* prefix, so a soft prompt must learn to
stand in for it; `demo_sentiment_rank` scores its validation split by rank classification (the
likelier of the two label strings is the answer), which still measures a prompt that has not yet
learnt to spell a label exactly. All use the byte vocabulary, so no SentencePiece file is needed.
"""

from __future__ import annotations

import functools
import random

import seqio
import tensorflow as tf

from prompt_jax.data import glue, metrics

VOCABULARY = seqio.ByteVocabulary()

TOPICS = {
    "movie": ["the movie", "this film", "the plot", "the acting", "the soundtrack", "the cast"],
    "food": ["the meal", "this pizza", "the soup", "the dessert", "the coffee", "the bread"],
    "travel": ["the hotel", "this trip", "the flight", "the beach", "the room", "the tour"],
    "book": ["the novel", "this book", "the story", "the ending", "the author", "the poem"],
}
ADJECTIVES = {
    "positive": ["great", "wonderful", "superb", "lovely", "brilliant", "delightful",
                 "excellent", "charming", "fantastic", "pleasant", "fun", "moving"],
    "negative": ["awful", "terrible", "boring", "dreadful", "dull", "horrible", "bad", "poor",
                 "bland", "disappointing", "weak", "tedious"],
}
ADVERBS = ["", "really ", "very ", "quite ", "truly ", "rather ", "so "]
SPLIT_SIZES = {"train": 8000, "validation": 400}
SENTIMENT_LABELS = ("negative", "positive")


def make_examples(split: str, seed: int = 0) -> list[dict[str, str]]:
  """Deterministic examples for `split`: {'sentence', 'topic', 'sentiment', 'adjective'}."""
  if split not in SPLIT_SIZES:
    raise ValueError(f"synthetic split must be one of {sorted(SPLIT_SIZES)}, got {split!r}")
  rng = random.Random(f"{split}-{seed}")
  examples = []
  for _ in range(SPLIT_SIZES[split]):
    topic = rng.choice(sorted(TOPICS))
    sentiment = rng.choice(sorted(ADJECTIVES))
    first, second = rng.sample(ADJECTIVES[sentiment], 2)
    sentence = f"{rng.choice(TOPICS[topic])} was {rng.choice(ADVERBS)}{first}"
    if rng.random() < 0.5:
      sentence += f" and {second}"
    examples.append({"sentence": sentence, "topic": topic, "sentiment": sentiment,
                     "adjective": first})
  return examples


def _source(prefix: str, target_field: str,
            splits=tuple(sorted(SPLIT_SIZES))) -> seqio.FunctionDataSource:
  def dataset_fn(split, shuffle_files, seed=None):
    del shuffle_files, seed
    examples = make_examples(split)
    return tf.data.Dataset.from_tensor_slices({
        "inputs": [prefix + ex["sentence"] for ex in examples],
        "targets": [ex[target_field] for ex in examples],
    })
  return seqio.FunctionDataSource(dataset_fn, splits=list(splits))


OUTPUT_FEATURES = {
    "inputs": seqio.Feature(VOCABULARY, add_eos=True),
    "targets": seqio.Feature(VOCABULARY, add_eos=True),
}

_TASKS = {
    # name: (input prefix, target field)
    "demo_sentiment_prefixed": ("sentiment: ", "sentiment"),
    "demo_topic_prefixed": ("topic: ", "topic"),
    "demo_adjective_prefixed": ("adjective: ", "adjective"),
    "demo_sentiment": ("", "sentiment"),
    "demo_topic": ("", "topic"),
    "demo_adjective": ("", "adjective"),
}
# Three tasks on the same sentences with different label sets (2, 4 and 24 labels) and no task
# prefix: in multi-task prompt tuning only the task's prompt tells the model what to predict.
MULTITASK_MIXTURE = "demo_multitask_mixture"
MULTITASK_TASKS = ("demo_sentiment", "demo_topic", "demo_adjective")


def register() -> None:
  """Register the demo tasks, `demo_multitask_mixture` and `demo_pretrain_mixture` with seqio
  (idempotent)."""
  for name, (prefix, field) in _TASKS.items():
    if name in seqio.TaskRegistry.names():
      continue
    seqio.TaskRegistry.add(
        name, source=_source(prefix, field),
        preprocessors=[seqio.preprocessors.tokenize, seqio.preprocessors.append_eos],
        output_features=OUTPUT_FEATURES, metric_fns=[metrics.accuracy])
  if "demo_sentiment_rank" not in seqio.TaskRegistry.names():
    # Evaluation only: one row per (sentence, label) scored by the model; seqio's Evaluator
    # gives rank tasks to the score function, and the likelier label is the prediction.
    seqio.TaskRegistry.add(
        "demo_sentiment_rank",
        source=_source("", "sentiment", splits=["validation"]),
        preprocessors=[
            functools.partial(glue.expand_label_candidates, label_names=SENTIMENT_LABELS),
            seqio.preprocessors.tokenize, seqio.preprocessors.append_eos],
        output_features=OUTPUT_FEATURES,
        postprocess_fn=functools.partial(glue.rank_classification_postprocessor,
                                         base_postprocess_fn=lambda s, **_: s),
        metric_fns=[metrics.rank_classification([metrics.accuracy])])
  if MULTITASK_MIXTURE not in seqio.MixtureRegistry.names():
    seqio.MixtureRegistry.add(MULTITASK_MIXTURE, list(MULTITASK_TASKS), default_rate=1.0)
  if "demo_pretrain_mixture" not in seqio.MixtureRegistry.names():
    seqio.MixtureRegistry.add("demo_pretrain_mixture",
                              [name for name in _TASKS if name.endswith("_prefixed")],
                              default_rate=1.0)


register()
