"""seqio Task/Mixture -> batches of `encoder_input_tokens`, `decoder_input_tokens`,
`decoder_target_tokens`, `decoder_loss_weights` (T5X's encoder-decoder features).

The pipeline is deterministic for a given seed, so the data-iterator position saved in a
checkpoint is just the number of batches consumed: resuming skips that many.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib
import logging
import warnings
from typing import Iterator, Mapping, Optional, Sequence

import numpy as np
import seqio

from prompt_jax.data import bucketing, file_tasks

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class DatasetConfig:
  """Which seqio task to read and how (T5X's `utils.DatasetConfig`, trimmed).

  Attributes:
    mixture_or_task_name: a registered seqio Task or Mixture.
    task_feature_lengths: e.g. {'inputs': 512, 'targets': 8}; longer examples are truncated
      (and counted in the log).
    split: dataset split.
    batch_size: global batch size (summed over hosts).
    shuffle: shuffle (training) or keep order (evaluation).
    seed: shuffle seed; fixed so that resuming reproduces the same order.
    module: a module to import first so that its tasks are registered (e.g. 'tasks').
  """

  mixture_or_task_name: str
  task_feature_lengths: Mapping[str, int]
  split: str = "train"
  batch_size: int = 32
  shuffle: bool = True
  seed: Optional[int] = 0
  use_cached: bool = False
  pack: bool = False
  module: Optional[str] = None

  def __post_init__(self):
    if self.batch_size < 1:
      raise ValueError(f"DatasetConfig.batch_size must be >= 1, got {self.batch_size}")
    for key in ("inputs", "targets"):
      if key not in self.task_feature_lengths:
        raise ValueError(f"DatasetConfig.task_feature_lengths needs {key!r}, got "
                         f"{dict(self.task_feature_lengths)}")


def import_task_module(module: Optional[str]) -> None:
  """Import `module` (TASK_MODULE) so that its tasks register; a missing one raises one line."""
  if not module:
    return
  try:
    importlib.import_module(module)
  except ModuleNotFoundError as e:
    if e.name and (module == e.name or module.startswith(e.name + ".")):
      raise ValueError(f"TASK_MODULE {module!r} cannot be imported: no module named "
                       f"{e.name!r}") from e
    raise


def closest_names(name: str, known, n: int = 5) -> list[str]:
  """Up to `n` of `known` nearest to `name`: the similar ones (difflib) and those containing it;
  when none is similar, the 3 least dissimilar, so that some names are always given."""
  known = sorted(set(known))
  close = difflib.get_close_matches(name, known, n=n, cutoff=0.4)
  containing = [k for k in known if name and name.lower() in k.lower()]
  if not close and not containing:
    close = difflib.get_close_matches(name, known, n=min(n, 3), cutoff=0.0)
  return list(dict.fromkeys(close + containing))[:n]


def host_only_tensorflow() -> None:
  """Hide the GPUs from TensorFlow, which only runs the input pipeline on the host, so that it
  allocates no accelerator memory beside JAX. Idempotent: a no-op once no GPU is visible to it.
  When TensorFlow has already initialised its GPUs it is too late: a warning (once) says so."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  if not tf.config.get_visible_devices("GPU"):
    return
  try:
    tf.config.set_visible_devices([], "GPU")
  except RuntimeError as e:
    warnings.warn(f"TensorFlow initialised its GPUs before the input pipeline could hide them, "
                  f"so it may use GPU memory beside JAX: {e}", RuntimeWarning, stacklevel=2)


def get_task_or_mixture(name: str, module: Optional[str] = None):
  """The registered seqio Task or Mixture called `name`; unknown names list the closest ones.

  Every input pipeline (`get_dataset`, `count_truncated`, evaluation's and inference's datasets)
  starts here, so this is where TensorFlow is kept off the accelerators (`host_only_tensorflow`)
  and where a `file:` spec (`file_tasks`; several joined by ';' make a mixture) registers the
  task over the user's files.
  """
  host_only_tensorflow()
  import_task_module(module)
  if not isinstance(name, str) or not name:
    raise ValueError(f"MIXTURE_OR_TASK_NAME must be a task or mixture name, got {name!r}")
  if file_tasks.is_file_spec(name):
    return file_tasks.get_or_register(name)
  try:
    return seqio.get_mixture_or_task(name)
  except ValueError:
    known = {k for k in (*seqio.TaskRegistry.names(), *seqio.MixtureRegistry.names())
             if not file_tasks.is_file_spec(k)}  # not the specs entered as aliases
    if not known:
      raise ValueError(f"unknown seqio task or mixture {name!r}; none is registered (TASK_MODULE "
                       f"{module!r} should register it)") from None
    raise ValueError(f"unknown seqio task or mixture {name!r}; closest: "
                     f"{', '.join(closest_names(name, known))}") from None


def _tasks_of(provider) -> list:
  """The tasks of a Task (itself) or of a Mixture (all its sub-tasks)."""
  return list(getattr(provider, "tasks", [provider]))


def check_vocabulary(dataset_cfg: DatasetConfig, vocab_size: int) -> int:
  """Raise ValueError when a feature vocabulary of `dataset_cfg`'s task (every task of a mixture)
  has more ids than the model's `vocab_size` embedding rows (the embedding lookup would clip or
  misread the extra ids silently); returns the largest vocabulary size."""
  if isinstance(vocab_size, bool) or not isinstance(vocab_size, (int, np.integer)) or (
      vocab_size < 1):
    raise ValueError(f"the model's vocab_size must be a positive integer, got {vocab_size!r}")
  provider = get_task_or_mixture(dataset_cfg.mixture_or_task_name, dataset_cfg.module)
  largest = 0
  for task in _tasks_of(provider):
    for key in ("inputs", "targets"):
      feature = task.output_features.get(key)
      if feature is None:
        continue
      size = int(feature.vocabulary.vocab_size)
      largest = max(largest, size)
      if size > vocab_size:
        raise ValueError(f"task {task.name!r}: its {key!r} vocabulary "
                         f"({type(feature.vocabulary).__name__}) has {size} ids but the model's "
                         f"embedding has {vocab_size} rows (T5Config.vocab_size)")
  return largest


TRUNCATION_SAMPLE = 1000


def count_truncated(cfg: DatasetConfig, *, shard_id: int = 0, num_shards: int = 1,
                    sample: int = TRUNCATION_SAMPLE) -> dict[str, dict[str, int]]:
  """Per task and feature, how many of the first `sample` examples of `cfg.split` (this host's
  shard, unshuffled) are longer than `cfg.task_feature_lengths`, i.e. get truncated. Non-zero
  counts are logged as warnings, as `evaluators.count_truncated` does for evaluation.

  The examples are read untrimmed; where a preprocessor trims by itself
  (`append_eos_after_trim`), examples that reach the length exactly are re-encoded from their
  `<feature>_pretokenized` text."""
  provider = get_task_or_mixture(cfg.mixture_or_task_name, cfg.module)
  counts = {}
  for task in _tasks_of(provider):
    if cfg.split not in task.splits:
      continue
    ds = task.get_dataset(sequence_length=dict(cfg.task_feature_lengths), split=cfg.split,
                          use_cached=cfg.use_cached, shuffle=False, num_epochs=1,
                          shard_info=seqio.ShardInfo(shard_id, num_shards), seed=cfg.seed,
                          trim_output_features=False)
    over = {k: 0 for k in cfg.task_feature_lengths}
    seen = 0
    for ex in ds.take(sample).as_numpy_iterator():
      seen += 1
      for key, length in cfg.task_feature_lengths.items():
        if key not in ex:
          continue
        n = len(ex[key])
        text = ex.get(f"{key}_pretokenized")
        if n == length and isinstance(text, bytes) and key in task.output_features:
          feature = task.output_features[key]
          n = len(feature.vocabulary.encode(text.decode("utf-8"))) + int(feature.add_eos)
        over[key] += n > length
    for key, n in over.items():
      if n:
        log.warning("%s: %d of the first %d %r examples have %r longer than %d tokens; they are "
                    "truncated", task.name, n, seen, cfg.split, key, cfg.task_feature_lengths[key])
    counts[task.name] = over
  return counts


def get_dataset(cfg: DatasetConfig, *, shard_id: int = 0, num_shards: int = 1,
                num_epochs: Optional[int] = None, drop_remainder: bool = True):
  """A tf.data.Dataset of per-host batches in the encoder-decoder feature layout."""
  get_task_or_mixture(cfg.mixture_or_task_name, cfg.module)
  if cfg.batch_size % num_shards:
    raise ValueError(f"batch_size {cfg.batch_size} is not divisible by {num_shards} hosts")
  count_truncated(cfg, shard_id=shard_id, num_shards=num_shards)
  ds = seqio.get_dataset(
      cfg.mixture_or_task_name, task_feature_lengths=dict(cfg.task_feature_lengths),
      dataset_split=cfg.split, shuffle=cfg.shuffle, num_epochs=num_epochs,
      feature_converter=seqio.EncDecFeatureConverter(pack=cfg.pack),
      shard_info=seqio.ShardInfo(shard_id, num_shards), use_cached=cfg.use_cached,
      seed=cfg.seed, verbose=False)
  return ds.batch(cfg.batch_size // num_shards, drop_remainder=drop_remainder)


def iterate_batches(cfg: DatasetConfig, *, start_step: int = 0, shard_id: int = 0,
                    num_shards: int = 1) -> Iterator[dict[str, np.ndarray]]:
  """Endless training batches, skipping the first `start_step` (the resume position)."""
  ds = get_dataset(cfg, shard_id=shard_id, num_shards=num_shards, num_epochs=None)
  if start_step:
    ds = ds.skip(start_step)
  for batch in ds.as_numpy_iterator():
    yield {k: v.astype(np.int32) for k, v in batch.items()}


def pad_batch(batch: Mapping[str, np.ndarray], batch_size: int):
  """Pad a final short batch with all-zero rows; returns (batch, number of real rows)."""
  n = len(next(iter(batch.values())))
  if n == batch_size:
    return dict(batch), n
  return {k: np.concatenate([v, np.zeros((batch_size - n,) + v.shape[1:], v.dtype)])
          for k, v in batch.items()}, n


def iterate_bucketed_batches(cfg: DatasetConfig, buckets: Sequence[int], *, start_step: int = 0,
                             shard_id: int = 0, num_shards: int = 1,
                             keys: Optional[Sequence[str]] = None
                             ) -> Iterator[dict[str, np.ndarray]]:
  """Endless training batches of `cfg`, each padded to the smallest of `buckets` that holds its
  longest example (`bucketing.bucket_by_length`); skips `start_step` batches.

  The largest bucket should be the task's input length (longer inputs are truncated to it)."""
  if max(buckets) > cfg.task_feature_lengths["inputs"]:
    raise ValueError(f"largest length bucket {max(buckets)} exceeds the input length "
                     f"{cfg.task_feature_lengths['inputs']}")
  if cfg.batch_size % num_shards:
    raise ValueError(f"batch_size {cfg.batch_size} is not divisible by {num_shards} hosts")
  ds = get_dataset(cfg, shard_id=shard_id, num_shards=num_shards, num_epochs=None)
  examples = ds.unbatch().as_numpy_iterator()
  batches = bucketing.bucket_by_length(examples, cfg.batch_size // num_shards, buckets,
                             keys=bucketing.ENCODER_KEYS if keys is None else keys)
  for step, batch in enumerate(batches):
    if step >= start_step:
      yield {k: v.astype(np.int32) for k, v in batch.items()}
