"""SPT in one run: gate search, top-K layer selection, re-training of the kept layers.

Phase 1, search (MODEL_DIR/search): the model's hook is a `prompts.spt.SelectivePrompt` with a
gate logit g_l and a generator at every candidate layer. The trainable tree is split into the
gates G = {g_l} (paths matching `spt.GATE_PATTERN`) and the weights W (input prompt and
generators), each with its own optax optimizer and state.

  search_mode='darts' (SPT-DARTS, bi-level, first-order DARTS):
      min_G  L_heldout(W*(G), G)   s.t.  W*(G) = argmin_W L_train(W, G)
    approximated by alternating, at every step t,
      W <- W - opt_W(dL_train(W, G) / dW)        on a batch of the training part
      G <- G - opt_G(dL_heldout(W, G) / dG)      on a batch of the held-out part
    The held-out part is the fraction `held_out_fraction` of the *training split*, chosen by a
    hash of each example's input tokens (a fixed partition, the same in every epoch).
  search_mode='joint' (plain SPT): one step updates W with opt_W and G with opt_G from the
    gradients of the same training batch.

  Re-parameterisation: gates are trained as logits g_l, a_l = sigmoid(g_l); the mix
  h = prop + a_l (new_l - prop) gives dL/dg_l = a_l (1 - a_l) <dL/dh, new_l - prop_l>. The
  inner product grows with the hidden-state scale of layer l (T5's residual stream grows with
  depth), so the gate optimizer is Adam (`gate_adam`), whose per-parameter normalisation makes
  each gate's step size independent of that scale; the weights keep prompt tuning's Adafactor
  (input prompt) and Adam for the generators (`spt_optimizer`).

Selection: after `search_steps`, a_l are read, the top K (`num_layers_to_keep`, ties broken by
the lower layer index) are kept (`spt.select_layers`); MODEL_DIR/search/selection.json records
the gates, the search's settings (search_mode, search_steps, held_out_fraction) and the choice,
and a rerun skips the finished search. The search does not depend on K: a rerun with another K
selects again from the recorded gates (refused in one line while MODEL_DIR/retrain holds a
re-training of the other selection: remove that directory, or use another MODEL_DIR); a rerun
with other search settings is refused in one line.

Phase 2, re-train (MODEL_DIR/retrain): a fresh `SelectivePrompt(hard=True, layers=kept)` (no
gates; a_l = 1 at kept layers, 0 elsewhere) is prompt-tuned by `trainer.train` for
`train_steps` steps, with its checkpoints, evaluation and resume.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from typing import Any, Callable, Iterator, Optional

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
import tensorflow as tf

from prompt_jax import params as params_lib
from prompt_jax.data import pipeline
from prompt_jax.models.encoder_decoder import EncoderDecoderModel
from prompt_jax.partitioning import Partitioner
from prompt_jax.programs import PromptPrograms
from prompt_jax.prompts import spt
from prompt_jax.serving import evaluation
from prompt_jax.storage import run_dir
from prompt_jax.training import guards, optimizers, trainer

log = logging.getLogger(__name__)

Array = jax.Array
SEARCH_MODES = ("darts", "joint")
_HASH_BUCKETS = 10000


# ------------------------------------------------------------------------------------- data


def held_out_filter(fraction: float, held_out: bool) -> Callable[[dict], tf.Tensor]:
  """tf.data predicate: is this example in the held-out (or in the training) part?"""
  threshold = int(round(fraction * _HASH_BUCKETS))

  def predicate(example):
    key = tf.strings.reduce_join(tf.strings.as_string(example["encoder_input_tokens"]),
                                 separator=" ")
    in_held_out = tf.strings.to_hash_bucket_fast(key, _HASH_BUCKETS) < threshold
    return in_held_out if held_out else tf.logical_not(in_held_out)
  return predicate


def split_batches(cfg: pipeline.DatasetConfig, fraction: float, held_out: bool, *,
                  start_step: int = 0, shard_id: int = 0, num_shards: int = 1
                  ) -> Iterator[dict[str, np.ndarray]]:
  """Endless batches of one part of the training split (held-out or the rest)."""
  ds = pipeline.get_dataset(cfg, shard_id=shard_id, num_shards=num_shards, num_epochs=None)
  ds = ds.unbatch().filter(held_out_filter(fraction, held_out))
  ds = ds.batch(cfg.batch_size // num_shards, drop_remainder=True)
  if start_step:
    ds = ds.skip(start_step)
  for batch in ds.as_numpy_iterator():
    yield {k: v.astype(np.int32) for k, v in batch.items()}


# ------------------------------------------------------------------------------------ steps


@flax.struct.dataclass
class SearchState:
  """The search phase's trainable state: weights W and gates G, each with its optimizer state."""

  step: Array
  weights: Any
  gates: Any
  weight_opt_state: Any
  gate_opt_state: Any


