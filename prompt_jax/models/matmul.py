"""The model's matmuls: float32 as they are, lower precisions accumulated in float32.

`einsum(spec, a, b, dtype)` is every matmul of the T5 (dense layers, attention scores and
values, logits). In float32 it is `jnp.einsum`. In a lower precision (bf16) it is
`accumulating_einsum`: inputs in that dtype, products summed in float32 (the fast path of a
TPU's MXU and of a CPU's bf16 matrix units: AMX/AVX-512 BF16 run bf16 x bf16 -> f32 several
times faster than a bf16-output dot), with a hand-written backward pass:

  * the cotangent is cast to the inputs' dtype before the backward matmuls, so XLA never
    upcasts the bf16 frozen weights to float32 for a float32 cotangent; off CPU the backward
    matmuls are the plain dtype einsum's (bf16 results): the TPU compiler measures T5 1.1
    base, remat full, v5e-8 at 0.47 GiB of temporaries this way, and 0.78 GiB with a float32
    cotangent or with backward matmuls that return float32 and cast
    (tests/test_matmul.py checks the TPU lowering);
  * on CPU, `x @ W^T` (every dense layer's activation gradient `g @ W^T`, and tied logits)
    hides the transpose from XLA until after XLA:CPU has decided whether the dot stays bf16:
    seeing a transposed operand, it upcasts the dot to float32 (~250 GFLOP/s here), while its
    YNNPACK dot runs the same product on the matrix units once the transpose is folded in
    (~1,300 GFLOP/s at the T5 1.1 small shape, `benchmarks/` and tests/test_matmul.py). Other
    forms (weight gradients, batched attention products) stay plain: there the late form can be
    one XLA:CPU cannot execute in bf16. Other platforms (the TPU compiler, GPUs) get plain
    einsums (float32 sums forward, dtype results backward), chosen when the program is lowered
    (`jax.lax.platform_dependent`).

Every result is named for rematerialisation (`jax.ad_checkpoint.checkpoint_name`): "matmul"
for products without batch axes (dense layers, logits), "batched_matmul" for those with them
(attention). The custom VJP hides its dots from `jax.checkpoint_policies.dots_saveable`, so the
model's remat policies save these names (`REMAT_POLICIES` in models/t5.py).
"""

from __future__ import annotations

import functools
import string

import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

Array = jax.Array

MATMUL = "matmul"
BATCHED_MATMUL = "batched_matmul"


def _named_axes(spec: str, a: Array, b: Array) -> tuple[str, str, str]:
  """'...i,io->...o' with a [b, l, i] -> ('xyi', 'io', 'xyo'): the spec with every axis named."""
  inputs, out = spec.replace(" ", "").split("->")
  lhs, rhs = inputs.split(",")
  if "..." not in spec:
    return lhs, rhs, out
  free = [c for c in string.ascii_letters if c not in spec]
  names = [free[:operand.ndim - (len(term) - 3)]
           for term, operand in ((lhs, a), (rhs, b)) if "..." in term]
  ellipsis = "".join(max(names, key=len))
  return lhs.replace("...", ellipsis), rhs.replace("...", ellipsis), out.replace("...", ellipsis)


def _unfoldable_transpose(x: Array, order: tuple[int, ...]) -> Array:
  """x transposed to `order`, hidden from XLA's early passes: a dynamic slice at a run-time zero
  cannot be folded before XLA:CPU decides whether a bf16 dot stays bf16 (it would otherwise see
  the transposed operand and upcast the dot to float32); later passes fold it away and the
  matrix units read the weight transposed."""
  transposed = jnp.transpose(x, order)
  zero = jax.lax.optimization_barrier(jnp.zeros((), jnp.int32))
  return jax.lax.dynamic_slice(transposed, (zero,) * x.ndim, transposed.shape)


def _free_and_contracted(lhs: str, rhs: str, out: str) -> tuple[str, str, str]:
  """(m, k, n) of `lhs,rhs->out`: the lhs-only, contracted and rhs-only axes, in operand order."""
  m = "".join(c for c in lhs if c not in rhs)
  k = "".join(c for c in lhs if c in rhs and c not in out)
  n = "".join(c for c in rhs if c not in lhs)
  return m, k, n


def _transposed_rhs_einsum(lhs: str, rhs: str, out: str, a: Array, b: Array,
                           out_dtype) -> Array:
  """einsum(lhs,rhs->out) for lhs [m..., k...], rhs [n..., k...] and out [m..., n...] (the
  activation gradient `g @ W^T` of a dense layer), summed in float32."""
  _, contract, n = _free_and_contracted(lhs, rhs, out)
  b2 = _unfoldable_transpose(b, tuple(rhs.index(c) for c in contract + n))
  nk, na = len(contract), a.ndim
  dims = ((tuple(range(na - nk, na)), tuple(range(nk))), ((), ()))
  return jax.lax.dot_general(a, b2, dims,
                             preferred_element_type=jnp.float32).astype(out_dtype)


