"""Decoding algorithms on the KV cache: greedy, beam search and temperature sampling (T5X-style).

Every algorithm is built from the model's three incremental-decoding methods only:
`encode(params, batch)`, `init_decode_cache(batch_size, input_length, max_decode_length)` and
`decode_step(params, cache, encoded, encoder_input_tokens, token, max_decode_length,
reuse_cross_cache)`. The encoder and the first decoder step run once per example (batch `b`, so
prompt banks and any other per-example feature of `batch` reach `encode` untouched); then the
self-attention cache and the input tokens are repeated to `b * n` rows, example-major (rows
`i*n .. i*n + n-1` are the `n` beams or samples of example `i`), and the remaining steps run on
that flat batch inside one `lax.while_loop`. The beam dimension is thus folded into the batch:
it is split over the mesh's data axis like any batch. The cross-attention keys, values and mask
bias of the encoder output (prompt included) stay at one row per example: the model lets the
`n` rows of an example attend to them as `n` queries, so they are never repeated or gathered.
Beam search reorders the self-attention cache with one row gather per cache array and step.

All three return `(tokens [b, n, max_decode_length] int32, scores [b, n] float32)`, best first;
tokens after EOS are 0 (EOS itself is kept). Log-probabilities are float32 whatever the
activation dtype (`decode_step` returns float32 logits).

  greedy(model, params, batch, L)                             n = 1; scores are log-likelihoods
  beam_search(model, params, batch, L, num_decodes, alpha)    n = num_decodes; scores are
                                                              log-likelihood / brevity penalty
  temperature_sample(model, params, batch, L, rng, temperature, topk, topp, num_decodes)
                                                              scores are log-likelihoods

`Greedy`, `BeamSearch` and `TemperatureSampling` are frozen (hashable) dataclasses holding the
settings; they are what gin configures (`DECODE_FN = @decoding.BeamSearch()`) and what
`PromptPrograms.predict` takes as a static argument of its jitted program. See docs/decoding.md.

Beam search follows T5X's `decoding.beam_search` in its interface (`num_decodes`, `alpha`,
brevity penalty `((5 + length) / 6) ** alpha` with the length counting EOS, live and finished
sets, early stop when no live beam can still beat the worst finished one) with two documented
differences, both also what Hugging Face's `generate` does: a candidate ending in EOS joins the
finished set only if it ranks among the top `num_decodes` candidates of its step (so one beam is
exactly greedy decoding), and beams still alive at `max_decode_length` are finished candidates
scored at that length (T5X returns them only when nothing finished).
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any, Callable, Mapping, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array
Batch = Mapping[str, Array]

NEG_INF = -jnp.inf
# Temperatures below this are treated as 0 (argmax), as in T5X: dividing logits by a tiny
# temperature overflows.
MIN_TEMPERATURE = 1e-4


def brevity_penalty(alpha: float, length) -> Array:
  """T5X's length normalisation ((5 + length) / 6) ** alpha (1 for alpha = 0), float32."""
  return jnp.power((5.0 + jnp.asarray(length, jnp.float32)) / 6.0, jnp.float32(alpha))


# ------------------------------------------------------------------------- shared machinery


def _check_length(max_decode_length) -> int:
  if not isinstance(max_decode_length, (int, np.integer)) or max_decode_length < 1:
    raise ValueError(f"max_decode_length must be a positive integer, got {max_decode_length!r}")
  return int(max_decode_length)


def _repeat_rows(x: Array, n: int) -> Array:
  """[b, ...] -> [b * n, ...], each row repeated n times in place (example-major)."""
  return x if n == 1 else jnp.repeat(x, n, axis=0)


# Decode-cache entries that depend only on the example (the cross-attention keys, values and
# key bias of the encoder output; a hook's self-attention prefix). They stay at one row per
# example: the model's attention lets the n beams of an example attend to that row as n
# queries, so they are neither repeated nor gathered.
_PER_EXAMPLE_CACHE = ("cached_cross_key", "cached_cross_value", "cached_cross_bias",
                      "cached_prefix_key", "cached_prefix_value")


