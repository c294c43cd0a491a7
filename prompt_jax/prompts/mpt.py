"""Multitask prompt tuning (MPT, Wang et al. 2023, arXiv 2303.02861) as Hugging Face PEFT builds it.

A shared prompt P* [length, embed] is modulated per task by a rank-r matrix: task t's prompt is

  P_t = P* ⊙ (U_t @ V_t),
  U_t = prefix_task_cols[t] [length, r],  V_t = prefix_task_rows[t] [r, embed]

(⊙ the elementwise product). Example j of a batch uses task prompt_ids[j]; the prompt is placed
into the embedded input as `InputPrompt` places a single prompt (prefix, prefix_after_bos or
suffix).

Parameters (below `encoder/prompt/prompt/`; PEFT's names):

  prompt_embeddings  [length, embed]         logical axes (prompt, prompt_embed)        shared
  prefix_task_cols   [num_tasks, length, r]  logical axes (prompts, prompt, prompt_rank) per task
  prefix_task_rows   [num_tasks, r, embed]   logical axes (prompts, prompt_rank, prompt_embed)

The factors' first logical axis is `prompts`, so multi-task training
(`multitask_training.task_leaf_paths`) gives each task's U_t, V_t their own optimizer state and
leaves an absent task's factors alone; the shared prompt has one state and receives the sum of the
tasks' gradients. `export(embedding_table)` folds every task's prompt into a plain
[num_tasks, length, embed] array (row t = P* ⊙ (U_t @ V_t)), which a single-prompt model serves
with identical encoder inputs.

What PEFT does (`peft/tuners/multitask_prompt_tuning/{config,model}.py`,
`MultitaskPromptEmbedding`, and `PeftModel.get_prompt`), and how this file relates:
- Shared prompt: PEFT's `PromptEmbedding` `torch.nn.Embedding(total_virtual_tokens, token_dim)`,
  N(0, 1) for the default `prompt_tuning_init='RANDOM'` (`init_fn`; `p_tuning.normal()` here,
  the default, is that N(0, 1); 'TEXT' is `initializers.from_string`).
- Factors: `prefix_task_cols` [num_tasks, total_virtual_tokens, num_ranks] and
  `prefix_task_rows` [num_tasks, num_ranks, token_dim], both `torch.normal(0, 0.02)`;
  `num_ranks` defaults to 1 (`rank` here, default 1; `factor_stddev` 0.02).
- Forward: `index_select` of both factors by `task_ids`, `task_prompts = cols @ rows`,
  `prompt_embeddings *= task_prompts`. Identical here, with the task ids from the batch feature
  `prompt_ids` [b] (`input_features`) instead of a `task_ids` argument.
- Differences: (1) for seq2seq models PEFT defaults to `num_transformer_submodules=2`, i.e. 2L
  virtual tokens (shared prompt and `prefix_task_cols` have 2L rows);
  `PeftModelForSeq2SeqLM.forward` gives the first L to the encoder and, with labels, prepends
  the other L to the decoder's input embeddings (padding labels with L ignored positions),
  while `generate` uses only the first L.
  Here the prompt is encoder-only with exactly L rows: PEFT with `num_transformer_submodules=1`.
  (2) Placement: PEFT only prefixes; every `InputPrompt` placement works here. (3) PEFT's
  transfer initialisations ('AVERAGE_SOURCE_TASKS', 'EXACT_SOURCE_TASK' load the source factors
  from a state dict, 'ONLY_SOURCE_SHARED' the shared prompt only) are not built in; the shared
  prompt can start from a saved array with `prompt_files.from_array`. (4) An out-of-range task id
  gathers NaN rows (as a prompt bank does) where `index_select` raises.
"""

from __future__ import annotations

from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from prompt_jax.prompts import base, initializers, p_tuning
from prompt_jax.prompts.multitask_prompts import TaskPromptHook

Array = jax.Array

# The rank axis of the task factors; replicated like every prompt axis.
LOGICAL_AXIS_RULES = (("prompt_rank", None),)
PEFT_FACTOR_STDDEV = 0.02  # torch.normal(mean=0, std=0.02) for both factors


def fold_task_prompts(shared: Array, cols: Array, rows: Array) -> Array:
  """shared [L, d], cols [n, L, r], rows [n, r, d] -> [n, L, d]: shared ⊙ (cols_t @ rows_t)."""
  return shared[None] * jnp.einsum("nlr,nrd->nld", cols, rows)


class MPTParams(nn.Module):
  """`prompt_embeddings` [length, embed], `prefix_task_cols` [num_tasks, length, rank] and
  `prefix_task_rows` [num_tasks, rank, embed] (see the module docstring)."""

  num_tasks: int
  length: int
  rank: int
  init_fn: initializers.PromptInit
  factor_stddev: float

  @nn.compact
  def __call__(self, embedding_table: Array) -> tuple[Array, Array, Array]:
    embed = embedding_table.shape[-1]
    shared = self.param(
        "prompt_embeddings", nn.with_logical_partitioning(
            lambda rng, shape: self.init_fn(rng, shape, embedding_table),
            ("prompt", "prompt_embed")),
        (self.length, embed))
    normal = lambda rng, shape: self.factor_stddev * jax.random.normal(rng, shape, jnp.float32)
    cols = self.param(
        "prefix_task_cols",
        nn.with_logical_partitioning(normal, ("prompts", "prompt", "prompt_rank")),
        (self.num_tasks, self.length, self.rank))
    rows = self.param(
        "prefix_task_rows",
        nn.with_logical_partitioning(normal, ("prompts", "prompt_rank", "prompt_embed")),
        (self.num_tasks, self.rank, embed))
    return shared, cols, rows


class MPTPrompt(TaskPromptHook):
  """Multitask prompt tuning: one shared prompt, a rank-`rank` modulation per task.

  Attributes:
    num_tasks: number of tasks (PEFT's `num_tasks`; the mixture's task count).
    length: prompt tokens L (PEFT's `num_virtual_tokens`; PROMPT_LENGTH).
    rank: rank r of each task's modulation (PEFT's `num_ranks`, default 1).
    init_fn: initialiser of the shared prompt (default N(0, 1), PEFT's 'RANDOM').
    factor_stddev: standard deviation of the normal init of both factors (PEFT: 0.02).
    placement: 'prefix', 'prefix_after_bos' or 'suffix', as for `InputPrompt`.
  """

  num_tasks: int = 2
  length: int = 100
  rank: int = 1
  init_fn: Callable = p_tuning.normal()
  factor_stddev: float = PEFT_FACTOR_STDDEV
  placement: str = "prefix"

  def __post_init__(self):
    self.check_common()
    base.check_prompt_length(self.length, "PROMPT_LENGTH (MPTPrompt.length)")
    if isinstance(self.rank, bool) or not isinstance(self.rank, (int, np.integer)) or self.rank < 1:
      raise ValueError(f"MPTPrompt.rank (MPT_RANK) must be an integer >= 1, got {self.rank!r}")
    if not (isinstance(self.factor_stddev, (int, float)) and self.factor_stddev > 0):
      raise ValueError(f"MPTPrompt.factor_stddev must be a number > 0, got "
                       f"{self.factor_stddev!r}")
    super().__post_init__()

  def setup(self):
    self.prompt = MPTParams(int(self.num_tasks), int(self.length), int(self.rank), self.init_fn,
                            float(self.factor_stddev))

  def task_prompts(self, embedding_table: Array) -> Array:
    """-> [num_tasks, length, embed]: every task's P* ⊙ (U_t @ V_t)."""
    return fold_task_prompts(*self.prompt(embedding_table))
