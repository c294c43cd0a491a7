"""SMoP: Sparse Mixture-of-Prompts (Choi et al., EMNLP 2023, "SMoP: Towards Efficient and
Effective Prompt Tuning with Sparse Mixture-of-Prompts"; reference code jyjohnchoi/SMoP,
`peft_models/tuners/prompt_routing.py::PromptRoutingEmbedding`).

k short prompts P_1..P_k [m, d] and a linear router; each example gets the one prompt (top-1)
the router picks for its input, scaled by the router's probability for it:

    x̄ = Σ_i mask_i e_i / max(1, Σ_i mask_i)        [b, d]   mean of the embedded input tokens
                                                             e_i (padding excluded, mask = id > 0)
    z = x̄ W_r                                      [b, k]   W_r [d, k], no bias, orthogonal init
    z̃ = z + s · ε ⊙ sg(z),  ε ~ N(0, 1) [b, k]     training steps only (router perturbation;
                                                             sg = stop-gradient), else z̃ = z
    p = softmax(z̃)                                  [b, k]
    prompt(x) = p_j* · P_j*,  j* = argmax_j p_j      [b, m, d]

`top_k` K > 1 gives the reference code's weighted sum Σ_{j ∈ top-K(p)} p_j P_j (still m tokens,
no renormalisation). The gate p_j* is what trains the router: argmax has no gradient, so W_r
learns only through the scale of the prompt it chose (a prompt's gradient reaches only the rows
of the examples that chose it).

Router perturbation (the paper's section 2.3; the reference's `GaussianNoise(sigma=1)` with
relative, detached scale: noise = σ ε (σ sg(z)), so s = σ² = 1): multiplicative Gaussian noise on
the router logits that lets other prompts win now and then and keeps the routing balanced. It is
on exactly in training steps: the hook cannot see `enable_dropout`, so it uses the generic
signal the model already gives every hook (and `p_tuning.LSTMHead` uses): the `dropout` rng
stream is present only in training steps (`EncoderDecoderModel.logits(dropout_rng=...)`, which
every train step passes, whatever DROPOUT_RATE is); evaluation, scoring and decoding have none.
`router_noise=0` turns it off.

Defaults (the reference README's training command): k = 4 prompts of m = 5 tokens (20 prompt
tokens in all, against the prompt-tuning baseline's 100; the encoder sees 5), top-1,
perturbation on; T5 with Adafactor lr 0.5 (weight decay 1e-5, no parameter scaling; linear
warm-up over 6% of the steps then linear decay, not reproduced by `prompts/smop.gin`), batch 32.

Differences from the reference: the prompts start from `init_fn` (default U[-0.5, 0.5) like the
other methods; the reference keeps `torch.nn.Embedding`'s N(0, 1), `p_tuning.normal()` here);
the reference's variants without a router (`stochastic`: a random prompt per example, the mean
prompt in evaluation) and Gumbel routing are not implemented.

Every example picks its own prompt, so a serving batch mixes prompts per example by itself; the
hook reads no batch feature. It depends on the whole input, so packed rows (several examples
in one row) are refused by the model (the hook does not read `encoder_segment_ids`).

Export: `export` returns None (`base.export_prompt`: "None ... when the prompt depends on the
input"). The k prompts alone are not a servable bank: the choice and the gate p_j* depend on the
input, so `prompt-jax export-prompt` refuses the hook and it serves from its run directory
(`prompt-jax eval/infer --model_dir=...`).
"""

from __future__ import annotations

import dataclasses
from typing import Callable, ClassVar, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from prompt_jax.prompts import base, initializers

Array = jax.Array

# Which of the k prompts (SMoP's experts); replicated like every prompt axis. A name of its own:
# the bank's `prompts` axis means one row per task to multi-task training.
LOGICAL_AXIS_RULES = (("prompt_experts", None),)


def _check_int(name: str, value, minimum: int = 1) -> int:
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
    raise ValueError(f"SMoPPrompt.{name} must be an integer >= {minimum}, got {value!r}")
  return int(value)


def mean_pool(embedded: Array, input_tokens: Array) -> Array:
  """embedded [b, l, d], tokens [b, l] -> [b, d]: the mean over the real (id > 0) tokens (0 for
  a row of padding only), in float32."""
  mask = (input_tokens > 0).astype(jnp.float32)[..., None]
  total = jnp.sum(embedded.astype(jnp.float32) * mask, axis=1)
  return total / jnp.maximum(jnp.sum(mask, axis=1), 1.0)