def _map_cache(fn: Callable[[Array], Array], cache, batch_size: int):
  """Apply `fn` to every per-row cache array (leading batch axis `batch_size`); scalars (the
  shared `cache_index`) and the per-example entries are left alone. Any other layout is an error
  (decoding repeats and gathers beams on axis 0)."""
  def apply(path, x):
    if np.ndim(x) == 0 or getattr(path[-1], "key", None) in _PER_EXAMPLE_CACHE:
      return x
    if x.shape[0] != batch_size:
      raise ValueError(f"decoding expects every non-scalar decode-cache array to lead with the "
                       f"batch axis ({batch_size}); got shape {x.shape}")
    return fn(x)
  return jax.tree_util.tree_map_with_path(apply, cache)


def _first_step(model, params, batch: Batch, max_decode_length: int, n: int):
  """Encode, run decoder step 1 on the `b` examples (this writes the cross-attention keys and
  values into the cache), then repeat the per-row cache and the input tokens to `b * n` rows.
  The cross-attention entries and the encoder output stay per example: later steps read the
  former and never the latter.

  -> (first-step logits [b, vocab] float32, cache [b*n], encoded [b], input tokens [b*n])."""
  tokens = batch["encoder_input_tokens"]
  batch_size, input_length = tokens.shape
  encoded = model.encode(params, batch)
  cache = model.init_decode_cache(batch_size, input_length, max_decode_length)
  start = jnp.zeros((batch_size, 1), jnp.int32)
  logits, cache = model.decode_step(params, cache, encoded, tokens, start, max_decode_length,
                                    reuse_cross_cache=False,
                                    prompt_features=model.prompt_features(batch))
  cache = _map_cache(lambda x: _repeat_rows(x, n), cache, batch_size)
  return logits.astype(jnp.float32), cache, encoded, _repeat_rows(tokens, n)


def _at_position(seqs: Array, position, tokens: Array) -> Array:
  """seqs [..., L] with column `position` (traced) set to tokens [...]."""
  column = jnp.arange(seqs.shape[-1]) == position
  return jnp.where(column, tokens[..., None], seqs)


def _column(seqs: Array, position) -> Array:
  """seqs[..., position] for a traced position."""
  return jax.lax.dynamic_index_in_dim(seqs, position, axis=seqs.ndim - 1, keepdims=False)


def _gather(x: Array, index: Array) -> Array:
  """x [b, k, ...], index [b, j] -> [b, j, ...] (a gather within each example)."""
  return jax.vmap(lambda rows, i: rows[i])(x, index)


# ---------------------------------------------------------------------------------- sampling


def _row_hash(x: Array) -> Array:
  """[b, ...] -> [b] uint32: a positional hash of each row's values (zeros add nothing, so
  trailing padding does not change it)."""
  x = x.reshape(x.shape[0], -1)
  if jnp.issubdtype(x.dtype, jnp.floating):
    x = jax.lax.bitcast_convert_type(x.astype(jnp.float32), jnp.uint32)
  multipliers = (np.arange(1, x.shape[1] + 1, dtype=np.uint64) * 2654435761 + 0x9E3779B9) % 2 ** 32
  return jnp.sum(x.astype(jnp.uint32) * jnp.asarray(multipliers, jnp.uint32), axis=1,
                 dtype=jnp.uint32)


def _row_keys(model, rng: Array, batch: Batch, n: int) -> Array:
  """One PRNG key per (example, decode): folded from `rng`, a hash of the example's input tokens,
  hashes of its prompt features (e.g. a bank's `prompt_ids`) and the decode index. So a sample
  depends on the seed and the example, not on the batch it is in or the mesh."""
  tokens = batch["encoder_input_tokens"]
  keys = jax.vmap(jax.random.fold_in, in_axes=(None, 0))(rng, _row_hash(tokens))
  for name in getattr(model, "prompt_feature_names", ("prompt_ids",)):
    if batch.get(name) is not None:
      keys = jax.vmap(jax.random.fold_in)(keys, _row_hash(jnp.asarray(batch[name])))
  keys = keys[jnp.repeat(jnp.arange(tokens.shape[0]), n)]
  decode_index = jnp.tile(jnp.arange(n, dtype=jnp.uint32), tokens.shape[0])
  return jax.vmap(jax.random.fold_in)(keys, decode_index)


