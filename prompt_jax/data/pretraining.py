"""T5's pre-training objectives on an offline English corpus, for mini frozen models.

Two objectives, as in Lester et al. (2021) Sec. 3.2:
  * span corruption (Raffel et al.): 15% of the tokens, in spans of mean length 3, are replaced
    in the inputs by sentinel ids; the targets list each sentinel followed by the tokens it hid;
  * prefix-LM ("LM adaptation"): the inputs are a text prefix, the targets its continuation.

Vocabulary: bytes (`seqio.ByteVocabulary`: 0 pad, 1 eos, 2 unk, 3..258 the 256 bytes) inside a
model vocabulary of 384 rows. Ids 259..383 are free, so they serve as the 125 sentinels, counted
from the top as in T5: sentinel k (k = 0, 1, ...) is id `vocab_size - 1 - k` (383, 382, ...).

Corpus: CPython's bundled help texts (`pydoc_data.topics`, ~465,000 characters of English
technical prose, Python Software Foundation License), present wherever Python is, so nothing is
downloaded. Its 79 topics are split 95% train / 5% validation by position.

Tasks (registered on import): `pretrain_span_corruption_bytes`, `pretrain_prefix_lm_bytes`.
"""

from __future__ import annotations

import functools

import numpy as np
import seqio
import tensorflow as tf

VOCABULARY = seqio.ByteVocabulary()
MODEL_VOCAB_SIZE = 384
BYTE_OFFSET = 3  # ByteVocabulary: id = byte + 3
NOISE_DENSITY = 0.15
MEAN_NOISE_SPAN_LENGTH = 3.0
# Raw text chunk lengths (tokens). Span corruption of 112 tokens gives at most
# 112 - 17 + 6 = 101 input and 17 + 7 = 24 target tokens (+ EOS): fits {'inputs': 128,
# 'targets': 32}. Prefix-LM chunks of 128 tokens are split so that the targets have 8..31 tokens.
SPAN_CORRUPTION_CHUNK = 112
PREFIX_LM_CHUNK = 128
PREFIX_LM_MAX_TARGETS = 31
PREFIX_LM_MIN_TARGETS = 8
FEATURE_LENGTHS = {"inputs": 128, "targets": 32}
PASSES = 4  # the corpus is cut 4 times at shifted offsets with fresh noise: 4x more examples


def sentinel_id(k: int, vocab_size: int = MODEL_VOCAB_SIZE) -> int:
  """Id of the k-th sentinel (0-based), counted down from the top of the vocabulary."""
  return vocab_size - 1 - k


def _random_segmentation(num_items: int, num_segments: int,
                         rng: np.random.Generator) -> np.ndarray:
  """Lengths (each >= 1, summing to num_items) of a uniformly random split into segments."""
  cuts = np.sort(rng.choice(np.arange(1, num_items), num_segments - 1, replace=False))
  return np.diff(np.concatenate([[0], cuts, [num_items]]))


def random_spans_noise_mask(length: int, rng: np.random.Generator,
                            noise_density: float = NOISE_DENSITY,
                            mean_noise_span_length: float = MEAN_NOISE_SPAN_LENGTH) -> np.ndarray:
  """T5's noise mask [length] (bool): round(length * density) noise tokens in
  round(noise / mean_span) spans; the sequence starts with a non-noise span."""
  if length < 2:
    raise ValueError(f"span corruption needs a length >= 2, got {length}")
  num_noise = int(np.clip(round(length * noise_density), 1, length - 1))
  num_spans = max(1, int(round(num_noise / mean_noise_span_length)))
  num_spans = min(num_spans, num_noise, length - num_noise)
  noise_lengths = _random_segmentation(num_noise, num_spans, rng)
  nonnoise_lengths = _random_segmentation(length - num_noise, num_spans, rng)
  mask = np.zeros(length, bool)
  position = 0
  for keep, drop in zip(nonnoise_lengths, noise_lengths):
    position += keep
    mask[position:position + drop] = True
    position += drop
  return mask


def noise_span_to_unique_sentinel(tokens: np.ndarray, noise_mask: np.ndarray,
                                  vocab_size: int = MODEL_VOCAB_SIZE) -> np.ndarray:
  """Replace each run of masked tokens by one sentinel (the k-th run by `sentinel_id(k)`)."""
  tokens, noise_mask = np.asarray(tokens), np.asarray(noise_mask, bool)
  if tokens.shape != noise_mask.shape:
    raise ValueError(f"tokens {tokens.shape} and noise_mask {noise_mask.shape} differ in shape")
  out, k = [], 0
  for i, (token, noise) in enumerate(zip(tokens, noise_mask)):
    if not noise:
      out.append(int(token))
    elif i == 0 or not noise_mask[i - 1]:
      out.append(sentinel_id(k, vocab_size))
      k += 1
  return np.asarray(out, np.int32)


