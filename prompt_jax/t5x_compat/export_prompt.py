"""Fold the prompt of a T5X prompt-tuning checkpoint into a plain [length, embed] `.npy`.

Works for every method (plain, SuperPos, Residual): the prompt parameters are read from the
checkpoint's `target/encoder/prompt/...` and folded by `prompts.base.export_prompt` with the
checkpoint's own embedding table. Configure the model with the same *prompt_jax* model and
prompt gin files the T5X run included (models/*.gin, prompts/*.gin; no t5x needed):

  prompt-jax export-prompt --gin_search_paths=gin_configs \
    --gin_file=models/t5_1_1_tiny.gin --gin_file=prompts/superpos.gin \
    --t5x_checkpoint=/tmp/t5x_demo/checkpoint_300 --output=/tmp/prompt.npy
"""

from __future__ import annotations

from typing import Mapping

import numpy as np
from flax import traverse_util

from prompt_jax.interop import t5x as t5x_interop
from prompt_jax.serving import prompt_export

PROMPT_PREFIX = "encoder/prompt/"
EMBEDDING = "token_embedder/embedding"


def read_prompt_params(checkpoint: str, model) -> Mapping:
  """The prompt parameters (the model's `encoder/prompt/...` names) stored in a T5X checkpoint."""
  abstract = model.init_abstract(model.dummy_batch(1, 4, 2))
  names = [name for name in traverse_util.flatten_dict(
      abstract, sep="/", is_leaf=lambda _, x: hasattr(x, "unbox"))
           if name.startswith(PROMPT_PREFIX)]
  if not names:
    raise ValueError("the configured model has no prompt (is a prompts/*.gin file given?)")
  flat = {name: t5x_interop.load_prompt(checkpoint, name) for name in names}
  return traverse_util.unflatten_dict(flat, sep="/")


def export_t5x_prompt(model, checkpoint: str) -> np.ndarray:
  """-> [length, embed] float32: the prompt the encoder sees, for serving with a plain Prompt."""
  prompt_params = read_prompt_params(checkpoint, model)
  embedding = t5x_interop.load_prompt(checkpoint, EMBEDDING)
  return prompt_export.fold_prompt(model, prompt_params,
                                   {"token_embedder": {"embedding": embedding}})
