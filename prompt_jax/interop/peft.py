"""PEFT prompt-tuning adapters (`adapter_config.json` + `adapter_model.safetensors`) <-> a
plain `[num_virtual_tokens, embed]` prompt, without torch or peft.

PEFT stores one tensor, `prompt_embeddings`, with `num_virtual_tokens *
num_transformer_submodules` rows. For `SEQ_2_SEQ_LM` PEFT uses 2 submodules (its default when the
config omits the key), but prompt tuning only ever reads rows `0..num_virtual_tokens-1`: it
prepends them to the embedded encoder inputs, exactly what our `InputPrompt(placement='prefix')`
does. We write PEFT's own layout (2n rows, the unused second half zero) by default; PEFT 0.21.2
also accepts n rows with `num_transformer_submodules: 1` (see ../shared/fixtures/README.md).
"""

from __future__ import annotations

import json
import os
from typing import Optional

import numpy as np

from prompt_jax.storage import prompt_files

# The format's names and its reader live in `prompt_files` (one home for prompt formats).
CONFIG_FILE = prompt_files.PEFT_CONFIG_FILE
WEIGHTS_FILE = prompt_files.PEFT_WEIGHTS_FILE
TENSOR_KEY = prompt_files.PEFT_TENSOR_KEY
TASK_TYPES = ("SEQ_2_SEQ_LM", "CAUSAL_LM", "SEQ_CLS", "TOKEN_CLS", "QUESTION_ANS",
              "FEATURE_EXTRACTION")


def load_prompt(path: str) -> np.ndarray:
  """A PEFT PROMPT_TUNING adapter directory -> float32 prompt [num_virtual_tokens, token_dim]
  (`prompt_files.read_peft_adapter`: format and values checked, errors naming the file)."""
  return prompt_files.read_peft_adapter(path)


def save_prompt(prompt: np.ndarray, path: str, base_model_name_or_path: Optional[str] = None, *,
                task_type: str = "SEQ_2_SEQ_LM", num_transformer_submodules: Optional[int] = None,
                num_attention_heads: Optional[int] = None, num_layers: Optional[int] = None,
                revision: Optional[str] = None) -> str:
  """Write `prompt` [num_virtual_tokens, token_dim] as a PEFT PROMPT_TUNING adapter directory
  that `peft.PeftModel.from_pretrained(base_model, path)` loads. Returns `path`.

  `base_model_name_or_path`: the HF model the prompt was tuned for (e.g. 'google/t5-base-lm-adapt');
  `num_attention_heads`/`num_layers` are informational (PEFT fills them from the base model).
  """
  from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top
  prompt = np.asarray(prompt)
  if prompt.ndim != 2 or prompt.shape[0] < 1:
    raise ValueError(f"save_prompt: prompt must be [num_virtual_tokens, token_dim], got shape "
                     f"{prompt.shape}")
  if not np.issubdtype(prompt.dtype, np.floating):
    raise ValueError(f"save_prompt: prompt must be floating point, got {prompt.dtype}")
  if task_type not in TASK_TYPES:
    raise ValueError(f"save_prompt: task_type must be one of {TASK_TYPES}, got {task_type!r}")
  submodules = (prompt_files.peft_num_transformer_submodules(task_type)
                if num_transformer_submodules is None else int(num_transformer_submodules))
  if submodules not in (1, 2):
    raise ValueError(f"save_prompt: num_transformer_submodules must be 1 or 2, got {submodules}")
  length, token_dim = prompt.shape
  table = np.zeros((length * submodules, token_dim), np.float32)
  table[:length] = prompt.astype(np.float32)
  config = {
      "peft_type": "PROMPT_TUNING",
      "task_type": task_type,
      "inference_mode": True,
      "base_model_name_or_path": base_model_name_or_path,
      "revision": revision,
      "num_virtual_tokens": int(length),
      "token_dim": int(token_dim),
      "num_transformer_submodules": submodules,
      "num_attention_heads": num_attention_heads,
      "num_layers": num_layers,
      "prompt_tuning_init": "RANDOM",
      "prompt_tuning_init_text": None,
      "tokenizer_name_or_path": None,
  }
  os.makedirs(path, exist_ok=True)
  save_file({TENSOR_KEY: table}, os.path.join(path, WEIGHTS_FILE), metadata={"format": "pt"})
  with open(os.path.join(path, CONFIG_FILE), "w") as f:
    json.dump(config, f, indent=2, sort_keys=True)
    f.write("\n")
  return path


def is_adapter_dir(path: str) -> bool:
  return os.path.isdir(path) and os.path.exists(os.path.join(path, CONFIG_FILE))
