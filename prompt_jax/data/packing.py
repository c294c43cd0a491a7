"""Packing: several short examples per encoder row, each with its own copy of the prompt.

GLUE inputs are short next to a 100-token prompt, so even length buckets pad a lot. Packing puts
several examples into one row of `input_length` encoder positions and `target_length` decoder
positions, in T5X's packed layout (seqio's `EncDecFeatureConverter(pack=True)`: features
`encoder_segment_ids`, `encoder_positions`, `decoder_segment_ids`, `decoder_positions`; segment
ids start at 1, padding is 0). With a prompt, every example first gets `prompt_length` reserved
slots in front of its tokens, so its segment covers its own prompt:

    encoder_input_tokens  S S S 7 8 5 1 S S S 8 4 1 0     (S = slot_id, prompt length 3)
    encoder_segment_ids   1 1 1 1 1 1 1 2 2 2 2 2 2 0
    encoder_positions     0 1 2 3 4 5 6 0 1 2 3 4 5 0
    decoder_target_tokens 3 9 1 4 1 0
    decoder_input_tokens  0 3 9 0 4 0
    decoder_segment_ids   1 1 1 2 2 0

The slot token `slot_id` is the prompt hook's to choose (non-zero: seqio strips zeros as
padding), so the caller that knows the prompt passes it: `prompt_jax.prompts.base.PROMPT_SLOT_ID`
for `InputPrompt` (placement `prefix`), which fills slot `position` of every segment with prompt
row `position` (`prompt_jax.prompts.base.fill_prompt_slots`). The model's segment masks keep the
examples apart, so every example's loss is its unpacked loss (tests/test_packing.py). The loss
of a packed batch with T5X's default normaliser (`NUM_REAL_TARGET_TOKENS`) is T5X's.

Two ways in: `pack_examples` packs host numpy examples (greedy first fit, no TensorFlow), and
`feature_converter` gives seqio's packing converter with the prompt slots reserved, for the
tf.data pipeline.
"""

from __future__ import annotations

from typing import Iterable, Mapping, Optional, Sequence

import numpy as np

from prompt_jax.data import bucketing

PACKED_KEYS = ("encoder_input_tokens", "encoder_segment_ids", "encoder_positions",
               "decoder_target_tokens", "decoder_input_tokens", "decoder_loss_weights",
               "decoder_segment_ids", "decoder_positions")


def _check_positive(name: str, value) -> int:
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
    raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
  return int(value)


def first_fit(input_lengths: Sequence[int], target_lengths: Sequence[int], rows: int,
              input_length: int, target_length: int, prompt_length: int,
              open_rows: Optional[int] = None) -> list[list[list[int]]]:
  """Greedy first fit: example indices per row per batch, [batch][row][segment].

  Examples are taken in order; each goes into the first open row with room for
  `prompt_length + input_lengths[i]` encoder and `target_lengths[i]` decoder positions, else
  into a new row. At most `open_rows` rows (default `rows`, one batch) stay open: opening one
  more closes the oldest. Closed rows form batches of `rows` in closing order; the last batch
  may have fewer rows. A larger window packs tighter and mixes the example order more."""
  rows = _check_positive("rows", rows)
  input_length = _check_positive("input_length", input_length)
  target_length = _check_positive("target_length", target_length)
  open_rows = rows if open_rows is None else _check_positive("open_rows", open_rows)
  if isinstance(prompt_length, bool) or not isinstance(prompt_length, (int, np.integer)) or (
      prompt_length < 0):
    raise ValueError(f"prompt_length must be an integer >= 0, got {prompt_length!r}")
  if len(input_lengths) != len(target_lengths):
    raise ValueError(f"{len(input_lengths)} input lengths but {len(target_lengths)} target "
                     "lengths")
  closed: list[list[int]] = []
  opened: list[list[int]] = []
  room: list[tuple[int, int]] = []  # free (encoder, decoder) positions of each open row
  for i, (n_in, n_tgt) in enumerate(zip(input_lengths, target_lengths)):
    need_in, need_tgt = prompt_length + int(n_in), int(n_tgt)
    if need_in > input_length or need_tgt > target_length:
      raise ValueError(f"example {i} needs {prompt_length} prompt + {int(n_in)} input = {need_in} "
                       f"encoder and {need_tgt} decoder positions; a packed row has "
                       f"{input_length} and {target_length}")
    for r, (free_in, free_tgt) in enumerate(room):
      if need_in <= free_in and need_tgt <= free_tgt:
        opened[r].append(i)
        room[r] = (free_in - need_in, free_tgt - need_tgt)
        break
    else:
      if len(opened) == open_rows:
        closed.append(opened.pop(0))
        room.pop(0)
      opened.append([i])
      room.append((input_length - need_in, target_length - need_tgt))
  closed.extend(opened)
  return [closed[k:k + rows] for k in range(0, len(closed), rows)]


