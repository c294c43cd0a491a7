"""Run files meant to follow a model file build the model the user named, not the demo's.

A run file that includes a model file silently replaces the user's model (gin's last binding
wins): `--gin_file=models/t5_1_1_base.gin --gin_file=runs/ensemble.gin` once built the 247k-
parameter tiny model. Every shipped runs/*.gin that is not a demo must include no model file;
composed after T5 1.1 base and XL it must build exactly the model that file builds alone
(parameters counted from shapes, no weights allocated).
"""

from __future__ import annotations

import functools
import re

import gin
import pytest

from prompt_jax import gin_utils
from prompt_jax import params as params_lib
from tests.conftest import GIN_CONFIGS

RUNS = GIN_CONFIGS / "runs"
# Run files that are complete runs on the shipped tiny model (README, docs) or that make models.
STANDALONE = re.compile(r"(^|_)demo\.gin$|^pretrain_.*\.gin$|^scale_xxl\.gin$")
REAL_MODELS = ["models/t5_1_1_base.gin", "models/t5_1_1_xl.gin"]
# What a run file leaves to the user (%gin.REQUIRED) and the model needs.
BINDINGS = {"multitask.gin": ["NUM_TASKS = 3"]}
# Prompt files a run file is combined with in the docs (multi-task prompts follow the run file).
AFTER = {"multitask.gin": [[], ["prompts/mpt.gin"], ["prompts/multitask_shared.gin"]]}


def _includes(path) -> list[str]:
  """Files `path` includes, transitively (gin's include lines)."""
  found = []
  for name in re.findall(r"^include\s+'([^']+)'", path.read_text(), flags=re.M):
    found += [name, *_includes(GIN_CONFIGS / name)]
  return found


def _combinable_runs() -> list[str]:
  return sorted(p.name for p in RUNS.glob("*.gin") if not STANDALONE.search(p.name))


@functools.cache
def _frozen_count(gin_files: tuple[str, ...], bindings: tuple[str, ...] = ()) -> int:
  """Frozen parameters of the model the gin files build, from shapes."""
  gin.clear_config()
  try:
    model, _ = gin_utils.model_from_gin(gin_files, bindings)
    shapes = model.init_abstract(model.dummy_batch(1, 8, 4))
    _, frozen = params_lib.split_params(params_lib.unbox(shapes))
    return params_lib.count(frozen)
  finally:
    gin.clear_config()


def test_the_combinable_run_files_are_the_ones_the_docs_combine():
  """The list below is not empty and holds the recipes the docs name (a renamed file fails)."""
  runs = _combinable_runs()
  assert {"prompt_finetune.gin", "ensemble.gin", "multitask.gin", "spt.gin", "eval.gin",
          "ensemble_eval.gin", "infer.gin", "superpos_finetune.gin"} <= set(runs), runs


@pytest.mark.parametrize("run", _combinable_runs())
def test_a_run_file_meant_for_a_model_file_includes_none(run):
  models = [name for name in _includes(RUNS / run) if name.startswith("models/")]
  assert not models, f"runs/{run} includes {models}: it would replace the user's model file"


@pytest.mark.parametrize("model", REAL_MODELS)
@pytest.mark.parametrize("run", _combinable_runs())
def test_a_recipe_builds_the_model_file_it_follows(model, run):
  alone = _frozen_count((model, "prompts/uniform.gin"))
  tiny = _frozen_count(("models/t5_1_1_tiny.gin", "prompts/uniform.gin"))
  assert alone > 100 * tiny  # base 248M, XL 2.8B against the tiny model's 247k
  for after in AFTER.get(run, [[]]):
    files = (model, "prompts/uniform.gin", f"runs/{run}", *after)
    assert _frozen_count(files, tuple(BINDINGS.get(run, ()))) == alone, files
