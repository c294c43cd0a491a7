"""Prompt-tuning train steps/s: ours (JAX) vs Hugging Face PEFT prompt tuning (torch), same shape.

    python benchmarks/train_throughput.py [--rounds 4 --steps 4] [--no_peft]

T5 1.1 small shape (random weights: speed does not depend on their values), batch 8, inputs 128,
a 100-token prompt, targets 8, fp32, dropout 0.1, Adafactor. The two frameworks and a large
`jnp.dot` (this machine's measured matmul peak) are timed in alternating rounds inside one
process, so that load from other processes hits all of them alike; the table reports per-round
ratios and their median. FLOPs per step are counted as 4 x (encoder matmul weights x encoder
tokens + (decoder matmul weights + logits weights) x decoder tokens) (`prompt_jax.plan`).

Needs the `bench` extra for the PEFT side: pip install -e '.[bench]'.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ.setdefault("USE_TF", "0")  # keep transformers from importing TensorFlow
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from prompt_jax import plan, trainer  # noqa: E402
from prompt_jax.models import t5  # noqa: E402
from prompt_jax.models.encoder_decoder import EncoderDecoderModel  # noqa: E402
from prompt_jax.partitioning import Partitioner  # noqa: E402
from prompt_jax.prompts import initializers  # noqa: E402
from prompt_jax.prompts.base import InputPrompt  # noqa: E402
from prompt_jax.prompts.plain import Prompt  # noqa: E402

PRESET = "t5_1_1_small"


def random_batch(rng: np.random.Generator, batch: int, inputs: int, targets: int,
                 lengths=None) -> dict[str, np.ndarray]:
  """Token ids in [3, 32000); `lengths` [batch] real input lengths (rest is padding)."""
  enc = rng.integers(3, 32000, (batch, inputs)).astype(np.int32)
  if lengths is not None:
    enc[np.arange(inputs)[None, :] >= np.asarray(lengths)[:, None]] = 0
  tgt = rng.integers(3, 32000, (batch, targets)).astype(np.int32)
  dec_in = np.concatenate([np.zeros((batch, 1), np.int32), tgt[:, :-1]], axis=1)
  return {"encoder_input_tokens": enc, "decoder_input_tokens": dec_in,
          "decoder_target_tokens": tgt, "decoder_loss_weights": np.ones_like(tgt)}


# ------------------------------------------------------------------------------------- ours


class JaxPromptTuning:
  """Our prompt trainer on one CPU device."""

  def __init__(self, batch: int, inputs: int, targets: int, prompt_length: int, dropout: float):
    config = t5.preset(PRESET, dropout_rate=dropout)
    self.model = EncoderDecoderModel(t5.Transformer(
        config, InputPrompt(Prompt(prompt_length, initializers.uniform()))))
    self.pt = trainer.PromptTrainer(self.model, trainer.adafactor(), Partitioner(), inputs,
                                    targets, batch)
    self.frozen = self.pt.random_frozen_params(jax.random.key(0))
    self.state = self.pt.init_state(self.frozen, jax.random.key(1))
    self.rng = jax.random.key(2)
    weights = plan.matmul_weights(self.pt.abstract_frozen, config.logits_via_embedding)
    self.flops = lambda b, enc_len, tgt_len: plan.analytic_flops(
        weights, config, b, enc_len + prompt_length, tgt_len)["matmul"]

  def run(self, batches: list[dict]) -> float:
    """Train on device-resident `batches`; returns seconds."""
    start = time.perf_counter()
    for batch in batches:
      self.state, metrics = self.pt.train_step_fn(self.state, self.frozen, batch, self.rng)  # pylint: disable=protected-access
    jax.block_until_ready(metrics["loss"])
    return time.perf_counter() - start

  def device_batches(self, batches: list[dict]) -> list[dict]:
    return [jax.block_until_ready(self.pt.shard_batch(b)) for b in batches]


# -------------------------------------------------------------------------------------- PEFT


class PeftPromptTuning:
  """transformers' T5ForConditionalGeneration of the same shape + PEFT prompt tuning."""

  def __init__(self, prompt_length: int, dropout: float, threads: int):
    import torch  # pylint: disable=g-import-not-at-top
    from peft import PromptTuningConfig, TaskType, get_peft_model  # pylint: disable=g-import-not-at-top
    from transformers import T5Config, T5ForConditionalGeneration  # pylint: disable=g-import-not-at-top
    from transformers.optimization import Adafactor  # pylint: disable=g-import-not-at-top
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    c = t5.preset(PRESET)
    config = T5Config(vocab_size=c.vocab_size, d_model=c.emb_dim, d_kv=c.head_dim,
                      d_ff=c.mlp_dim, num_layers=c.num_encoder_layers,
                      num_decoder_layers=c.num_decoder_layers, num_heads=c.num_heads,
                      feed_forward_proj="gated-gelu", tie_word_embeddings=False,
                      dropout_rate=dropout, decoder_start_token_id=0, pad_token_id=0)
    self.torch = torch
    base = T5ForConditionalGeneration(config)
    self.model = get_peft_model(base, PromptTuningConfig(task_type=TaskType.SEQ_2_SEQ_LM,
                                                         num_virtual_tokens=prompt_length))
    self.model.train()
    params = [p for p in self.model.parameters() if p.requires_grad]
    self.optimizer = Adafactor(params, lr=0.3, relative_step=False, scale_parameter=False,
                               warmup_init=False, clip_threshold=1.0, decay_rate=-0.8,
                               weight_decay=1e-5)

  def torch_batch(self, batch: dict, trim: bool = False) -> dict:
    """`trim`: pad to the batch's longest input (what a PEFT user's collator does)."""
    enc = batch["encoder_input_tokens"]
    if trim:
      enc = enc[:, :max(int((enc > 0).sum(1).max()), 1)]
    t = self.torch.as_tensor
    return {"input_ids": t(enc, dtype=self.torch.long),
            "attention_mask": t((enc > 0).astype(np.int64)),
            "labels": t(batch["decoder_target_tokens"], dtype=self.torch.long)}

  def run(self, batches: list[dict]) -> float:
    start = time.perf_counter()
    for batch in batches:
      loss = self.model(**batch).loss
      loss.backward()
      self.optimizer.step()
      self.optimizer.zero_grad(set_to_none=True)
    return time.perf_counter() - start


