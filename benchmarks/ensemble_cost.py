"""Cost of evaluating N prompts in one mixed batch vs N separate passes, on one frozen model.

  python benchmarks/ensemble_cost.py [--preset tiny] [--num_prompts 4] [--batch_size 8]

Both ways compute the same thing -- every example under every prompt -- with the same
`PromptBank` model and random frozen weights: 'mixed' runs one batch of N*B rows (the examples
replicated, `prompt_ids` 0..N-1), 'separate' runs N batches of B rows, one prompt each. Timed
after compilation, best of `--repeats`, for teacher-forced scoring (rank classification) and
greedy decoding with the KV cache. Prints a table and `separate / mixed` as a ratio (> 1: the
mixed batch is cheaper).
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

from prompt_jax import params as params_lib
from prompt_jax.models import t5
from prompt_jax.models.encoder_decoder import EncoderDecoderModel
from prompt_jax.prompts.bank import PromptBank
from prompt_jax.serving import ensemble


def _best_time(fn, repeats: int) -> tuple[float, float]:
  """Best (wall-clock, process CPU) seconds of `fn()`; CPU time is steadier on a shared host."""
  jax.block_until_ready(fn())  # compile
  wall, cpu = float("inf"), float("inf")
  for _ in range(repeats):
    start, start_cpu = time.perf_counter(), time.process_time()
    jax.block_until_ready(fn())
    wall = min(wall, time.perf_counter() - start)
    cpu = min(cpu, time.process_time() - start_cpu)
  return wall, cpu


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--preset", default="tiny", help="T5 preset (prompt_jax.models.t5)")
  parser.add_argument("--num_layers", type=int, default=None,
                      help="override encoder and decoder depth (e.g. a 2-layer 't5_1_1_small')")
  parser.add_argument("--num_prompts", type=int, default=4)
  parser.add_argument("--batch_size", type=int, default=8)
  parser.add_argument("--input_length", type=int, default=64)
  parser.add_argument("--target_length", type=int, default=8)
  parser.add_argument("--prompt_length", type=int, default=20)
  parser.add_argument("--repeats", type=int, default=5)
  args = parser.parse_args(argv)

  overrides = {} if args.num_layers is None else {"num_encoder_layers": args.num_layers,
                                                  "num_decoder_layers": args.num_layers}
  config = t5.preset(args.preset, dropout_rate=0.0, **overrides)
  n, b = args.num_prompts, args.batch_size
  model = EncoderDecoderModel(t5.Transformer(config, PromptBank(n, args.prompt_length)))
  rng = np.random.default_rng(0)
  tokens = rng.integers(3, min(config.vocab_size, 32000), (b, args.input_length), np.int32)
  targets = rng.integers(3, min(config.vocab_size, 32000), (b, args.target_length), np.int32)
  batch = {"encoder_input_tokens": tokens, "decoder_target_tokens": targets,
           "decoder_input_tokens": np.concatenate([np.zeros((b, 1), np.int32), targets[:, :-1]],
                                                  1),
           "decoder_loss_weights": np.ones_like(targets)}
  params = params_lib.unbox(jax.jit(model.init)(jax.random.key(0), model.dummy_batch(
      b, args.input_length, args.target_length)))
  mixed_batch = {k: jnp.asarray(v) for k, v in ensemble.replicate_across_prompts(batch, n).items()}
  separate_batches = [{k: jnp.asarray(v) for k, v in dict(
      batch, prompt_ids=np.full(b, i, np.int32)).items()} for i in range(n)]

  score = jax.jit(model.score_batch)
  decode = jax.jit(lambda p, x: model.predict_batch(p, x, args.target_length))
  decode_inputs = lambda x: {k: x[k] for k in ("encoder_input_tokens", "prompt_ids")}
  passes = {"score": lambda x: score(params, x),
            "greedy decode": lambda x: decode(params, decode_inputs(x))}
  rows = {}
  for name, run in passes.items():
    mixed = _best_time(lambda run=run: run(mixed_batch), args.repeats)
    separate = _best_time(lambda run=run: [run(x) for x in separate_batches], args.repeats)
    rows[name] = {"mixed_s": mixed[0], "separate_s": separate[0],
                  "mixed_cpu_s": mixed[1], "separate_cpu_s": separate[1],
                  "wall_ratio": separate[0] / mixed[0], "cpu_ratio": separate[1] / mixed[1]}

  count = params_lib.count(params)
  print(f"{args.preset} ({count / 1e6:.2f}M params, {config.num_encoder_layers}+"
        f"{config.num_decoder_layers} layers), {n} prompts x {b} examples, inputs "
        f"{args.input_length} + prompt {args.prompt_length}, targets {args.target_length}; "
        f"{jax.device_count()} {jax.devices()[0].platform} device(s), best of {args.repeats}")
  print(f"{'':14}  {'1 mixed batch':>14}  {f'{n} separate':>12}  {'ratio':>6}  "
        f"{'CPU: mixed':>11}  {'separate':>10}  {'ratio':>6}")
  for name, r in rows.items():
    print(f"{name:14}  {r['mixed_s'] * 1e3:11.1f} ms  {r['separate_s'] * 1e3:9.1f} ms  "
          f"{r['wall_ratio']:5.2f}x  {r['mixed_cpu_s'] * 1e3:8.1f} ms  "
          f"{r['separate_cpu_s'] * 1e3:7.1f} ms  {r['cpu_ratio']:5.2f}x")
  print("ratio = separate / mixed (> 1: one mixed batch is cheaper than N separate passes)")
  return rows


if __name__ == "__main__":
  main()
