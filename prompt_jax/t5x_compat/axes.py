"""Logical axes of our parameters in the forms T5X expects.

Our modules declare axes with flax's `nn.with_logical_partitioning` (boxed `LogicallyPartitioned`
leaves); T5X reads them from a separate `params_axes` collection of `AxisMetadata` leaves named
`<param>_axes` (flaxformer's convention). T5X's standard partitioning rules and Adafactor factor
rules do not know the prompt axes, so both get extra entries here.
"""

from __future__ import annotations

from typing import Any, Mapping

import flax
from flax import traverse_util
from flax.core import meta
from flax.linen import partitioning as flax_partitioning

from prompt_jax import prompts


def prompt_axis_rules() -> tuple[tuple[str, Any], ...]:
  """(logical axis, mesh axis) rules for the prompt axes (every rule a prompt method file
  declares, `prompts.logical_axis_rules()`), for T5X's
  `partitioning.standard_logical_axis_rules.additional_rules`. Prompts are small: replicated."""
  return prompts.logical_axis_rules()


def prompt_axes() -> tuple[str, ...]:
  """Axes that only prompt parameters use; T5X's standard rules cover every other axis of ours."""
  return tuple(name for name, _ in prompt_axis_rules())


def adafactor_factor_rules():
  """T5X Adafactor `logical_factor_rules`: the standard ones plus NONE (unfactored second
  moments) for the prompt axes, as google-research/prompt-tuning does."""
  # t5x is optional (not on PyPI): the rest of this module works without it.
  from t5x import adafactor  # pylint: disable=g-import-not-at-top

  rules = flax.core.unfreeze(adafactor.standard_logical_factor_rules())
  for name in prompt_axes():
    rules[name] = adafactor.FactorDim.NONE
  return flax.core.freeze(rules)


def to_params_axes(variables: Mapping[str, Any]) -> dict:
  """Variables from `module.init` with boxed params -> the same variables with plain arrays
  under 'params' and T5X's 'params_axes' collection (`<name>_axes`: AxisMetadata(names)).

  Raises ValueError naming the parameter if a param carries no logical axes."""
  variables = flax.core.unfreeze(variables)
  flat = traverse_util.flatten_dict(variables["params"], is_leaf=lambda _, x: isinstance(
      x, meta.AxisMetadata))
  params, axes = {}, {}
  for path, leaf in flat.items():
    if not isinstance(leaf, meta.Partitioned):
      raise ValueError(f"parameter {'/'.join(path)} has no logical axes (expected a "
                       f"LogicallyPartitioned leaf, got {type(leaf).__name__})")
    params[path] = leaf.unbox()
    axes[path[:-1] + (path[-1] + "_axes",)] = flax_partitioning.AxisMetadata(
        names=tuple(leaf.names))
  variables["params"] = traverse_util.unflatten_dict(params)
  variables["params_axes"] = traverse_util.unflatten_dict(axes)
  return variables