def _check_slots(prompt_length, slot_id: Optional[int]) -> None:
  """prompt_length >= 0; prompt slots need a slot_id >= 1 (0 is padding)."""
  if isinstance(prompt_length, bool) or not isinstance(prompt_length, (int, np.integer)) or (
      prompt_length < 0):
    raise ValueError(f"prompt_length must be an integer >= 0, got {prompt_length!r}")
  if prompt_length and (isinstance(slot_id, bool) or not isinstance(slot_id, (int, np.integer))
                        or slot_id < 1):
    raise ValueError(f"prompt_length={prompt_length} reserves prompt slots: slot_id must be the "
                     f"prompt hook's slot token >= 1 (prompts.base.PROMPT_SLOT_ID), got "
                     f"{slot_id!r}")


def _pack_row(row: Sequence[Mapping[str, np.ndarray]], input_length: int, target_length: int,
              prompt_length: int, slot_id: Optional[int]) -> dict[str, np.ndarray]:
  """One packed row (1-D features) from its examples' stripped features."""
  out = {k: np.zeros(input_length if k.startswith("encoder") else target_length, np.int32)
         for k in PACKED_KEYS}
  at_in = at_tgt = 0
  for segment, ex in enumerate(row, start=1):
    tokens, targets, weights = ex["inputs"], ex["targets"], ex["weights"]
    n_in, n_tgt = prompt_length + len(tokens), len(targets)
    enc = slice(at_in, at_in + n_in)
    out["encoder_input_tokens"][enc] = np.concatenate(
        [np.full(prompt_length, slot_id or 0, np.int32), tokens])
    out["encoder_segment_ids"][enc] = segment
    out["encoder_positions"][enc] = np.arange(n_in)
    dec = slice(at_tgt, at_tgt + n_tgt)
    out["decoder_target_tokens"][dec] = targets
    out["decoder_input_tokens"][dec] = np.concatenate([[0], targets[:-1]]) if n_tgt else targets
    out["decoder_loss_weights"][dec] = weights
    out["decoder_segment_ids"][dec] = segment
    out["decoder_positions"][dec] = np.arange(n_tgt)
    at_in, at_tgt = at_in + n_in, at_tgt + n_tgt
  return out


