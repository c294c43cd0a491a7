"""The compiled programs of a prompt-tuned model, separate from whoever runs them.

`PromptPrograms(model, partitioner)` splits the parameter tree once into `prompt_params`
(trainable) and `frozen_params` (an ordinary, non-donated argument of every program: never
differentiated, never in an optimizer state, never copied or saved), and holds one jitted
function per program, each with explicit in/out shardings and lowerable for ahead-of-time plans:

  train_step_fn(state, frozen_params, batch, rng) -> (state, metrics)   (needs an optimizer)
  eval_step_fn(prompt_params, frozen_params, batch) -> metrics
  score_fn(prompt_params, frozen_params, batch) -> [batch] target log-likelihoods
  predict_fn(prompt_params, frozen_params, batch, max_decode_length, decoding)
      -> (tokens [batch, decodes, length], scores [batch, decodes])   (`decoding.Greedy()`,
      `BeamSearch(...)`, `TemperatureSampling(...)`; best decode first)

Each jitted function is the one cache of its program (jax caches one executable per argument
shape). The methods without `_fn` take host-local numpy batches, shard them over the data axis
and return numpy where the result is for the host. Evaluation, serving, inference, `plan` and
the benchmarks use these without a training optimizer or a dataset; the training loop uses them
with one.
"""

from __future__ import annotations

import logging
from typing import Any, Mapping, Optional

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax

from prompt_jax import params as params_lib
from prompt_jax.models import decoding as decoding_lib
from prompt_jax.models.encoder_decoder import EncoderDecoderModel
from prompt_jax.partitioning import Partitioner
from prompt_jax.prompts import base as prompts_base
from prompt_jax.storage import frozen_models

log = logging.getLogger(__name__)

Array = jax.Array

# The model's own features of a predict / score batch; the prompt hook's (`input_features`, e.g.
# a bank's `prompt_ids`) are added from the model (`EncoderDecoderModel.prompt_feature_names`).
PREDICT_KEYS = ("encoder_input_tokens",)
SCORE_KEYS = ("encoder_input_tokens", "decoder_input_tokens", "decoder_target_tokens",
              "decoder_loss_weights")


@flax.struct.dataclass
class TrainState:
  """Everything that trains: the step, the prompt parameters and their optimizer state."""

  step: Array
  prompt_params: Any
  opt_state: Any


def _frozen_dtype(frozen_dtype: Optional[str]):
  try:
    dtype = None if frozen_dtype is None else jnp.dtype(frozen_dtype)
  except TypeError as e:
    raise ValueError(f"frozen_dtype must be a floating dtype name such as 'bfloat16' or None, "
                     f"got {frozen_dtype!r}") from e
  if dtype is not None and not jnp.issubdtype(dtype, jnp.floating):
    raise ValueError(f"frozen_dtype must be a floating dtype, got {frozen_dtype!r}")
  return dtype