def _gate_metrics(gates) -> dict[str, Array]:
  """{'gate/layer_<l>': a_l = sigmoid(g_l)} of a gate tree (traceable)."""
  flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(gates), sep="/")
  metrics = {}
  for path, logit in flat.items():
    match = spt.GATE_PATH.search(path)
    if match:
      metrics[f"gate/layer_{int(match.group(2))}"] = jax.nn.sigmoid(jnp.reshape(logit, ()))
  return metrics


class SptSearch:
  """The gate search as a training regime (`regimes.Regime`) of `trainer.run`.

  `weight_step` differentiates the loss w.r.t. W only and `gate_step` w.r.t. G only, so the
  gates receive gradients only in the gate optimizer's phase; `joint_step` updates both.
  `step_fn` is one of the two modes: darts (a weight step on a batch of the training part, then
  a gate step on a batch of the held-out part) or joint.
  """

  def __init__(self, model: EncoderDecoderModel, weight_optimizer: optax.GradientTransformation,
               gate_optimizer: optax.GradientTransformation, partitioner: Partitioner,
               input_length: int, target_length: int, batch_size: int, *,
               dataset_cfg: Optional[pipeline.DatasetConfig] = None,
               search_mode: str = "darts", held_out_fraction: float = 0.2):
    hook = model.module.prompt
    if not isinstance(hook, spt.SelectivePrompt) or hook.hard:
      raise ValueError("the SPT search needs the model's prompt to be a "
                       f"spt.SelectivePrompt with hard=False, got {type(hook).__name__}"
                       + (" with hard=True" if getattr(hook, "hard", False) else ""))
    if search_mode not in SEARCH_MODES:
      raise ValueError(f"SPT search_mode must be one of {SEARCH_MODES}, got {search_mode!r}")
    if search_mode == "darts" and not 0.0 < held_out_fraction < 1.0:
      raise ValueError(f"SPT held_out_fraction must be in (0, 1), got {held_out_fraction!r}")
    self.model = model
    self.weight_optimizer = weight_optimizer
    self.gate_optimizer = gate_optimizer
    self.dataset_cfg = dataset_cfg
    self.search_mode = search_mode
    self.held_out_fraction = held_out_fraction
    self.settings = {"search_mode": search_mode, "held_out_fraction": held_out_fraction}
    self.programs = PromptPrograms.for_training(model, weight_optimizer, partitioner,
                                                input_length, target_length, batch_size)
    self.partitioner = self.programs.partitioner  # fitted to the batch (`fit_batch`)
    gates, _ = params_lib.split_params(self.programs.abstract_prompt, spt.GATE_PATTERN)
    if not gates:
      raise ValueError("the SelectivePrompt model has no gated layer (check "
                       "SelectivePrompt.layers and the number of encoder layers)")
    self.weight_step = jax.jit(self._weight_step, donate_argnums=(0,))
    self.gate_step = jax.jit(self._gate_step, donate_argnums=(0,))
    self.joint_step = jax.jit(self._joint_step, donate_argnums=(0,))
    self.step_fn = jax.jit(self._search_step, donate_argnums=(0,))

  def random_frozen_params(self, rng: Array):
    return self.programs.random_frozen_params(rng)

  def init_state(self, frozen_params, rng: Array) -> SearchState:
    prompt = self.programs.init_prompt(frozen_params, rng)
    gates, weights = params_lib.split_params(prompt, spt.GATE_PATTERN)
    return SearchState(step=jnp.array(0, jnp.int32), weights=weights, gates=gates,
                       weight_opt_state=self.weight_optimizer.init(weights),
                       gate_opt_state=self.gate_optimizer.init(gates))

  def abstract_state(self) -> SearchState:
    gates, weights = params_lib.split_params(self.programs.abstract_prompt, spt.GATE_PATTERN)
    shapes = jax.eval_shape(lambda w, g: SearchState(
        step=jnp.array(0, jnp.int32), weights=w, gates=g,
        weight_opt_state=self.weight_optimizer.init(w),
        gate_opt_state=self.gate_optimizer.init(g)), weights, gates)
    replicated = self.partitioner.replicated()  # prompt axes are replicated by the rules
    return jax.tree_util.tree_map(
        lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=replicated), shapes)

  def prompt_params(self, state: SearchState):
    return params_lib.merge_params(state.weights, state.gates)

  def loss(self, weights, gates, frozen_params, batch, dropout_rng):
    params = params_lib.merge_params(params_lib.merge_params(weights, gates), frozen_params)
    with self.partitioner.axis_rules():
      return self.model.loss_fn(params, batch, dropout_rng)

  def _weight_step(self, state: SearchState, frozen_params, batch, rng):
    rng = jax.random.fold_in(rng, state.step)
    (_, metrics), grads = jax.value_and_grad(self.loss, has_aux=True)(
        state.weights, state.gates, frozen_params, batch, rng)
    updates, opt_state = self.weight_optimizer.update(grads, state.weight_opt_state,
                                                      state.weights)
    return state.replace(step=state.step + 1, weights=optax.apply_updates(state.weights, updates),
                         weight_opt_state=opt_state), dict(metrics,
                                                           grad_norm=optax.global_norm(grads))

  def _gate_step(self, state: SearchState, frozen_params, batch):
    grad_fn = jax.value_and_grad(lambda g: self.loss(state.weights, g, frozen_params, batch,
                                                     None), has_aux=True)
    (_, metrics), grads = grad_fn(state.gates)
    updates, opt_state = self.gate_optimizer.update(grads, state.gate_opt_state, state.gates)
    return state.replace(gates=optax.apply_updates(state.gates, updates),
                         gate_opt_state=opt_state), dict(metrics,
                                                         gate_grad_norm=optax.global_norm(grads))

  def _joint_step(self, state: SearchState, frozen_params, batch, rng):
    rng = jax.random.fold_in(rng, state.step)
    (_, metrics), (w_grads, g_grads) = jax.value_and_grad(self.loss, argnums=(0, 1),
                                                          has_aux=True)(
        state.weights, state.gates, frozen_params, batch, rng)
    w_updates, w_opt = self.weight_optimizer.update(w_grads, state.weight_opt_state,
                                                    state.weights)
    g_updates, g_opt = self.gate_optimizer.update(g_grads, state.gate_opt_state, state.gates)
    return state.replace(step=state.step + 1,
                         weights=optax.apply_updates(state.weights, w_updates),
                         gates=optax.apply_updates(state.gates, g_updates),
                         weight_opt_state=w_opt, gate_opt_state=g_opt), dict(
                             metrics, grad_norm=optax.global_norm(w_grads),
                             gate_grad_norm=optax.global_norm(g_grads))

  def _search_step(self, state: SearchState, frozen_params, inputs, rng):
    """One search step of `search_mode` -> (state, metrics with the gate values a_l)."""
    if self.search_mode == "darts":
      state, metrics = self._weight_step(state, frozen_params, inputs["train"], rng)
      state, gate_metrics = self._gate_step(state, frozen_params, inputs["held_out"])
      metrics = dict(metrics, held_out_loss=gate_metrics["loss"],
                     gate_grad_norm=gate_metrics["gate_grad_norm"])
      loss_finite = jnp.isfinite(metrics["loss"]) & jnp.isfinite(gate_metrics["loss"])
    else:
      state, metrics = self._joint_step(state, frozen_params, inputs["train"], rng)
      loss_finite = jnp.isfinite(metrics["loss"])
    prompt_finite = params_lib.tree_all_finite(self.prompt_params(state))
    return state, dict(metrics, **_gate_metrics(state.gates), prompt_finite=prompt_finite,
                       all_finite=loss_finite & prompt_finite)

  def batches(self, start_step: int, shard_id: int, num_shards: int) -> Iterator[dict]:
    """{'train': batch} (joint) or {'train': batch, 'held_out': batch} (darts) per step."""
    if self.dataset_cfg is None:
      raise ValueError("SptSearch needs dataset_cfg to produce batches")
    shard = dict(start_step=start_step, shard_id=shard_id, num_shards=num_shards)
    if self.search_mode == "joint":
      return ({"train": b} for b in pipeline.iterate_batches(self.dataset_cfg, **shard))
    train = split_batches(self.dataset_cfg, self.held_out_fraction, False, **shard)
    held_out = split_batches(self.dataset_cfg, self.held_out_fraction, True, **shard)
    return ({"train": t, "held_out": h} for t, h in zip(train, held_out))

  def shard(self, inputs: dict) -> dict:
    return {part: self.programs.shard_batch(batch) for part, batch in inputs.items()}

  def shard_batch(self, batch):
    return self.programs.shard_batch(batch)


