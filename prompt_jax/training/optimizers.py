"""Every optimizer of the project, configured from gin (`optimizers.<name>`).

`adafactor` (Lester et al.'s prompt-tuning defaults), `adamw` with a weight-decay mask,
`per_prompt` (one optimizer state per prompt of a bank), `per_task` (multi-task prompts: per-task
rows and shared leaves), `split_by_path` (one optimizer for the leaves a regex selects, another
for the rest), `spt_optimizer` / `gate_adam` (SPT's weights and gates) and `warmup_cosine_adamw`
(pretraining the small frozen models).

No optimizer here spells a prompt method's parameter names: the method file exports the path
patterns of its parameters (`superpos.WEIGHT_DECAY_PATTERN`, `spt.GENERATOR_PATTERN`), which gin
files (`@superpos.weight_decay_pattern()`) or builders (`spt_optimizer`) pass in.

`adamw` is decoupled-weight-decay Adam (Loshchilov & Hutter) whose weight decay can be limited to
the parameters whose '/'-joined path matches a regex, e.g. SuperPos-Prompt decays its
coefficients p' and not its embedding copies E:

    optimizers.adamw.weight_decay_pattern = @superpos.weight_decay_pattern()

Paths are relative to the trainable tree, e.g. `encoder/prompt/prompt/coefficients`.
"""

from __future__ import annotations

import re
from typing import Any, Optional

import flax
import jax
import optax

from prompt_jax import params as params_lib
from prompt_jax.prompts import spt


def _key_name(key) -> str:
  for attr in ("key", "name", "idx"):
    if hasattr(key, attr):
      return str(getattr(key, attr))
  return str(key)


def leaf_paths(tree: Any) -> Any:
  """A tree like `tree` whose leaves are their '/'-joined paths."""
  return jax.tree_util.tree_map_with_path(
      lambda path, _: "/".join(_key_name(k) for k in path), tree)


def _compile(pattern: str, what: str) -> re.Pattern:
  try:
    return re.compile(pattern)
  except re.error as e:
    raise ValueError(f"{what} {pattern!r} is not a valid regex: {e}") from e


def path_mask(pattern: Optional[str]):
  """-> mask(params) -> tree of bools, True where the leaf's path matches `pattern`.

  `None` selects every leaf. A pattern that selects nothing is an error (raised when the mask
  first sees the parameters), since it would silently switch weight decay off.
  """
  if pattern is None:
    return lambda params: jax.tree_util.tree_map(lambda _: True, params)
  regex = _compile(pattern, "weight_decay_pattern")

  def mask(params):
    paths = leaf_paths(params)
    selected = jax.tree_util.tree_map(lambda p: bool(regex.search(p)), paths)
    if not any(jax.tree_util.tree_leaves(selected)):
      raise ValueError(f"weight_decay_pattern {pattern!r} matches no trainable parameter; "
                       f"the trainable paths are {sorted(jax.tree_util.tree_leaves(paths))}")
    return selected

  return mask


def described(transformation: optax.GradientTransformation, name: str,
              **hyperparameters) -> optax.GradientTransformation:
  """`transformation`, carrying its name and hyperparameters for the run record
  (`description`): a resume with another learning rate is then a recorded difference."""

  def init(params):
    return transformation.init(params)

  init.hyperparameters = {"name": name, **hyperparameters}
  return optax.GradientTransformation(init, transformation.update)


def description(transformation: Optional[optax.GradientTransformation]) -> Optional[dict]:
  """{'name': ..., hyperparameters...} of an optimizer built here, else None (an optax
  transformation built elsewhere: the record then holds only its state's types)."""
  return getattr(getattr(transformation, "init", None), "hyperparameters", None)


