"""The model's matmul: bf16 values and gradients against a float64 NumPy einsum, both branches
of `g @ W^T` (CPU's hidden transpose, everyone else's plain einsum), and the dot result types
each platform's lowering gets."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from prompt_jax.models import matmul

# Values compared against tolerances: CI runs these again under another CPU instruction set.
pytestmark = pytest.mark.numerics

# (spec, lhs shape, rhs shape): the T5's dense layers, tied logits and attention.
SPECS = [
    ("...i,io->...o", (2, 5, 16), (16, 24)),
    ("...e,ve->...v", (2, 5, 16), (40, 16)),
    ("bhqd,bhdk->bhqk", (2, 3, 5, 8), (2, 3, 8, 7)),
    ("bhqk,bhkd->bhqd", (2, 3, 5, 7), (2, 3, 7, 8)),
]


def _bf16_values(shape, seed):
  """Random values exactly representable in bf16, so the float64 reference sees the same inputs."""
  x = np.random.default_rng(seed).normal(size=shape).astype(np.float32)
  return np.asarray(jnp.asarray(x, jnp.bfloat16).astype(jnp.float32), np.float64)


def _float32_sum_tolerance(terms, count):
  """What float32 rounding can add to a sum of `count` products whose absolute values sum to
  `terms` (elementwise), in any order: bf16 x bf16 products are exact in float32, and each of the
  `count` additions rounds by <= 2^-24 of a partial sum. Those errors have random signs, so they
  grow like sqrt(count) (Higham & Mary 2019), not count; 4x covers the largest of ~1e6 sums. The
  summation order (SIMD width, dot kernel, CPU) is free. Measured: <= 0.5 of sqrt(count) * 2^-24
  * terms. A result rounded to bf16 (up to 2^-8 relative) exceeds it in most outputs (by ~4x at 1024
  products, ~100x at 40)."""
  return 4 * np.sqrt(count) * 2.0 ** -24 * terms


def _assert_within(got, want, tolerance):
  """|got - want| <= tolerance, elementwise (assert_allclose takes only a scalar atol)."""
  excess = np.abs(np.asarray(got, np.float64) - want) / tolerance
  worst = np.unravel_index(np.argmax(excess), excess.shape)
  assert excess[worst] <= 1, (f"off by {excess[worst]:.3g}x the float32 rounding bound at "
                              f"{worst}: {np.asarray(got)[worst]} vs {want[worst]}")


@pytest.mark.parametrize("spec,lhs_shape,rhs_shape", SPECS)
def test_bf16_value_and_gradients_match_float64(spec, lhs_shape, rhs_shape):
  a, b = _bf16_values(lhs_shape, 0), _bf16_values(rhs_shape, 1)
  out_shape = np.einsum(spec, a, b).shape
  cotangent = _bf16_values(out_shape, 2)

  def loss(a, b):
    out = matmul.einsum(spec, a, b, jnp.bfloat16, out_dtype=jnp.float32)
    return jnp.sum(out * cotangent.astype(np.float32))

  value, (grad_a, grad_b) = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))(
      a.astype(np.float32), b.astype(np.float32))
  named = spec.replace("...", "bl")  # the [2, 5, ...] lhs of the ellipsis specs
  lhs_spec, rhs_spec = named.split("->")[0].split(",")
  out_spec = named.split("->")[1]
  expect_grad_a = np.einsum(f"{out_spec},{rhs_spec}->{lhs_spec}", cotangent, b)
  expect_grad_b = np.einsum(f"{lhs_spec},{out_spec}->{rhs_spec}", a, cotangent)
  # The value is a float32 sum of out * cotangent over the outputs, each out a float32 sum of
  # `contracted` exact products; it nearly cancels (|value| can be 1e-3 of the sum of its |terms|),
  # so bound its rounding by those terms, not by |value| (rtol=1e-5 of |value| held by 1.4x).
  contracted = int(np.einsum(spec, np.ones(lhs_shape), np.ones(rhs_shape)).flat[0])
  terms = np.sum(np.einsum(spec, np.abs(a), np.abs(b)) * np.abs(cotangent))
  np.testing.assert_allclose(value, np.sum(np.einsum(spec, a, b) * cotangent), rtol=0,
                             atol=_float32_sum_tolerance(terms, contracted + cotangent.size))
  # Gradients are returned in bf16 (8 bits of mantissa): one rounding of a float32 sum.
  np.testing.assert_allclose(np.asarray(grad_a, np.float64), expect_grad_a, rtol=1e-2, atol=2e-2)
  np.testing.assert_allclose(np.asarray(grad_b, np.float64), expect_grad_b, rtol=1e-2, atol=2e-2)


@pytest.mark.parametrize("rows", [1, 6, 37, 1824])
@pytest.mark.parametrize("lhs,rhs,out,sizes", [("xo", "io", "xi", dict(i=16, o=12)),
                                               ("xyo", "io", "xyi", dict(i=24, o=40, y=3)),
                                               ("xv", "ev", "xe", dict(v=200, e=8)),
                                               ("xo", "io", "xi", dict(i=512, o=1024))])
def test_transposed_rhs_branch_runs_and_equals_float64(rows, lhs, rhs, out, sizes):
  """The CPU branch of the activation gradient `g @ W^T` at every shape class: tiny, odd and
  one-row shapes must run (not reach a bf16 dot XLA:CPU cannot execute) and be exact."""
  sizes = dict(sizes, x=rows)
  a = jnp.asarray(_bf16_values([sizes[c] for c in lhs], 3), jnp.bfloat16)
  b = jnp.asarray(_bf16_values([sizes[c] for c in rhs], 4), jnp.bfloat16)
  assert matmul._is_transposed_rhs(lhs, rhs, out)
  cpu_branch = jax.jit(
      lambda a, b: matmul._transposed_rhs_einsum(lhs, rhs, out, a, b, jnp.float32))
  spec = f"{lhs},{rhs}->{out}"
  expected = np.einsum(spec, np.float64(a), np.float64(b))
  # Float32 accumulation of up to 1024 exact products per output, in whatever order the CPU's
  # dot kernel takes. (The former rtol=1e-5, atol=1e-4 held by 2.9x on one machine; the error
  # grows with the number and size of the products, which this bound follows.)
  contracted = int(np.prod([sizes[c] for c in lhs if c not in out]))
  tolerance = _float32_sum_tolerance(
      np.einsum(spec, np.abs(np.float64(a)), np.abs(np.float64(b))), contracted)
  _assert_within(cpu_branch(a, b), expected, tolerance)
  plain = jax.jit(lambda a, b: matmul._plain_einsum(lhs, rhs, out, a, b, jnp.float32))
  _assert_within(plain(a, b), expected, tolerance)


def test_float32_is_plain_einsum():
  a = np.random.default_rng(5).normal(size=(3, 4, 16)).astype(np.float32)
  b = np.random.default_rng(6).normal(size=(16, 8)).astype(np.float32)
  np.testing.assert_allclose(matmul.einsum("...i,io->...o", a, b, jnp.float32),
                             np.einsum("...i,io->...o", np.float64(a), np.float64(b)),
                             rtol=1e-5, atol=1e-5)


def _dot_result_types(spec, lhs_shape, rhs_shape, platform):
  """The result element types of every dot in the bf16 value-and-gradient program of `spec`,
  lowered for `platform` (no device of that platform needed)."""
  def loss(a, b):
    return jnp.sum(matmul.einsum(spec, a, b, jnp.bfloat16, out_dtype=jnp.float32))

  program = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))
  args = (jax.ShapeDtypeStruct(lhs_shape, jnp.bfloat16),
          jax.ShapeDtypeStruct(rhs_shape, jnp.bfloat16))
  text = jax.export.export(program, platforms=[platform])(*args).mlir_module()
  return [re.search(r"->\s*tensor<(?:\d+x)*(\w+)>", line).group(1)
          for line in text.splitlines() if "stablehlo.dot_general" in line]


@pytest.mark.parametrize("spec,lhs_shape,rhs_shape", SPECS)
def test_accelerator_backward_matmuls_return_the_input_dtype(spec, lhs_shape, rhs_shape):
  # Off CPU, a backward matmul that returns float32 and casts cost the TPU compiler 0.47 ->
  # 0.78 GiB of temporaries (T5 1.1 base, remat full, v5e-8): the forward sums in float32,
  # both gradients come out of bf16 dots. On CPU the gradients take the float32 fast path.
  tpu = _dot_result_types(spec, lhs_shape, rhs_shape, "tpu")
  assert tpu == ["f32", "bf16", "bf16"], tpu
  cpu = _dot_result_types(spec, lhs_shape, rhs_shape, "cpu")
  assert cpu == ["f32", "f32", "f32"], cpu