# ------------------------------------------------------------------------------------ phases


def retrain_model(model: EncoderDecoderModel, layers) -> EncoderDecoderModel:
  """The search model with its hook replaced by hard gates at `layers` (no gate parameters)."""
  hook = model.module.prompt.clone(layers=tuple(layers), hard=True)
  return dataclasses.replace(model, module=model.module.clone(prompt=hook))


def check_search_settings(selection: dict, settings: dict, search_dir: str,
                          retrain_dir: str) -> None:
  """ValueError in one line when the finished search (its selection.json) ran with other search
  settings than `settings` (a setting it did not record is not compared)."""
  differing = [(k, selection[k], v) for k, v in settings.items()
               if k in selection and selection[k] != v]
  if differing:
    held = ", ".join(f"{k}={old!r}" for k, old, _ in differing)
    wanted = ", ".join(f"{k}={new!r}" for k, _, new in differing)
    raise ValueError(f"{search_dir} holds a finished SPT search with {held}; this command "
                     f"configures {wanted}: use the search's settings, remove {search_dir} and "
                     f"{retrain_dir} to search again, or use another MODEL_DIR")


def check_retrain_selection(retrain_dir: str, stored, stored_k, selected, k: int) -> None:
  """ValueError in one line when the re-train phase started (MODEL_DIR/retrain holds a run
  record or checkpoints) for the `stored` layers and this command selects other ones."""
  if any(os.path.exists(os.path.join(retrain_dir, name))
         for name in (run_dir.RECORD_FILE, run_dir.CHECKPOINTS_DIR, run_dir.SUMMARY_FILE)):
    raise ValueError(f"{retrain_dir} re-trains layers {list(stored)} (K={stored_k}); this "
                     f"command selects {list(selected)} (K={k}) from the same search: remove "
                     f"{retrain_dir} to re-train for K={k} (the search is kept), or use another "
                     "MODEL_DIR")