# Bounds of the integer parameters: beams/samples per example (each multiplies the batch; 65536
# leaves room for sampling statistics, tests draw 4000, while a typo of many digits is refused
# before anything is allocated), top-k (int32 indices) and the seed (`jax.random.key` takes 32
# bits).
MAX_DECODES = 65536
MAX_TOPK = 2**31 - 1
MAX_SEED = 2**32 - 1


def _is_int(value) -> bool:
  return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def _is_finite(value) -> bool:
  """A finite int or float (not bool); an int too large for a float is not finite."""
  if not isinstance(value, (int, float)) or isinstance(value, bool):
    return False
  try:
    return math.isfinite(value)
  except OverflowError:
    return False


def _show(value, limit: int = 60) -> str:
  """`repr(value)` for an error message, shortened (a huge integer by its digit count)."""
  if _is_int(value) and abs(int(value)).bit_length() > 200:
    return f"an integer of about {int(abs(int(value)).bit_length() * 0.30103) + 1} digits"
  text = repr(value)
  return text if len(text) <= limit else f"{text[:limit - 3]}..."


def _check_sampling(temperature, topk, topp, num_decodes):
  if not _is_finite(temperature) or temperature < 0:
    raise ValueError(f"temperature must be a finite number >= 0, got {_show(temperature)}")
  if not _is_int(topk) or not 0 <= topk <= MAX_TOPK:
    raise ValueError(f"topk must be an integer in [0, {MAX_TOPK}] (0 = no top-k), got "
                     f"{_show(topk)}")
  if not isinstance(topp, (int, float)) or isinstance(topp, bool) or not 0.0 <= topp <= 1.0:
    raise ValueError(f"topp must be a number in [0, 1] (0 = no top-p), got {_show(topp)}")
  if not _is_int(num_decodes) or not 1 <= num_decodes <= MAX_DECODES:
    raise ValueError(f"num_decodes must be an integer in [1, {MAX_DECODES}], got "
                     f"{_show(num_decodes)}")


def _check_seed(seed):
  if not _is_int(seed) or not 0 <= seed <= MAX_SEED:
    raise ValueError(f"seed must be an integer in [0, 2**32 - 1], got {_show(seed)}")


def sampling_support(logits: Array, temperature: float, topk: int = 0,
                     topp: float = 0.0) -> tuple[Array, Optional[Array]]:
  """The distribution one sampling step draws from, as (logits' [r, m], token ids [r, m] or None
  for the identity): logits / temperature; then only the `topk` largest (0 = all); then only the
  smallest set of most probable tokens whose probabilities add up to at least `topp` (0 or 1 =
  all). Excluded entries are -inf. (Hugging Face's order; T5X allows only one of topk / topp.)"""
  scaled = logits / jnp.float32(temperature)
  vocab = scaled.shape[-1]
  ids = None
  if topk and topk < vocab:
    scaled, ids = jax.lax.top_k(scaled, topk)
  if 0.0 < topp < 1.0:
    if ids is None:
      scaled, ids = jax.lax.top_k(scaled, vocab)  # sorted, most probable first
    probs = jax.nn.softmax(scaled, axis=-1)
    before = jnp.cumsum(probs, axis=-1) - probs  # mass of the more probable tokens
    scaled = jnp.where(before < topp, scaled, NEG_INF)
  return scaled, ids


