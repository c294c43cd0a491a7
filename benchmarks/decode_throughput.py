"""Greedy decoding tokens/s: ours (KV cache, cross-attention keys/values cached once, one jitted
`lax.scan`) vs Hugging Face `generate` (greedy, its own cache) on torch, same T5 1.1 small shape.

    python benchmarks/decode_throughput.py [--rounds 4 --batch 8 --inputs 228 --new_tokens 32]

Both sides encode the inputs and then decode exactly `new_tokens` tokens (no early stop), and
are timed in alternating rounds inside one process (the machine is shared; ratios per round).
`--inputs 228` matches 128 input tokens + a 100-token prompt.
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

import jax  # noqa: E402
import numpy as np  # noqa: E402
import train_throughput  # noqa: E402

from prompt_jax import params as params_lib  # noqa: E402
from prompt_jax.models import t5  # noqa: E402
from prompt_jax.models.encoder_decoder import EncoderDecoderModel  # noqa: E402


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--rounds", type=int, default=4)
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--inputs", type=int, default=228)
  parser.add_argument("--new_tokens", type=int, default=32)
  parser.add_argument("--threads", type=int, default=os.cpu_count())
  parser.add_argument("--no_hf", action="store_true")
  args = parser.parse_args(argv)
  print(train_throughput.describe_machine())
  config = t5.preset(train_throughput.PRESET, dropout_rate=0.0)
  # eos_id -1 never matches, so every sequence decodes all `new_tokens` steps.
  model = EncoderDecoderModel(t5.Transformer(config), eos_id=-1)
  rng = np.random.default_rng(0)
  tokens = rng.integers(3, 32000, (args.batch, args.inputs)).astype(np.int32)
  batch = {"encoder_input_tokens": tokens}
  params = params_lib.unbox(model.init(jax.random.key(0), model.dummy_batch(1, 4, 4)))
  predict = jax.jit(model.predict_batch, static_argnums=2)
  jax.block_until_ready(predict(params, batch, args.new_tokens))

  def ours() -> float:
    start = time.perf_counter()
    jax.block_until_ready(predict(params, batch, args.new_tokens))
    return time.perf_counter() - start

  hf = None
  if not args.no_hf:
    import torch  # pylint: disable=g-import-not-at-top
    from transformers import T5Config, T5ForConditionalGeneration  # pylint: disable=g-import-not-at-top
    torch.set_num_threads(args.threads)
    hf_model = T5ForConditionalGeneration(T5Config(
        vocab_size=config.vocab_size, d_model=config.emb_dim, d_kv=config.head_dim,
        d_ff=config.mlp_dim, num_layers=config.num_encoder_layers,
        num_decoder_layers=config.num_decoder_layers, num_heads=config.num_heads,
        feed_forward_proj="gated-gelu", tie_word_embeddings=False, dropout_rate=0.0,
        decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)).eval()
    input_ids = torch.as_tensor(tokens, dtype=torch.long)
    kwargs = dict(max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens,
                  do_sample=False, num_beams=1, use_cache=True)

    def hf() -> float:
      start = time.perf_counter()
      with torch.inference_mode():
        out = hf_model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                                **kwargs)
      assert out.shape[1] == args.new_tokens + 1, out.shape
      return time.perf_counter() - start
    hf()  # warm-up

  generated = args.batch * args.new_tokens
  print(f"shape: {train_throughput.PRESET}, batch {args.batch}, encoder length {args.inputs}, "
        f"{args.new_tokens} greedy steps, fp32")
  print(f"{'round':>5} {'ours tokens/s':>14} {'HF tokens/s':>12} {'ratio':>6}")
  rows = []
  for r in range(args.rounds):
    ours_tps = generated / ours()
    hf_tps = generated / hf() if hf else float("nan")
    rows.append((ours_tps, hf_tps, ours_tps / hf_tps))
    print(f"{r:5d} {ours_tps:14.1f} {hf_tps:12.1f} {ours_tps / hf_tps:6.2f}", flush=True)
  med = [statistics.median(col) for col in zip(*rows)]
  print(f"{'median':>5} {med[0]:14.1f} {med[1]:12.1f} {med[2]:6.2f}")
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