def _search_or_reuse(model: EncoderDecoderModel, search_dir: str, retrain_dir: str,
                     search_settings: dict, k: int, make_search, loop_settings: dict
                     ) -> tuple[tuple[int, ...], dict]:
  """-> (the K selected layers, the gate values a_l): from MODEL_DIR/search's finished search
  (its selection.json; K may differ from the search's, unless re-training started), else by
  running the search (`make_search()`, a `SptSearch`, through the loop with `loop_settings`)."""
  selection_path = os.path.join(search_dir, "selection.json")
  selection = run_dir.read_json(selection_path)
  if selection is not None:
    check_search_settings(selection, search_settings, search_dir, retrain_dir)
    gates = {int(key): v for key, v in selection["gates"].items()}
    selected = spt.select_layers(gates, k)  # K is not a setting of the search
    stored = tuple(selection["selected_layers"])
    print(f"SPT search already finished ({selection_path}); "
          + ("" if selected == stored else f"selecting K={k} layers from its gates; ")
          + "re-training", flush=True)
  else:
    search = make_search()
    print(f"SPT search ({search.search_mode}): trainable parameters are the input prompt, the "
          "generators and the gates", flush=True)
    result = trainer.run(search, model_dir=search_dir, **loop_settings)
    gates = spt.gate_values(result.state.gates)
    selected = spt.select_layers(gates, k)
    if jax.process_index() == 0:
      run_dir.write_json(selection_path, {"gates": gates, "selected_layers": list(selected),
                                          "k": k, **search_settings})
    del result, search
  print("SPT gate values a_l: " + ", ".join(f"layer {key}: {v:.3f}" for key, v in gates.items()),
        flush=True)
  print(f"SPT selected layers (K={k}): {list(selected)}", flush=True)
  if selection is not None and selected != stored:
    check_retrain_selection(retrain_dir, stored, selection.get("k"), selected, k)
    if jax.process_index() == 0:
      run_dir.write_json(selection_path, dict(selection, selected_layers=list(selected), k=k))
  return selected, gates