def _decode_loop(model, params, batch: Batch, max_decode_length: int, n: int, eos_id: int,
                 choose: Callable[[Array, Array], Array]):
  """Greedy / sampling: `choose(logits [b*n, vocab], step) -> tokens [b*n]` at every step.

  -> (tokens [b, n, L], summed model log-likelihood [b, n]), decodes in row order."""
  length = max_decode_length
  logits, cache, encoded, tokens = _first_step(model, params, batch, length, n)
  logits = _repeat_rows(logits, n)
  rows = logits.shape[0]

  def advance(seqs, scores, done, logits, step):
    token = choose(logits, step).astype(jnp.int32)
    log_probs = jax.nn.log_softmax(logits, axis=-1)
    token_ll = jnp.take_along_axis(log_probs, token[:, None], axis=-1)[:, 0]
    token = jnp.where(done, 0, token)
    scores = scores + jnp.where(done, 0.0, token_ll)
    return _at_position(seqs, step, token), scores, done | (token == eos_id)

  seqs = jnp.zeros((rows, length), jnp.int32)
  seqs, scores, done = advance(seqs, jnp.zeros((rows,), jnp.float32),
                               jnp.zeros((rows,), bool), logits, 0)

  def cond(state):
    step, _, _, done, _ = state
    return (step < length) & ~jnp.all(done)

  def body(state):
    step, seqs, scores, done, cache = state
    token = _column(seqs, step - 1)[:, None]
    logits, cache = model.decode_step(params, cache, encoded, tokens, token, length,
                                      reuse_cross_cache=True)
    seqs, scores, done = advance(seqs, scores, done, logits, step)
    return step + 1, seqs, scores, done, cache

  _, seqs, scores, _, _ = jax.lax.while_loop(
      cond, body, (jnp.array(1, jnp.int32), seqs, scores, done, cache))
  batch_size = rows // n
  return seqs.reshape(batch_size, n, length), scores.reshape(batch_size, n)


def _best_first(tokens: Array, scores: Array):
  order = jnp.argsort(-scores, axis=1, stable=True)
  return (jnp.take_along_axis(tokens, order[:, :, None], axis=1),
          jnp.take_along_axis(scores, order, axis=1))


def temperature_sample(model, params, batch: Batch, max_decode_length: int,
                       rng: Optional[Array] = None, temperature: float = 1.0, topk: int = 0,
                       topp: float = 0.0, num_decodes: int = 1,
                       eos_id: Optional[int] = None) -> tuple[Array, Array]:
  """`num_decodes` samples per example -> (tokens [b, n, L], log-likelihoods [b, n]), best first.

  Each step draws from softmax(logits / temperature), restricted by `topk` / `topp` (see
  `sampling_support`). A temperature below 1e-4, or topk = 1, is greedy (argmax) decoding, and
  `rng` is then unused. Scores are the model's own log-likelihood of the sampled tokens (at
  temperature 1, unrestricted; EOS included), which is what the decodes are ranked by. The
  samples are a function of `rng` and each example (see `_row_keys`): the same seed gives the
  same samples in any batch and on any mesh.
  """
  _check_sampling(temperature, topk, topp, num_decodes)
  length = _check_length(max_decode_length)
  eos_id = model.eos_id if eos_id is None else eos_id
  if temperature < MIN_TEMPERATURE or topk == 1:
    def choose(logits, step):
      del step
      return jnp.argmax(logits, axis=-1)
  else:
    if rng is None:
      raise ValueError("temperature_sample needs an rng when it samples (temperature > 0)")
    keys = _row_keys(model, rng, batch, num_decodes)

    def choose(logits, step):
      support, ids = sampling_support(logits, temperature, topk, topp)
      step_keys = jax.vmap(jax.random.fold_in, in_axes=(0, None))(keys, step)
      picked = jax.vmap(jax.random.categorical)(step_keys, support)
      return picked if ids is None else jnp.take_along_axis(ids, picked[:, None], axis=-1)[:, 0]
  tokens, scores = _decode_loop(model, params, batch, length, num_decodes, eos_id, choose)
  return _best_first(tokens, scores)


