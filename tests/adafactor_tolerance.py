"""How closely two float32 Adafactor runs of the same computation can agree, on any x86-64 CPU.

Two runs that compute the same loss with differently ordered float32 sums (another batch shape,
bucket width, mesh or prompt bank; another CPU's SIMD width or dot kernel: XLA:CPU hands dots and
reductions to YNNPACK, which picks AVX2 or AVX-512 kernels from the CPU it runs on) get gradients
that differ by rounding: ~6e-8 relative per operation times the terms a sum accumulates, so about
1e-6 to 1e-5 of the size of an entry's own terms.

Adafactor as `optimizers.adafactor()` sets it up (decay 0.8, update clipping 1.0, no parameter
scaling; prompts are below the 128 needed to factor the second moment) divides each gradient entry
by the root of that entry's own running mean square: the first step is lr * sign(g) (plus a 1e-5
weight decay), and later steps g_t / sqrt(v_t) carry the *relative* rounding error of their entry.
That is tiny for most entries but has no bound for an entry whose terms nearly cancel. What is
bounded is the update's size: it is clipped to RMS <= 1 before the learning rate, so each step
moves a prompt by at most lr in RMS. Hence, against lr * steps:

* RMS difference <= 1e-4 of it. Measured 0.56e-5 to 0.85e-5 for 3 steps of a trimmed vs an
  untrimmed prompt-bank run (test_ensemble), with YNNPACK's AVX-512 kernels, its AVX2 kernels
  (under `qemu-x86_64 -cpu Haswell`), Eigen's dots and XLA's SSE4.2 code. A real difference in
  the computation is far above: one pad token left unmasked in one row of those 8 x 64 moves it
  to 6.4e-2.
* No entry beyond 1e-2 of it. The worst entry measured was 0.9e-4 to 1.1e-4 of it here (1.4e-4 on
  an AVX2-only EPYC, which failed the former elementwise atol=1e-4); the unmasked pad gives 0.77.
"""

from __future__ import annotations

import numpy as np

RMS_FRACTION = 1e-4
ENTRY_FRACTION = 1e-2


def assert_adafactor_runs_agree(got, want, steps: int, learning_rate: float = 0.3,
                                what: str = "prompt"):
  """`got` and `want`: the same trainable arrays after `steps` Adafactor steps (at
  `learning_rate`, `optimizers.adafactor()`'s 0.3 by default) of two runs that compute the same
  thing with differently ordered float32 sums."""
  diff = np.abs(np.asarray(got, np.float64) - np.asarray(want, np.float64))
  moved = learning_rate * steps  # the most the RMS can move (update RMS clipped to 1)
  rms, worst = float(np.sqrt(np.mean(diff ** 2))), float(np.max(diff))
  assert rms <= RMS_FRACTION * moved, (
      f"{what}s differ by RMS {rms:.3g} = {rms / moved:.3g} of lr * steps = {moved:.3g}; "
      f"float32 rounding gives ~1e-5 of it, the bound is {RMS_FRACTION:g}")
  assert worst <= ENTRY_FRACTION * moved, (
      f"a {what} entry differs by {worst:.3g} = {worst / moved:.3g} of lr * steps = "
      f"{moved:.3g}; the bound is {ENTRY_FRACTION:g}")
