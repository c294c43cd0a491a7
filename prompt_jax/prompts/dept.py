"""Decomposed Prompt Tuning, DePT (Shi & Lipani, ICLR 2024, arXiv 2309.05173, "DePT: Decomposed
Prompt Tuning for Parameter-Efficient Fine-tuning").

A plain prompt of L tokens is traded for a shorter soft prompt of m < L tokens plus a low-rank
update of the frozen input token embeddings, position by position:

    E'[j] = E[j] + (alpha / sqrt(r)) (A @ B)[j]      j = 0 .. l-1, the input positions
    encoder input = insert(P, E')                     (prefix by default, as the authors)

    E [b, l, d] embedded input tokens,  P [m, d] soft prompt,  A [s, r],  B [r, d],
    s = `max_input_length` (rows of A: one per input position; an input of l < s tokens uses the
    first l rows, an input longer than s is refused), r = `rank`.

The paper's claim: at the same parameter budget as prompt tuning, DePT matches or beats it (and
most PEFT baselines) on 23 NLP and vision-language tasks while its shorter prompt saves over 20%
of training and inference time and memory; the saving grows with model size.

Parameter budget. DePT trains m·d + s·r + r·d parameters; to match a plain prompt of L tokens
(L·d), `rank=None` derives r from `budget_length` L:

    r = floor((L - m) · d / (s + d))

(T5-Base, d=768, s=256, L=100: m=60 gives r=30 and m=40 gives r=45, both exactly 76,800 =
100·768; otherwise the floor leaves fewer than s + d of the L·d unspent). An explicit `rank` wins.

Defaults from the authors' code (ZhengxiangShi/DePT, `peft/tuners/prompt_tuning_lora.py`,
`train.py`, README): s = 256 (`--max_seq_length 256`), m = 60 with r = 30 (`train.py`'s default
`--r 30`; the README's example is m=40, r=45, "40 or 60 should be fine"), the update scaled by
lora_alpha / sqrt(r) with lora_alpha = 8 (`PromptEmbeddingLoRA.scaling`), A ~ kaiming_uniform(a=√5)
= U[-1/√r, 1/√r] and B = 0 (so training starts from the short prompt alone), the soft prompt
from text or random (here: `prompt`'s `init_fn`, sampled vocabulary in `prompts/dept.gin`). Two
learning rates in one AdamW: the soft prompt's (README grid {3e-1, 4e-1}) and the low-rank pair's
(README grid {5e-3, 3e-1, 5e-4}; the paper's point is a smaller one): `prompts/dept.gin` binds
0.3 and 5e-3 with `optimizers.split_by_path(LOW_RANK_PATTERN, ...)`.

Packed rows (`base.PACKED_FEATURES`): handled. Slot q >= m of a packed example is its text token
q - m, which gets row q - m of A @ B, as it would unpacked; prompt slots and padding get none.

Export: the soft prompt folds to a plain [m, d] array but the embedding update cannot (it is added
to the input tokens, not inserted), so `export` returns None: the trainer writes no
prompts/prompt_<step>.npy for DePT and `prompt-jax export-prompt` refuses, because a plain prompt
alone would silently serve a different model. Serve DePT from its run directory (eval/infer
--model_dir); `export_parts` gives both folded pieces, {'prompt': [m, d],
'embedding_update': [s, d]}, for tools that can apply them.
"""

from __future__ import annotations

import math
from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from prompt_jax.prompts.base import InputPrompt, PromptFeatures, check_prompt_length

Array = jax.Array

# `prompt_position`: rows of A, one per input position (new here); `prompt_rank` as in dpt/mpt.
LOGICAL_AXIS_RULES = (("prompt_position", None), ("prompt_rank", None))
# The low-rank pair's paths, for the second learning rate (`optimizers.split_by_path`).
LOW_RANK_PATTERN = r"(^|/)lora_embedding_[ab]$"
DEPT_ALPHA = 8.0  # lora_alpha of the authors' PromptTuningLoRAConfig


def low_rank_pattern() -> str:
  """`LOW_RANK_PATTERN`, for gin: `pattern = @dept.low_rank_pattern()`."""
  return LOW_RANK_PATTERN


def matched_rank(budget_length: int, prompt_length: int, max_input_length: int,
                 embed: int) -> int:
  """r = floor((L - m) d / (s + d)): the largest rank whose m·d + s·r + r·d <= L·d."""
  return (budget_length - prompt_length) * embed // (max_input_length + embed)


def parameter_count(prompt_length: int, rank: int, max_input_length: int, embed: int) -> int:
  """m·d + s·r + r·d: DePT's trainable parameters."""
  return prompt_length * embed + max_input_length * rank + rank * embed


def _optional_int(name: str, value) -> None:
  if value is not None:
    check_prompt_length(value, name)


