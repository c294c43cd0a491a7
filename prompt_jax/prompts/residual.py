"""Residual Prompt Tuning (Razdaibiedina et al. 2023): a plain prompt reparameterised by a
shared bottleneck MLP with a skip connection,

    prompt' = LayerNorm(W_up ReLU(W_down prompt + b_down) + b_up) + prompt

applied to every prompt token with the same weights. The SuperPos-Prompt paper compares against
it with bottleneck 128 and learning rate 0.3 (its own release defaults to bottleneck 800).

The output does not depend on the input, so the trained prompt folds into a plain
[length, embed] array (`InputPrompt.export`) and serves with zero overhead.
"""

from __future__ import annotations

from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from prompt_jax.prompts import initializers

Array = jax.Array


def _boxed(init, axes):
  return nn.with_logical_partitioning(init, axes)


class ResidualPrompt(nn.Module):
  """A prompt generator (see `prompt_jax.prompts.base`) for `InputPrompt`.

  Attributes:
    length: number of prompt tokens L.
    bottleneck: width of the MLP's hidden layer (128 as in the SuperPos comparison).
    init_fn: initialiser of the underlying prompt (see `prompt_jax.prompts.initializers`).
    layer_norm_epsilon: LayerNorm epsilon (1e-5, PyTorch's default, as in the reference code).

  Parameters (below `encoder/prompt/prompt/`): `prompt` [L, embed] (prompt, prompt_embed),
  `down/kernel` [embed, bottleneck] (prompt_embed, prompt_mlp), `down/bias` [bottleneck],
  `up/kernel` [bottleneck, embed], `up/bias` [embed], `layer_norm/{scale,bias}` [embed].
  """

  length: int = 10
  bottleneck: int = 128
  init_fn: Callable = initializers.uniform()
  layer_norm_epsilon: float = 1e-5

  def __post_init__(self):
    for name in ("length", "bottleneck"):
      value = getattr(self, name)
      if not isinstance(value, int) or value < 1:
        raise ValueError(f"ResidualPrompt.{name} must be a positive integer, got {value!r}")
    super().__post_init__()

  @nn.compact
  def __call__(self, input_tokens: Array, embedded_inputs: Array, embedding_table: Array) -> Array:
    """-> [batch, length, embed] (float32)."""
    del embedded_inputs
    embed = embedding_table.shape[-1]
    prompt = self.param(
        "prompt", _boxed(lambda rng, shape: self.init_fn(rng, shape, embedding_table),
                         ("prompt", "prompt_embed")), (self.length, embed))
    hidden = nn.Dense(self.bottleneck, name="down",
                      kernel_init=_boxed(nn.initializers.lecun_normal(),
                                         ("prompt_embed", "prompt_mlp")),
                      bias_init=_boxed(nn.initializers.zeros_init(), ("prompt_mlp",)))(prompt)
    hidden = nn.relu(hidden)
    hidden = nn.Dense(embed, name="up",
                      kernel_init=_boxed(nn.initializers.lecun_normal(),
                                         ("prompt_mlp", "prompt_embed")),
                      bias_init=_boxed(nn.initializers.zeros_init(), ("prompt_embed",)))(hidden)
    hidden = nn.LayerNorm(epsilon=self.layer_norm_epsilon, name="layer_norm",
                          scale_init=_boxed(nn.initializers.ones_init(), ("prompt_embed",)),
                          bias_init=_boxed(nn.initializers.zeros_init(), ("prompt_embed",)))(hidden)
    out = hidden + prompt
    return jnp.broadcast_to(out, (input_tokens.shape[0],) + out.shape)