def span_corruption(tokens: np.ndarray, noise_mask: np.ndarray,
                    vocab_size: int = MODEL_VOCAB_SIZE) -> tuple[np.ndarray, np.ndarray]:
  """(inputs, targets) of T5's span corruption for a given noise mask (no EOS).

  E.g. tokens [a b c d e f g], mask [0 0 1 1 0 1 0] -> inputs [a b S0 e S1 g],
  targets [S0 c d S1 f S2] (S_k = sentinel_id(k)).
  """
  noise_mask = np.asarray(noise_mask, bool)
  return (noise_span_to_unique_sentinel(tokens, noise_mask, vocab_size),
          noise_span_to_unique_sentinel(tokens, ~noise_mask, vocab_size))


def prefix_lm_split(tokens: np.ndarray, split_point: int) -> tuple[np.ndarray, np.ndarray]:
  """(inputs, targets) = (tokens[:split_point], tokens[split_point:]) for 0 < split < len."""
  tokens = np.asarray(tokens, np.int32)
  if not 0 < split_point < len(tokens):
    raise ValueError(f"prefix-LM split_point must be in [1, {len(tokens) - 1}], got "
                     f"{split_point}")
  return tokens[:split_point], tokens[split_point:]


@functools.cache
def corpus_tokens(split: str) -> np.ndarray:
  """The corpus as byte-vocabulary ids (int32): 'train' (95%) or 'validation' (5%)."""
  if split not in ("train", "validation"):
    raise ValueError(f"pretraining corpus split must be 'train' or 'validation', got {split!r}")
  import pydoc_data.topics  # pylint: disable=g-import-not-at-top
  texts = [pydoc_data.topics.topics[k] for k in sorted(pydoc_data.topics.topics)]
  text = "\n\n".join(" ".join(t.split()) for t in texts)  # collapse indentation runs
  data = np.frombuffer(text.encode("utf-8"), np.uint8).astype(np.int32) + BYTE_OFFSET
  cut = int(len(data) * 0.95)
  return data[:cut] if split == "train" else data[cut:]


def _chunks(tokens: np.ndarray, length: int, offset: int):
  for start in range(offset, len(tokens) - length + 1, length):
    yield tokens[start:start + length]


def span_corruption_examples(split: str, seed: int = 0):
  """Yields {'inputs', 'targets'} (int32, no EOS) of span-corrupted corpus chunks."""
  tokens = corpus_tokens(split)
  rng = np.random.default_rng([seed, 0 if split == "train" else 1])
  for p in range(PASSES if split == "train" else 1):
    for chunk in _chunks(tokens, SPAN_CORRUPTION_CHUNK, p * SPAN_CORRUPTION_CHUNK // PASSES):
      inputs, targets = span_corruption(chunk, random_spans_noise_mask(len(chunk), rng))
      yield {"inputs": inputs, "targets": targets}


def prefix_lm_examples(split: str, seed: int = 0):
  """Yields {'inputs', 'targets'} (int32, no EOS): a corpus chunk split at a random point."""
  tokens = corpus_tokens(split)
  rng = np.random.default_rng([seed, 2 if split == "train" else 3])
  for p in range(PASSES if split == "train" else 1):
    for chunk in _chunks(tokens, PREFIX_LM_CHUNK, p * PREFIX_LM_CHUNK // PASSES):
      split_point = len(chunk) - int(rng.integers(PREFIX_LM_MIN_TARGETS,
                                                  PREFIX_LM_MAX_TARGETS + 1))
      inputs, targets = prefix_lm_split(chunk, split_point)
      yield {"inputs": inputs, "targets": targets}


def _source(example_fn) -> seqio.FunctionDataSource:
  def dataset_fn(split, shuffle_files, seed=None):
    del shuffle_files, seed  # deterministic; seqio shuffles the examples
    spec = {"inputs": tf.TensorSpec([None], tf.int32), "targets": tf.TensorSpec([None], tf.int32)}
    return tf.data.Dataset.from_generator(lambda: example_fn(split), output_signature=spec)
  return seqio.FunctionDataSource(dataset_fn, splits=["train", "validation"])


OUTPUT_FEATURES = {
    "inputs": seqio.Feature(VOCABULARY, add_eos=True),
    "targets": seqio.Feature(VOCABULARY, add_eos=True),
}
TASKS = {
    "pretrain_span_corruption_bytes": span_corruption_examples,
    "pretrain_prefix_lm_bytes": prefix_lm_examples,
}


def register() -> None:
  """Register the two pre-training tasks with seqio (idempotent)."""
  for name, example_fn in TASKS.items():
    if name not in seqio.TaskRegistry.names():
      seqio.TaskRegistry.add(name, source=_source(example_fn),
                             preprocessors=[seqio.preprocessors.append_eos],
                             output_features=OUTPUT_FEATURES, metric_fns=[])


register()