def greedy(model, params, batch: Batch, max_decode_length: int,
           eos_id: Optional[int] = None) -> tuple[Array, Array]:
  """Greedy decoding -> (tokens [b, 1, L], log-likelihoods [b, 1]); the tokens are those of
  `EncoderDecoderModel.predict_batch`."""
  return temperature_sample(model, params, batch, max_decode_length, None, temperature=0.0,
                            eos_id=eos_id)


# ------------------------------------------------------------------------------- beam search


class _Beams(NamedTuple):
  """Beam-search state; [b, K, ...] per example and beam."""
  step: Array           # [] position of the next token
  live_seqs: Array      # [b, K, L] int32, the K best prefixes not ended by EOS
  live_log_probs: Array  # [b, K] float32 (-inf: no such beam)
  done_seqs: Array      # [b, K, L] int32, the K best finished sequences
  done_scores: Array    # [b, K] float32 log-prob / brevity penalty (-inf: empty slot)
  cache: Any            # the decode cache of the live beams, [b*K, ...]


def _check_beams(num_decodes, alpha):
  if not _is_int(num_decodes) or not 1 <= num_decodes <= MAX_DECODES:
    raise ValueError(f"num_decodes (the beam width) must be an integer in [1, {MAX_DECODES}], "
                     f"got {_show(num_decodes)}")
  if not _is_finite(alpha) or alpha < 0:
    # alpha >= 0 makes the early stop exact: no live beam can gain from growing longer.
    raise ValueError(f"alpha (the brevity-penalty exponent) must be a finite number >= 0, got "
                     f"{_show(alpha)}")


def _beam_update(state: _Beams, log_probs: Array, alpha: float, eos_id: int, length: int):
  """Extend every live beam by every token and keep the best: -> (state without its cache,
  parent beam [b, K] of each new live beam)."""
  batch_size, beams, vocab = log_probs.shape
  step = state.step
  candidates = (state.live_log_probs[:, :, None] + log_probs).reshape(batch_size, beams * vocab)
  # The 2K best candidates: at most K of them end in EOS (one token per beam), so at least K
  # remain to continue.
  top = min(2 * beams, beams * vocab)
  cand_log_probs, flat = jax.lax.top_k(candidates, top)
  parent, token = flat // vocab, (flat % vocab).astype(jnp.int32)
  seqs = _at_position(_gather(state.live_seqs, parent), step, token)
  is_eos = token == eos_id
  # A candidate finishes when it ends in EOS or reaches the length limit, and counts only if it
  # is among this step's K best (a beam of width K holds K hypotheses).
  finishes = (is_eos | (step == length - 1)) & (jnp.arange(top) < beams)
  finishes &= cand_log_probs > NEG_INF
  new_scores = jnp.where(finishes, cand_log_probs / brevity_penalty(alpha, step + 1), NEG_INF)
  # Existing finished sequences come first, so they win ties.
  done_scores, pick = jax.lax.top_k(jnp.concatenate([state.done_scores, new_scores], 1), beams)
  done_seqs = _gather(jnp.concatenate([state.done_seqs, seqs], 1), pick)
  live_log_probs, pick = jax.lax.top_k(jnp.where(is_eos, NEG_INF, cand_log_probs), beams)
  new_state = _Beams(step + 1, _gather(seqs, pick), live_log_probs, done_seqs, done_scores, None)
  return new_state, _gather(parent, pick)


def _beams_finished(state: _Beams, alpha: float, length: int) -> Array:
  """[b] whether no live beam can still enter the finished set: its log-probability only falls
  as it grows, and dividing by the largest brevity penalty (length L) bounds its score."""
  best_live = jnp.max(state.live_log_probs, axis=1)
  bound = best_live / brevity_penalty(alpha, length)
  return (best_live == NEG_INF) | (jnp.min(state.done_scores, axis=1) > bound)