class SMoPPrompt(base.PerExamplePrompt, nn.Module):
  """Encoder hook: `num_prompts` prompts of `length` tokens, one routed to each example.

  Attributes:
    num_prompts: k, the number of short prompts (4 in the paper).
    length: m, tokens per prompt and of the encoder's prompt (5 in the paper).
    router_noise: s, the relative standard deviation of the router perturbation in training
      steps (1.0, the reference's sigma=1); 0 turns it off.
    top_k: prompts mixed per example (1, the paper's sparse routing).
    init_fn: initialiser of each prompt (see `prompt_jax.prompts.initializers`); prompt j gets
      the rng `fold_in(rng, j)`.
    placement: 'prefix', 'prefix_after_bos' or 'suffix', as for `InputPrompt`.
    max_encoder_length: the encoder length budget (keyword only; `base`).

  Parameters (below `encoder/prompt/`): `prompts` [k, m, d] (prompt_experts, prompt,
  prompt_embed) and `router/kernel` [d, k] (prompt_embed, prompt_experts).
  """

  input_features: ClassVar[tuple[str, ...]] = ()

  num_prompts: int = 4
  length: int = 5
  router_noise: float = 1.0
  top_k: int = 1
  init_fn: Callable = initializers.uniform()
  placement: str = "prefix"
  max_encoder_length: int = dataclasses.field(default=base.MAX_ENCODER_LENGTH, kw_only=True)

  def __post_init__(self):
    _check_int("num_prompts", self.num_prompts)
    base.check_prompt_length(self.length, "SMoPPrompt.length (PROMPT_LENGTH)")
    if _check_int("top_k", self.top_k) > self.num_prompts:
      raise ValueError(f"SMoPPrompt.top_k must be <= num_prompts={self.num_prompts}, got "
                       f"{self.top_k!r}")
    noise = self.router_noise
    if isinstance(noise, bool) or not isinstance(noise, (int, float)) or not 0 <= noise < np.inf:
      raise ValueError(f"SMoPPrompt.router_noise must be a finite number >= 0, got {noise!r}")
    base.check_placement(self)
    super().__post_init__()

  def _prompts(self, embedding_table: Array) -> Array:
    def init(rng, shape):
      return jnp.stack([self.init_fn(jax.random.fold_in(rng, j), shape[1:], embedding_table)
                        for j in range(shape[0])])

    return self.param(
        "prompts",
        nn.with_logical_partitioning(init, ("prompt_experts", "prompt", "prompt_embed")),
        (int(self.num_prompts), int(self.length), embedding_table.shape[-1]))

  def route(self, input_tokens: Array, embedded_inputs: Array) -> Array:
    """-> the router's probabilities p [b, k] (perturbed in training steps), float32."""
    pooled = mean_pool(embedded_inputs, input_tokens)
    logits = nn.Dense(
        int(self.num_prompts), use_bias=False, name="router", dtype=jnp.float32,
        kernel_init=nn.with_logical_partitioning(nn.initializers.orthogonal(),
                                                 ("prompt_embed", "prompt_experts")))(pooled)
    if self.router_noise and self.has_rng("dropout"):
      noise = jax.random.normal(self.make_rng("dropout"), logits.shape, logits.dtype)
      logits = logits + self.router_noise * noise * jax.lax.stop_gradient(logits)
    return jax.nn.softmax(logits, axis=-1)

  @nn.compact
  def __call__(self, input_tokens: Array, embedded_inputs: Array, embedding_table: Array,
               prompt_features: Optional[base.PromptFeatures] = None):
    """-> (embedded [b, m + l, d], mask [b, m + l]); example j gets its routed prompt."""
    unread = base.unread_features(self, prompt_features)
    if unread:
      raise ValueError(f"SMoPPrompt routes every example itself and reads no batch feature, "
                       f"got {unread}")
    base.check_encoder_length(self.length, input_tokens.shape[1], self.max_encoder_length)
    prompts = self._prompts(embedding_table).astype(jnp.float32)  # [k, m, d]
    probs = self.route(input_tokens, embedded_inputs)  # [b, k]
    gates, chosen = jax.lax.top_k(probs, int(self.top_k))  # [b, K]
    prompt = jnp.einsum("bk,bkmd->bmd", gates, jnp.take(prompts, chosen, axis=0))
    return self.place(prompt, embedded_inputs, input_tokens)
