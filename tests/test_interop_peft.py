"""PEFT prompt adapters: the real adapter (../shared/fixtures/peft_prompt_tiny) on the real HF
model reproduces PEFT's logits, encoder states and greedy ids; our writer produces PEFT's layout
and round-trips exactly."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from prompt_jax.interop import hf, peft
from prompt_jax.models import t5
from prompt_jax.models.encoder_decoder import EncoderDecoderModel
from prompt_jax.prompts import initializers
from prompt_jax.prompts.base import InputPrompt
from prompt_jax.prompts.plain import Prompt
from prompt_jax.storage import prompt_files
from tests.conftest import shared_fixture

# Values compared against tolerances: CI runs these again under another CPU instruction set.
pytestmark = pytest.mark.numerics


def _logits_tolerance(reference):
  """Float32 logits against PEFT's (torch float32): 2e-6 of the largest |logit| (20.5 here), as
  test_interop_hf argues. Seen: 7.6e-6 with YNNPACK's AVX-512 or Eigen's kernels, 8.6e-6 (4.2e-7
  of it, 0.86 of a fixed atol=1e-5) with YNNPACK's AVX2 kernels."""
  return dict(rtol=0, atol=2e-6 * float(np.max(np.abs(reference))))


def _prompted(prompt_length: int):
  path = shared_fixture("hf_t5_tiny_v1_1")
  cfg, params = hf.load_t5(str(path))
  module = t5.Transformer(cfg, InputPrompt(Prompt(prompt_length, initializers.uniform())))
  inputs = {n: np.load(path / f"{n}.npy") for n in ("input_ids", "attention_mask",
                                                    "decoder_input_ids")}
  return module, params, inputs


def test_load_takes_rows_of_the_first_submodule():
  adapter = shared_fixture("peft_prompt_tiny")
  prompt = peft.load_prompt(str(adapter))
  table = load_file(str(adapter / "adapter_model.safetensors"))["prompt_embeddings"]
  assert table.shape == (10, 32) and prompt.shape == (5, 32) and prompt.dtype == np.float32
  np.testing.assert_array_equal(prompt, table[:5])
  assert not np.allclose(table[:5], table[5:])


def test_adapter_reproduces_peft_logits_states_and_generate():
  adapter = shared_fixture("peft_prompt_tiny")
  module, params, inputs = _prompted(5)
  params = dict(params, encoder=dict(params["encoder"], prompt={"prompt": {
      "prompt": peft.load_prompt(str(adapter))}}))
  ids, dec = inputs["input_ids"], inputs["decoder_input_ids"]
  logits = module.apply({"params": params}, ids, dec, np.ones_like(dec), enable_dropout=False)
  want = np.load(adapter / "logits_with_prompt.npy")
  np.testing.assert_allclose(np.asarray(logits), want, **_logits_tolerance(want))

  encoded = np.asarray(module.apply({"params": params}, ids, enable_dropout=False,
                                    method=module.encode))
  real = np.concatenate([np.ones((2, 5), bool), inputs["attention_mask"].astype(bool)], axis=1)
  states = np.load(adapter / "encoder_last_hidden_state_with_prompt.npy")
  assert encoded.shape == states.shape == (2, 17, 32)
  # |state| <= 3.5 after the final norm: 1e-5 is ~3e-6 of the scale; 1.2e-6 seen.
  np.testing.assert_allclose(encoded[real], states[real], atol=1e-5, rtol=0)

  generated = np.load(adapter / "generated_ids_with_prompt.npy")
  model = EncoderDecoderModel(module)
  out = jax.jit(model.predict_batch, static_argnums=2)(
      params, {"encoder_input_tokens": jnp.asarray(ids)}, generated.shape[1] - 1)
  np.testing.assert_array_equal(np.asarray(out), generated[:, 1:])