# ------------------------------------------------------------------------------------- peaks


def jax_matmul_peak(n: int = 2048, repeats: int = 3) -> float:
  """Best FLOP/s of an [n, n] x [n, n] float32 `jnp.dot` on this machine, now."""
  a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
  b = jax.random.normal(jax.random.key(1), (n, n), jnp.float32)
  dot = jax.jit(jnp.dot)
  jax.block_until_ready(dot(a, b))
  best = float("inf")
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(dot(a, b))
    best = min(best, time.perf_counter() - start)
  return 2.0 * n ** 3 / best


def describe_machine() -> str:
  cpu = "unknown CPU"
  try:
    with open("/proc/cpuinfo") as f:
      cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
  except (OSError, StopIteration):
    pass
  load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
  return (f"{cpu}, {os.cpu_count()} cores, jax {jax.__version__} on {jax.devices()[0].platform}"
          f", load average at start {load:.1f}")


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--rounds", type=int, default=4)
  parser.add_argument("--steps", type=int, default=4, help="train steps per round and side")
  parser.add_argument("--warmup", type=int, default=2)
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--inputs", type=int, default=128)
  parser.add_argument("--targets", type=int, default=8)
  parser.add_argument("--prompt", type=int, default=100)
  parser.add_argument("--dropout", type=float, default=0.1)
  parser.add_argument("--threads", type=int, default=os.cpu_count())
  parser.add_argument("--no_peft", action="store_true")
  args = parser.parse_args(argv)
  print(describe_machine())
  rng = np.random.default_rng(0)
  host = [random_batch(rng, args.batch, args.inputs, args.targets)
          for _ in range(args.steps)]
  ours = JaxPromptTuning(args.batch, args.inputs, args.targets, args.prompt, args.dropout)
  ours_batches = ours.device_batches(host)
  flops = ours.flops(args.batch, args.inputs, args.targets)
  ours.run(ours_batches[:1] * args.warmup)  # compile + warm-up
  peft = None
  if not args.no_peft:
    peft = PeftPromptTuning(args.prompt, args.dropout, args.threads)
    peft_batches = [peft.torch_batch(b) for b in host]
    peft.run(peft_batches[:1] * args.warmup)
  print(f"shape: {PRESET}, batch {args.batch}, inputs {args.inputs} + prompt {args.prompt}, "
        f"targets {args.targets}, fp32, dropout {args.dropout}; {flops / 1e9:.1f} GFLOP/step "
        "(4N count)")
  print(f"{'round':>5} {'ours steps/s':>13} {'PEFT steps/s':>13} {'ratio':>6} "
        f"{'peak GFLOP/s':>13} {'ours % peak':>12} {'PEFT % peak':>12}")
  rows = []
  for r in range(args.rounds):
    peak = jax_matmul_peak()
    ours_sps = args.steps / ours.run(ours_batches)
    peft_sps = args.steps / peft.run(peft_batches) if peft else float("nan")
    peak = max(peak, jax_matmul_peak())
    row = (ours_sps, peft_sps, ours_sps / peft_sps, peak, ours_sps * flops / peak,
           peft_sps * flops / peak)
    rows.append(row)
    print(f"{r:5d} {row[0]:13.3f} {row[1]:13.3f} {row[2]:6.2f} {peak / 1e9:13.1f} "
          f"{100 * row[4]:11.1f}% {100 * row[5]:11.1f}%", flush=True)
  med = [statistics.median(col) for col in zip(*rows)]
  print(f"{'median':>5} {med[0]:13.3f} {med[1]:13.3f} {med[2]:6.2f} {med[3] / 1e9:13.1f} "
        f"{100 * med[4]:11.1f}% {100 * med[5]:11.1f}%")
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