def adamw(learning_rate: float = 0.01, weight_decay: float = 1e-5, b1: float = 0.9,
          b2: float = 0.999, eps: float = 1e-8, weight_decay_pattern: Optional[str] = None,
          clipping_threshold: Optional[float] = None) -> optax.GradientTransformation:
  """AdamW with a constant learning rate (SuperPos-Prompt defaults: lr 0.01, weight decay 1e-5).

  Args:
    weight_decay_pattern: regex over trainable parameter paths that receive weight decay;
      None decays every trainable parameter.
    clipping_threshold: clip the global gradient norm to this value first (None: no clipping).
  """
  if learning_rate <= 0:
    raise ValueError(f"adamw learning_rate must be > 0, got {learning_rate}")
  if weight_decay < 0:
    raise ValueError(f"adamw weight_decay must be >= 0, got {weight_decay}")
  if clipping_threshold is not None and clipping_threshold <= 0:
    raise ValueError(f"adamw clipping_threshold must be > 0 or None, got {clipping_threshold}")
  optimizer = optax.adamw(learning_rate, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay,
                          mask=path_mask(weight_decay_pattern))
  if clipping_threshold is not None:
    optimizer = optax.chain(optax.clip_by_global_norm(clipping_threshold), optimizer)
  return described(optimizer, "adamw", learning_rate=learning_rate, weight_decay=weight_decay,
                   b1=b1, b2=b2, eps=eps, weight_decay_pattern=weight_decay_pattern,
                   clipping_threshold=clipping_threshold)


def adafactor(learning_rate: float = 0.3, decay_rate: float = 0.8,
              clipping_threshold: float = 1.0, weight_decay_rate: float = 1e-5,
              multiply_by_parameter_scale: bool = False) -> optax.GradientTransformation:
  """Adafactor with Lester et al.'s prompt-tuning settings as defaults."""
  return described(
      optax.adafactor(learning_rate=learning_rate, decay_rate=decay_rate,
                      clipping_threshold=clipping_threshold, weight_decay_rate=weight_decay_rate,
                      multiply_by_parameter_scale=multiply_by_parameter_scale),
      "adafactor", learning_rate=learning_rate, decay_rate=decay_rate,
      clipping_threshold=clipping_threshold, weight_decay_rate=weight_decay_rate,
      multiply_by_parameter_scale=multiply_by_parameter_scale)


def per_prompt(inner: optax.GradientTransformation,
               rescale_gradients: bool = True) -> optax.GradientTransformation:
  """`inner` applied to each prompt of a bank separately (vmapped over the leading axis).

  Every trainable leaf must be [num_prompts, ...] (a `PromptBank`'s `prompts`). Adafactor's
  update clipping, for instance, uses the RMS of the whole update, so one shared Adafactor over
  [N, length, embed] would couple the prompts; vmapped, each prompt clips its own update.

  `rescale_gradients` multiplies gradients by N, undoing the 1/N a mean-type loss normaliser
  puts on each prompt's share of a replicated batch; set it False when the model's
  `loss_normalizing_factor` is None or a constant (then the sum already is per-prompt exact).
  """

  def init(params):
    params_lib.leading_size(params, "trainable parameter")
    return jax.vmap(inner.init)(params)

  def update(updates, state, params=None):
    num_prompts = params_lib.leading_size(updates, "gradient")
    if rescale_gradients:
      updates = jax.tree_util.tree_map(lambda g: g * num_prompts, updates)
    if params is None:
      return jax.vmap(lambda u, s: inner.update(u, s))(updates, state)
    return jax.vmap(inner.update)(updates, state, params)

  return described(optax.GradientTransformation(init, update), "per_prompt",
                   inner=description(inner), rescale_gradients=rescale_gradients)


