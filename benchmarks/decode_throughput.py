"""Decoding tokens/s, greedy and beam search: ours (`prompt_jax.models.decoding`, KV cache, one
jitted `lax.while_loop`) vs Hugging Face `generate` on torch (its own cache), same model shape.

    python benchmarks/decode_throughput.py [--num_beams 1,4 --rounds 3 --batch 8 --inputs 228
                                            --new_tokens 32 --preset t5_1_1_small --dtype float32]

For every beam width n (1 = greedy) both sides encode the inputs and decode exactly
`new_tokens` tokens per example: ours with an EOS id that never matches, HF with
`min_new_tokens = max_new_tokens` (EOS is suppressed until then). Beam search is ours
`beam_search(num_decodes=n, alpha=0)` vs HF `generate(num_beams=n, length_penalty=0.0,
early_stopping=False)`; tokens/s counts `batch * new_tokens` (one returned sequence per example).
Both sides are timed in alternating rounds inside one process; the ratio is per round, then the
median. `--inputs 228` matches 128 input tokens + a 100-token prompt. Weights are random (the
speed does not depend on them). The first and last lines give the machine and the load average
(`bench_common`): only figures labelled "quiet machine" belong in README or docs.

Imports only jax, numpy and prompt_jax (torch and transformers only without `--no_hf`), so it
runs where TensorFlow, seqio and tensorflow-datasets are not installed. HF runs on
`--torch_device` (default cpu; cuda on a GPU machine); `benchmarks/gpu_check.py` runs this and
train_throughput.py on the base and large models in both dtypes and prints one table.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

os.environ.setdefault("USE_TF", "0")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import bench_common  # noqa: E402
import jax  # noqa: E402
import numpy as np  # noqa: E402

from prompt_jax import params as params_lib  # noqa: E402
from prompt_jax.models import (
  decoding,  # noqa: E402
  t5,  # noqa: E402
)
from prompt_jax.models.encoder_decoder import EncoderDecoderModel  # noqa: E402

PRESET = "t5_1_1_small"


def _beam_widths(text: str) -> list[int]:
  try:
    widths = [int(w) for w in text.split(",")]
  except ValueError:
    widths = []
  if not widths or min(widths) < 1:
    raise argparse.ArgumentTypeError(
        f"--num_beams takes positive integers separated by commas (1 = greedy), got {text!r}")
  return widths


def _hf_model(config: t5.T5Config, dtype: str, device: str = "cpu"):
  """A random HF T5ForConditionalGeneration of the same shape as `config`, on torch `device`."""
  import torch  # pylint: disable=g-import-not-at-top
  from transformers import T5Config, T5ForConditionalGeneration  # pylint: disable=g-import-not-at-top
  gated = len(config.mlp_activations) > 1
  act = {"gelu": "gelu_new", "gelu_exact": "gelu"}.get(config.mlp_activations[0],
                                                        config.mlp_activations[0])
  model = T5ForConditionalGeneration(T5Config(
      vocab_size=config.vocab_size, d_model=config.emb_dim, d_kv=config.head_dim,
      d_ff=config.mlp_dim, num_layers=config.num_encoder_layers,
      num_decoder_layers=config.num_decoder_layers, num_heads=config.num_heads,
      relative_attention_num_buckets=config.relative_attention_num_buckets,
      relative_attention_max_distance=config.relative_attention_max_distance,
      feed_forward_proj=f"gated-{act}" if gated else act,
      tie_word_embeddings=config.logits_via_embedding, dropout_rate=0.0,
      decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)).eval().to(device)
  return model.to(torch.bfloat16) if dtype == "bfloat16" else model


def measure(argv=None) -> dict:
  """Runs the benchmark of `main(argv)` (printing the same) and returns its medians: for every
  beam width n, `n: {'ours': tokens/s, 'hf': tokens/s (nan with --no_hf), 'ratio': ...}`, and
  `'quiet'` (`bench_common.finish`)."""
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--num_beams", type=_beam_widths, default=[1, 4],
                      help="beam widths to time, comma-separated; 1 = greedy (default 1,4)")
  parser.add_argument("--rounds", type=int, default=3)
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--inputs", type=int, default=228)
  parser.add_argument("--new_tokens", type=int, default=32)
  parser.add_argument("--preset", default=PRESET, choices=sorted(t5.PRESETS),
                      help="T5 architecture (prompt_jax.models.t5.PRESETS)")
  parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"),
                      help="activation dtype of ours; HF runs in the same dtype")
  parser.add_argument("--threads", type=int, default=os.cpu_count(),
                      help="torch threads for HF")
  parser.add_argument("--no_hf", action="store_true", help="time ours only")
  parser.add_argument("--torch_device", default="cpu",
                      help="torch device of the HF side ('cuda' on a GPU machine)")
  args = parser.parse_args(argv)
  for name in ("rounds", "batch", "inputs", "new_tokens", "threads"):
    if getattr(args, name) < 1:
      parser.error(f"--{name} must be a positive integer, got {getattr(args, name)}")
  start_load = bench_common.start()

  config = t5.preset(args.preset, dropout_rate=0.0, dtype=args.dtype)
  # eos_id -1 never matches, so every sequence decodes all `new_tokens` steps.
  model = EncoderDecoderModel(t5.Transformer(config), eos_id=-1)
  rng = np.random.default_rng(0)
  vocab = min(config.vocab_size, 32000)
  tokens = rng.integers(3, vocab, (args.batch, args.inputs)).astype(np.int32)
  batch = {"encoder_input_tokens": tokens}
  params = params_lib.unbox(model.init(jax.random.key(0), model.dummy_batch(1, 4, 4)))
  length = args.new_tokens

  def ours_fn(beams: int):
    if beams == 1:
      decode = jax.jit(lambda p, b: decoding.greedy(model, p, b, length))
    else:
      decode = jax.jit(lambda p, b: decoding.beam_search(model, p, b, length, beams, 0.0))
    out, _ = jax.block_until_ready(decode(params, batch))  # compile + warm-up
    assert out.shape == (args.batch, beams, length), out.shape

    def run() -> float:
      start = time.perf_counter()
      jax.block_until_ready(decode(params, batch))
      return time.perf_counter() - start
    return run

  hf_model = None
  if not args.no_hf:
    import torch  # pylint: disable=g-import-not-at-top
    torch.set_num_threads(args.threads)
    hf_model = _hf_model(config, args.dtype, args.torch_device)
    input_ids = torch.as_tensor(tokens, dtype=torch.long, device=args.torch_device)
    on_cuda = input_ids.device.type == "cuda"

  def hf_fn(beams: int):
    if hf_model is None:
      return None
    kwargs = dict(max_new_tokens=length, min_new_tokens=length, do_sample=False,
                  num_beams=beams, use_cache=True)
    if beams > 1:
      kwargs.update(length_penalty=0.0, early_stopping=False)

    def run() -> float:
      start = time.perf_counter()
      with torch.inference_mode():
        out = hf_model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                                **kwargs)
      if on_cuda:
        torch.cuda.synchronize(input_ids.device)
      assert out.shape == (args.batch, length + 1), out.shape
      return time.perf_counter() - start
    run()  # warm-up
    return run

  generated = args.batch * length
  medians, results = [], {}
  for beams in args.num_beams:
    what = "greedy" if beams == 1 else f"{beams}-beam search"
    print(f"\n{what}: {args.preset}, batch {args.batch}, encoder length {args.inputs}, "
          f"{length} new tokens, {args.dtype}")
    ours, hf = ours_fn(beams), hf_fn(beams)
    print(f"{'round':>6} {'ours tokens/s':>14} {'HF tokens/s':>12} {'ratio':>6}")
    rows = []
    for r in range(args.rounds):
      ours_tps = generated / ours()
      hf_tps = generated / hf() if hf else float("nan")
      rows.append((ours_tps, hf_tps, ours_tps / hf_tps))
      print(f"{r:6d} {ours_tps:14.1f} {hf_tps:12.1f} {ours_tps / hf_tps:6.2f}", flush=True)
    med = [statistics.median(col) for col in zip(*rows)]
    medians.append((what, med))
    results[beams] = {"ours": med[0], "hf": med[1], "ratio": med[2]}
    print(f"{'median':>6} {med[0]:14.1f} {med[1]:12.1f} {med[2]:6.2f}")
  print()
  for what, med in medians:
    print(f"{what}: ours {med[0]:.1f} tokens/s, HF {med[1]:.1f} tokens/s, ratio {med[2]:.2f}")
  results["quiet"] = bench_common.finish(start_load)
  return results


def main(argv=None) -> int:
  measure(argv)
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
