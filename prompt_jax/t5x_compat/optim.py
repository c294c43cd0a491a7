"""Make T5X optimise only the prompt.

Two ways, both configured from gin (see gin_configs/t5x/prompts/):
  * `trainable_filter()` for `flax.traverse_util.ModelParamTraversal`, used by T5X's
    `optimizers.MultiOptimizer` (T5X Adafactor on the prompt, as in the prompt-tuning paper);
  * `prompt_only(optax_optimizer)` for `optimizers.OptaxWrapper`: an optax transformation that
    applies `optax_optimizer` to the trainable leaves and zero updates to the rest.
Both select parameters by the same regex as the rest of prompt_jax
(`params.DEFAULT_TRAINABLE_PATTERN`: any path component named `prompt`).
"""

from __future__ import annotations

import re
from typing import Callable

import jax
import optax

from prompt_jax import params as params_lib
from prompt_jax.training.optimizers import leaf_paths

TRAINABLE = "trainable"
FROZEN = "frozen"


def _compile(pattern: str) -> re.Pattern:
  try:
    return re.compile(pattern)
  except re.error as e:
    raise ValueError(f"trainable_pattern {pattern!r} is not a valid regex: {e}") from e


def trainable_filter(pattern: str = params_lib.DEFAULT_TRAINABLE_PATTERN
                     ) -> Callable[[str, object], bool]:
  """-> filter_fn(path, value) for `ModelParamTraversal`; `path` is '/encoder/prompt/...'."""
  regex = _compile(pattern)
  return lambda path, _: bool(regex.search(path.lstrip("/")))


def trainable_labels(pattern: str = params_lib.DEFAULT_TRAINABLE_PATTERN):
  """-> labels(params): a tree of 'trainable' / 'frozen' by '/'-joined parameter path.

  Raises ValueError when nothing matches: training would silently do nothing."""
  regex = _compile(pattern)

  def labels(params):
    paths = leaf_paths(params)
    tree = jax.tree_util.tree_map(lambda p: TRAINABLE if regex.search(p) else FROZEN, paths)
    if TRAINABLE not in jax.tree_util.tree_leaves(tree):
      raise ValueError(f"trainable_pattern {pattern!r} matches no parameter; the parameters "
                       f"are {sorted(jax.tree_util.tree_leaves(paths))[:20]}...")
    return tree

  return labels


def prompt_only(optimizer: optax.GradientTransformation,
                pattern: str = params_lib.DEFAULT_TRAINABLE_PATTERN
                ) -> optax.GradientTransformation:
  """`optimizer` on the parameters matching `pattern`, zero updates (and no state) elsewhere."""
  return optax.multi_transform({TRAINABLE: optimizer, FROZEN: optax.set_to_zero()},
                               trainable_labels(pattern))
