"""Every model gin file builds the architecture its name promises."""

from __future__ import annotations

import gin
import pytest

from prompt_jax.models import t5
from tests.conftest import GIN_CONFIGS

MODEL_FILES = sorted(p.stem for p in (GIN_CONFIGS / "models").glob("*.gin"))


def _preset_name(stem):
  return "tiny" if stem == "t5_1_1_tiny" else stem


@pytest.mark.parametrize("stem", MODEL_FILES)
def test_model_gin_matches_preset(stem):
  gin.clear_config()
  gin.add_config_file_search_path(str(GIN_CONFIGS))
  gin.parse_config_files_and_bindings(
      [str(GIN_CONFIGS / "models" / f"{stem}.gin"), str(GIN_CONFIGS / "prompts" / "uniform.gin")],
      [], finalize_config=False)
  config = gin.get_configurable(t5.T5Config)()
  expected = t5.preset(_preset_name(stem))
  # Dropout is a run setting (DROPOUT_RATE); everything else is the architecture.
  assert config.replace(dropout_rate=expected.dropout_rate) == expected
  gin.clear_config()


def test_every_preset_has_a_gin_file():
  stems = {_preset_name(s) for s in MODEL_FILES}
  assert set(t5.PRESETS) <= stems