def train_spt(*, model: EncoderDecoderModel, model_dir: Optional[str], search_steps: int,
              train_steps: int, num_layers_to_keep: int,
              train_dataset_cfg: pipeline.DatasetConfig,
              eval_dataset_cfg: Optional[pipeline.DatasetConfig] = None,
              initial_checkpoint_path: Optional[str] = None,
              optimizer: Optional[optax.GradientTransformation] = None,
              gate_optimizer: Optional[optax.GradientTransformation] = None,
              search_mode: str = "darts", held_out_fraction: float = 0.2,
              partitioner: Optional[Partitioner] = None, checkpoint_every_steps: int = 1000,
              keep_checkpoints: Optional[int] = 3, eval_every_steps: int = 0,
              eval_at_start: bool = True, log_every_steps: int = 10,
              max_decode_length: Optional[int] = None, seed: int = 0,
              evaluator: evaluation.EvaluatorChoice = "task",
              config_text: Optional[str] = None) -> dict[str, Any]:
  """Search (MODEL_DIR/search), select the top-K layers, re-train them (MODEL_DIR/retrain).

  Both phases are runs of the one training loop (`trainer.run`): the search with the
  `SptSearch` regime, the re-training with plain prompt tuning (`trainer.train`).
  Returns `trainer.train`'s summary of the re-train phase plus `gates` and `selected_layers`.
  `config_text` (the CLI's gin config) is written to each phase's config.gin.
  """
  model_dir = run_dir.check_model_dir(model_dir)
  search_steps = guards.check_count("SPT search_steps", search_steps, 1)
  optimizer = optimizer or optimizers.spt_optimizer()
  gate_optimizer = gate_optimizer or optimizers.gate_adam()
  partitioner = partitioner or Partitioner()
  pipeline.check_vocabulary(train_dataset_cfg, model.config.vocab_size)
  lengths = train_dataset_cfg.task_feature_lengths
  search_dir = os.path.join(model_dir, "search")

  retrain_dir = os.path.join(model_dir, "retrain")
  search_settings = {"search_mode": search_mode, "search_steps": search_steps,
                     "held_out_fraction": held_out_fraction}

  selected, gates = _search_or_reuse(
      model, search_dir, retrain_dir, search_settings, num_layers_to_keep,
      lambda: SptSearch(model, optimizer, gate_optimizer, partitioner, lengths["inputs"],
                        lengths["targets"], train_dataset_cfg.batch_size,
                        dataset_cfg=train_dataset_cfg, search_mode=search_mode,
                        held_out_fraction=held_out_fraction),
      dict(train_steps=search_steps, initial_checkpoint_path=initial_checkpoint_path,
           checkpoint_every_steps=checkpoint_every_steps, keep_checkpoints=2,
           log_every_steps=log_every_steps, seed=seed, label="SPT search",
           config_text=config_text))
  summary = trainer.train(
      model=retrain_model(model, selected), model_dir=retrain_dir,
      train_steps=train_steps, train_dataset_cfg=train_dataset_cfg,
      eval_dataset_cfg=eval_dataset_cfg, initial_checkpoint_path=initial_checkpoint_path,
      optimizer=optimizer, partitioner=partitioner,
      checkpoint_every_steps=checkpoint_every_steps, keep_checkpoints=keep_checkpoints,
      eval_every_steps=eval_every_steps, eval_at_start=eval_at_start,
      log_every_steps=log_every_steps, max_decode_length=max_decode_length, seed=seed,
      evaluator=evaluator, config_text=config_text)
  summary = dict(summary, gates=gates, selected_layers=list(selected),
                 model_dir=os.path.abspath(model_dir))
  if jax.process_index() == 0:
    run_dir.write_json(os.path.join(model_dir, run_dir.SUMMARY_FILE), summary)
  return summary
