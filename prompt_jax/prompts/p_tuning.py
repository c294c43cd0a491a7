"""P-tuning (Liu et al. 2021, "GPT Understands, Too") as HF PEFT defines its prompt encoder
(`peft/tuners/p_tuning/model.py::PromptEncoder`, config `PromptEncoderConfig`).

A learned embedding E [L, d] of the L virtual tokens is reparameterised by a small network, the
same for every token:

    MLP  (PEFT's default): prompt = W3 ReLU(W2 ReLU(W1 E + b1) + b2) + b3
                           W1 [d, h], W2 [h, h], W3 [h, d]; exactly three Linear layers, whatever
                           `num_layers` says (PEFT ignores `encoder_num_layers` for the MLP and
                           warns; so do we). PEFT's MLP has no dropout either.
    LSTM:                  H = BiLSTM(E) [L, 2h] (num_layers layers, hidden h per direction,
                           dropout between layers in training steps only),
                           prompt = W2 ReLU(W1 H + b1) + b2, W1 [2h, 2h], W2 [2h, d].

h = `hidden_size` defaults to d (PEFT sets `encoder_hidden_size = token_dim` when it is None,
`peft/utils/other.py::_prepare_prompt_learning_config`). The LSTM is flax's
`nn.OptimizedLSTMCell` (gates i, f, g, o; input kernels `i?` without bias, recurrent kernels
`h?` with the one bias per gate, which equals PyTorch's b_ih + b_hh); outputs are
[forward, backward] concatenated, as in `torch.nn.LSTM(bidirectional=True)`.

Initialisation follows PyTorch's defaults, which PEFT's modules get: Linear weights and biases
U(+-1/sqrt(fan_in)); LSTM weights U(+-1/sqrt(h)), bias the sum of two such draws. The embedding E
uses `init_fn` (default U[-0.5, 0.5) like the other methods; `normal()` below is PEFT's
`torch.nn.Embedding` N(0, 1)).

Differences from PEFT: for seq2seq models PEFT's encoder makes 2L tokens
(`num_transformer_submodules=2`) of which `PeftModelForSeq2SeqLM.forward` uses only the first L,
so its bidirectional LSTM also reads L extra unused rows; here the encoder sees exactly L tokens
(PEFT with `num_transformer_submodules=1`). The MLP variant is unaffected.

The output does not depend on the input, so the trained prompt folds into a plain [L, d] array
(`InputPrompt.export`) and serves with zero overhead.
"""

from __future__ import annotations

import warnings
from typing import Callable, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from prompt_jax.prompts import initializers
from prompt_jax.prompts.base import check_prompt_length

Array = jax.Array

REPARAMETERIZATION_TYPES = ("MLP", "LSTM")
# PEFT's PromptEncoderConfig.encoder_num_layers default; the MLP always has this many hidden
# layers (three Linear layers).
MLP_NUM_LAYERS = 2
# Logical axes of kernels whose input is not (only) the embedding, e.g. [h, h]: a name may occur
# once per array, so the input axis is labelled `prompt_embed`; every prompt axis is replicated
# (`prompt_jax.prompts.base.LOGICAL_AXIS_RULES`), so the label only matters to the metadata.
SQUARE_AXES = ("prompt_embed", "prompt_mlp")


def normal(stddev: float = 1.0) -> initializers.PromptInit:
  """N(0, stddev^2) per entry: PEFT's virtual-token embedding (`torch.nn.Embedding`, stddev 1)."""
  if not stddev > 0:
    raise ValueError(f"normal prompt init needs stddev > 0, got {stddev!r}")

  def init(rng, shape, embedding_table=None):
    del embedding_table
    return stddev * jax.random.normal(rng, shape, jnp.float32)

  return init


def _uniform(rng, shape, bound, dtype):
  return jax.random.uniform(rng, shape, dtype, -bound, bound)


def _lstm_kernel_init(rng, shape, dtype=jnp.float32):
  """torch.nn.LSTM's init, U(+-1/sqrt(hidden)); the last axis of every flax LSTM kernel is h."""
  return _uniform(rng, shape, 1.0 / np.sqrt(shape[-1]), dtype)


def _lstm_bias_init(rng, shape, dtype=jnp.float32):
  """b_ih + b_hh of torch.nn.LSTM, each U(+-1/sqrt(hidden)), as flax's single gate bias."""
  return jnp.sum(_uniform(rng, (2,) + tuple(shape), 1.0 / np.sqrt(shape[-1]), dtype), axis=0)


def _boxed(init, axes):
  return nn.with_logical_partitioning(init, axes)


def _check_positive_int(name: str, value) -> int:
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
    raise ValueError(f"PTuningPrompt.{name} must be an integer >= 1, got {value!r}")
  return int(value)


