"""Prompt-tuning train steps/s: ours (JAX) vs Hugging Face PEFT prompt tuning (torch), same shape.

    python benchmarks/train_throughput.py [--rounds 4 --steps 4] [--preset t5_1_1_base]
        [--dtype bfloat16] [--no_peft]

Default shape: T5 1.1 small (random weights: speed does not depend on their values), batch 8,
inputs 128, a 100-token prompt, targets 8, fp32, dropout 0.1, Adafactor. `--preset` takes any
name in `prompt_jax.models.t5.PRESETS`. `--dtype bfloat16` runs ours with bf16 activations and
bf16 frozen weights (the prompt, its optimizer state and the loss stay fp32) and PEFT under
`torch.autocast(<dev>, dtype=torch.bfloat16)` around forward and loss (fp32 weights, as a PEFT
user runs it); the matmul peak is then that of bf16 `jnp.dot` inputs. The two frameworks and a large
`jnp.dot` (this machine's measured matmul peak) are timed in alternating rounds inside one
process, so that load from other processes hits all of them alike; the table reports per-round
ratios and their median, framed by the load averages at the start and end
(`bench_common`: "UNDER LOAD" when other processes used the CPU). FLOPs per step are counted as
4 x (encoder matmul weights x encoder tokens + (decoder matmul weights + logits weights) x
decoder tokens) (`prompt_jax.tools.plan`).

Imports only jax/flax/optax/orbax/numpy from prompt_jax's dependencies (no TensorFlow, seqio or
tensorflow-datasets), so it runs as is on a GPU or TPU machine (ours on the accelerator; PEFT on
`--torch_device` <dev>, default cpu: pass cuda on a GPU machine, or --no_peft). The PEFT side needs
the `bench` extra: pip install -e '.[bench]'. `benchmarks/gpu_check.py` runs this and
decode_throughput.py on the base and large models in both dtypes and prints one table.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from typing import Optional

os.environ.setdefault("USE_TF", "0")  # keep transformers from importing TensorFlow
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
if os.path.dirname(os.path.abspath(__file__)) not in sys.path:  # bench_common, when imported
  sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import bench_common  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from prompt_jax.models import t5  # noqa: E402
from prompt_jax.models.encoder_decoder import EncoderDecoderModel  # noqa: E402
from prompt_jax.partitioning import Partitioner  # noqa: E402
from prompt_jax.programs import PromptPrograms  # noqa: E402
from prompt_jax.prompts import initializers  # noqa: E402
from prompt_jax.prompts.base import InputPrompt  # noqa: E402
from prompt_jax.prompts.plain import Prompt  # noqa: E402
from prompt_jax.tools import flops as flop_counts  # noqa: E402
from prompt_jax.training.optimizers import adafactor  # noqa: E402

PRESET = "t5_1_1_small"
DTYPES = ("float32", "bfloat16")


def check_dtype(dtype: str) -> str:
  if dtype not in DTYPES:
    raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")
  return dtype


def random_batch(rng: np.random.Generator, batch: int, inputs: int, targets: int,
                 lengths=None, vocab_size: int = 32000) -> dict[str, np.ndarray]:
  """Token ids in [3, vocab_size) of a [batch, inputs] / [batch, targets] batch; `lengths`
  [batch] real input lengths (the rest is padding, id 0)."""
  enc = rng.integers(3, vocab_size, (batch, inputs)).astype(np.int32)
  if lengths is not None:
    enc[np.arange(inputs)[None, :] >= np.asarray(lengths)[:, None]] = 0
  tgt = rng.integers(3, vocab_size, (batch, targets)).astype(np.int32)
  dec_in = np.concatenate([np.zeros((batch, 1), np.int32), tgt[:, :-1]], axis=1)
  return {"encoder_input_tokens": enc, "decoder_input_tokens": dec_in,
          "decoder_target_tokens": tgt, "decoder_loss_weights": np.ones_like(tgt)}


def batch_vocab(preset: str) -> int:
  """Upper bound (exclusive) of the random token ids for a preset: its real vocabulary."""
  return min(t5.preset(preset).vocab_size, 32000)


# ------------------------------------------------------------------------------------- ours


class JaxPromptTuning:
  """Our prompt-tuning train step (`PromptPrograms`, Adafactor) on the default device(s).

  `dtype` 'bfloat16': bf16 activations (`T5Config.dtype`) and frozen weights (`frozen_dtype`);
  the prompt, its optimizer state and the loss stay float32.
  """

  def __init__(self, batch: int, inputs: int, targets: int, prompt_length: int, dropout: float,
               preset: str = PRESET, dtype: str = "float32",
               partitioner: Optional[Partitioner] = None):
    check_dtype(dtype)
    self.config = config = t5.preset(preset, dropout_rate=dropout, dtype=dtype)
    self.model = EncoderDecoderModel(t5.Transformer(
        config, InputPrompt(Prompt(prompt_length, initializers.uniform()))))
    partitioner = partitioner or Partitioner()
    if batch % partitioner.data_parallel_size:
      raise ValueError(f"batch {batch} is not divisible by the data-parallel size "
                       f"{partitioner.data_parallel_size}")
    self.pt = PromptPrograms(self.model, partitioner, adafactor(),
                             frozen_dtype=None if dtype == "float32" else dtype,
                             batch_size=batch, input_length=inputs, target_length=targets)
    self.frozen = self.pt.random_frozen_params(jax.random.key(0))
    self.state = self.pt.init_state(self.frozen, jax.random.key(1))
    self.rng = jax.random.key(2)
    self.last_loss = float("nan")
    weights = flop_counts.matmul_weights(self.pt.abstract_frozen, config.logits_via_embedding)
    self.flops = lambda b, enc_len, tgt_len: flop_counts.analytic_flops(
        weights, config, b, enc_len + prompt_length, tgt_len)["matmul"]

  def run(self, batches: list[dict]) -> float:
    """Train on device-resident `batches`; returns seconds."""
    start = time.perf_counter()
    for batch in batches:
      self.state, metrics = self.pt.train_step_fn(self.state, self.frozen, batch, self.rng)
    jax.block_until_ready(metrics["loss"])
    elapsed = time.perf_counter() - start
    self.last_loss = float(metrics["loss"])
    return elapsed

  def device_batches(self, batches: list[dict]) -> list[dict]:
    return [jax.block_until_ready(self.pt.shard_batch(b)) for b in batches]


# -------------------------------------------------------------------------------------- PEFT


def hf_t5_config(c: t5.T5Config, dropout: float):
  """transformers' T5Config of the same architecture as our `c`."""
  from transformers import T5Config  # pylint: disable=g-import-not-at-top
  acts = c.mlp_activations
  if len(acts) == 2 and acts[1] == "linear":
    feed_forward_proj = f"gated-{acts[0]}"
  elif len(acts) == 1:
    feed_forward_proj = acts[0]
  else:
    raise ValueError(f"no transformers T5 feed_forward_proj for mlp_activations {acts!r}")
  return T5Config(vocab_size=c.vocab_size, d_model=c.emb_dim, d_kv=c.head_dim,
                  d_ff=c.mlp_dim, num_layers=c.num_encoder_layers,
                  num_decoder_layers=c.num_decoder_layers, num_heads=c.num_heads,
                  relative_attention_num_buckets=c.relative_attention_num_buckets,
                  relative_attention_max_distance=c.relative_attention_max_distance,
                  layer_norm_epsilon=c.layer_norm_epsilon, feed_forward_proj=feed_forward_proj,
                  tie_word_embeddings=c.logits_via_embedding, dropout_rate=dropout,
                  decoder_start_token_id=0, pad_token_id=0)


