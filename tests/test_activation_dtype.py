"""ACTIVATION_DTYPE 'auto': bfloat16 where the hardware has bf16 matrix units, float32 elsewhere;
the real-model gin files ask for it, the tiny demo pins float32, and `plan` resolves it for the
platform it plans for rather than the host it runs on."""

from __future__ import annotations

import gin
import pytest

from prompt_jax import cli
from prompt_jax.models import activation_dtype, t5
from tests.conftest import GIN_CONFIGS

REAL_MODEL_FILES = sorted(
    str(p.relative_to(GIN_CONFIGS)) for p in (GIN_CONFIGS / "models").glob("t5_1_*.gin")
    if "tiny" not in p.name)


def _host_has_bf16_matrix_units() -> bool:
  """Read independently of the module: any /proc/cpuinfo flags line naming AMX-BF16 or AVX-512
  BF16 (no file: none)."""
  try:
    text = open("/proc/cpuinfo").read()
  except OSError:
    return False
  flags = next((line.split(":", 1)[1].split() for line in text.splitlines()
                if line.startswith(("flags", "Features"))), [])
  return "amx_bf16" in flags or "avx512_bf16" in flags


@pytest.mark.parametrize("platform,flags,capability,expected", [
    ("tpu", (), None, "bfloat16"),
    ("gpu", (), 8.0, "bfloat16"),  # Ampere
    ("gpu", (), 9.0, "bfloat16"),  # Hopper
    ("gpu", (), 7.5, "float32"),  # Turing: no bf16 tensor cores
    ("gpu", (), None, "float32"),  # capability unknown
    ("cpu", ("sse4_2", "avx2", "fma"), None, "float32"),  # AVX2 only
    ("cpu", ("avx512f", "avx512_bf16"), None, "bfloat16"),  # e.g. AMD Zen 4
    ("cpu", ("avx512f", "amx_tile", "amx_bf16"), None, "bfloat16"),  # e.g. Sapphire Rapids
    ("cpu", ("avx512f", "avx512_vnni"), None, "float32"),  # AVX-512 without BF16
    ("metal", ("avx512_bf16",), None, "float32"),  # a platform not measured
])
def test_auto_is_bfloat16_only_with_bf16_matrix_units(platform, flags, capability, expected):
  assert activation_dtype.resolve("auto", platform, flags, capability) == expected


@pytest.mark.parametrize("requested", ["float32", "bfloat16", "float16"])
def test_an_explicit_dtype_is_kept_on_every_platform(requested):
  for platform in ("cpu", "gpu", "tpu"):
    assert activation_dtype.resolve(requested, platform, ("amx_bf16",), 9.0) == requested


def test_cpu_flags_come_from_the_first_flags_line(tmp_path):
  cpuinfo = tmp_path / "cpuinfo"
  cpuinfo.write_text("processor\t: 0\nmodel name\t: X\nflags\t\t: fpu avx2 avx512_bf16\n\n"
                     "processor\t: 1\nflags\t\t: fpu\n")
  assert activation_dtype.cpu_flags(str(cpuinfo)) == ("fpu", "avx2", "avx512_bf16")
  assert activation_dtype.cpu_flags(str(tmp_path / "missing")) == ()


def test_a_config_asking_for_auto_holds_this_hosts_dtype():
  expected = "bfloat16" if _host_has_bf16_matrix_units() else "float32"  # tests run on CPU
  assert t5.T5Config(dtype="auto").dtype == expected
  assert t5.T5Config(dtype="float32").dtype == "float32"
  with pytest.raises(ValueError, match="T5Config.dtype: unknown dtype 'fp32'"):
    t5.T5Config(dtype="fp32")


def _parse(files, bindings=()):
  gin.clear_config()
  gin.add_config_file_search_path(str(GIN_CONFIGS))
  gin.parse_config_files_and_bindings([str(GIN_CONFIGS / f) for f in files], list(bindings),
                                      finalize_config=False)


@pytest.mark.parametrize("model_file", REAL_MODEL_FILES)
def test_real_model_files_ask_for_auto_and_build_this_hosts_dtype(model_file):
  expected = "bfloat16" if _host_has_bf16_matrix_units() else "float32"
  try:
    _parse([model_file, "prompts/uniform.gin"])
    assert gin.query_parameter("%ACTIVATION_DTYPE") == "auto"
    assert gin.get_configurable(t5.T5Config)().dtype == expected
  finally:
    gin.clear_config()


def test_the_tiny_demo_model_is_float32_on_every_machine():
  try:
    _parse(["models/t5_1_1_tiny.gin", "prompts/uniform.gin"])
    assert gin.get_configurable(t5.T5Config)().dtype == "float32"
  finally:
    gin.clear_config()


@pytest.mark.parametrize("platform,expected", [
    ("tpu", "bfloat16"), ("gpu", "bfloat16"),
    ("cpu", "bfloat16" if _host_has_bf16_matrix_units() else "float32")])
def test_plan_resolves_auto_for_the_platform_it_plans_for(platform, expected):
  try:
    _parse(["models/t5_1_1_base.gin", "prompts/uniform.gin"])
    cli._bind_planned_activation_dtype(gin, platform)  # pylint: disable=protected-access
    assert gin.query_parameter("%ACTIVATION_DTYPE") == expected
    assert gin.get_configurable(t5.T5Config)().dtype == expected
    # an explicit choice is the user's on every platform
    _parse(["models/t5_1_1_base.gin", "prompts/uniform.gin"], ["ACTIVATION_DTYPE = 'float32'"])
    cli._bind_planned_activation_dtype(gin, platform)  # pylint: disable=protected-access
    assert gin.query_parameter("%ACTIVATION_DTYPE") == "float32"
  finally:
    gin.clear_config()