def test_adapter_as_prompt_initialiser_gives_the_same_logits(tmp_path):
  """The path users take: the adapter saved as .npy, loaded by `prompt_files.from_array`."""
  adapter = shared_fixture("peft_prompt_tiny")
  np.save(tmp_path / "prompt.npy", peft.load_prompt(str(adapter)))
  path = shared_fixture("hf_t5_tiny_v1_1")
  cfg, frozen = hf.load_t5(str(path))
  module = t5.Transformer(cfg, InputPrompt(Prompt(5, prompt_files.from_array(
      str(tmp_path / "prompt.npy")))))
  model = EncoderDecoderModel(module)
  ids, dec = np.load(path / "input_ids.npy"), np.load(path / "decoder_input_ids.npy")
  batch = {"encoder_input_tokens": ids, "decoder_input_tokens": dec,
           "decoder_target_tokens": np.ones_like(dec)}
  params = model.init_missing(jax.random.key(0), frozen, batch)
  want = np.load(adapter / "logits_with_prompt.npy")
  np.testing.assert_allclose(np.asarray(model.logits(params, batch)), want,
                             **_logits_tolerance(want))


def test_save_writes_peft_layout_and_round_trips_exactly(tmp_path):
  adapter = shared_fixture("peft_prompt_tiny")
  reference = json.loads((adapter / "adapter_config.json").read_text())
  prompt = np.random.default_rng(0).normal(size=(5, 32)).astype(np.float32)
  out = peft.save_prompt(prompt, str(tmp_path / "a"), base_model_name_or_path="hf_t5_tiny_v1_1",
                         num_attention_heads=4, num_layers=2)
  config = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
  for key in ("peft_type", "task_type", "num_virtual_tokens", "num_transformer_submodules",
              "token_dim", "num_attention_heads", "num_layers", "base_model_name_or_path",
              "inference_mode", "prompt_tuning_init"):
    assert config[key] == reference[key], key
  assert set(config) <= set(reference)
  table = load_file(str(tmp_path / "a" / "adapter_model.safetensors"))
  assert list(table) == ["prompt_embeddings"] and table["prompt_embeddings"].shape == (10, 32)
  np.testing.assert_array_equal(table["prompt_embeddings"][5:], 0.0)
  loaded = peft.load_prompt(out)
  assert loaded.tobytes() == prompt.tobytes()


def test_single_submodule_layout(tmp_path):
  prompt = np.arange(12, dtype=np.float32).reshape(3, 4)
  peft.save_prompt(prompt, str(tmp_path), "t5-small", num_transformer_submodules=1)
  assert load_file(str(tmp_path / "adapter_model.safetensors"))["prompt_embeddings"].shape == (
      3, 4)
  np.testing.assert_array_equal(peft.load_prompt(str(tmp_path)), prompt)


def test_released_prompt_round_trips_through_peft(tmp_path):
  released = np.load(shared_fixture("prompt_t5_1_1_lm100k_base_sst2.npy"))
  peft.save_prompt(released, str(tmp_path), "google/t5-base-lm-adapt")
  loaded = peft.load_prompt(str(tmp_path))
  assert loaded.shape == (100, 768) and loaded.tobytes() == released.tobytes()


def test_bad_adapters_are_refused(tmp_path):
  with pytest.raises(FileNotFoundError, match="adapter_config.json"):
    peft.load_prompt(str(tmp_path))
  peft.save_prompt(np.ones((5, 4), np.float32), str(tmp_path), "x")
  config = json.loads((tmp_path / "adapter_config.json").read_text())
  (tmp_path / "adapter_config.json").write_text(json.dumps(dict(config, peft_type="LORA")))
  with pytest.raises(ValueError, match="peft_type must be 'PROMPT_TUNING', got 'LORA'"):
    peft.load_prompt(str(tmp_path))
  (tmp_path / "adapter_config.json").write_text(json.dumps(config))
  save_file({"prompt_embeddings": np.ones((5, 4), np.float32)},
            str(tmp_path / "adapter_model.safetensors"))
  with pytest.raises(ValueError, match=r"shape \(5, 4\).*num_transformer_submodules=2 "
                                       r"expected 10 rows"):
    peft.load_prompt(str(tmp_path))
  with pytest.raises(ValueError, match=r"\[num_virtual_tokens, token_dim\], got shape \(4,\)"):
    peft.save_prompt(np.ones(4, np.float32), str(tmp_path / "b"))