def beam_search(model, params, batch: Batch, max_decode_length: int, num_decodes: int = 4,
                alpha: float = 0.6, eos_id: Optional[int] = None) -> tuple[Array, Array]:
  """Beam search -> (tokens [b, num_decodes, L], scores [b, num_decodes]), best first.

  A sequence's score is its log-likelihood (float32, EOS included) divided by
  `brevity_penalty(alpha, its length including EOS)`; alpha = 0 ranks by log-likelihood alone.
  Sequences that reach `max_decode_length` without EOS compete at that length. Slots left empty
  (a search space smaller than `num_decodes`) have score -inf and tokens 0.
  """
  _check_beams(num_decodes, alpha)
  length = _check_length(max_decode_length)
  eos_id = model.eos_id if eos_id is None else eos_id
  beams = int(num_decodes)
  logits, cache, encoded, tokens = _first_step(model, params, batch, length, beams)
  batch_size, vocab = logits.shape
  # Step 1 extends a single live beam (the others are -inf); every beam's row already holds it.
  initial = _Beams(
      step=jnp.array(0, jnp.int32),
      live_seqs=jnp.zeros((batch_size, beams, length), jnp.int32),
      live_log_probs=jnp.where(jnp.arange(beams) == 0, 0.0, NEG_INF)[None].repeat(batch_size, 0),
      done_seqs=jnp.zeros((batch_size, beams, length), jnp.int32),
      done_scores=jnp.full((batch_size, beams), NEG_INF, jnp.float32), cache=None)
  first = jnp.broadcast_to(jax.nn.log_softmax(logits)[:, None], (batch_size, beams, vocab))
  state, _ = _beam_update(initial, first, alpha, eos_id, length)
  state = state._replace(cache=cache)

  def cond(state):
    return (state.step < length) & ~jnp.all(_beams_finished(state, alpha, length))

  def body(state):
    token = _column(state.live_seqs, state.step - 1).reshape(batch_size * beams, 1)
    logits, cache = model.decode_step(params, state.cache, encoded, tokens, token, length,
                                      reuse_cross_cache=True)
    log_probs = jax.nn.log_softmax(logits).reshape(batch_size, beams, vocab)
    new_state, parent = _beam_update(state, log_probs, alpha, eos_id, length)
    # Each new live beam continues from its parent's self-attention cache rows (one gather per
    # array, rows of the flat [b*K] batch).
    rows = (parent + beams * jnp.arange(batch_size)[:, None]).reshape(-1)
    cache = _map_cache(lambda x: jnp.take(x, rows, axis=0, mode="clip"), cache,
                       batch_size * beams)
    return new_state._replace(cache=cache)

  final = jax.lax.while_loop(cond, body, state)
  filled = final.done_scores > NEG_INF
  return jnp.where(filled[:, :, None], final.done_seqs, 0), final.done_scores


# ------------------------------------------------------------------- configurable decoders


@dataclasses.dataclass(frozen=True)
class Greedy:
  """Greedy decoding (the default): one decode per example, its log-likelihood as score."""

  num_decodes = 1

  def __call__(self, model, params, batch: Batch, max_decode_length: int):
    return greedy(model, params, batch, max_decode_length)


@dataclasses.dataclass(frozen=True)
class BeamSearch:
  """T5X-style beam search: `num_decodes` beams (all returned, best first), brevity-penalty
  exponent `alpha` (T5X's default 0.6; 0 = plain log-likelihood)."""

  num_decodes: int = 4
  alpha: float = 0.6

  def __post_init__(self):
    _check_beams(self.num_decodes, self.alpha)

  def __call__(self, model, params, batch: Batch, max_decode_length: int):
    return beam_search(model, params, batch, max_decode_length, self.num_decodes, self.alpha)


@dataclasses.dataclass(frozen=True)
class TemperatureSampling:
  """T5X-style `temperature_sample`: `num_decodes` samples per example (ranked by
  log-likelihood, best first) at `temperature` with `topk` (0 = off) and `topp` (0 = off),
  reproducible given `seed`. Temperature 0 or topk = 1 is greedy."""

  temperature: float = 1.0
  topk: int = 0
  topp: float = 0.0
  seed: int = 0
  num_decodes: int = 1

  def __post_init__(self):
    _check_sampling(self.temperature, self.topk, self.topp, self.num_decodes)
    _check_seed(self.seed)

  def __call__(self, model, params, batch: Batch, max_decode_length: int):
    return temperature_sample(model, params, batch, max_decode_length,
                              jax.random.key(self.seed), self.temperature, self.topk,
                              self.topp, self.num_decodes)


