"""Stopping on SIGINT / SIGTERM without losing work.

A scheduler or a Cloud TPU VM sends SIGTERM before it takes the machine; a person presses
Ctrl-C. Inside `StopOnSignal`, the first such signal only sets a flag: the training loop
finishes its step, saves a checkpoint and raises `Preempted`, which the CLI turns into a one-line
message and exit code `EXIT_CODE`. A second signal stops at once (KeyboardInterrupt).

On several hosts all of them must save the same step: there JAX's coordination service catches
SIGTERM itself and `multihost_utils.reached_preemption_sync_point(step)` answers the same on
every host (MaxText and Orbax use the same call), so SIGTERM is left to it here.
"""

from __future__ import annotations

import logging
import signal
import threading
from typing import Optional

log = logging.getLogger(__name__)

EXIT_CODE = 75  # EX_TEMPFAIL: stopped cleanly; rerun the same command to continue


class Preempted(Exception):
  """Training stopped on a signal after saving its state; rerunning the command continues."""

  exit_code = EXIT_CODE


class SignalHandlers:
  """Base of the context managers here and in `sweep`: `_install(signums)` sets `self._handler`
  for those signals (in the main thread only: elsewhere Python cannot) and leaving the context
  restores the previous handlers."""

  _previous: dict

  def _install(self, signums) -> None:
    self._previous = {}
    if threading.current_thread() is threading.main_thread():
      for signum in signums:
        self._previous[signum] = signal.signal(signum, self._handler)

  def _handler(self, signum, frame) -> None:
    raise NotImplementedError

  def __exit__(self, *exc) -> None:
    for signum, previous in self._previous.items():
      signal.signal(signum, previous)
    self._previous = {}


class StopOnSignal(SignalHandlers):
  """Context manager that turns SIGINT/SIGTERM into a request to stop after the current step."""

  def __init__(self, process_count: int = 1):
    self.process_count = process_count
    self.signal_name: Optional[str] = None
    self._previous = {}

  def _handler(self, signum, frame):  # pylint: disable=unused-argument
    if self.signal_name is not None:
      raise KeyboardInterrupt(f"second {signal.Signals(signum).name}")
    self.signal_name = signal.Signals(signum).name
    log.warning("%s received: stopping after the current step (send it again to stop now)",
                self.signal_name)

  def __enter__(self) -> StopOnSignal:
    self._install([signal.SIGINT] + ([signal.SIGTERM] if self.process_count == 1 else []))
    return self

  def requested(self, step: int) -> bool:
    """Whether to stop after `step`; the same answer on every host."""
    if self.process_count > 1:
      from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
      try:
        synced = multihost_utils.reached_preemption_sync_point(step)
      except RuntimeError:  # no preemption service (distributed runtime started without it)
        synced = False
      return synced
    return self.signal_name is not None