def _plain_einsum(lhs: str, rhs: str, out: str, a: Array, b: Array, out_dtype) -> Array:
  return jnp.einsum(f"{lhs},{rhs}->{out}", a, b,
                    preferred_element_type=jnp.float32).astype(out_dtype)


def _is_transposed_rhs(lhs: str, rhs: str, out: str) -> bool:
  """lhs [m..., k...] x rhs [n..., k...] -> out [m..., n...], with no batch axes."""
  m, k, n = _free_and_contracted(lhs, rhs, out)
  return (bool(k) and lhs == m + k and rhs == n + k and out == m + n
          and len(m) + len(n) + len(k) == len(set(lhs + rhs)))


def _cpu_einsum(lhs: str, rhs: str, out: str, a: Array, b: Array, out_dtype) -> Array:
  """On CPU: `x @ W^T` (a dense layer's activation gradient, tied logits) through the bf16
  matrix units with the transpose hidden, every other form as the plain einsum."""
  if _is_transposed_rhs(lhs, rhs, out):
    return _transposed_rhs_einsum(lhs, rhs, out, a, b, out_dtype)
  return _plain_einsum(lhs, rhs, out, a, b, out_dtype)


def _fast_einsum(lhs: str, rhs: str, out: str, a: Array, b: Array, out_dtype) -> Array:
  """A forward matmul summed in float32: `x @ W^T` with the transpose hidden on CPU, every
  other form (and every form elsewhere) the plain einsum."""
  if not _is_transposed_rhs(lhs, rhs, out):
    return _plain_einsum(lhs, rhs, out, a, b, out_dtype)
  return jax.lax.platform_dependent(
      a, b, cpu=functools.partial(_transposed_rhs_einsum, lhs, rhs, out, out_dtype=out_dtype),
      default=functools.partial(_plain_einsum, lhs, rhs, out, out_dtype=out_dtype))


def _backward_einsum(lhs: str, rhs: str, out: str, a: Array, b: Array) -> Array:
  """A backward-pass matmul of same-dtype a and b, result in that dtype: on CPU `_cpu_einsum`
  (float32 sums, the matrix units' fast path), elsewhere the dtype einsum (the accelerator
  accumulates in float32 itself; a float32 result then cast costs TPU memory)."""
  return jax.lax.platform_dependent(
      a, b, cpu=functools.partial(_cpu_einsum, lhs, rhs, out, out_dtype=a.dtype),
      default=lambda a, b: jnp.einsum(f"{lhs},{rhs}->{out}", a, b))


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 3))
def accumulating_einsum(spec: str, a: Array, b: Array, out_dtype=None) -> Array:
  """`jnp.einsum(spec, a, b)` of same-dtype inputs, summed in float32, returned in `out_dtype`
  (default: the inputs' dtype). See the module docstring for its backward pass."""
  return _fast_einsum(*_named_axes(spec, a, b), a, b, out_dtype or a.dtype)


def _accumulating_einsum_fwd(spec, a, b, out_dtype):
  return accumulating_einsum(spec, a, b, out_dtype), (a, b)


def _accumulating_einsum_bwd(spec, out_dtype, residuals, g):
  del out_dtype
  a, b = residuals
  lhs, rhs, out = _named_axes(spec, a, b)
  g = g.astype(a.dtype)
  return _backward_einsum(out, rhs, lhs, g, b), _backward_einsum(lhs, out, rhs, a, g)


accumulating_einsum.defvjp(_accumulating_einsum_fwd, _accumulating_einsum_bwd)


def _has_batch_axes(lhs: str, rhs: str, out: str) -> bool:
  """Whether an axis is in both inputs and the output ('bhqd,bhdk->bhqk': b and h)."""
  return any(c in rhs and c in out for c in lhs)


def einsum(spec: str, a: Array, b: Array, dtype, out_dtype=None) -> Array:
  """The model's matmul of a and b cast to `dtype`: `jnp.einsum` in float32 (result in
  `out_dtype`, default `dtype`), else `accumulating_einsum`; the result is named MATMUL or
  BATCHED_MATMUL for remat policies."""
  dtype = jnp.dtype(dtype)
  a, b = a.astype(dtype), b.astype(dtype)
  if dtype == jnp.float32:
    out = jnp.einsum(spec, a, b).astype(out_dtype or dtype)
  else:
    out = accumulating_einsum(spec, a, b, None if out_dtype is None else jnp.dtype(out_dtype))
  batched = _has_batch_axes(*_named_axes(spec, a, b))
  return checkpoint_name(out, BATCHED_MATMUL if batched else MATMUL)
