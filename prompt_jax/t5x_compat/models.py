"""T5X's `EncoderDecoderModel` for our `prompt_jax.models.t5.Transformer`.

The Transformer already has T5X's call signature (`__call__`, `encode`, `decode` with a `cache`
collection). The differences are bridged here:
  * logical axes: ours are boxed (`nn.with_logical_partitioning`), T5X wants a `params_axes`
    collection, so `get_initial_variables` converts;
  * prompt initialisers that read the vocabulary embedding (sampled vocabulary, class labels,
    SuperPos): T5X initialises missing variables (`fallback_to_scratch`) from a random model, so
    with `prompt_init_checkpoint` set the prompt is initialised from that checkpoint's
    `token_embedder/embedding` instead;
  * the decoding cache: T5X creates it with a `decode=True` apply, ours is created by `init`
    (its length is the decoder input length), so `_compute_kv_cache` builds zeros of that shape.
    Our `decode` has no `prefill` argument, so T5X never prefills a decoder prompt.
Requires t5x.
"""

from __future__ import annotations

from typing import Mapping, Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import core as flax_core
from flax import linen as nn
from t5x import models as t5x_models

from prompt_jax.interop import t5x as t5x_interop
from prompt_jax.storage import frozen_models
from prompt_jax.t5x_compat import axes

EMBEDDING = "token_embedder/embedding"


def read_embedding(path: str) -> np.ndarray:
  """The [vocab, embed] token embedding of a T5X checkpoint (only that array is read) or of a
  `.npz` of parameters (`frozen_models.save_params_npz`'s names); `builtin:<name>` is resolved.
  Read on every call: `PromptEncoderDecoderModel` keeps the table it read."""
  resolved = frozen_models.resolve_path(path)
  if t5x_interop.is_t5x_checkpoint(resolved):
    return np.asarray(t5x_interop.load_prompt(resolved, EMBEDDING), np.float32)
  if resolved.endswith(".npz"):
    with np.load(resolved) as npz:  # save_params_npz's '/'-joined names
      if EMBEDDING in npz.files:
        return np.asarray(npz[EMBEDDING], np.float32)
  raise ValueError(f"prompt_init_checkpoint {path!r}: expected a T5X checkpoint or a .npz of "
                   f"parameters holding {EMBEDDING!r}")


class PromptEncoderDecoderModel(t5x_models.EncoderDecoderModel):
  """`t5x.models.EncoderDecoderModel` for our Transformer, with `params_axes`.

  Construct it like T5X's: `module` is a `prompt_jax.models.t5.Transformer` (with or without a
  prompt hook), plus vocabularies, `optimizer_def`, `z_loss`, `loss_normalizing_factor`, ...
  `prompt_init_checkpoint`: a T5X checkpoint (usually the initial one) or `.npz` whose
  token embedding the prompt initialiser sees; None uses the random table of a fresh model
  (fine for `uniform` initialisation, wrong for vocabulary-based ones).
  """

  def __init__(self, *args, prompt_init_checkpoint: Optional[str] = None, **kwargs):
    super().__init__(*args, **kwargs)
    self.prompt_init_checkpoint = prompt_init_checkpoint
    # (path, table) of the last embedding read: T5X calls get_initial_variables more than once
    # (for shapes, then for values), and the table is read from disk only the first time.
    self._embedding: Optional[tuple[str, np.ndarray]] = None

  def prompt_init_embedding(self) -> np.ndarray:
    """The token embedding of `prompt_init_checkpoint` (`read_embedding`), read once per path
    and kept by this model."""
    path = self.prompt_init_checkpoint
    if self._embedding is None or self._embedding[0] != path:
      self._embedding = (path, read_embedding(path))
    return self._embedding[1]

  def get_initial_variables(self, rng: jax.Array, input_shapes: Mapping[str, tuple],
                            input_types: Optional[Mapping[str, jnp.dtype]] = None
                            ) -> flax_core.FrozenVariableDict:
    # Our embedding takes integer ids; T5X's default input type is float32.
    input_types = dict(input_types or {})
    for name in ("encoder_input_tokens", "decoder_input_tokens"):
      input_types.setdefault(name, jnp.int32)
    variables = axes.to_params_axes(
        super().get_initial_variables(rng, input_shapes, input_types))
    if self.prompt_init_checkpoint is not None and "prompt" in variables["params"]["encoder"]:
      variables["params"]["encoder"]["prompt"] = self._prompt_from_checkpoint_embedding(
          rng, input_shapes, variables["params"]["token_embedder"]["embedding"].shape)
    return flax_core.freeze(variables)

  def _prompt_from_checkpoint_embedding(self, rng: jax.Array, input_shapes: Mapping[str, tuple],
                                        expected_shape: tuple) -> dict:
    """Prompt parameters initialised with the checkpoint's embedding table visible."""
    table = self.prompt_init_embedding()
    if tuple(table.shape) != tuple(expected_shape):
      raise ValueError(f"prompt_init_checkpoint {self.prompt_init_checkpoint!r}: "
                       f"{EMBEDDING} has shape {table.shape}, the model expects {expected_shape}")
    encoder = jnp.ones(input_shapes["encoder_input_tokens"], jnp.int32)
    decoder = jnp.ones(input_shapes["decoder_input_tokens"], jnp.int32)
    # Only the embedding is given: apply creates every other parameter, the prompt's initialiser
    # seeing the real table (as prompt_jax's own EncoderDecoderModel.init_missing does).
    _, created = self.module.apply(
        {"params": {"token_embedder": {"embedding": jnp.asarray(table)}}}, encoder, decoder,
        decoder, enable_dropout=False, rngs={"params": rng}, mutable=["params"])
    return nn.unbox(flax_core.unfreeze(created["params"]["encoder"]["prompt"]))

  def _compute_kv_cache(self, params, encoded_inputs: jnp.ndarray,
                        encoder_input_tokens: jnp.ndarray, decoder_input_tokens: jnp.ndarray,
                        prefill_decoder_prompt: bool = False):
    """An empty cache for decoding up to decoder_input_tokens.shape[1] tokens -> (cache, None)."""
    del params, encoded_inputs, prefill_decoder_prompt
    ones_enc = jnp.ones(encoder_input_tokens.shape, jnp.int32)
    ones_dec = jnp.ones(decoder_input_tokens.shape, jnp.int32)
    shapes = jax.eval_shape(lambda: self.module.init(
        jax.random.PRNGKey(0), ones_enc, ones_dec, ones_dec, decode=True,
        enable_dropout=False)["cache"])
    return jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), shapes), None
