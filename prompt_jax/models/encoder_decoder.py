"""Loss, prediction and scoring around a T5 module (the seam T5X calls `EncoderDecoderModel`).

The trainer only talks to this class; the module only computes logits. Besides the model's own
batch features, a batch may carry the ones the prompt hook reads (`hook.input_features`, e.g. a
bank's `prompt_ids`): `prompt_features(batch)` picks exactly those and every method hands them to
the module as one mapping (see the hook contract in `prompt_jax.models.t5`).
"""

from __future__ import annotations

import dataclasses
from typing import Mapping, Optional, Union

import flax.linen as nn
import jax
import jax.numpy as jnp

from prompt_jax.models import losses

Array = jax.Array
Batch = Mapping[str, Array]

BATCH_KEYS = ("encoder_input_tokens", "decoder_input_tokens", "decoder_target_tokens")


@dataclasses.dataclass(frozen=True)
class EncoderDecoderModel:
  """A T5 `Transformer` plus its loss (T5X cross-entropy with z-loss) and greedy decoding.

  Attributes:
    module: a `prompt_jax.models.t5.Transformer`.
    z_loss: weight of the log(Z)^2 auxiliary loss (T5X default 1e-4).
    loss_normalizing_factor: None (sum), a number, or a T5X special name such as
      'NUM_REAL_TARGET_TOKENS'.
    eos_id: end-of-sequence token id; decoding stops emitting after it.
  """

  module: nn.Module
  z_loss: float = 1e-4
  loss_normalizing_factor: Union[None, float, str] = "NUM_REAL_TARGET_TOKENS"
  eos_id: int = 1

  def __post_init__(self):
    losses.normalizing_factor_and_weights(self.loss_normalizing_factor, jnp.zeros((1, 1)), None)

  @property
  def config(self):
    return self.module.config

  @property
  def prompt_feature_names(self) -> tuple[str, ...]:
    """The batch features the prompt hook reads (its `input_features`); () without a hook."""
    hook = self.module.prompt
    return () if hook is None else tuple(hook.input_features)

  def prompt_features(self, batch: Batch) -> dict:
    """{name: batch[name]} for the hook's features present in `batch`."""
    return {k: batch[k] for k in self.prompt_feature_names if k in batch}

  def dummy_batch(self, batch_size: int, input_length: int, target_length: int) -> dict:
    ones = lambda n: jnp.ones((batch_size, n), jnp.int32)
    return {"encoder_input_tokens": ones(input_length), "decoder_input_tokens": ones(target_length),
            "decoder_target_tokens": ones(target_length),
            "decoder_loss_weights": ones(target_length)}

  def init_abstract(self, batch: Batch):
    """Boxed (`nn.LogicallyPartitioned`) parameter shapes, without allocating anything."""
    def init(rng):
      return self.module.init(rng, *(batch[k] for k in BATCH_KEYS), enable_dropout=False,
                              prompt_features=self.prompt_features(batch))
    return jax.eval_shape(init, jax.random.key(0))["params"]

  def init(self, rng: Array, batch: Batch):
    """Boxed random parameters for every leaf (frozen and trainable)."""
    return self.module.init(rng, *(batch[k] for k in BATCH_KEYS), enable_dropout=False,
                            prompt_features=self.prompt_features(batch))["params"]

  def init_missing(self, rng: Array, params: Mapping, batch: Batch):
    """Create the parameters absent from `params` (e.g. the prompt), letting their initialisers
    see the given ones (e.g. the loaded embedding table). Returns the complete boxed tree."""
    _, variables = self.module.apply({"params": params}, *(batch[k] for k in BATCH_KEYS),
                                     enable_dropout=False, rngs={"params": rng},
                                     prompt_features=self.prompt_features(batch),
                                     mutable=["params"])
    return variables["params"]

  def logits(self, params: Mapping, batch: Batch, dropout_rng: Optional[Array] = None) -> Array:
    """Teacher-forced logits [b, t, vocab]; dropout is on iff `dropout_rng` is given."""
    rngs = {"dropout": dropout_rng} if dropout_rng is not None else None
    return self.module.apply({"params": params}, *(batch[k] for k in BATCH_KEYS),
                             batch.get("encoder_segment_ids"), batch.get("decoder_segment_ids"),
                             enable_dropout=dropout_rng is not None, rngs=rngs,
                             prompt_features=self.prompt_features(batch))

  def loss_fn(self, params: Mapping, batch: Batch, dropout_rng: Optional[Array]):
    """-> (scalar loss, metrics dict)."""
    logits = self.logits(params, batch, dropout_rng)
    return losses.loss_and_metrics(logits, batch["decoder_target_tokens"],
                                   batch.get("decoder_loss_weights"), self.z_loss,
                                   self.loss_normalizing_factor)

  def score_batch(self, params: Mapping, batch: Batch) -> Array:
    """Sum of target-token log-likelihoods per example [b] (for rank classification)."""
    logits = self.logits(params, batch)
    targets = batch["decoder_target_tokens"]
    log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    token_ll = jnp.take_along_axis(log_probs, targets[..., None].astype(jnp.int32), -1)[..., 0]
    weights = batch.get("decoder_loss_weights")
    weights = (targets > 0) if weights is None else weights
    return jnp.sum(token_ll * weights, axis=-1)

  # ------------------------------------------------------------------ incremental decoding
  # The pieces every decoding algorithm (greedy here, beam search and sampling in
  # `prompt_jax.models.decoding`) is built from: encode once, then one cached decoder step at a
  # time.

  def encode(self, params: Mapping, batch: Batch) -> Array:
    """Encoder output [b, l', embed] (prompt positions included) of `encoder_input_tokens`."""
    return self.module.apply({"params": params}, batch["encoder_input_tokens"],
                             enable_dropout=False, prompt_features=self.prompt_features(batch),
                             method=self.module.encode)

  def init_decode_cache(self, batch_size: int, input_length: int, max_decode_length: int):
    """A zero KV cache for `batch_size` sequences of up to `max_decode_length` tokens."""
    tokens = jnp.ones((batch_size, input_length), jnp.int32)
    dummy = jnp.ones((batch_size, max_decode_length), jnp.int32)
    cache_shapes = jax.eval_shape(
        lambda: self.module.init(jax.random.key(0), tokens, dummy, dummy, decode=True,
                                 enable_dropout=False)["cache"])
    return jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), cache_shapes)

  def decode_step(self, params: Mapping, cache, encoded: Array, encoder_input_tokens: Array,
                  token: Array, max_decode_length: int, reuse_cross_cache: bool = True,
                  prompt_features: Optional[Mapping[str, Array]] = None):
    """One cached decoder step: token [r, 1] -> (logits [r, vocab] float32, updated cache).

    The first step of a sequence must pass `reuse_cross_cache=False`: it computes the
    cross-attention keys/values (and mask bias) of `encoded` [b, l', embed] and stores them;
    later steps read them back and use neither `encoded` nor the encoder mask. Those cache
    entries (`cached_cross_*`) keep one row per example, so later steps may decode r = b * n
    rows (n beams or samples per example, example-major) with the self-attention cache and
    `encoder_input_tokens` repeated to r rows and the cross-attention entries left at b.
    `prompt_features` (the first step: the hook's per-example inputs, `prompt_features(batch)`)
    reach the hook's attention prefixes, which the cache then holds."""
    logits, variables = self.module.apply(
        {"params": params, "cache": cache}, encoded, encoder_input_tokens, token, token,
        enable_dropout=False, decode=True, max_decode_length=max_decode_length,
        reuse_cross_cache=reuse_cross_cache, prompt_features=prompt_features,
        mutable=["cache"], method=self.module.decode)
    return logits[:, -1].astype(jnp.float32), variables["cache"]

  def predict_batch(self, params: Mapping, batch: Batch, max_decode_length: int) -> Array:
    """Greedy decoding with the KV cache: [b, max_decode_length] tokens (0 after EOS).

    `batch` needs `encoder_input_tokens` [b, l] and the hook's features (e.g. `prompt_ids` [b]
    for a prompt bank)."""
    tokens = batch["encoder_input_tokens"]
    encoded = self.encode(params, batch)
    batch_size = tokens.shape[0]
    cache = self.init_decode_cache(batch_size, tokens.shape[1], max_decode_length)

    def step(carry, _, reuse_cross_cache=True):
      cache, token, done = carry
      features = None if reuse_cross_cache else self.prompt_features(batch)
      logits, cache = self.decode_step(params, cache, encoded, tokens, token, max_decode_length,
                                       reuse_cross_cache, features)
      next_token = jnp.argmax(logits, axis=-1).astype(jnp.int32)
      next_token = jnp.where(done, 0, next_token)
      done = done | (next_token == self.eos_id)
      return (cache, next_token[:, None], done), next_token

    start = jnp.zeros((batch_size, 1), jnp.int32)
    done = jnp.zeros((batch_size,), bool)
    carry, first = step((cache, start, done), None, reuse_cross_cache=False)
    _, rest = jax.lax.scan(step, carry, None, length=max_decode_length - 1)
    return jnp.concatenate([first[:, None], rest.T], axis=1)