def pack_examples(examples: Iterable[Mapping[str, np.ndarray]], rows: int, input_length: int,
                  target_length: int, prompt_length: int, open_rows: Optional[int] = None, *,
                  slot_id: Optional[int] = None) -> list[dict[str, np.ndarray]]:
  """Host examples -> packed batches of `rows` rows ([rows, input_length] encoder features,
  [rows, target_length] decoder features, `PACKED_KEYS`, int32), greedy first fit with
  `open_rows` rows open (`first_fit`); the prompt slots hold `slot_id` (required when
  prompt_length > 0).

  Each example is a mapping of 1-D `encoder_input_tokens` and `decoder_target_tokens` (trailing
  zeros are padding and are dropped) and optionally `decoder_loss_weights`; other features are
  ignored. `input_length` counts every example's `prompt_length` reserved slots. The last batch
  is padded with empty rows (all zero: no segment, no loss) to `rows` rows."""
  _check_slots(prompt_length, slot_id)
  stripped = []
  for ex in examples:
    tokens = np.asarray(ex["encoder_input_tokens"], np.int32)
    targets = np.asarray(ex["decoder_target_tokens"], np.int32)
    n_in = int(bucketing.real_lengths(tokens[None])[0])
    n_tgt = int(bucketing.real_lengths(targets[None])[0])
    weights = ex.get("decoder_loss_weights")
    weights = (targets > 0) if weights is None else np.asarray(weights)
    stripped.append({"inputs": tokens[:n_in], "targets": targets[:n_tgt],
                     "weights": weights[:n_tgt].astype(np.int32)})
  layout = first_fit([len(e["inputs"]) for e in stripped], [len(e["targets"]) for e in stripped],
                     rows, input_length, target_length, prompt_length, open_rows)
  batches = []
  for batch in layout:
    packed = [_pack_row([stripped[i] for i in row], input_length, target_length, prompt_length,
                        slot_id) for row in batch]
    packed += [_pack_row([], input_length, target_length, prompt_length, slot_id)
               for _ in range(rows - len(batch))]
    batches.append({k: np.stack([row[k] for row in packed]) for k in PACKED_KEYS})
  return batches


def segment_sums(values: np.ndarray, segment_ids: np.ndarray) -> dict[int, float]:
  """values [l], segment_ids [l] (one row) -> {segment id: sum of its values} (segments >= 1)."""
  values, segment_ids = np.asarray(values), np.asarray(segment_ids)
  return {int(s): float(values[segment_ids == s].sum()) for s in np.unique(segment_ids) if s > 0}


def utilisation(batches: Sequence[Mapping[str, np.ndarray]]) -> dict[str, float]:
  """Fraction of encoder and decoder positions that hold an example (prompt slots included),
  and examples per row (empty rows count)."""
  enc = np.concatenate([b["encoder_segment_ids"].ravel() for b in batches])
  dec = np.concatenate([b["decoder_segment_ids"].ravel() for b in batches])
  rows = sum(len(b["encoder_segment_ids"]) for b in batches)
  examples = sum(int(np.sum(np.max(b["encoder_segment_ids"], axis=1))) for b in batches)
  return {"encoder": float(np.mean(enc > 0)), "decoder": float(np.mean(dec > 0)),
          "examples_per_row": examples / max(rows, 1)}


def feature_converter(prompt_length: int, *, slot_id: Optional[int] = None, **kwargs):
  """seqio's `EncDecFeatureConverter(pack=True)` with `prompt_length` prompt slots (token
  `slot_id`, required when prompt_length > 0) reserved in front of every example's inputs
  (imports seqio and TensorFlow when called).

  The converter's `inputs` length is the packed row length, slots included: an example with more
  than `inputs - prompt_length` tokens loses its end, as seqio truncates. seqio packs in order
  (a row is closed when the next example does not fit). `kwargs` go to the converter (e.g.
  `bos_id`); `pack` is always True."""
  _check_slots(prompt_length, slot_id)
  import seqio  # pylint: disable=g-import-not-at-top
  import tensorflow as tf  # pylint: disable=g-import-not-at-top

  slots = tf.fill([int(prompt_length)], tf.constant(slot_id or 0, tf.int32))

  def reserve(ex):
    return dict(ex, inputs=tf.concat([slots, tf.cast(ex["inputs"], tf.int32)], axis=0))

  class PromptPackingConverter(seqio.EncDecFeatureConverter):
    """Reserves the prompt slots, then packs as `EncDecFeatureConverter(pack=True)`."""

    def _convert_features(self, ds, task_feature_lengths):
      ds = ds.map(reserve, num_parallel_calls=tf.data.experimental.AUTOTUNE)
      return super()._convert_features(ds, task_feature_lengths)

  kwargs.pop("pack", None)
  return PromptPackingConverter(pack=True, **kwargs)
