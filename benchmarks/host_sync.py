"""Training steps/s with a host sync every step vs the loop's deferred check, in one process.

`synced`: the pre-redesign loop body — shard the host batch, run the step, read the step's
finiteness flag on the host (`bool(...)`, which waits for the step). `deferred`: what
`trainer.train` does now — batches sharded two steps ahead (`prefetch_to_devices`), the
finiteness tracked on the devices (`FiniteTracker`), fetched once at the end of the window.
Both read the same seqio pipeline and run the same compiled step; rounds alternate.

  python benchmarks/host_sync.py --shape demo --rounds 4 --steps 30
  python benchmarks/host_sync.py --shape small --rounds 3 --steps 4
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from prompt_jax.data import pipeline, synthetic  # noqa: E402,F401  (registers demo tasks)
from prompt_jax.models import t5  # noqa: E402
from prompt_jax.models.encoder_decoder import EncoderDecoderModel  # noqa: E402
from prompt_jax.partitioning import Partitioner  # noqa: E402
from prompt_jax.programs import PromptPrograms
from prompt_jax.prompts import initializers  # noqa: E402
from prompt_jax.prompts.base import InputPrompt  # noqa: E402
from prompt_jax.prompts.plain import Prompt  # noqa: E402
from prompt_jax.training import (
  guards,
  trainer,  # noqa: E402
)

SHAPES = {  # preset, checkpoint, batch, inputs, targets, prompt length
    "demo": ("tiny", "builtin:demo_t5_tiny.npz", 32, 64, 16, 10),
    "small": ("t5_1_1_small", None, 8, 128, 8, 100),
}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--shape", choices=sorted(SHAPES), default="demo")
  parser.add_argument("--rounds", type=int, default=4)
  parser.add_argument("--steps", type=int, default=30)
  args = parser.parse_args()
  preset, checkpoint, batch_size, inputs, targets, prompt_length = SHAPES[args.shape]
  config = dataclasses.replace(t5.preset(preset), dropout_rate=0.0)
  if args.shape == "small":  # the demo task's byte vocabulary fits any T5 vocabulary
    config = dataclasses.replace(config, vocab_size=max(config.vocab_size, 384))
  model = EncoderDecoderModel(t5.Transformer(config, InputPrompt(
      Prompt(prompt_length, initializers.uniform()))))
  pt = PromptPrograms.for_training(model, trainer.adafactor(), Partitioner(), inputs, targets,
                             batch_size)
  frozen = (pt.load_frozen_params(checkpoint) if checkpoint
            else pt.random_frozen_params(jax.random.key(0)))
  state = pt.init_state(frozen, jax.random.key(1))
  rng = jax.random.key(2)
  cfg = pipeline.DatasetConfig("demo_sentiment", {"inputs": inputs, "targets": targets},
                               batch_size=batch_size)
  batches = pipeline.iterate_batches(cfg)
  state, _ = pt.train_step(state, frozen, next(batches), rng)  # compile
  jax.block_until_ready(state)

  def synced(state):
    for _ in range(args.steps):
      state, metrics = pt.train_step_fn(state, frozen, pt.shard_batch(next(batches)), rng)
      assert bool(metrics["all_finite"])
    return state

  def deferred(state):
    device_batches = trainer.prefetch_to_devices(batches, pt.shard_batch, size=2)
    finite = guards.FiniteTracker()
    for _ in range(args.steps):
      state, metrics = pt.train_step_fn(state, frozen, next(device_batches), rng)
      finite.update(metrics, 1)
    assert finite.first_bad() is None
    return state

  print(f"shape {args.shape}: {preset}, batch {batch_size}, inputs {inputs}, targets "
        f"{targets}, prompt {prompt_length}; load average {os.getloadavg()[0]:.2f}")
  rates = {"synced": [], "deferred": []}
  for round_index in range(args.rounds):
    for name, run in (("synced", synced), ("deferred", deferred)):
      start = time.perf_counter()
      state = run(state)
      jax.block_until_ready(state)
      rates[name].append(args.steps / (time.perf_counter() - start))
    print(f"round {round_index}: synced {rates['synced'][-1]:.2f} steps/s, deferred "
          f"{rates['deferred'][-1]:.2f} steps/s, ratio "
          f"{rates['deferred'][-1] / rates['synced'][-1]:.3f}")
  ratios = np.array(rates["deferred"]) / np.array(rates["synced"])
  print(f"median: synced {np.median(rates['synced']):.2f}, deferred "
        f"{np.median(rates['deferred']):.2f} steps/s; deferred/synced {np.median(ratios):.3f}")


if __name__ == "__main__":
  main()
