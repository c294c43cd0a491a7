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
from safetensors.numpy import save_file

from prompt_jax.interop import hf

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
TENSOR_KEY = "prompt_embeddings"
TASK_TYPES = ("SEQ_2_SEQ_LM", "CAUSAL_LM", "SEQ_CLS", "TOKEN_CLS", "QUESTION_ANS",
              "FEATURE_EXTRACTION")


def default_submodules(task_type: str) -> int:
  """PEFT's default: 2 for encoder-decoder models (`SEQ_2_SEQ_LM`), else 1."""
  return 2 if task_type == "SEQ_2_SEQ_LM" else 1


def is_adapter_dir(path: str) -> bool:
  """Whether `path` is a directory holding `adapter_config.json`."""
  return os.path.isdir(path) and os.path.exists(os.path.join(path, CONFIG_FILE))


def read_config(path: str) -> dict:
  """`adapter_config.json` of an adapter directory; a corrupt file raises naming it."""
  config_path = os.path.join(path, CONFIG_FILE)
  if not os.path.exists(config_path):
    raise FileNotFoundError(f"{path!r} is not a PEFT adapter directory: no {CONFIG_FILE}")
  return hf.read_json(config_path, "a JSON object of PEFT settings")


def _positive_int(config: dict, key: str, source: str):
  value = config.get(key)
  if value is None:
    return None
  if isinstance(value, bool) or not isinstance(value, int) or value < 1:
    raise ValueError(f"{source}: {key} must be a positive integer, got {value!r}")
  return value


def load_prompt(path: str) -> np.ndarray:
  """A PEFT PROMPT_TUNING adapter directory -> float32 prompt [num_virtual_tokens, token_dim]:
  the first num_virtual_tokens rows of its `prompt_embeddings` [num_virtual_tokens *
  num_transformer_submodules, token_dim]. Format and values are checked (floating point, the
  config's shape, at least one column, finite), every error one line naming the file."""
  config = read_config(path)
  config_path = os.path.join(path, CONFIG_FILE)
  if config.get("peft_type") != "PROMPT_TUNING":
    raise ValueError(f"{path}/{CONFIG_FILE}: peft_type must be 'PROMPT_TUNING', got "
                     f"{config.get('peft_type')!r}")
  weights_path = os.path.join(path, WEIGHTS_FILE)
  if not os.path.exists(weights_path):
    hint = " (adapter_model.bin needs torch)" if os.path.exists(
        os.path.join(path, "adapter_model.bin")) else ""
    raise FileNotFoundError(f"{path!r} has no {WEIGHTS_FILE}{hint}")
  tensors = hf.load_safetensors(weights_path)
  if TENSOR_KEY not in tensors:
    raise ValueError(f"{weights_path}: expected the tensor {TENSOR_KEY!r}, found "
                     f"{sorted(tensors)}")
  table = tensors[TENSOR_KEY]
  if not np.issubdtype(table.dtype, np.floating):
    raise ValueError(f"{weights_path}: {TENSOR_KEY} has dtype {table.dtype}; a prompt must "
                     "be floating point")
  table = np.asarray(table, dtype=np.float32)
  length = _positive_int(config, "num_virtual_tokens", config_path)
  if length is None:
    raise ValueError(f"{config_path}: lacks num_virtual_tokens (the prompt length)")
  submodules = _positive_int(config, "num_transformer_submodules", config_path) or (
      default_submodules(config.get("task_type", "")))
  if table.ndim != 2 or table.shape[0] != length * submodules:
    raise ValueError(f"{weights_path}: {TENSOR_KEY} has shape {table.shape}; with "
                     f"num_virtual_tokens={length} and num_transformer_submodules={submodules} "
                     f"expected {length * submodules} rows")
  token_dim = config.get("token_dim")
  if token_dim is not None and table.shape[1] != token_dim:
    raise ValueError(f"{weights_path}: {TENSOR_KEY} has {table.shape[1]} columns, "
                     f"{CONFIG_FILE} says token_dim={token_dim}")
  if table.shape[1] == 0:
    raise ValueError(f"{weights_path}: {TENSOR_KEY} has shape {table.shape}: a prompt needs at "
                     "least one embedding column")
  prompt = np.ascontiguousarray(table[:length])
  finite = np.isfinite(prompt)
  if not finite.all():
    bad = int(prompt.size - np.count_nonzero(finite))
    first = tuple(int(i) for i in np.argwhere(~finite)[0])
    raise ValueError(f"prompt file {weights_path!r} has {bad} non-finite value"
                     f"{'s' if bad != 1 else ''} (NaN or inf); the first is "
                     f"{prompt[first]} at index {list(first)}")
  return prompt


def save_prompt(prompt: np.ndarray, path: str, base_model_name_or_path: Optional[str] = None, *,
                task_type: str = "SEQ_2_SEQ_LM", num_transformer_submodules: Optional[int] = None,
                num_attention_heads: Optional[int] = None, num_layers: Optional[int] = None,
                revision: Optional[str] = None) -> str:
  """Write `prompt` [num_virtual_tokens, token_dim] as a PEFT PROMPT_TUNING adapter directory
  that `peft.PeftModel.from_pretrained(base_model, path)` loads. Returns `path`.

  `base_model_name_or_path`: the HF model the prompt was tuned for (e.g. 'google/t5-base-lm-adapt');
  `num_attention_heads`/`num_layers` are informational (PEFT fills them from the base model).
  """
  prompt = np.asarray(prompt)
  if prompt.ndim != 2 or prompt.shape[0] < 1:
    raise ValueError(f"save_prompt: prompt must be [num_virtual_tokens, token_dim], got shape "
                     f"{prompt.shape}")
  if not np.issubdtype(prompt.dtype, np.floating):
    raise ValueError(f"save_prompt: prompt must be floating point, got {prompt.dtype}")
  if task_type not in TASK_TYPES:
    raise ValueError(f"save_prompt: task_type must be one of {TASK_TYPES}, got {task_type!r}")
  submodules = (default_submodules(task_type)
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
