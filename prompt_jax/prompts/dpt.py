"""Decomposed Prompt Tuning, DPT (Xiao et al., Findings of EMNLP 2023, arXiv 2310.10094,
"Decomposed Prompt Tuning via Low-Rank Reparameterization"): the soft prompt is the product of
two trainable low-rank matrices,

    P = A @ B          P [L, d],  A [L, r],  B [r, d],  r << min(L, d)

so it trains L·r + r·d parameters instead of L·d (T5-Large, L=100, d=1024, r=10: 11,240 instead of
102,400, the paper's "11.2K vs 102K"). The paper's finding: learned soft prompts have a low
"intrinsic rank", and DPT with ~11% of the parameters matches or beats vanilla prompt tuning on
SuperGLUE with T5.

Defaults from the authors' code (XYaoooo/DPT): L = 100 (`--enc_prompt_tokens 100`), r = 10
(`--bottle_neck 10`), both factors initialised U[-0.5, 0.5] (`init_prefix_weights`, random_range
0.5), product prepended to the encoder input (`T5EncoderStack.get_prompt_encoder`); AdamW lr 0.3,
weight decay 1e-5, gradient norm clipped at 1.0 (`options.py`; `prompts/dpt.gin` binds them, with
a constant learning rate where the code decays linearly after a 10% warmup).

The output does not depend on the input, so `InputPrompt.export` folds a trained DPT into the
plain [L, d] array A @ B, which serves with a plain `Prompt` at zero overhead.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from prompt_jax.prompts.base import check_prompt_length

Array = jax.Array

# The rank axis of the factors (shared with `mpt.py`, same rule); replicated like every prompt axis.
LOGICAL_AXIS_RULES = (("prompt_rank", None),)
DPT_INIT_LIMIT = 0.5  # the authors' U[-0.5, 0.5] for both factors


def symmetric_uniform(limit: float):
  """A Linen initialiser U[-limit, limit) (float32)."""

  def init(rng, shape, dtype=jnp.float32):
    return jax.random.uniform(rng, shape, dtype, -limit, limit)

  return init


class DPTPrompt(nn.Module):
  """A prompt generator (see `prompt_jax.prompts.base`) for `InputPrompt`: prompt = A @ B.

  Attributes:
    length: number of prompt tokens L (the paper's 100).
    rank: inner dimension r of the factors (the paper's bottleneck, 10).
    init_limit: both factors start U[-init_limit, init_limit) (the authors' 0.5).

  Parameters (below `encoder/prompt/prompt/`): `a` [L, r] (prompt, prompt_rank) and `b` [r, embed]
  (prompt_rank, prompt_embed).
  """

  length: int = 100
  rank: int = 10
  init_limit: float = DPT_INIT_LIMIT

  def __post_init__(self):
    check_prompt_length(self.length, "PROMPT_LENGTH (DPTPrompt.length)")
    check_prompt_length(self.rank, "DPTPrompt.rank")
    if isinstance(self.init_limit, bool) or not isinstance(self.init_limit, (int, float)) \
        or not self.init_limit > 0:
      raise ValueError(f"DPTPrompt.init_limit must be a number > 0, got {self.init_limit!r}")
    super().__post_init__()

  @nn.compact
  def __call__(self, input_tokens: Array, embedded_inputs: Array, embedding_table: Array) -> Array:
    """-> [batch, length, embed] (float32), the same for every example."""
    del embedded_inputs
    embed = embedding_table.shape[-1]
    init = symmetric_uniform(self.init_limit)
    a = self.param("a", nn.with_logical_partitioning(init, ("prompt", "prompt_rank")),
                   (self.length, self.rank))
    b = self.param("b", nn.with_logical_partitioning(init, ("prompt_rank", "prompt_embed")),
                   (self.rank, embed))
    prompt = jnp.dot(a, b, precision=jax.lax.Precision.HIGHEST)
    return jnp.broadcast_to(prompt, (input_tokens.shape[0],) + prompt.shape)
