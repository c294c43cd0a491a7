"""Shared + task-specific prompts: a prompt shared by all tasks combined with one prompt per task.

google-research/prompt-tuning's multi-task prompts (`prompt_tuning/extended/multitask_prompts.py`,
`ConcatMultiTaskPrompt` and `AddMultiTaskPrompt`): a shared prompt S [shared_length, embed] that
every task trains, and a task prompt T_t [task_length, embed] per task t. Example j of a batch
uses task t = prompt_ids[j] and sees the effective prompt

  combine='concat'   P_t = [S; T_t]   (shared first)   length = shared_length + task_length
  combine='add'      P_t = S + T_t    (elementwise)    length = shared_length = task_length

placed into the embedded input exactly as `InputPrompt` places a single prompt (prefix,
prefix_after_bos or suffix). The hook's `length` is that effective length (what the encoder sees
and what one exported row holds); `shared_length` splits it, and `task_length` is the rest
(concat) or all of it (add).

Parameters (below `encoder/prompt/prompt/`):

  shared_prompt  [shared_length, embed]           logical axes (prompt, prompt_embed)
  task_prompts   [num_tasks, task_length, embed]  logical axes (prompts, prompt, prompt_embed)

The task prompts' first logical axis is `prompts`, so multi-task training
(`multitask_training.task_leaf_paths`) gives each task's row its own optimizer state and leaves
an absent task's row alone; the shared prompt has one state and receives the sum of every task's
gradient (the multi-task loss is the sum of per-task losses).

`export(embedding_table)` gives every task's effective prompt, [num_tasks, length, embed]: row t
is the plain prompt a single-prompt model (`InputPrompt(Prompt(length))`, same placement) serves
with identical encoder inputs, so `multitask_training.export_task_prompts` writes one ordinary
`.npy` per task.

Differences from the reference:
- The task comes from the batch feature `prompt_ids` [b] (`input_features`), not from a task
  token the reference reads from (and strips off) the first input position (`to_task_idx`, e.g.
  `sentinel_to_task`); the input tokens are left as they are.
- The reference's task variable is one flattened [num_tasks, task_length * embed] embedding table
  (logical axes ('tasks', 'prompt+embed')); here it is [num_tasks, task_length, embed], the layout
  of `bank.PromptBank`, with the `prompts` task axis.
- The reference's gin config initialises both parts from U[0, 0.5) (`linen.initializers.uniform`
  with scale 0.5); gin_configs/prompts/multitask_shared.gin uses the project's PROMPT_INIT (U[-0.5,
  0.5), the paper's) for both, `shared_init` and `task_init` accept any initialiser of
  `prompt_jax.prompts.initializers`.
- Only the concatenation and addition variants; the reference's feature-concatenation and
  projection variants are not implemented.
- Out-of-range `prompt_ids` gather NaN rows (as a prompt bank does) instead of clamping.

`TaskPromptHook` is the part every per-task hook shares (selection by `prompt_ids`, placement,
mask, checks, export); `mpt.MPTPrompt` uses it too.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from prompt_jax.prompts import base, hook, initializers
from prompt_jax.prompts.base import PLACEMENTS, insert_prompt, prompt_mask

Array = jax.Array
COMBINATIONS = ("concat", "add")


def check_num_tasks(num_tasks, owner: str) -> int:
  """`num_tasks` as an int; ValueError unless it is an integer >= 1 (bools are refused)."""
  if isinstance(num_tasks, bool) or not isinstance(num_tasks, (int, np.integer)) or num_tasks < 1:
    raise ValueError(f"{owner}.num_tasks (NUM_TASKS) must be an integer >= 1, got {num_tasks!r}")
  return int(num_tasks)


def combine_prompts(shared: Array, tasks: Array, combine: str) -> Array:
  """shared [s, d], task prompts [n, t, d] -> [n, s + t, d] ('concat', shared first) or
  [n, t, d] ('add', s == t)."""
  if combine == "concat":
    shared = jnp.broadcast_to(shared, (tasks.shape[0],) + shared.shape)
    return jnp.concatenate([shared, tasks], axis=1)
  if combine == "add":
    return shared[None] + tasks
  raise ValueError(f"combine must be one of {COMBINATIONS}, got {combine!r}")


class TaskPromptHook(hook.InputLevelOnly, nn.Module):
  """Encoder hook with one computed prompt per task, chosen per example by `prompt_ids` [b].

  A subclass defines `num_tasks`, `length` and `placement` (fields or properties) and
  `task_prompts(embedding_table) -> [num_tasks, length, embed]`; this class selects the rows of
  a batch's tasks and places them as `InputPrompt` places one prompt.

  Without `prompt_ids`, a hook of one task uses it; more tasks need ids, except while the
  parameters are being created (the model's dummy batch has none).
  """

  input_features: ClassVar[tuple[str, ...]] = ("prompt_ids",)

  max_encoder_length: int = dataclasses.field(default=base.MAX_ENCODER_LENGTH, kw_only=True)

  def check_common(self) -> None:
    """The checks every subclass runs in `__post_init__`."""
    name = type(self).__name__
    check_num_tasks(self.num_tasks, name)
    if self.placement not in PLACEMENTS:
      raise ValueError(f"{name}.placement must be one of {PLACEMENTS}, got {self.placement!r}")
    base.check_prompt_length(self.max_encoder_length, f"{name}.max_encoder_length")

  @property
  def num_prompts(self) -> int:
    """The number of prompts the hook holds, one per task (a `PromptBank`'s name for it)."""
    return int(self.num_tasks)

  def task_prompts(self, embedding_table: Array) -> Array:
    """-> [num_tasks, length, embed]: every task's effective prompt."""
    raise NotImplementedError

  def __call__(self, input_tokens: Array, embedded_inputs: Array, embedding_table: Array,
               prompt_features: Optional[base.PromptFeatures] = None):
    """-> (embedded [b, length + l, d], mask [b, length + l]); example j uses task
    prompt_ids[j]'s prompt."""
    base.check_encoder_length(self.length, input_tokens.shape[1], self.max_encoder_length)
    prompts = self.task_prompts(embedding_table)  # [n, p, d]
    chosen = base.rows_by_prompt_id(self, prompts, input_tokens, prompt_features, "tasks",
                                    ", each example's task index")
    chosen = chosen.astype(embedded_inputs.dtype)  # [b, p, d]
    embedded = insert_prompt(chosen, embedded_inputs, input_tokens, self.placement)
    return embedded, prompt_mask(input_tokens, self.length, self.placement)

  def input_mask(self, input_tokens: Array) -> Array:
    return prompt_mask(input_tokens, self.length, self.placement)

  def export(self, embedding_table: Array) -> Array:
    """Every task's prompt folded into a plain array, [num_tasks, length, embed]."""
    return self.task_prompts(embedding_table)


class SharedTaskParams(nn.Module):
  """The parameters `shared_prompt` [shared_length, embed] and `task_prompts` [num_tasks,
  task_length, embed]; task t's rows are initialised by `task_init` with `fold_in(rng, t)`."""

  num_tasks: int
  shared_length: int
  task_length: int
  shared_init: initializers.PromptInit
  task_init: initializers.PromptInit

  @nn.compact
  def __call__(self, embedding_table: Array) -> tuple[Array, Array]:
    embed = embedding_table.shape[-1]
    shared = self.param(
        "shared_prompt", nn.with_logical_partitioning(
            lambda rng, shape: self.shared_init(rng, shape, embedding_table),
            ("prompt", "prompt_embed")),
        (self.shared_length, embed))

    def task_init(rng, shape):
      return jnp.stack([self.task_init(jax.random.fold_in(rng, t), shape[1:], embedding_table)
                        for t in range(shape[0])])

    tasks = self.param(
        "task_prompts",
        nn.with_logical_partitioning(task_init, ("prompts", "prompt", "prompt_embed")),
        (self.num_tasks, self.task_length, embed))
    return shared, tasks


class SharedTaskPrompt(TaskPromptHook):
  """A shared prompt combined with a per-task prompt (see the module docstring).

  Attributes:
    num_tasks: number of tasks (rows of `task_prompts`; the mixture's task count).
    length: the effective prompt length the encoder sees (PROMPT_LENGTH).
    shared_length: tokens of the shared prompt; None = `length` (the only value 'add' accepts).
      With 'concat' it must be below `length`; the task prompts get the rest.
    combine: 'concat' (shared then task) or 'add' (elementwise sum).
    shared_init, task_init: initialisers (`prompt_jax.prompts.initializers`) of the two parts.
    placement: 'prefix', 'prefix_after_bos' or 'suffix', as for `InputPrompt`.
  """

  num_tasks: int = 2
  length: int = 100
  shared_length: Optional[int] = None
  combine: str = "concat"
  shared_init: initializers.PromptInit = initializers.uniform()
  task_init: initializers.PromptInit = initializers.uniform()
  placement: str = "prefix"

  def __post_init__(self):
    self.check_common()
    base.check_prompt_length(self.length, "PROMPT_LENGTH (SharedTaskPrompt.length)")
    if self.combine not in COMBINATIONS:
      raise ValueError(f"SharedTaskPrompt.combine must be one of {COMBINATIONS}, got "
                       f"{self.combine!r}")
    shared = self.shared_length_value
    base.check_prompt_length(shared, "SHARED_PROMPT_LENGTH (SharedTaskPrompt.shared_length)")
    if self.combine == "add" and shared != self.length:
      raise ValueError(f"combine='add' sums prompts of one length: SHARED_PROMPT_LENGTH "
                       f"({shared}) must equal PROMPT_LENGTH ({self.length})")
    if self.combine == "concat" and shared >= self.length:
      raise ValueError(f"combine='concat' needs SHARED_PROMPT_LENGTH ({shared}) < PROMPT_LENGTH "
                       f"({self.length}); the task prompts get the difference")
    super().__post_init__()

  @property
  def shared_length_value(self) -> int:
    return self.length if self.shared_length is None else self.shared_length

  @property
  def task_length(self) -> int:
    """Tokens of each task prompt: the rest of `length` (concat) or all of it (add)."""
    if self.combine == "concat":
      return int(self.length) - int(self.shared_length_value)
    return int(self.length)

  def setup(self):
    self.prompt = SharedTaskParams(int(self.num_tasks), int(self.shared_length_value),
                                   self.task_length, self.shared_init, self.task_init)

  def task_prompts(self, embedding_table: Array) -> Array:
    """-> [num_tasks, length, embed]: every task's shared + task prompt."""
    shared, tasks = self.prompt(embedding_table)
    return combine_prompts(shared, tasks, self.combine)
