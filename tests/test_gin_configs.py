"""Every model gin file builds the architecture its name promises."""

from __future__ import annotations

import gin
import pytest

from prompt_jax.models import t5
from tests.conftest import GIN_CONFIGS

MODEL_FILES = sorted(p.stem for p in (GIN_CONFIGS / "models").glob("*.gin"))


def _preset_name(stem):
  return stem  # every model gin file's stem names a preset (`t5_1_1_tiny` is also `tiny`)


@pytest.mark.parametrize("stem", MODEL_FILES)
def test_model_gin_matches_preset(stem):
  gin.clear_config()
  gin.add_config_file_search_path(str(GIN_CONFIGS))
  gin.parse_config_files_and_bindings(
      [str(GIN_CONFIGS / "models" / f"{stem}.gin"), str(GIN_CONFIGS / "prompts" / "uniform.gin")],
      [], finalize_config=False)
  config = gin.get_configurable(t5.T5Config)()
  expected = t5.preset(_preset_name(stem))
  # Dropout is a run setting (DROPOUT_RATE), the layer layout and the activation dtype compile
  # settings (SCAN_LAYERS, on for the large presets; ACTIVATION_DTYPE, 'auto' in the real-model
  # files: tests/test_activation_dtype.py); everything else is the architecture.
  assert config.replace(dropout_rate=expected.dropout_rate, scan_layers=expected.scan_layers,
                        dtype=expected.dtype) == expected
  assert config.scan_layers == any(size in stem for size in ("large", "xl"))
  gin.clear_config()


def test_every_preset_has_a_gin_file():
  stems = {_preset_name(s) for s in MODEL_FILES}
  assert set(t5.PRESETS) - {"tiny"} == stems
  assert t5.preset("tiny") == t5.preset("t5_1_1_tiny")


def test_spt_run_binds_every_required_argument_of_train_spt():
  """`prompt-jax spt --gin_file=runs/spt_demo.gin` (runs/spt.gin after the tiny model) calls
  spt_training.train_spt with no argument missing; TRAIN_FN (which routed `prompt-jax train` to
  it) is gone."""
  import inspect

  from prompt_jax.training import spt_training
  gin.clear_config()
  try:
    gin.add_config_file_search_path(str(GIN_CONFIGS))
    gin.parse_config_files_and_bindings([str(GIN_CONFIGS / "runs" / "spt_demo.gin")],
                                        ["MODEL_DIR = '/tmp/unused'"], finalize_config=False)
    bound = gin.get_bindings(spt_training.train_spt)
    required = {name for name, p in inspect.signature(spt_training.train_spt).parameters.items()
                if p.default is inspect.Parameter.empty}
    assert required and required <= set(bound), sorted(required - set(bound))
    with pytest.raises(ValueError):
      gin.query_parameter("%TRAIN_FN")
  finally:
    gin.clear_config()
