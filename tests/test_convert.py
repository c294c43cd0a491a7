"""`prompt-jax convert`: HF/T5X weights -> Orbax (bit-exact), prompts between .npy, PEFT and
T5X (exact), one-line errors."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from safetensors.numpy import load_file

from prompt_jax import cli
from prompt_jax.interop import hf, t5x
from prompt_jax.storage import frozen_models
from tests.conftest import shared_fixture
from tests.test_interop_t5x import tiny_config


def _assert_bit_exact(a, b):
  flat_a = dict(jax.tree_util.tree_leaves_with_path(a))
  flat_b = dict(jax.tree_util.tree_leaves_with_path(b))
  assert flat_a.keys() == flat_b.keys()
  for key, value in flat_a.items():
    other = np.asarray(flat_b[key])
    assert other.dtype == np.asarray(value).dtype and other.tobytes() == np.asarray(
        value).tobytes(), key


def test_hf_to_orbax_is_bit_exact(tmp_path, capsys):
  source = str(shared_fixture("hf_t5_tiny_v1_1"))
  out = str(tmp_path / "frozen")
  assert cli.main(["convert", "hf-to-orbax", source, out]) == 0
  assert "wrote 57,984 parameters" in capsys.readouterr().out
  config, params = hf.load_t5(source)
  _assert_bit_exact(params, frozen_models.load_frozen_params(out, config))
  # An existing output is never overwritten.
  assert cli.main(["convert", "hf-to-orbax", source, out]) == 1
  assert "already exists" in capsys.readouterr().err


def test_t5x_to_orbax_is_bit_exact(tmp_path, capsys):
  source = str(shared_fixture("t5x_t5_1_1_tiny_legacy/checkpoint_3"))
  out = str(tmp_path / "frozen")
  flags = ["--config", "t5_1_1_base", "--set", "emb_dim=4", "--set", "num_heads=2", "--set",
           "head_dim=2", "--set", "mlp_dim=8", "--set", "num_encoder_layers=2", "--set",
           "num_decoder_layers=2", "--set", "relative_attention_num_buckets=4", "--set",
           "relative_attention_max_distance=8"]
  assert cli.main(["convert", "t5x-to-orbax", source, out] + flags) == 0
  assert "wrote 257,856 parameters (step 3)" in capsys.readouterr().out
  _assert_bit_exact(t5x.load_params(source, tiny_config()),
                    frozen_models.load_frozen_params(out, tiny_config()))
  assert cli.main(["convert", "t5x-to-orbax", source, str(tmp_path / "x"), "--config",
                   "t5_1_1_base"]) == 1
  assert ("decoder/decoder_norm/scale has shape (4,), the model config expects (768,)"
          in capsys.readouterr().err)


def test_released_prompt_through_every_format_is_exact(tmp_path):
  released_path = str(shared_fixture("prompt_t5_1_1_lm100k_base_sst2.npy"))
  released = np.load(released_path)
  assert cli.main(["convert", "prompt", released_path, str(tmp_path / "peft"), "--to", "peft",
                   "--base_model_name_or_path", "google/t5-base-lm-adapt"]) == 0
  assert cli.main(["convert", "prompt", str(tmp_path / "peft"), str(tmp_path / "t5x"), "--to",
                   "t5x", "--step", "1200"]) == 0
  assert (tmp_path / "t5x" / "checkpoint_1200" / "checkpoint").is_file()
  assert cli.main(["convert", "prompt", str(tmp_path / "t5x"), str(tmp_path / "back.npy")]) == 0
  back = np.load(tmp_path / "back.npy")
  assert back.dtype == np.float32 and back.tobytes() == released.tobytes()


def test_peft_fixture_to_npy_takes_the_first_rows(tmp_path):
  adapter = shared_fixture("peft_prompt_tiny")
  assert cli.main(["convert", "prompt", str(adapter), str(tmp_path / "p.npy")]) == 0
  table = load_file(str(adapter / "adapter_model.safetensors"))["prompt_embeddings"]
  np.testing.assert_array_equal(np.load(tmp_path / "p.npy"), table[:5])


@pytest.mark.parametrize("args,message", [
    (["prompt", "{tmp}/a.npy", "{tmp}/out"], "--to is needed"),
    (["prompt", "{tmp}", "{tmp}/b.npy"], "cannot tell the prompt format"),
    (["t5x-to-orbax", "{tmp}", "{tmp}/o", "--config", "t5_1_1_base", "--set", "width=3"],
     "T5Config has no field 'width'"),
])
def test_errors_are_one_line(tmp_path, capsys, args, message):
  np.save(tmp_path / "a.npy", np.ones((2, 3), np.float32))
  code = cli.main(["convert"] + [a.format(tmp=tmp_path) for a in args])
  err = capsys.readouterr().err
  assert code == 1 and message in err and len(err.strip().splitlines()) == 1, err