Decoding = Any  # Greedy | BeamSearch | TemperatureSampling, or any hashable callable alike
DEFAULT = Greedy()


def resolve(decoding: Optional[Decoding]) -> Decoding:
  """None -> `Greedy()`; anything else must be a hashable callable
  `(model, params, batch, max_decode_length) -> (tokens [b, n, L], scores [b, n])`."""
  if decoding is None:
    return DEFAULT
  if not callable(decoding):
    raise TypeError(f"a decoding must be Greedy(), BeamSearch(...) or TemperatureSampling(...) "
                    f"(callable), got {decoding!r}")
  try:
    hash(decoding)
  except TypeError as e:
    raise TypeError(f"a decoding is a static argument of a jitted program and must be "
                    f"hashable, got {decoding!r}") from e
  return decoding


_INTEGER_BOUNDS = {"num_decodes": f"[1, {MAX_DECODES}]", "topk": f"[0, {MAX_TOPK}]",
                   "seed": "[0, 2**32 - 1]"}
_NAMES = {"greedy": Greedy, "beam_search": BeamSearch, "temperature_sample": TemperatureSampling,
          "Greedy": Greedy, "BeamSearch": BeamSearch, "TemperatureSampling": TemperatureSampling}


def parse(spec: str) -> Decoding:
  """A decoding from a command-line string: 'greedy', 'beam_search(num_decodes=4, alpha=0.6)',
  'temperature_sample(temperature=0.7, topk=40, seed=1, num_decodes=4)' (T5X's function names
  or the class names; keyword arguments with literal values)."""
  import ast  # pylint: disable=g-import-not-at-top
  shown = _show(spec, 100)
  match = re.fullmatch(r"\s*([A-Za-z_]\w*)\s*(?:\((.*)\))?\s*", spec or "", re.S)
  if not match or match.group(1) not in _NAMES:
    raise ValueError(f"unknown decoding {shown}; expected greedy, beam_search(...) or "
                     f"temperature_sample(...)")
  cls, args = _NAMES[match.group(1)], (match.group(2) or "").strip()
  # An integer literal too long for any bound is named before Python parses it (a literal of
  # thousands of digits is refused by int() with a message that names nothing).
  for name, digits in re.findall(r"\b(\w+)\s*=\s*[+-]?\s*(\d{19,})(?![\w.])", args):
    if name in _INTEGER_BOUNDS:
      raise ValueError(f"decoding {shown}: {name}={digits[:12]}... ({len(digits)} digits) is "
                       f"out of range; {name} must be an integer in {_INTEGER_BOUNDS[name]}")
  kwargs = {}
  if args:
    try:
      call = ast.parse(f"f({args})", mode="eval").body
      if call.args:
        raise ValueError("positional arguments")
      kwargs = {kw.arg: ast.literal_eval(kw.value) for kw in call.keywords}
    except (SyntaxError, ValueError) as e:
      reason = (str(e).splitlines() or [type(e).__name__])[0]
      reason = reason if len(reason) <= 120 else reason[:117] + "..."
      raise ValueError(f"decoding {shown}: arguments must be keyword=literal pairs "
                       f"({reason})") from None
  fields = {f.name for f in dataclasses.fields(cls)}
  unknown = sorted(set(kwargs) - fields)
  if unknown:
    raise ValueError(f"decoding {shown}: {cls.__name__} has no parameter {_show(unknown[0])} "
                     f"(it takes {sorted(fields) or 'none'})")
  try:
    return cls(**kwargs)
  except ValueError as e:
    raise ValueError(f"decoding {shown}: {e}") from None