class DePTPrompt(InputPrompt):
  """The DePT encoder hook: `InputPrompt` of the short soft prompt, after the low-rank update of
  the embedded input tokens (see the module docstring).

  Attributes:
    prompt: the generator of the m-token soft prompt (e.g. `plain.Prompt(60)`), placed as
      `InputPrompt` places it.
    placement: 'prefix' (the paper's), 'prefix_after_bos' or 'suffix'; the update is added to the
      input tokens before insertion, so input token j always gets row j.
    max_input_length: s, the rows of A (the authors' 256 = `--max_seq_length`).
    rank: r; None derives it from `budget_length` (`matched_rank`).
    budget_length: L, the plain prompt length whose parameter count DePT matches (used only when
      `rank` is None).
    alpha: the update is scaled by alpha / sqrt(r) (the authors' lora_alpha = 8).

  Parameters (below `encoder/prompt/`): `prompt/...` the generator's (`prompt/prompt` [m, d] for
  a plain prompt, the path of a plain prompt run), `lora_embedding_a` [s, r] (prompt_position,
  prompt_rank), `lora_embedding_b` [r, d] (prompt_rank, prompt_embed).
  """

  max_input_length: int = 256
  rank: Optional[int] = None
  budget_length: Optional[int] = None
  alpha: float = DEPT_ALPHA

  def __post_init__(self):
    name = type(self).__name__
    check_prompt_length(self.max_input_length, f"{name}.max_input_length")
    _optional_int(f"{name}.rank", self.rank)
    _optional_int(f"{name}.budget_length (PROMPT_LENGTH)", self.budget_length)
    if isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float)) \
        or not self.alpha > 0:
      raise ValueError(f"{name}.alpha must be a number > 0, got {self.alpha!r}")
    if self.rank is None:
      if self.budget_length is None:
        raise ValueError(f"{name} needs rank, or budget_length (the plain prompt length whose "
                         "parameter count it matches) to derive it; got neither")
      length = int(self.prompt.length)
      if self.budget_length <= length:
        raise ValueError(f"{name}.budget_length (PROMPT_LENGTH) L={self.budget_length} must "
                         f"exceed the soft prompt length m={length} to leave parameters for "
                         "the low-rank pair")
    super().__post_init__()

  def resolved_rank(self, embed: int) -> int:
    """r: `rank`, or `matched_rank(budget_length, m, s, embed)`; ValueError when that is < 1."""
    if self.rank is not None:
      return int(self.rank)
    rank = matched_rank(self.budget_length, self.length, self.max_input_length, embed)
    if rank < 1:
      raise ValueError(
          f"{type(self).__name__}: budget L={self.budget_length} tokens leaves rank "
          f"floor((L - m) d / (s + d)) = floor(({self.budget_length} - {self.length}) * {embed} "
          f"/ ({self.max_input_length} + {embed})) = {rank} < 1; shorten the soft prompt m, "
          "raise L or set rank")
    return rank

  def _factors(self, embed: int) -> tuple[Array, Array]:
    """(A [s, r], B [r, d]), float32; created on first use."""
    rank = self.resolved_rank(embed)
    bound = 1.0 / math.sqrt(rank)  # torch kaiming_uniform_(a=sqrt(5)) on [s, r]: fan_in = r
    a = self.param("lora_embedding_a", nn.with_logical_partitioning(
        lambda rng, shape: jax.random.uniform(rng, shape, jnp.float32, -bound, bound),
        ("prompt_position", "prompt_rank")), (self.max_input_length, rank))
    b = self.param("lora_embedding_b", nn.with_logical_partitioning(
        nn.initializers.zeros_init(), ("prompt_rank", "prompt_embed")), (rank, embed),
        jnp.float32)
    return a, b

  def scaled_product(self, a: Array, b: Array) -> Array:
    """(alpha / sqrt(r)) A @ B -> [s, d] float32, row j added to input token j."""
    scale = self.alpha / math.sqrt(a.shape[1])
    return scale * jnp.dot(a, b, precision=jax.lax.Precision.HIGHEST)

  @nn.compact
  def __call__(self, input_tokens: Array, embedded_inputs: Array, embedding_table: Array,
               prompt_features: Optional[PromptFeatures] = None):
    """E' = E + update, then `InputPrompt` inserts the soft prompt: -> (embedded [b, m + l, d],
    mask [b, m + l]); packed rows: ([b, l, d], [b, l])."""
    name = type(self).__name__
    length, s = input_tokens.shape[1], self.max_input_length
    update = self.scaled_product(*self._factors(embedded_inputs.shape[-1]))  # [s, d]
    packed = self._packed_features(input_tokens, prompt_features)
    if packed is None:
      if length > s:
        raise ValueError(f"inputs of {length} tokens exceed {name}.max_input_length={s} (the "
                         "rows of A, one per input position); raise DEPT_MAX_INPUT_LENGTH or "
                         "truncate the inputs")
      rows = update[None, :length]
    else:
      if length - self.length > s:
        raise ValueError(f"packed rows of {length} encoder tokens can hold examples of up to "
                         f"{length - self.length} tokens, more than {name}.max_input_length={s}")
      segment_ids, positions = packed
      text = positions - self.length  # slot q >= m of an example is its text token q - m
      rows = jnp.take(update, jnp.clip(text, 0, s - 1), axis=0)
      rows = jnp.where(((segment_ids > 0) & (text >= 0))[..., None], rows, 0.0)
    embedded = (embedded_inputs.astype(jnp.float32) + rows).astype(embedded_inputs.dtype)
    return super().__call__(input_tokens, embedded, embedding_table, prompt_features)

  def export(self, embedding_table: Array) -> None:
    """None: the embedding update is part of the model's input, not of a prompt, so DePT has no
    plain [length, embed] form (the module docstring; `export_parts` gives both pieces)."""
    del embedding_table
    return None

  def export_parts(self, embedding_table: Array) -> dict[str, Array]:
    """{'prompt': the soft prompt [m, d], 'embedding_update': (alpha / sqrt(r)) A @ B [s, d]}:
    everything DePT adds, folded (apply with the trained parameters, as `base.export_prompt`
    does with `method=hook.export_parts`)."""
    a, b = (nn.meta.unbox(self.get_variable("params", name))
            for name in ("lora_embedding_a", "lora_embedding_b"))
    return {"prompt": super().export(embedding_table),
            "embedding_update": self.scaled_product(a, b)}