class PeftPromptTuning:
  """transformers' T5ForConditionalGeneration of the same shape + PEFT prompt tuning.

  `dtype` 'bfloat16': forward and loss under `torch.autocast(device, dtype=torch.bfloat16)`,
  weights and optimizer fp32 (what a PEFT user does). `device`: a torch device ('cpu', 'cuda').
  """

  def __init__(self, prompt_length: int, dropout: float, threads: int, preset: str = PRESET,
               dtype: str = "float32", device: str = "cpu"):
    import torch  # pylint: disable=g-import-not-at-top
    from peft import PromptTuningConfig, TaskType, get_peft_model  # pylint: disable=g-import-not-at-top
    from transformers import T5ForConditionalGeneration  # pylint: disable=g-import-not-at-top
    from transformers.optimization import Adafactor  # pylint: disable=g-import-not-at-top
    self.bf16 = check_dtype(dtype) == "bfloat16"
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    self.torch = torch
    self.device = torch.device(device)
    base = T5ForConditionalGeneration(hf_t5_config(t5.preset(preset), dropout))
    self.model = get_peft_model(base, PromptTuningConfig(
        task_type=TaskType.SEQ_2_SEQ_LM, num_virtual_tokens=prompt_length)).to(self.device)
    self.model.train()
    params = [p for p in self.model.parameters() if p.requires_grad]
    self.optimizer = Adafactor(params, lr=0.3, relative_step=False, scale_parameter=False,
                               warmup_init=False, clip_threshold=1.0, decay_rate=-0.8,
                               weight_decay=1e-5)
    self.last_loss = float("nan")

  def torch_batch(self, batch: dict, trim: bool = False) -> dict:
    """`trim`: pad to the batch's longest input (what a PEFT user's collator does)."""
    enc = batch["encoder_input_tokens"]
    if trim:
      enc = enc[:, :max(int((enc > 0).sum(1).max()), 1)]
    t = lambda x: self.torch.as_tensor(x, dtype=self.torch.long, device=self.device)
    return {"input_ids": t(enc), "attention_mask": t((enc > 0).astype(np.int64)),
            "labels": t(batch["decoder_target_tokens"])}

  def run(self, batches: list[dict]) -> float:
    """Train on `batches` (from `torch_batch`); returns seconds."""
    start = time.perf_counter()
    for batch in batches:
      with self.torch.autocast(self.device.type, dtype=self.torch.bfloat16, enabled=self.bf16):
        loss = self.model(**batch).loss
      loss.backward()
      self.optimizer.step()
      self.optimizer.zero_grad(set_to_none=True)
    if self.device.type == "cuda":
      self.torch.cuda.synchronize(self.device)
    elapsed = time.perf_counter() - start
    self.last_loss = float(loss.detach().float())
    return elapsed