class PromptPrograms:
  """The sharded, jitted programs of one model on one mesh.

  Args:
    model: the `EncoderDecoderModel` (frozen T5 plus prompt hook).
    partitioner: mesh and logical axis rules.
    optimizer: an optax transformation of the trainable parameters; only `train_step`,
      `init_state` and `abstract_state` need it.
    trainable_pattern: regex over '/'-joined parameter paths selecting the trainable leaves.
    frozen_dtype: store the frozen parameters in this dtype (e.g. 'bfloat16', cast once when
      they are loaded); None keeps float32. The prompt and its optimizer state stay float32.
    batch_size, input_length, target_length: the batch shape the model is traced with to find
      its parameters (`dummy_batch`; parameter shapes do not depend on it, a real input length
      checks the encoder budget early). With an optimizer it is the global training batch, which
      must divide over the data axis.
  """

  def __init__(self, model: EncoderDecoderModel, partitioner: Optional[Partitioner] = None,
               optimizer: Optional[optax.GradientTransformation] = None,
               trainable_pattern: str = params_lib.DEFAULT_TRAINABLE_PATTERN,
               frozen_dtype: Optional[str] = None, *, batch_size: int = 1, input_length: int = 8,
               target_length: int = 8):
    self.model = model
    partitioner = partitioner or Partitioner()
    if optimizer is not None:  # the training batch splits evenly over the data axis
      partitioner = partitioner.fit_batch(batch_size)
    self.partitioner = partitioner
    self.batch_size = batch_size
    self.optimizer = optimizer
    self.trainable_pattern = trainable_pattern
    self.frozen_dtype = _frozen_dtype(frozen_dtype)
    self.dummy_batch = model.dummy_batch(batch_size, input_length, target_length)
    with partitioner.axis_rules():
      boxed = model.init_abstract(self.dummy_batch)
    boxed_trainable, boxed_frozen = params_lib.split_params(boxed, trainable_pattern)
    if not jax.tree_util.tree_leaves(boxed_trainable):
      raise ValueError(f"no parameter matches the trainable pattern {trainable_pattern!r}; "
                       "is a prompt configured?")
    self.abstract_frozen = params_lib.unbox(boxed_frozen)  # float32, as checkpoints store them
    self.abstract_prompt = params_lib.unbox(boxed_trainable)
    self.frozen_shardings = partitioner.shardings_for(boxed_frozen)
    self.prompt_shardings = partitioner.shardings_for(boxed_trainable)
    replicated = partitioner.replicated()
    params_in = (self.prompt_shardings, self.frozen_shardings, None)
    self.eval_step_fn = jax.jit(self._eval_step_impl, in_shardings=params_in,
                                out_shardings=replicated)
    self.score_fn = jax.jit(self._score_impl, in_shardings=params_in, out_shardings=replicated)
    self.predict_fn = jax.jit(self._predict_impl, in_shardings=params_in,
                              out_shardings=replicated, static_argnums=(3, 4))
    self.state_shardings = self.train_step_fn = None
    if optimizer is not None:
      abstract_opt = jax.eval_shape(optimizer.init, self.abstract_prompt)
      self.state_shardings = TrainState(
          step=replicated, prompt_params=self.prompt_shardings,
          opt_state=jax.tree_util.tree_map(lambda _: replicated, abstract_opt))
      self.train_step_fn = jax.jit(
          self._train_step_impl,
          in_shardings=(self.state_shardings, self.frozen_shardings, None, replicated),
          out_shardings=(self.state_shardings, replicated), donate_argnums=(0,))

  @classmethod
  def for_training(cls, model: EncoderDecoderModel, optimizer: optax.GradientTransformation,
                   partitioner: Optional[Partitioner], input_length: int, target_length: int,
                   batch_size: int,
                   trainable_pattern: str = params_lib.DEFAULT_TRAINABLE_PATTERN,
                   frozen_dtype: Optional[str] = None) -> PromptPrograms:
    """The programs of a training run on a global batch of `batch_size` rows of
    [input_length] / [target_length] tokens (the model is traced with that shape, so the
    encoder length budget is checked before anything is loaded)."""
    return cls(model, partitioner, optimizer, trainable_pattern, frozen_dtype,
               batch_size=batch_size, input_length=input_length, target_length=target_length)

  # ------------------------------------------------------------------------------ parameters

  def param_counts(self) -> dict[str, int]:
    return {"frozen": params_lib.count(self.abstract_frozen),
            "trainable": params_lib.count(self.abstract_prompt)}

  def random_frozen_params(self, rng: Array):
    """Randomly initialised frozen parameters, created directly in their shardings."""
    def init(rng):
      with self.partitioner.axis_rules():
        boxed = self.model.init(rng, self.dummy_batch)
      frozen = params_lib.unbox(params_lib.split_params(boxed, self.trainable_pattern)[1])
      return self.cast_frozen(frozen)
    return jax.jit(init, out_shardings=self.frozen_shardings)(rng)

  def cast_frozen(self, frozen_params):
    """Floating leaves -> `frozen_dtype` (identity when it is None); works on numpy and jax."""
    if self.frozen_dtype is None:
      return frozen_params
    return jax.tree_util.tree_map(
        lambda x: x.astype(self.frozen_dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x,
        frozen_params)

  def frozen_structs(self):
    """ShapeDtypeStructs of the frozen parameters as the programs see them (dtype, sharding)."""
    def struct(s, sharding):
      floating = jnp.issubdtype(s.dtype, jnp.floating)
      dtype = self.frozen_dtype if floating and self.frozen_dtype is not None else s.dtype
      return jax.ShapeDtypeStruct(s.shape, dtype, sharding=sharding)
    return jax.tree_util.tree_map(struct, self.abstract_frozen, self.frozen_shardings)

  def prompt_structs(self):
    """ShapeDtypeStructs (with shardings) of the prompt parameters."""
    return jax.tree_util.tree_map(
        lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), self.abstract_prompt,
        self.prompt_shardings)

  def load_frozen_params(self, path: str):
    """Frozen parameters from a checkpoint path, checked against the config and sharded."""
    loaded = frozen_models.load_frozen_params(path, self.model.config, self.frozen_structs(),
                                            self.partitioner)
    return frozen_models.device_put_tree(self.cast_frozen(loaded), self.frozen_shardings)

  def frozen_params(self, path: Optional[str], rng: Array, *, random_ok: bool,
                    hint: str = "set INITIAL_CHECKPOINT_PATH") -> Any:
    """The frozen parameters: loaded from `path` (`load_frozen_params`); with no path,
    randomly initialised when `random_ok` (a warning says so when the model has frozen
    parameters), else a ValueError ending with `hint`."""
    if path:
      return self.load_frozen_params(path)
    if not random_ok:
      raise ValueError(f"no frozen checkpoint: {hint}")
    if params_lib.count(self.abstract_frozen):
      log.warning("no frozen checkpoint (INITIAL_CHECKPOINT_PATH is not set): the frozen model "
                  "is randomly initialised")
    return self.random_frozen_params(rng)

  def init_prompt(self, frozen_params, rng: Array):
    """A freshly initialised prompt (its initialiser sees the frozen embedding), float32."""
    def init(frozen_params, rng):
      with self.partitioner.axis_rules():
        full = self.model.init_missing(rng, frozen_params, self.dummy_batch)
      prompt = params_lib.unbox(params_lib.split_params(full, self.trainable_pattern)[0])
      # Initialisers reading a bf16 embedding table would give a bf16 prompt; it trains in fp32.
      return jax.tree_util.tree_map(
          lambda x: x.astype(jnp.float32) if jnp.issubdtype(x.dtype, jnp.floating) else x,
          prompt)
    return jax.jit(init, in_shardings=(self.frozen_shardings, self.partitioner.replicated()),
                   out_shardings=self.prompt_shardings)(frozen_params, rng)

  # --------------------------------------------------------------------------- training state

  def _need_optimizer(self, what: str):
    if self.optimizer is None:
      raise ValueError(f"{what} needs an optimizer; construct PromptPrograms(optimizer=...)")

  def init_state(self, frozen_params, rng: Array) -> TrainState:
    """Fresh prompt and optimizer state."""
    self._need_optimizer("init_state")
    return self.state_from_prompt(self.init_prompt(frozen_params, rng))

  def state_from_prompt(self, prompt_params) -> TrainState:
    """Step 0 and a fresh optimizer state for the given trainable parameters (a tree with the
    structure and shapes of `abstract_prompt`: e.g. a trained prompt to continue from)."""
    self._need_optimizer("state_from_prompt")
    params_lib.check_same_shapes(prompt_params, self.abstract_prompt, "initial parameters")
    def init(prompt):
      prompt = jax.tree_util.tree_map(lambda x, s: x.astype(s.dtype), prompt,
                                      self.abstract_prompt)
      return TrainState(step=jnp.array(0, jnp.int32), prompt_params=prompt,
                        opt_state=self.optimizer.init(prompt))
    return jax.jit(init, in_shardings=(self.prompt_shardings,),
                   out_shardings=self.state_shardings)(prompt_params)

  def abstract_state(self) -> TrainState:
    """ShapeDtypeStructs (with shardings) of the state, for restoring a checkpoint."""
    self._need_optimizer("abstract_state")
    shapes = jax.eval_shape(
        lambda p: TrainState(step=jnp.array(0, jnp.int32), prompt_params=p,
                             opt_state=self.optimizer.init(p)), self.abstract_prompt)
    return jax.tree_util.tree_map(
        lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes,
        self.state_shardings)

  # -------------------------------------------------------------------------------- programs

  def _loss(self, prompt_params, frozen_params, batch, dropout_rng):
    params = params_lib.merge_params(prompt_params, frozen_params)
    with self.partitioner.axis_rules():
      return self.model.loss_fn(params, batch, dropout_rng)

  def _train_step_impl(self, state: TrainState, frozen_params, batch, rng):
    dropout_rng = jax.random.fold_in(rng, state.step)
    grad_fn = jax.value_and_grad(self._loss, has_aux=True)
    (_, metrics), grads = grad_fn(state.prompt_params, frozen_params, batch, dropout_rng)
    updates, opt_state = self.optimizer.update(grads, state.opt_state, state.prompt_params)
    prompt_params = optax.apply_updates(state.prompt_params, updates)
    # Checked on the device: the loss before the update and the prompt after it. A finite loss
    # with an update that overflows the prompt must not be saved as "good".
    prompt_finite = params_lib.tree_all_finite(prompt_params)
    metrics = dict(metrics, grad_norm=optax.global_norm(grads), prompt_finite=prompt_finite,
                   all_finite=jnp.isfinite(metrics["loss"]) & prompt_finite)
    return TrainState(step=state.step + 1, prompt_params=prompt_params,
                      opt_state=opt_state), metrics

  def _eval_step_impl(self, prompt_params, frozen_params, batch):
    return self._loss(prompt_params, frozen_params, batch, None)[1]

  def _score_impl(self, prompt_params, frozen_params, batch):
    params = params_lib.merge_params(prompt_params, frozen_params)
    with self.partitioner.axis_rules():
      return self.model.score_batch(params, batch)

  def _predict_impl(self, prompt_params, frozen_params, batch, max_decode_length: int,
                    decoding=None):
    """-> (tokens [b, n, max_decode_length], scores [b, n]), best first
    (`prompt_jax.models.decoding`; `decoding` None is greedy, n = 1)."""
    params = params_lib.merge_params(prompt_params, frozen_params)
    with self.partitioner.axis_rules():
      return decoding_lib.resolve(decoding)(self.model, params, batch, max_decode_length)

  # ------------------------------------------------------------- host batches in, numpy out

  def shard_batch(self, batch: Mapping[str, np.ndarray]) -> dict[str, Array]:
    """Host-local numpy batch -> global arrays split over the data axis."""
    return {k: jax.make_array_from_process_local_data(
        self.partitioner.data_sharding(np.ndim(v)), np.asarray(v)) for k, v in batch.items()}

  def _pad_rows(self, batch: Mapping[str, np.ndarray]) -> tuple[dict[str, np.ndarray], int]:
    """(batch with all-zero rows appended up to a multiple of this host's data shards, its
    real row count): serving computes every row on its own, so the padding rows' outputs are
    dropped and change no other row."""
    arrays = {k: np.asarray(v) for k, v in batch.items()}
    rows = len(next(iter(arrays.values())))
    shards = max(1, self.partitioner.data_parallel_size // jax.process_count())
    missing = -rows % shards
    if missing:
      arrays = {k: np.concatenate([v, np.zeros((missing, *v.shape[1:]), v.dtype)])
                for k, v in arrays.items()}
    return arrays, rows

  def train_step(self, state: TrainState, frozen_params, batch: Mapping[str, np.ndarray],
                 rng: Array):
    """One training step on a host batch -> (state, metrics on the device)."""
    self._need_optimizer("train_step")
    return self.train_step_fn(state, frozen_params, self.shard_batch(batch), rng)

  def eval_step(self, prompt_params, frozen_params, batch: Mapping[str, np.ndarray]):
    """Loss metrics of a host batch (on the device)."""
    return self.eval_step_fn(prompt_params, frozen_params, self.shard_batch(batch))

  def predict(self, prompt_params, frozen_params, batch: Mapping[str, np.ndarray],
              max_decode_length: int, decoding=None, *, return_scores: bool = False):
    """Decoding of a host batch with `decoding` (`prompt_jax.models.decoding.Greedy()` when None,
    `BeamSearch(...)`, `TemperatureSampling(...)`) -> the best decode's token ids
    [batch, max_decode_length]; with `return_scores`, (all decodes [batch, n, max_decode_length],
    their scores [batch, n]), best first."""
    keys = PREDICT_KEYS + self.model.prompt_feature_names
    rows, real = self._pad_rows({k: batch[k] for k in keys if k in batch})
    tokens, scores = self.predict_fn(prompt_params, frozen_params, self.shard_batch(rows),
                                     int(max_decode_length), decoding_lib.resolve(decoding))
    if return_scores:
      return np.asarray(tokens)[:real], np.asarray(scores)[:real]
    return np.asarray(tokens[:, 0])[:real]

  def score(self, prompt_params, frozen_params, batch: Mapping[str, np.ndarray]) -> np.ndarray:
    """Sum of target log-likelihoods of a host batch -> [batch]."""
    keys = SCORE_KEYS + self.model.prompt_feature_names
    rows, real = self._pad_rows({k: batch[k] for k in keys if k in batch})
    return np.asarray(self.score_fn(prompt_params, frozen_params, self.shard_batch(rows)))[:real]

  def export_prompt(self, prompt_params, frozen_params) -> Optional[np.ndarray]:
    """The prompt as a plain [length, embed] array (methods fold their reparameterisation)."""
    params = params_lib.merge_params(prompt_params, frozen_params)
    exported = prompts_base.export_prompt(self.model.module.prompt, params)
    return None if exported is None else np.asarray(exported)
