"""Prompt methods. Each method is one file; all plug into the frozen model through the encoder
hook contract of `prompt_jax.models.t5` (`base.InputPrompt` is the input-level hook).

Logical axes: `base.LOGICAL_AXIS_RULES` is the vocabulary every method may use (`prompt`,
`prompt_embed`, `prompt_mlp`); a file whose parameters use a name of its own declares its rule in
a module-level `LOGICAL_AXIS_RULES` next to the parameter. `logical_axis_rules()` collects them
from every file of this package, so a new method file brings its rules with it and
`prompt_jax.partitioning` never names a method. (A hook defined outside this package needs no
rule to be correct: flax replicates a logical axis that no rule names.)
"""

from __future__ import annotations

import importlib
import pkgutil
from typing import Optional


def logical_axis_rules() -> tuple[tuple[str, Optional[str]], ...]:
  """Every `LOGICAL_AXIS_RULES` declared by the files of this package, one rule per name.

  Raises ValueError if two files map one name to different mesh axes."""
  rules: dict[str, Optional[str]] = {}
  owners: dict[str, str] = {}
  for info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
    module = importlib.import_module(f"{__name__}.{info.name}")
    for name, mesh_axis in getattr(module, "LOGICAL_AXIS_RULES", ()):
      if rules.setdefault(name, mesh_axis) != mesh_axis:
        raise ValueError(f"logical axis {name!r}: {module.__name__} maps it to {mesh_axis!r}, "
                         f"{owners[name]} to {rules[name]!r}")
      owners.setdefault(name, module.__name__)
  return tuple(rules.items())