# ------------------------------------------------------------------------------------- peaks


def _dot_fp32_accumulation(x, y):
  return jnp.dot(x, y, preferred_element_type=jnp.float32)


def jax_matmul_peak(n: int = 2048, repeats: int = 3, dtype: str = "float32") -> float:
  """Best FLOP/s of an [n, n] x [n, n] `jnp.dot` of `dtype` inputs on the default device, now.

  For bfloat16 the best of a bf16-output dot and one accumulating into float32
  (`preferred_element_type`): on this project's CPU the latter is ~2x faster (2048^2: 304 vs
  155 GFLOP/s; fp32 192), and the peak is the best the bf16 matrix units give."""
  a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32).astype(dtype)
  b = jax.random.normal(jax.random.key(1), (n, n), jnp.float32).astype(dtype)
  dots = [jax.jit(jnp.dot)]
  if jnp.dtype(dtype) != jnp.float32:
    dots.append(jax.jit(_dot_fp32_accumulation))
  best = float("inf")
  for dot in dots:
    jax.block_until_ready(dot(a, b))
    for _ in range(repeats):
      start = time.perf_counter()
      jax.block_until_ready(dot(a, b))
      best = min(best, time.perf_counter() - start)
  return 2.0 * n ** 3 / best


def default_peak_size() -> int:
  """2048 on CPU; accelerators need a larger product to reach their peak."""
  return 2048 if jax.default_backend() == "cpu" else 8192


def describe_machine() -> str:
  """`bench_common.describe_machine()` plus the load average now (kept for older callers)."""
  return f"{bench_common.describe_machine()}, load average {bench_common.load_average():.2f}"


def dtype_note(dtype: str) -> str:
  if dtype == "float32":
    return "fp32"
  return ("bf16 (ours: bf16 activations and frozen weights, fp32 prompt, optimizer and loss; "
          "PEFT: torch bf16 autocast, fp32 weights)")


def add_common_flags(parser: argparse.ArgumentParser) -> None:
  """Flags shared with length_bucketing.py: model, dtype, prompt, batch shape, threads."""
  parser.add_argument("--preset", default=PRESET, choices=sorted(t5.PRESETS),
                      help="T5 architecture (prompt_jax.models.t5.PRESETS)")
  parser.add_argument("--dtype", default="float32", choices=DTYPES)
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--inputs", type=int, default=128)
  parser.add_argument("--targets", type=int, default=8)
  parser.add_argument("--prompt", type=int, default=100)
  parser.add_argument("--dropout", type=float, default=0.1)
  parser.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads")
  parser.add_argument("--no_peft", action="store_true", help="time ours only")


