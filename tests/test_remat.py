"""Remat policies save what their names say, for the bf16 matmuls' custom VJP too.

`jax.checkpoint` rewrites the program before XLA sees it: whatever a policy does not save, the
backward pass recomputes, so the lowered gradient program holds one extra dot per recomputed
forward matmul whose result the backward needs. Counting dots in the program lowered for the
TPU (no TPU needed) tells what each policy saved: `dots_saveable` recomputes no matmul (as many
dots as without remat), `dots_with_no_batch_dims_saveable` only attention products (their batch
and head axes), `full` more.
Before the matmuls were named (`models/matmul.py`), bf16 `dots_saveable` lowered to `full`'s
program: jax's policy does not see the dots inside a custom VJP.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax.linen import unbox

from prompt_jax import params as params_lib
from prompt_jax.models import t5
from prompt_jax.models.encoder_decoder import EncoderDecoderModel
from prompt_jax.prompts import initializers
from prompt_jax.prompts.base import InputPrompt
from prompt_jax.prompts.plain import Prompt

ENCODER_LAYERS, DECODER_LAYERS = 2, 1


def _batch():
  rng = np.random.default_rng(0)
  target = rng.integers(3, 300, size=(2, 4))
  return {"encoder_input_tokens": jnp.asarray(rng.integers(3, 300, size=(2, 7)), jnp.int32),
          "decoder_input_tokens": jnp.asarray(np.pad(target[:, :-1], ((0, 0), (1, 0))),
                                              jnp.int32),
          "decoder_target_tokens": jnp.asarray(target, jnp.int32),
          "decoder_loss_weights": jnp.ones((2, 4), jnp.int32)}


def _gradient_program(policy: str, dtype: str, scan_layers: bool = False):
  config = t5.preset("tiny", num_encoder_layers=ENCODER_LAYERS,
                     num_decoder_layers=DECODER_LAYERS, dropout_rate=0.0, dtype=dtype,
                     remat_policy=policy, scan_layers=scan_layers)
  model = EncoderDecoderModel(t5.Transformer(config, InputPrompt(Prompt(3,
                                                                       initializers.uniform()))))
  batch = _batch()
  prompt, frozen = params_lib.split_params(unbox(model.init(jax.random.key(0), batch)))

  def loss(prompt, frozen):
    return model.loss_fn(params_lib.merge_params(prompt, frozen), batch, None)[0]

  return jax.value_and_grad(loss), (prompt, frozen)


def _lowered_dots(policy: str, dtype: str, scan_layers: bool = False) -> int:
  program, args = _gradient_program(policy, dtype, scan_layers)
  structs = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), args)
  text = jax.export.export(jax.jit(program), platforms=["tpu"])(*structs).mlir_module()
  return sum("stablehlo.dot_general" in line for line in text.splitlines())


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_policies_recompute_only_the_matmuls_they_do_not_save(dtype):
  dots = {p: _lowered_dots(p, dtype) for p in t5.REMAT_POLICIES}
  assert (dots["none"] == dots["dots_saveable"] < dots["dots_with_no_batch_dims_saveable"]
          < dots["full"]), dots


def test_scanned_policies_recompute_only_the_matmuls_they_do_not_save():
  dots = {p: _lowered_dots(p, "bfloat16", scan_layers=True) for p in t5.REMAT_POLICIES}
  assert (dots["none"] == dots["dots_saveable"] < dots["dots_with_no_batch_dims_saveable"]
          < dots["full"]), dots


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_every_policy_gives_the_loss_and_gradient_without_remat(dtype):
  # float32: the same numbers; bf16: recomputation may fuse and round differently. bf16 keeps 8
  # mantissa bits: a value one program rounds to bf16 and the other does not (recomputed vs
  # saved, fused vs not) moves by up to 2^-8 = 0.4%, and dozens of bf16 values through 2 + 1
  # layers feed the prompt gradient: a few percent of its largest entry at worst. Seen: 0.7%
  # with YNNPACK's dots, 1.4% with Eigen's (0.68 of the former 2%); allow 5%.
  results = {}
  for policy in t5.REMAT_POLICIES:
    program, args = _gradient_program(policy, dtype)
    results[policy] = jax.jit(program)(*args)
  loss, grad = results["none"]
  grad = np.asarray(jax.tree_util.tree_leaves(grad)[0], np.float32)
  scale = float(np.max(np.abs(grad)))
  assert scale > 0
  fp32 = dtype == "float32"
  tol = dict(rtol=1e-6, atol=1e-6) if fp32 else dict(rtol=0, atol=0.05 * scale)
  for policy, (other_loss, other_grad) in results.items():
    np.testing.assert_allclose(float(other_loss), float(loss), rtol=1e-6 if fp32 else 1e-2,
                               err_msg=policy)
    np.testing.assert_allclose(
        np.asarray(jax.tree_util.tree_leaves(other_grad)[0], np.float32), grad,
        err_msg=policy, **tol)
