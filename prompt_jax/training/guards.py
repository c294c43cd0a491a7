"""Guards of a training run: a step whose loss or updated prompt is not finite
(`FiniteTracker`, tracked on the devices) and a finite run that runs away (`DivergenceGuard`)
stop it with `TrainingDivergedError`, before anything of the bad step is saved."""

from __future__ import annotations

import collections
from typing import Any, Mapping, Optional

import jax
import jax.numpy as jnp
import numpy as np

from prompt_jax import params as params_lib

Array = jax.Array


class TrainingDivergedError(RuntimeError):
  """A step's loss or updated prompt became NaN or infinite; nothing of it was saved and the
  last good checkpoint is left as it was."""


def check_count(name: str, value: Any, minimum: int) -> int:
  """`value` as an int >= minimum, else a ValueError naming the macro and the value."""
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
    raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
  return int(value)


class DivergenceGuard:
  """Stops a run that runs away while staying finite (the on-device check catches NaN/inf).

  Two signs, each switchable off with None:
    loss: the mean of the last `window` logged training losses exceeds `loss_factor` times the
      untrained loss (the first logged loss of the run); training that works lowers the loss,
      so ten times the untrained loss is a run that went wrong, not a slow one.
    parameters: the largest |trainable value| exceeds `param_factor` times its value before
      the first step (at least 1.0); Adafactor and Adam move parameters by about the learning
      rate per step, so a 1000-fold growth is a learning rate that is orders too large (an
      lr of 1e30 leaves the loss near the untrained one, but the prompt at ~1e29).
  `reference` carries the untrained loss and initial size across resumes (saved in each
  checkpoint's metadata).
  """

  def __init__(self, loss_factor: Optional[float] = 10.0, param_factor: Optional[float] = 1e3,
               window: int = 3, reference: Optional[Mapping[str, float]] = None):
    for name, value in (("divergence_loss_factor", loss_factor),
                        ("divergence_param_factor", param_factor)):
      if value is not None and (isinstance(value, bool) or not value > 1):
        raise ValueError(f"{name} must be a number > 1 or None (off), got {value!r}")
    self.loss_factor, self.param_factor = loss_factor, param_factor
    self.window = check_count("divergence window", window, 1)
    self.reference = dict(reference or {})
    self.losses: collections.deque = collections.deque(maxlen=self.window)

  def start(self, max_abs: float) -> None:
    """The trainable parameters' largest |value| before the first step of a fresh run."""
    self.reference.setdefault("initial_max_abs", float(max_abs))

  def check(self, loss: float, max_abs: Optional[float]) -> Optional[str]:
    """Why the run diverged at this log point, or None."""
    self.reference.setdefault("untrained_loss", float(loss))
    self.losses.append(float(loss))
    untrained = self.reference["untrained_loss"]
    if self.loss_factor is not None and len(self.losses) == self.window and untrained > 0:
      mean = sum(self.losses) / self.window
      if mean > self.loss_factor * untrained:
        return (f"mean loss {mean:.4g} over the last {self.window} logged steps is above "
                f"{self.loss_factor:g} x the untrained loss {untrained:.4g}")
    initial = self.reference.get("initial_max_abs")
    if self.param_factor is not None and max_abs is not None and initial is not None:
      limit = self.param_factor * max(initial, 1.0)
      if max_abs > limit:
        return (f"the trainable parameters reached |value| {max_abs:.3g}, above "
                f"{self.param_factor:g} x their initial {max(initial, 1.0):.3g}")
    return None


POSTFIX = ("cross_ent_loss", "loss")  # the training metrics shown beside the progress bar


FLAGS = ("all_finite", "prompt_finite")  # step outputs that are checks, not metrics

max_abs = jax.jit(params_lib.tree_max_abs)  # the largest |value| of a tree, on the devices


class FiniteTracker:
  """The first step whose loss or updated prompt was not finite, tracked on the devices (no
  host sync per step); `first_bad()` fetches it."""

  def __init__(self):
    self.state = (jnp.array(0, jnp.int32), jnp.array(0.0, jnp.float32), jnp.array(True))

  def update(self, metrics: Mapping[str, Array], step: int) -> None:
    self.state = _track_first_bad(self.state, metrics["all_finite"], metrics["loss"],
                                  metrics["prompt_finite"], step)

  def first_bad(self) -> Optional[tuple[int, float, bool]]:
    """(step, loss, prompt finite) of the first non-finite step, or None."""
    step, loss, prompt_finite = jax.device_get(self.state)
    return None if int(step) == 0 else (int(step), float(loss), bool(prompt_finite))


@jax.jit
def _track_first_bad(state, all_finite, loss, prompt_finite, step):
  first, first_loss, first_prompt_finite = state
  new = (first == 0) & ~all_finite
  return (jnp.where(new, jnp.asarray(step, jnp.int32), first),
          jnp.where(new, loss.astype(jnp.float32), first_loss),
          jnp.where(new, prompt_finite, first_prompt_finite))