def measure(argv=None) -> dict:
  """Runs the benchmark of `main(argv)` (printing the same) and returns its medians: `ours` and
  `peft` steps/s (nan with --no_peft), `ratio`, and `quiet` (`bench_common.finish`)."""
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--rounds", type=int, default=4)
  parser.add_argument("--steps", type=int, default=4, help="train steps per round and side")
  parser.add_argument("--warmup", type=int, default=2)
  parser.add_argument("--peak_size", type=int, default=None,
                      help="n of the n x n matmul peak (default 2048 on CPU, 8192 otherwise)")
  add_common_flags(parser)
  parser.add_argument("--torch_device", default="cpu",
                      help="torch device of the PEFT side ('cuda' on a GPU machine)")
  args = parser.parse_args(argv)
  for name in ("rounds", "steps", "warmup", "batch"):
    if getattr(args, name) < 1:
      parser.error(f"--{name} must be >= 1, got {getattr(args, name)}")
  start_load = bench_common.start()
  peak_size = args.peak_size or default_peak_size()
  rng = np.random.default_rng(0)
  host = [random_batch(rng, args.batch, args.inputs, args.targets,
                       vocab_size=batch_vocab(args.preset)) for _ in range(args.steps)]
  ours = JaxPromptTuning(args.batch, args.inputs, args.targets, args.prompt, args.dropout,
                         args.preset, args.dtype)
  ours_batches = ours.device_batches(host)
  flops = ours.flops(args.batch, args.inputs, args.targets)
  ours.run(ours_batches[:1] * args.warmup)  # compile + warm-up
  peft = None
  if not args.no_peft:
    peft = PeftPromptTuning(args.prompt, args.dropout, args.threads, args.preset, args.dtype,
                            args.torch_device)
    peft_batches = [peft.torch_batch(b) for b in host]
    peft.run(peft_batches[:1] * args.warmup)
  print(f"shape: {args.preset}, batch {args.batch}, inputs {args.inputs} + prompt {args.prompt}, "
        f"targets {args.targets}, {dtype_note(args.dtype)}, dropout {args.dropout}; "
        f"{flops / 1e9:.1f} GFLOP/step (4N count); peak: {peak_size}^2 {args.dtype} jnp.dot"
        + (" (best of bf16 and fp32 accumulation)" if args.dtype == "bfloat16" else ""))
  print(f"{'round':>5} {'ours steps/s':>13} {'PEFT steps/s':>13} {'ratio':>6} "
        f"{'peak GFLOP/s':>13} {'ours % peak':>12} {'PEFT % peak':>12}")
  rows = []
  for r in range(args.rounds):
    peak = jax_matmul_peak(peak_size, dtype=args.dtype)
    ours_sps = args.steps / ours.run(ours_batches)
    peft_sps = args.steps / peft.run(peft_batches) if peft else float("nan")
    peak = max(peak, jax_matmul_peak(peak_size, dtype=args.dtype))
    row = (ours_sps, peft_sps, ours_sps / peft_sps, peak, ours_sps * flops / peak,
           peft_sps * flops / peak)
    rows.append(row)
    print(f"{r:5d} {row[0]:13.3f} {row[1]:13.3f} {row[2]:6.2f} {peak / 1e9:13.1f} "
          f"{100 * row[4]:11.1f}% {100 * row[5]:11.1f}%", flush=True)
  med = [statistics.median(col) for col in zip(*rows)]
  print(f"{'median':>5} {med[0]:13.3f} {med[1]:13.3f} {med[2]:6.2f} {med[3] / 1e9:13.1f} "
        f"{100 * med[4]:11.1f}% {100 * med[5]:11.1f}%")
  print(f"last training loss: ours {ours.last_loss:.4f}, PEFT "
        f"{peft.last_loss if peft else float('nan'):.4f}")
  quiet = bench_common.finish(start_load)
  return {"ours": med[0], "peft": med[1], "ratio": med[2], "quiet": quiet}


def main(argv=None) -> int:
  measure(argv)
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
