"""TensorBoard scalars under MODEL_DIR/<name>, written synchronously and fsynced on every write.

tensorboardX's `SummaryWriter` queues events for a writer thread and its `flush()` does not
drain that queue, so a killed run loses what it logged last (the step-0 evaluation, a
checkpoint step's loss). Here each `write` appends its events to the file and fsyncs it before
returning: what was written before a kill is on disk. Only the first host writes.
"""

from __future__ import annotations

import os
import time
from typing import Mapping


class MetricWriter:
  """Scalars for one event directory, e.g. MODEL_DIR/train or MODEL_DIR/eval."""

  def __init__(self, model_dir: str, name: str, *, enabled: bool | None = None):
    self.directory = os.path.join(model_dir, name)
    if enabled is None:
      import jax  # pylint: disable=g-import-not-at-top
      enabled = jax.process_index() == 0
    self._writer = None
    self._enabled = enabled

  def _events(self):
    if self._writer is None:
      from tensorboardX.event_file_writer import EventsWriter  # pylint: disable=g-import-not-at-top
      os.makedirs(self.directory, exist_ok=True)
      self._writer = EventsWriter(os.path.join(self.directory, "events"))
    return self._writer

  def write(self, step: int, metrics: Mapping[str, float]) -> None:
    """One scalar event per metric at `step`, on disk when this returns."""
    if not self._enabled or not metrics:
      return
    from tensorboardX.proto import event_pb2  # pylint: disable=g-import-not-at-top
    from tensorboardX.summary import scalar  # pylint: disable=g-import-not-at-top
    writer = self._events()
    now = time.time()
    for key, value in metrics.items():
      writer.write_event(event_pb2.Event(wall_time=now, step=int(step),
                                         summary=scalar(key, float(value))))
    writer.flush()  # flushes and fsyncs

  def close(self) -> None:
    if self._writer is not None:
      self._writer.close()
      self._writer = None


def read_scalars(directory: str) -> dict[str, list[tuple[int, float]]]:
  """Every scalar in the event files of `directory`: tag -> [(step, value)] in file order."""
  import struct  # pylint: disable=g-import-not-at-top

  from tensorboardX.proto import event_pb2  # pylint: disable=g-import-not-at-top
  scalars: dict[str, list[tuple[int, float]]] = {}
  if not os.path.isdir(directory):
    return scalars
  for name in sorted(os.listdir(directory)):
    if ".tfevents." not in name:
      continue
    with open(os.path.join(directory, name), "rb") as f:
      data = f.read()
    offset = 0
    while offset + 12 <= len(data):
      (length,) = struct.unpack("Q", data[offset:offset + 8])
      record = data[offset + 12:offset + 12 + length]
      if len(record) < length:
        break  # a record cut short by a kill
      offset += 12 + length + 4
      event = event_pb2.Event.FromString(record)
      for value in event.summary.value:
        scalars.setdefault(value.tag, []).append((event.step, value.simple_value))
  return scalars