def per_task(inner: optax.GradientTransformation, task_paths) -> optax.GradientTransformation:
  """Multi-task prompts: `inner` per task for the per-task leaves, `inner` once for the rest.

  `task_paths`: the '/'-joined paths of the trainable leaves that hold one row per task
  ([num_tasks, ...], e.g. a bank's `prompts`); every task row gets its own `inner` state
  (`per_prompt`, no gradient rescaling: the multi-task loss is normalised per task). The other
  leaves (a shared prompt) get one `inner` state. The state is {'tasks': ..., 'shared': ...};
  `state['tasks']` leaves all lead with the task axis.
  """
  task_paths = frozenset(task_paths)
  per_row = per_prompt(inner, rescale_gradients=False)

  def split(tree):
    flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(tree), sep="/")
    parts = ({k: v for k, v in flat.items() if k in task_paths},
             {k: v for k, v in flat.items() if k not in task_paths})
    return tuple(flax.traverse_util.unflatten_dict(p, sep="/") if p else {} for p in parts)

  def merge(tasks, shared):
    flat = {**flax.traverse_util.flatten_dict(tasks, sep="/"),
            **flax.traverse_util.flatten_dict(shared, sep="/")}
    return flax.traverse_util.unflatten_dict(flat, sep="/")

  def init(params):
    tasks, shared = split(params)
    if not tasks:
      raise ValueError("per_task found none of the per-task leaves "
                       f"{sorted(task_paths)} among the trainable parameters")
    return {"tasks": per_row.init(tasks), "shared": inner.init(shared)}

  def update(updates, state, params=None):
    task_updates, shared_updates = split(updates)
    task_params, shared_params = split(params) if params is not None else (None, None)
    task_updates, task_state = per_row.update(task_updates, state["tasks"], task_params)
    shared_updates, shared_state = inner.update(shared_updates, state["shared"], shared_params)
    return merge(task_updates, shared_updates), {"tasks": task_state, "shared": shared_state}

  return described(optax.GradientTransformation(init, update), "per_task",
                   inner=description(inner))


def split_by_path(pattern: str, matched: optax.GradientTransformation,
                  rest: optax.GradientTransformation,
                  names: tuple[str, str] = ("matched", "rest")) -> optax.GradientTransformation:
  """`matched` for the trainable leaves whose '/'-joined path matches `pattern`, `rest` for the
  others, each with its own state (`optax.multi_transform`, whose state is keyed by `names`).
  Either side may be empty. The description (run record) holds both sides' descriptions, e.g.
  DePT's two learning rates (`prompts/dept.gin`)."""
  regex = _compile(pattern, "split_by_path pattern")
  first, second = names

  def labels(params):
    return jax.tree_util.tree_map(lambda p: first if regex.search(p) else second,
                                  leaf_paths(params))

  return described(optax.multi_transform({first: matched, second: rest}, labels),
                   "split_by_path", pattern=pattern, names=[first, second],
                   matched=description(matched), rest=description(rest))


def gate_adam(learning_rate: float = 0.05, b1: float = 0.5, b2: float = 0.999
              ) -> optax.GradientTransformation:
  """Adam with DARTS's betas (0.5, 0.999): the optimizer of architecture weights (SPT's gate
  logits, `spt.GATE_PATTERN`)."""
  return described(optax.adam(learning_rate, b1=b1, b2=b2), "gate_adam",
                   learning_rate=learning_rate, b1=b1, b2=b2)


def spt_optimizer(prompt_learning_rate: float = 0.3, generator_learning_rate: float = 3e-3
                  ) -> optax.GradientTransformation:
  """SPT's weights optimizer: Adam for the prompt generators (`spt.GENERATOR_PATTERN`), prompt
  tuning's Adafactor for the rest (the free input prompt)."""
  return described(split_by_path(spt.GENERATOR_PATTERN, optax.adam(generator_learning_rate),
                                 adafactor(prompt_learning_rate), names=("generator", "prompt")),
                   "spt_optimizer", prompt_learning_rate=prompt_learning_rate,
                   generator_learning_rate=generator_learning_rate)


def warmup_cosine_adamw(learning_rate: float, warmup_steps: int, steps: int):
  """AdamW (weight decay 0.01) with linear warmup and cosine decay, global-norm clipped at 1."""
  schedule = optax.warmup_cosine_decay_schedule(0.0, learning_rate,
                                                max(min(warmup_steps, steps - 1), 0), steps)
  return described(
      optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(schedule, weight_decay=0.01)),
      "warmup_cosine_adamw", learning_rate=learning_rate, warmup_steps=warmup_steps,
      steps=steps)
