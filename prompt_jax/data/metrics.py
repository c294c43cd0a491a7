"""seqio-style metric functions: `metric(targets, predictions) -> {name: value}` (percentages)."""

from __future__ import annotations

from typing import Sequence

import numpy as np


def accuracy(targets: Sequence, predictions: Sequence) -> dict[str, float]:
  """Exact-match accuracy in percent."""
  if len(targets) != len(predictions):
    raise ValueError(f"accuracy: {len(targets)} targets but {len(predictions)} predictions")
  if not targets:
    return {"accuracy": 0.0}
  hits = [t == p for t, p in zip(targets, predictions)]
  return {"accuracy": 100.0 * float(np.mean(hits))}
