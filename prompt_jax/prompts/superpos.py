"""SuperPos-Prompt (SadraeiJavaeri et al. 2024, arXiv 2406.05279): each prompt token is a
superposition of sampled vocabulary embeddings.

For prompt token i, `embeddings[i]` [m, embed] starts as m rows of the frozen token embedding
(drawn from the `population_size` most frequent ids) and is trainable; `coefficients[i]` [m] are
trainable weights. The token is

    prompt[i] = coefficients[i] @ embeddings[i]        (the paper's p_i = E_i p'_i, E_i = rows^T)

No softmax over the coefficients by default: the paper found it worse (`softmax=True` exists to
reproduce that ablation). Weight decay belongs on `coefficients` only, not on `embeddings`:
`WEIGHT_DECAY_PATTERN`, for `optimizers.adamw(weight_decay_pattern=...)` (gin:
`@superpos.weight_decay_pattern()`, as `prompts/superpos.gin` binds it).

Memory: `embeddings` holds length * m * embed parameters (10 x 128 x 768 = 983k for T5-base,
5.2M for XXL), plus twice that in AdamW state. `shared_embeddings=True` keeps one [m, embed]
matrix for all tokens (m * embed parameters); the paper uses a copy per token.

The prompt does not depend on the input, so it folds into a plain [length, embed] array for
serving (`InputPrompt.export`); training-time parameters are only needed while training.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

Array = jax.Array

# SuperPos's own axis (the m sampled embeddings a prompt token is combined from); replicated like
# every prompt axis.
LOGICAL_AXIS_RULES = (("superpos_basis", None),)
# Weight decay on the coefficients p' only (the paper), as a regex over trainable parameter paths
# (`encoder/prompt/prompt/coefficients`).
WEIGHT_DECAY_PATTERN = r"(^|/)coefficients$"


def weight_decay_pattern() -> str:
  """`WEIGHT_DECAY_PATTERN`, for gin: `weight_decay_pattern = @superpos.weight_decay_pattern()`."""
  return WEIGHT_DECAY_PATTERN


def sampled_rows(population_size: int, shared: bool):
  """Initialiser for `embeddings`: rows of `embedding_table` for ids drawn, without replacement
  within each token's set, from the first `population_size` ids (T5 ids are roughly sorted by
  frequency). -> [length, m, embed], or [m, embed] when `shared`."""

  def init(rng, shape, embedding_table):
    *lead, m, _ = shape
    population = min(population_size, embedding_table.shape[0])
    if m > population:
      raise ValueError(f"SuperPosPrompt.num_embeddings={m} exceeds the {population} token ids "
                       "it samples from (population_size and vocabulary size)")
    count = 1 if shared else lead[0]
    keys = jax.random.split(rng, count)
    ids = jax.vmap(lambda k: jax.random.choice(k, population, (m,), replace=False))(keys)
    rows = jnp.take(embedding_table, ids, axis=0).astype(jnp.float32)  # [count, m, embed]
    return rows[0] if shared else rows

  return init


def scaled_normal(rng, shape, dtype=jnp.float32):
  """N(0, 1/m) coefficients: at initialisation each token has about the scale of one embedding
  row. (Our choice; the paper does not pin the coefficient initialisation down.)"""
  return jax.random.normal(rng, shape, dtype) / jnp.sqrt(shape[-1]).astype(dtype)


class SuperPosPrompt(nn.Module):
  """A prompt generator (see `prompt_jax.prompts.base`) for `InputPrompt`.

  Attributes:
    length: number of prompt tokens L (paper: 10).
    num_embeddings: m, sampled embeddings per token (paper: 128, where gains plateau).
    population_size: ids are sampled from the first `population_size` token ids.
    shared_embeddings: one [m, embed] matrix for all tokens instead of a copy per token.
    softmax: normalise coefficients with a softmax (reported worse; off by default).

  Parameters: `embeddings` [L, m, embed] (axes prompt, superpos_basis, prompt_embed) or
  [m, embed] when shared, and `coefficients` [L, m] (axes prompt, superpos_basis).
  """

  length: int = 10
  num_embeddings: int = 128
  population_size: int = 5000
  shared_embeddings: bool = False
  softmax: bool = False

  def __post_init__(self):
    for name in ("length", "num_embeddings", "population_size"):
      value = getattr(self, name)
      if not isinstance(value, int) or value < 1:
        raise ValueError(f"SuperPosPrompt.{name} must be a positive integer, got {value!r}")
    super().__post_init__()

  @nn.compact
  def __call__(self, input_tokens: Array, embedded_inputs: Array, embedding_table: Array) -> Array:
    """-> [batch, length, embed] (float32)."""
    embed = embedding_table.shape[-1]
    init = sampled_rows(self.population_size, self.shared_embeddings)
    if self.shared_embeddings:
      shape, axes = (self.num_embeddings, embed), ("superpos_basis", "prompt_embed")
    else:
      shape = (self.length, self.num_embeddings, embed)
      axes = ("prompt", "superpos_basis", "prompt_embed")
    embeddings = self.param(
        "embeddings",
        nn.with_logical_partitioning(lambda rng, s: init(rng, s, embedding_table), axes), shape)
    coefficients = self.param(
        "coefficients", nn.with_logical_partitioning(scaled_normal, ("prompt", "superpos_basis")),
        (self.length, self.num_embeddings))
    if self.softmax:
      coefficients = jax.nn.softmax(coefficients, axis=-1)
    if self.shared_embeddings:
      prompt = jnp.einsum("lm,md->ld", coefficients, embeddings)
    else:
      prompt = jnp.einsum("lm,lmd->ld", coefficients, embeddings)
    return jnp.broadcast_to(prompt, (input_tokens.shape[0],) + prompt.shape)


def num_params(length: int, embed: int, num_embeddings: int, shared: bool = False) -> int:
  """Trainable parameters: L*m*d + L*m (or m*d + L*m with shared embeddings)."""
  basis = num_embeddings * embed * (1 if shared else length)
  return basis + length * num_embeddings
