"""TensorBoard scalars under MODEL_DIR/<name>, written synchronously and fsynced on every write.

tensorboardX's `SummaryWriter` queues events for a writer thread and its `flush()` does not
drain that queue, so a killed run loses what it logged last (the step-0 evaluation, a
checkpoint step's loss). Here each `write` appends its events to the file and fsyncs it before
returning: what was written before a kill is on disk. Only the first host writes.

Each `write` also appends one JSON line per metric to MODEL_DIR/metrics.jsonl (`METRICS_FILE`),
{"step", "time", "split", "name", "value"} with `split` the writer's name ("train", "eval", ...),
fsynced before it returns: the curves (`prompt_jax.storage.curves`) without TensorBoard. A kill
can cut the last line short; `read_metrics` skips it and `truncate_metrics` (called on resume)
removes it.
"""

from __future__ import annotations

import json
import os
import time
from typing import Mapping, Optional

from prompt_jax.storage import run_dir

METRICS_FILE = run_dir.METRICS_FILE
# The splits `truncate_metrics` cuts at the resumed step: the training loop writes them again.
RESUMED_SPLITS = ("train", "eval")


def _first_host() -> bool:
  import jax  # pylint: disable=g-import-not-at-top
  return jax.process_index() == 0


def _fsync_directory(directory: str) -> None:
  try:
    fd = os.open(directory, os.O_RDONLY)
  except OSError:
    return
  try:
    os.fsync(fd)
  except OSError:
    pass
  finally:
    os.close(fd)


def _append_lines(path: str, records: list[dict]) -> None:
  """The records as JSON lines at the end of `path`, fsynced. A cut-short last line (a kill
  mid-write) is ended first, so it stays one unreadable line instead of spoiling the next."""
  text = "".join(json.dumps(r) + "\n" for r in records)
  created = not os.path.exists(path)
  with open(path, "ab") as f:
    if f.tell() > 0:
      with open(path, "rb") as tail:
        tail.seek(-1, os.SEEK_END)
        if tail.read(1) != b"\n":
          text = "\n" + text
    f.write(text.encode())
    f.flush()
    os.fsync(f.fileno())
  if created:
    _fsync_directory(os.path.dirname(path) or ".")


class MetricWriter:
  """Scalars for one event directory, e.g. MODEL_DIR/train or MODEL_DIR/eval."""

  def __init__(self, model_dir: str, name: str, *, enabled: bool | None = None):
    self.directory = os.path.join(model_dir, name)
    self.name = name
    self.metrics_path = os.path.join(model_dir, METRICS_FILE)
    if enabled is None:
      enabled = _first_host()
    self._writer = None
    self._enabled = enabled

  def _events(self):
    if self._writer is None:
      from tensorboardX.event_file_writer import EventsWriter  # pylint: disable=g-import-not-at-top
      os.makedirs(self.directory, exist_ok=True)
      self._writer = EventsWriter(os.path.join(self.directory, "events"))
    return self._writer

  def write(self, step: int, metrics: Mapping[str, float]) -> None:
    """One scalar event per metric at `step`, and one line per metric in MODEL_DIR/metrics.jsonl,
    both on disk when this returns."""
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
    # Opened for each write: `truncate_metrics` replaces the file, and a kept descriptor would
    # write into the replaced one.
    _append_lines(self.metrics_path, [
        {"step": int(step), "time": now, "split": self.name, "name": str(key),
         "value": float(value)} for key, value in metrics.items()])

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


def _parse_lines(data: bytes) -> tuple[list[dict], bool]:
  """The complete records of a metrics.jsonl file's bytes, and whether any line was dropped
  (cut short by a kill: no newline, or not a whole JSON record)."""
  records, dropped = [], False
  for line in data.split(b"\n"):
    if not line.strip():
      continue
    try:
      record = json.loads(line)
    except ValueError:
      dropped = True
      continue
    if not isinstance(record, dict) or not {"step", "split", "name", "value"} <= record.keys():
      dropped = True
      continue
    records.append(record)
  return records, dropped


def read_metrics(model_dir: str) -> list[dict]:
  """The records of MODEL_DIR/metrics.jsonl in file order ({"step", "time", "split", "name",
  "value"}), skipping a line cut short by a kill; [] when the file does not exist."""
  path = os.path.join(model_dir, METRICS_FILE)
  try:
    with open(path, "rb") as f:
      data = f.read()
  except FileNotFoundError:
    return []
  return _parse_lines(data)[0]


def truncate_metrics(model_dir: str, after_step: int, *,
                     enabled: Optional[bool] = None) -> int:
  """Drop the "train" and "eval" lines of MODEL_DIR/metrics.jsonl with step > `after_step`, and
  any cut-short line, before a run resumed at `after_step` writes those steps again. The file is
  replaced atomically (a temporary file in the same directory, fsynced, then `os.replace`); it is
  left alone when nothing is dropped. Only the first host writes (`enabled`, default
  `jax.process_index() == 0`). Returns the number of records dropped."""
  path = os.path.join(model_dir, METRICS_FILE)
  if enabled is None:
    enabled = _first_host()
  if not enabled or not os.path.exists(path):
    return 0
  with open(path, "rb") as f:
    data = f.read()
  records, dropped = _parse_lines(data)
  kept = [r for r in records
          if not (r["split"] in RESUMED_SPLITS and int(r["step"]) > int(after_step))]
  if not dropped and len(kept) == len(records):
    return 0
  data = "".join(json.dumps(r) + "\n" for r in kept).encode()
  run_dir.atomic_write(path, lambda f: f.write(data))
  _fsync_directory(model_dir)
  return len(records) - len(kept)