class PTuningPrompt(nn.Module):
  """A prompt generator (see `prompt_jax.prompts.base`) for `InputPrompt`.

  Attributes:
    length: number of virtual tokens L (PEFT's `num_virtual_tokens`).
    reparameterization_type: 'MLP' (default) or 'LSTM' (`encoder_reparameterization_type`).
    hidden_size: h (`encoder_hidden_size`); None = the model's emb_dim d, as in PEFT.
    num_layers: LSTM layers (`encoder_num_layers`, default 2); the MLP ignores it (as PEFT).
    dropout: dropout between LSTM layers (`encoder_dropout`, default 0.0), applied only when a
      dropout rng is present (training steps); the MLP ignores it (as PEFT).
    init_fn: initialiser of the embedding E (see `prompt_jax.prompts.initializers`).

  Parameters (below `encoder/prompt/prompt/`): `embedding` [L, d] (prompt, prompt_embed).
  MLP: `mlp_head_0` [d, h]+[h], `mlp_head_1` [h, h]+[h], `mlp_head_2` [h, d]+[d]
  (`kernel`, `bias`). LSTM: `lstm_head/layer_<k>_{forward,backward}/{ii,if,ig,io}/kernel`
  [in, h] (in = d for k = 0, else 2h) and `.../{hi,hf,hg,ho}/{kernel [h, h], bias [h]}`,
  then `mlp_head_0` [2h, 2h]+[2h], `mlp_head_1` [2h, d]+[d].
  """

  length: int = 10
  reparameterization_type: str = "MLP"
  hidden_size: Optional[int] = None
  num_layers: int = 2
  dropout: float = 0.0
  init_fn: Callable = initializers.uniform()

  def __post_init__(self):
    check_prompt_length(self.length, "PTuningPrompt.length (PROMPT_LENGTH)")
    if self.reparameterization_type not in REPARAMETERIZATION_TYPES:
      raise ValueError(f"PTuningPrompt.reparameterization_type must be one of "
                       f"{REPARAMETERIZATION_TYPES}, got {self.reparameterization_type!r}")
    if self.hidden_size is not None:
      _check_positive_int("hidden_size", self.hidden_size)
    _check_positive_int("num_layers", self.num_layers)
    if isinstance(self.dropout, bool) or not isinstance(self.dropout, (int, float)) or not (
        0.0 <= self.dropout < 1.0):
      raise ValueError(f"PTuningPrompt.dropout must be a number in [0, 1), got {self.dropout!r}")
    if self.reparameterization_type == "MLP":
      if self.num_layers != MLP_NUM_LAYERS:
        warnings.warn(f"PTuningPrompt: for MLP, num_layers={self.num_layers} is ignored; exactly "
                      f"{MLP_NUM_LAYERS} hidden layers (3 Linear layers) are used, as in PEFT",
                      stacklevel=2)
      if self.dropout:
        warnings.warn(f"PTuningPrompt: for MLP, dropout={self.dropout} is ignored (PEFT's MLP "
                      "prompt encoder has no dropout)", stacklevel=2)
    super().__post_init__()

  @nn.compact
  def __call__(self, input_tokens: Array, embedded_inputs: Array, embedding_table: Array) -> Array:
    """-> [batch, length, embed] (float32)."""
    del embedded_inputs
    embed = embedding_table.shape[-1]
    hidden = embed if self.hidden_size is None else int(self.hidden_size)
    embedding = self.param(
        "embedding", _boxed(lambda rng, shape: self.init_fn(rng, shape, embedding_table),
                            ("prompt", "prompt_embed")), (self.length, embed))
    x = embedding.astype(jnp.float32)
    linear = initializers.torch_linear
    if self.reparameterization_type == "MLP":
      x = nn.relu(linear(hidden, embed, ("prompt_embed", "prompt_mlp"), "mlp_head_0")(x))
      x = nn.relu(linear(hidden, hidden, SQUARE_AXES, "mlp_head_1")(x))
      out = linear(embed, hidden, ("prompt_mlp", "prompt_embed"), "mlp_head_2")(x)
    else:
      x = LSTMHead(self.num_layers, hidden, self.dropout, name="lstm_head")(x[None])[0]
      x = nn.relu(linear(2 * hidden, 2 * hidden, SQUARE_AXES, "mlp_head_0")(x))
      out = linear(embed, 2 * hidden, ("prompt_mlp", "prompt_embed"), "mlp_head_1")(x)
    return jnp.broadcast_to(out, (input_tokens.shape[0],) + out.shape)


class LSTMHead(nn.Module):
  """`torch.nn.LSTM(bidirectional=True, batch_first=True)`: [batch, L, in] -> [batch, L, 2h]
  ([forward, backward] outputs), `dropout` on the inputs of layers 1.. when a dropout rng is
  present (training steps)."""

  num_layers: int
  hidden_size: int
  dropout: float = 0.0

  @nn.compact
  def __call__(self, x: Array) -> Array:
    deterministic = not self.has_rng("dropout")
    for k in range(self.num_layers):
      if k:
        x = nn.Dropout(self.dropout)(x, deterministic=deterministic)
      rnns = []
      for direction in ("forward", "backward"):
        cell = nn.OptimizedLSTMCell(
            self.hidden_size, kernel_init=_boxed(_lstm_kernel_init, SQUARE_AXES),
            recurrent_kernel_init=_boxed(_lstm_kernel_init, SQUARE_AXES),
            bias_init=_boxed(_lstm_bias_init, ("prompt_mlp",)), name=f"layer_{k}_{direction}")
        rnns.append(nn.RNN(cell))
      x = nn.Bidirectional(*rnns)(x)
    return x
