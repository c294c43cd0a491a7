"""Training regimes: what differs between prompt tuning, SPT's gate search and pretraining.

The loop (`trainer.run`) owns everything regimes share: MODEL_DIR and its lock, the data
position, checkpoints and resume, the on-device NaN/inf check, metrics, evaluation scheduling,
prompt exports and preemption. A regime supplies only what is its own:

  programs                   the `PromptPrograms` (frozen loading, batch sharding, evaluation,
                             prediction, prompt export)
  abstract_state()           ShapeDtypeStructs (with shardings) of its training state
  init_state(frozen, rng)    a fresh training state
  step_fn(state, frozen_params, inputs, rng) -> (state, metrics)
                             one jitted step; `metrics` hold at least `loss`, `all_finite` and
                             `prompt_finite` (device scalars the loop checks before any save)
  batches(start_step, shard_id, num_shards)
                             host inputs of `step_fn`, one per step, from the `start_step`th on
  shard(inputs)              host inputs -> device inputs
  prompt_params(state)       the trainable parameters in the programs' layout
  settings                   a JSON-able dict stored with every checkpoint; resuming a
                             MODEL_DIR written with other settings is an error

`PromptTuning` is plain prompt tuning (and every method that is a model hook: banks, deep
prompts, SuperPos, residual, P-tuning, hard SPT re-training, full-model pretraining with a
trainable pattern that matches everything). `spt_training.SptSearch` is the gate search.
"""

from __future__ import annotations

from typing import Any, Callable, Iterator, Mapping, Optional, Protocol, Sequence

import jax
import numpy as np

from prompt_jax.data import pipeline
from prompt_jax.programs import PromptPrograms, TrainState

Array = jax.Array


class Regime(Protocol):
  """The interface `trainer.run` trains through (see the module docstring)."""

  programs: PromptPrograms
  settings: Mapping[str, Any]

  def abstract_state(self) -> Any: ...

  def init_state(self, frozen_params, rng: Array) -> Any: ...

  def step_fn(self, state, frozen_params, inputs, rng: Array) -> tuple[Any, Mapping]: ...

  def batches(self, start_step: int, shard_id: int, num_shards: int) -> Iterator[Any]: ...

  def shard(self, inputs) -> Any: ...

  def prompt_params(self, state) -> Any: ...


class PromptTuning:
  """One optimizer over the trainable parameters; batches from one dataset.

  Args:
    programs: `PromptPrograms` built with an optimizer.
    dataset_cfg: the training data (`batch_size` is the global batch).
    batch_transforms: callables mapping each host-local numpy batch, in order (e.g.
      `ensemble.ReplicateAcrossPrompts()` then `bucketing.trim_to_bucket`: they compose).
    initial_params: start the trainable parameters from these (a tree like
      `programs.abstract_prompt`) instead of their initialisers, e.g. the second phase of
      pretraining or a prompt transferred from another task.
    settings: stored with every checkpoint and compared on resume.
  """

  def __init__(self, programs: PromptPrograms, dataset_cfg: pipeline.DatasetConfig,
               batch_transforms: Sequence[Callable[[dict], dict]] = (),
               initial_params: Optional[Any] = None,
               settings: Optional[Mapping[str, Any]] = None):
    if programs.train_step_fn is None:
      raise ValueError("PromptTuning needs PromptPrograms built with an optimizer")
    for transform in batch_transforms:
      if not callable(transform):
        raise ValueError(f"batch_transforms must be callables, got {transform!r}")
    self.programs = programs
    self.dataset_cfg = dataset_cfg
    self.batch_transforms = tuple(batch_transforms)
    self.initial_params = initial_params
    self.settings = dict(settings or {})
    self.step_fn = programs.train_step_fn
    self.shard = programs.shard_batch
    self.abstract_state = programs.abstract_state

  def init_state(self, frozen_params, rng: Array) -> TrainState:
    if self.initial_params is None:
      return self.programs.init_state(frozen_params, rng)
    return self.programs.state_from_prompt(self.initial_params)

  def batches(self, start_step: int, shard_id: int, num_shards: int
              ) -> Iterator[dict[str, np.ndarray]]:
    batches = pipeline.iterate_batches(self.dataset_cfg, start_step=start_step,
                                       shard_id=shard_id, num_shards=num_shards)
    for transform in self.batch_transforms:
      batches = map(transform, batches)
    return batches

  def prompt_params(self, state: TrainState):
    return state.prompt_params
