"""ATTEMPT: attentional mixtures of soft prompts (Asai et al., EMNLP 2022, arXiv 2205.11961;
reference code AkariAsai/ATTEMPT, `attempt/third_party/models/t5/modeling_t5.py::T5Stack`,
`attn_method='sub'`).

t frozen *source* prompts S_1..S_t [m, d] (trained beforehand on source tasks) and a trainable
*target* prompt T [m, d]; an attention module G, trained with T, mixes them per example:

    x̂ = max_i e_i                                   [b, d]   max-pool of the embedded input
                                                              tokens e_i (padding excluded)
    h = LayerNorm(W_up SiLU(W_down x̂))              [b, d]   W_down [d, r], W_up [r, d], no bias
    P_j = S_j (j <= t),  P_{t+1} = T                [t+1, m, d]
    p̂_j = max_k P_j[k]                               [t+1, d] max-pool over the prompt's tokens
    a = softmax(p̂ h / τ)                             [b, t+1] over the sources and the target
    prompt(x) = T + Σ_{j=1}^{t+1} a_j P_j            [b, m, d]

(the target is both a candidate of the mixture and added once more, as in the reference).

Defaults (the paper and `attempt/configs/attempt/sinlge_task.json`): t = 6 source prompts
(MNLI, QNLI, QQP, SST-2, SQuAD, ReCoRD) of m = 100 tokens; r = 100; SiLU; τ = d·e (the config's
`temperature: 2087` for T5-base's d = 768; `temperature=None` computes d·e for any width); W_down
and W_up start N(0, 0.01²) (the reference's `_init_weights` for `nn.Linear`); the target starts
as a copy of the first source prompt (`update_prefix_weights_single(shared_params[0])`,
`target_init=None`); AdamW lr 0.3, weight decay 0, 500 warm-up steps, batch 32 (the
Hugging Face Trainer's defaults; `prompts/attempt.gin` binds the optimizer, not the schedule).
The reference trains only W_down, W_up and T: its LayerNorm stays at its initial scale 1 and
bias 0 (`layer_norm_affine=False`, the default; True adds a trainable scale and bias). LayerNorm
epsilon 1e-5 (PyTorch's).

Source prompts are constants, not parameters: they are passed in as an array (`source_prompts`,
a `SourcePrompts` built by `source_bank`), so they are in no parameter tree, receive no gradient
and no optimizer state, and no trainable pattern has to exclude them. This module never reads
files (prompts/ does not import storage/): `gin_configs/prompts/attempt.gin` reads the sources
with `storage.prompt_files.read_prompt` (every prompt source: .npy, `FILE.npy#ROW`, a PEFT
adapter directory, a run directory, a multi-task run's bank export) and hands the arrays to
`source_bank`. The run record holds their shape and SHA-256 (`describe`), so evaluating a run
with other source prompts is refused like any other model change.

Multi-task (the reference's `shared_attn=True`): `num_tasks` > 1 holds one target prompt per
task, `target_prompts` [num_tasks, m, d], chosen per example by the batch feature `prompt_ids`
[b] (as a prompt bank); G and the sources are shared by all tasks, and example j mixes the
sources with its own task's target. The leading `prompts` axis marks the per-task rows for
multi-task training (`multitask_training.task_leaf_paths`). `prompt-jax multitask` itself does
not accept this hook yet (its evaluation and export serve every task as a folded plain prompt).

Differences from the reference: the max-pool of the input skips padding (the reference pools
over the padded sequence, `pad_to_max_length`, so the pad embedding takes part); the prompt then
does not depend on how much padding a batch has. Learned temperature is not implemented (the
reference's own code notes it is broken).

Export: the prompt depends on the input, so `export` returns None and `prompt-jax export-prompt`
refuses the hook; it serves from its run directory (with the same source prompts).
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
from typing import Any, Callable, ClassVar, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from prompt_jax.prompts import base

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class SourcePrompts:
  """Frozen source prompts [t, m, d] float32, held by value but compared and hashed by shape and
  SHA-256 (a Linen module's fields must hash; the record shows both)."""

  shape: tuple[int, ...]
  sha256: str
  _array: np.ndarray = dataclasses.field(repr=False, compare=False, hash=False)

  @property
  def array(self) -> np.ndarray:
    return self._array


def _source_array(value, index: int) -> np.ndarray:
  array = np.asarray(value)
  if not np.issubdtype(array.dtype, np.floating) or array.ndim not in (2, 3) or 0 in array.shape:
    raise ValueError(f"ATTEMPT source prompt {index} must be a non-empty float [length, embed] "
                     f"array or a bank [n, length, embed], got dtype {array.dtype} and shape "
                     f"{array.shape}")
  if not np.all(np.isfinite(array)):
    raise ValueError(f"ATTEMPT source prompt {index} has non-finite values (NaN or inf)")
  return array.astype(np.float32).reshape((-1,) + array.shape[-2:])


def source_bank(sources: Any, reader: Optional[Callable[[str], Any]] = None) -> SourcePrompts:
  """The frozen source prompts of `AttemptPrompt` from `sources`: one array (a bank
  [t, m, d] or one prompt [m, d]) or a sequence of them ([m, d] each, or banks [n, m, d],
  concatenated in order). With `reader`, string entries are prompt sources read by
  `reader(source)` (gin: `storage.prompt_files.read_prompt` with `allow_bank=True`).
  Every prompt must have the same [m, d]; errors name the entry."""
  if isinstance(sources, SourcePrompts):
    return sources
  if isinstance(sources, str) or not isinstance(sources, (list, tuple)):
    sources = [sources]
  if not sources:
    raise ValueError("ATTEMPT needs at least one source prompt, got an empty list")
  arrays = []
  for i, source in enumerate(sources):
    if isinstance(source, str):
      if reader is None:
        raise ValueError(f"ATTEMPT source prompt {i} is the path {source!r}; pass arrays or a "
                         "reader (prompts/attempt.gin reads paths with prompt_files.read_prompt)")
      source = reader(source)
    arrays.append(_source_array(source, i))
  shapes = {a.shape[1:] for a in arrays}
  if len(shapes) != 1:
    raise ValueError("ATTEMPT source prompts must share one [length, embed], got "
                     f"{[a.shape[1:] for a in arrays]}")
  array = np.ascontiguousarray(np.concatenate(arrays))
  digest = hashlib.sha256(array.tobytes()).hexdigest()[:16]
  return SourcePrompts(tuple(int(n) for n in array.shape), digest, array)


def max_pool(embedded: Array, input_tokens: Array) -> Array:
  """embedded [b, l, d], tokens [b, l] -> [b, d]: the maximum over the real (id > 0) tokens (0 for
  a row of padding only), in float32."""
  real = (input_tokens > 0)[..., None]
  pooled = jnp.max(jnp.where(real, embedded.astype(jnp.float32), -jnp.inf), axis=1)
  return jnp.where(jnp.any(real, axis=1), pooled, 0.0)


def _normal(stddev: float):
  def init(rng, shape, dtype=jnp.float32):
    return stddev * jax.random.normal(rng, shape, dtype)
  return init


class AttentionModule(nn.Module):
  """G: the max-pooled input x̂ [b, d] -> h = LayerNorm(W_up SiLU(W_down x̂)) [b, d], float32.

  Parameters: `down/kernel` [d, r], `up/kernel` [r, d] (N(0, 0.01²), no bias), and with
  `layer_norm_affine` `layer_norm/{scale,bias}` [d]."""

  hidden: int = 100
  layer_norm_affine: bool = False
  layer_norm_epsilon: float = 1e-5

  @nn.compact
  def __call__(self, pooled: Array) -> Array:
    embed = pooled.shape[-1]
    boxed = nn.with_logical_partitioning
    hidden = nn.Dense(self.hidden, use_bias=False, name="down", dtype=jnp.float32,
                      kernel_init=boxed(_normal(0.01), ("prompt_embed", "prompt_mlp")))(pooled)
    hidden = nn.Dense(embed, use_bias=False, name="up", dtype=jnp.float32,
                      kernel_init=boxed(_normal(0.01), ("prompt_mlp", "prompt_embed")))(
                          nn.silu(hidden))
    return nn.LayerNorm(epsilon=self.layer_norm_epsilon, name="layer_norm", dtype=jnp.float32,
                        use_scale=self.layer_norm_affine, use_bias=self.layer_norm_affine,
                        scale_init=boxed(nn.initializers.ones_init(), ("prompt_embed",)),
                        bias_init=boxed(nn.initializers.zeros_init(), ("prompt_embed",)))(hidden)


class AttemptPrompt(base.PerExamplePrompt, nn.Module):
  """Encoder hook: target prompt(s) plus an input-dependent attention mixture of frozen source
  prompts (see the module docstring).

  Attributes:
    source_prompts: the frozen sources, `source_bank(...)` or anything it accepts ([t, m, d],
      or a sequence of [m, d] arrays). They fix the prompt length m.
    num_tasks: target prompts (1; > 1 for the multi-task variant, chosen by `prompt_ids`).
    attention_hidden: r, the width of W_down (100).
    temperature: τ; None = d·e (2087 for d = 768, the reference's setting).
    target_init: initialiser of each target prompt (`prompt_jax.prompts.initializers`); None =
      a copy of the first source prompt, as the reference.
    layer_norm_affine: give G's LayerNorm a trainable scale and bias (False: the reference
      trains neither).
    layer_norm_epsilon: 1e-5 (PyTorch's default).
    placement: 'prefix', 'prefix_after_bos' or 'suffix', as for `InputPrompt`.
    max_encoder_length: the encoder length budget (keyword only; `base`).

  Parameters (below `encoder/prompt/`): `target_prompts` [num_tasks, m, d] (prompts, prompt,
  prompt_embed), `attention/down/kernel` [d, r] (prompt_embed, prompt_mlp),
  `attention/up/kernel` [r, d] (prompt_mlp, prompt_embed), and with `layer_norm_affine`
  `attention/layer_norm/{scale,bias}` [d] (prompt_embed).
  """

  input_features: ClassVar[tuple[str, ...]] = ("prompt_ids",)

  source_prompts: Any = None
  num_tasks: int = 1
  attention_hidden: int = 100
  temperature: Optional[float] = None
  target_init: Optional[Callable] = None
  layer_norm_affine: bool = False
  layer_norm_epsilon: float = 1e-5
  placement: str = "prefix"
  max_encoder_length: int = dataclasses.field(default=base.MAX_ENCODER_LENGTH, kw_only=True)

  def __post_init__(self):
    if self.source_prompts is None:
      raise ValueError("AttemptPrompt.source_prompts must be set (an array [t, m, d] or "
                       "source_bank(...)), got None")
    if not isinstance(self.source_prompts, SourcePrompts):
      # Converted once, so that the module's fields hash (a Linen module must).
      object.__setattr__(self, "source_prompts", source_bank(self.source_prompts))
    for name in ("num_tasks", "attention_hidden"):
      value = getattr(self, name)
      if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"AttemptPrompt.{name} must be an integer >= 1, got {value!r}")
    for name in ("temperature", "layer_norm_epsilon"):
      value = getattr(self, name)
      if value is None and name == "temperature":
        continue
      if isinstance(value, bool) or not isinstance(value, (int, float)) or not (
          0 < value < math.inf):
        raise ValueError(f"AttemptPrompt.{name} must be a finite number > 0, got {value!r}")
    if not isinstance(self.layer_norm_affine, bool):
      raise ValueError(f"AttemptPrompt.layer_norm_affine must be True or False, got "
                       f"{self.layer_norm_affine!r}")
    base.check_placement(self)
    super().__post_init__()

  @property
  def length(self) -> int:
    """m, the tokens of every prompt (the sources' length)."""
    return int(self.source_prompts.shape[1])

  @property
  def num_sources(self) -> int:
    return int(self.source_prompts.shape[0])

  def _targets(self, sources: Array, embedding_table: Array) -> Array:
    def init(rng, shape):
      if self.target_init is None:
        return jnp.broadcast_to(sources[0], shape)
      return jnp.stack([self.target_init(jax.random.fold_in(rng, t), shape[1:], embedding_table)
                        for t in range(shape[0])])

    return self.param(
        "target_prompts", nn.with_logical_partitioning(init, ("prompts", "prompt", "prompt_embed")),
        (int(self.num_tasks), self.length, sources.shape[-1]))

  @nn.compact
  def __call__(self, input_tokens: Array, embedded_inputs: Array, embedding_table: Array,
               prompt_features: Optional[base.PromptFeatures] = None):
    """-> (embedded [b, m + l, d], mask [b, m + l]); example j mixes with task prompt_ids[j]'s
    target (the only target when num_tasks is 1)."""
    base.check_encoder_length(self.length, input_tokens.shape[1], self.max_encoder_length)
    sources = jnp.asarray(self.source_prompts.array)  # [t, m, d], a constant
    if sources.shape[-1] != embedding_table.shape[-1]:
      raise ValueError(f"ATTEMPT source prompts {self.source_prompts.shape} have width "
                       f"{sources.shape[-1]}, the model's embeddings {embedding_table.shape[-1]}")
    targets = self._targets(sources, embedding_table).astype(jnp.float32)
    target = base.rows_by_prompt_id(self, targets, input_tokens, prompt_features, "tasks",
                                    ", each example's task index")  # [b, m, d]
    h = AttentionModule(int(self.attention_hidden), self.layer_norm_affine,
                        self.layer_norm_epsilon, name="attention")(
                            max_pool(embedded_inputs, input_tokens))  # [b, d]
    temperature = self.temperature or sources.shape[-1] * math.e
    source_keys = jnp.max(sources, axis=1)  # [t, d]
    target_keys = jnp.max(target, axis=1)  # [b, d]
    scores = jnp.concatenate([h @ source_keys.T, jnp.sum(h * target_keys, -1, keepdims=True)],
                             axis=-1) / temperature  # [b, t + 1]
    weights = jax.nn.softmax(scores, axis=-1)
    prompt = (jnp.einsum("bt,tmd->bmd", weights[:, :-1], sources)
              + (1.0 + weights[:, -1:, None]) * target)
    return self.place(prompt, embedded_inputs, input_tokens)
