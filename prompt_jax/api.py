"""The Python API: load a frozen T5, tune a prompt on it, then predict, score, evaluate, export.

    from prompt_jax import api
    frozen = api.load_frozen("builtin:demo_t5_tiny.npz")        # or 'hf://google/t5-base-lm-adapt'
    tuned = frozen.tune("train.jsonl", validation="dev.jsonl", prompt_length=10, steps=300)
    tuned.predict(["the soup was bland"])                        # ['negative']
    tuned.evaluate()                                             # {'accuracy': ...}
    tuned.save_npy("prompt.npy"); tuned.save_peft("adapter/")

It is a front end over what `prompt-jax` runs, not a second implementation: `tune` builds the
same `PromptPrograms` and runs the one training loop (`training.trainer.run`), which writes the
run directory (`tuned.model_dir`: run.json, checkpoints, metrics, curves) exactly as
`prompt-jax train` does; predicting, scoring and evaluating call the serving functions of
`prompt-jax infer` / `eval`. What gin binds for the CLI is a keyword argument here (no gin is
read). Data is a registered seqio task name, a `file:` spec or a JSONL/CSV/TSV path
(`data.file_tasks`), or an in-memory list of (input, target) pairs.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import shutil
import tempfile
from typing import Any, Callable, Mapping, Optional, Sequence, Union

import flax.linen as nn
import numpy as np
import optax
import seqio

from prompt_jax.data import file_tasks, pipeline
from prompt_jax.models import decoding as decoding_lib
from prompt_jax.models import t5
from prompt_jax.models.encoder_decoder import EncoderDecoderModel
from prompt_jax.partitioning import Partitioner
from prompt_jax.programs import PromptPrograms
from prompt_jax.prompts import (
  base,
  dept,
  dpt,
  initializers,
  p_tuning,
  plain,
  prefix,
  residual,
  smop,
  superpos,
)
from prompt_jax.prompts.hook import PromptHook
from prompt_jax.serving import evaluators, inference, prompt_export
from prompt_jax.storage import frozen_models
from prompt_jax.training import optimizers, trainer
from prompt_jax.training.regimes import PromptTuning

Data = Union[str, Sequence[tuple[str, str]], Sequence[Mapping[str, str]]]
Decoding = Union[None, str, decoding_lib.Greedy, decoding_lib.BeamSearch,
                 decoding_lib.TemperatureSampling]

# What registers the task names `tune` accepts (the CLI's TASK_MODULE default): GLUE,
# SuperGLUE and the demo's synthetic tasks.
TASK_MODULE = "prompt_jax.tasks"
# The shipped checkpoints: which architecture and vocabulary each one is.
BUILTIN_MODELS = {"demo_t5_tiny.npz": ("tiny", "byte")}


@dataclasses.dataclass(frozen=True)
class Method:
  """A prompt method by short name: its hook for a prompt budget of `length` tokens on inputs of
  `input_length` tokens, and the optimizer its paper trains it with (the method's
  `gin_configs/prompts/<name>.gin` holds the same for the CLI)."""

  hook: Callable[[int, int], nn.Module]
  optimizer: Callable[[], optax.GradientTransformation]


def _dept(length: int, input_length: int) -> nn.Module:
  """DePT at the budget of a plain prompt of `length` tokens: a soft prompt of 60% of them (the
  authors' 60 of 100) plus the low-rank update of `input_length` input embeddings."""
  return dept.DePTPrompt(prompt=plain.Prompt(length=max(1, (length * 3) // 5),
                                             init_fn=initializers.sampled_vocabulary()),
                         max_input_length=input_length, budget_length=max(2, length))


def _dept_optimizer() -> optax.GradientTransformation:
  """The authors' two learning rates: 0.3 for the prompt, 5e-3 for the low-rank pair."""
  def adamw(learning_rate):
    return optimizers.adamw(learning_rate=learning_rate, weight_decay=1e-5,
                            clipping_threshold=1.0)
  return optimizers.split_by_path(dept.low_rank_pattern(), adamw(5e-3), adamw(0.3),
                                  names=("low_rank", "prompt"))


METHODS: dict[str, Method] = {
    # Lester et al. 2021: U[-0.5, 0.5) init, Adafactor lr 0.3.
    "plain": Method(lambda n, _: base.InputPrompt(prompt=plain.Prompt(length=n)),
                    optimizers.adafactor),
    # Razdaibiedina et al. 2023, as compared in the SuperPos paper: bottleneck 128, AdamW 0.3.
    "residual": Method(
        lambda n, _: base.InputPrompt(prompt=residual.ResidualPrompt(
            length=n, init_fn=initializers.sampled_vocabulary())),
        lambda: optimizers.adamw(learning_rate=0.3, weight_decay=1e-5)),
    # SuperPos-Prompt: 128 superposed embeddings, AdamW 0.01, decay on the coefficients only.
    "superpos": Method(
        lambda n, _: base.InputPrompt(prompt=superpos.SuperPosPrompt(length=n)),
        lambda: optimizers.adamw(learning_rate=0.01, weight_decay=1e-5,
                                 weight_decay_pattern=superpos.WEIGHT_DECAY_PATTERN)),
    # P-tuning (Liu et al. 2021): a 2-layer MLP reparameterisation, AdamW 0.01.
    "p_tuning": Method(lambda n, _: base.InputPrompt(prompt=p_tuning.PTuningPrompt(length=n)),
                       lambda: optimizers.adamw(learning_rate=0.01, weight_decay=0.01)),
    # DPT (Xiao et al. 2023): the prompt as A [n, 10] @ B [10, d], AdamW 0.3, clipping 1.
    "dpt": Method(lambda n, _: base.InputPrompt(prompt=dpt.DPTPrompt(length=n)),
                  lambda: optimizers.adamw(learning_rate=0.3, weight_decay=1e-5,
                                           clipping_threshold=1.0)),
    # DePT (Shi & Lipani 2024): a shorter prompt and a low-rank input-embedding update.
    "dept": Method(_dept, _dept_optimizer),
    # SMoP (Choi et al. 2023): 4 prompts of n tokens each, one routed per example, Adafactor 0.5.
    "smop": Method(lambda n, _: smop.SMoPPrompt(length=n),
                   lambda: optimizers.adafactor(learning_rate=0.5)),
    # Prefix tuning (Li & Liang 2021): n key/value prefixes in every attention layer through
    # the authors' 512-wide MLP, AdamW 5e-5 (theirs, for thousands of steps; pass a larger
    # `learning_rate` for a short run: the demo reaches 100% at 3e-3 in 50 steps).
    "prefix": Method(lambda n, _: prefix.PrefixTuning(length=n),
                     lambda: optimizers.adamw(learning_rate=5e-5, weight_decay=0.0)),
}


def prompt_hook(method: Union[str, nn.Module], length: int, input_length: int = 512
                ) -> nn.Module:
  """The encoder hook of `method`: a name of `METHODS`, a hook (`PromptHook`) used as it is, or
  a bare prompt generator (a module with `length`, e.g. `plain.Prompt(length=20)`), which is
  placed in front of the input by wrapping it in `base.InputPrompt`."""
  if isinstance(method, str):
    if method not in METHODS:
      raise ValueError(f"unknown prompt method {method!r}; known: {', '.join(METHODS)} (or pass "
                       "a prompt module)")
    return METHODS[method].hook(base.check_prompt_length(length, "prompt_length"), input_length)
  if not isinstance(method, nn.Module):
    raise ValueError(f"method must be a name ({', '.join(METHODS)}) or a Linen prompt module, "
                     f"got {method!r}")
  if isinstance(method, PromptHook):
    return method
  if isinstance(getattr(method, "length", None), int):
    return base.InputPrompt(prompt=method)
  raise ValueError(f"{type(method).__name__} is neither a prompt hook (see prompts/hook.py) nor "
                   "a prompt generator (a module with an integer `length` returning "
                   "[batch, length, embed])")


@dataclasses.dataclass
class FrozenT5:
  """A frozen T5: its architecture, its checkpoint and the vocabulary it reads.

  Attributes:
    config: the architecture (`models.t5.T5Config`).
    checkpoint: what `INITIAL_CHECKPOINT_PATH` would name (None: random weights, for tests).
    vocabulary: 'byte', 't5', a SentencePiece model path or a seqio vocabulary (the
      checkpoint's own spiece.model for Hugging Face models); files and lists are tokenised
      with it.
  """

  config: t5.T5Config
  checkpoint: Optional[str]
  vocabulary: Union[str, seqio.Vocabulary]

  def model(self, hook: Optional[nn.Module]) -> EncoderDecoderModel:
    """The encoder-decoder with `hook` as its prompt (T5X's z-loss and normalisation)."""
    return EncoderDecoderModel(module=t5.Transformer(config=self.config, prompt=hook))

  @functools.cached_property
  def seqio_vocabulary(self) -> seqio.Vocabulary:
    """`vocabulary` as a seqio vocabulary (resolved as file tasks resolve `vocabulary=`)."""
    return file_tasks.resolve_vocabulary(self.vocabulary)[0]

  def tune(self, data: Data, *, validation: Optional[Data] = None,
           method: Union[str, nn.Module] = "plain", prompt_length: int = 100,
           steps: int = 1000, batch_size: int = 32, learning_rate: Optional[float] = None,
           optimizer: Optional[optax.GradientTransformation] = None,
           input_length: Optional[int] = None, target_length: Optional[int] = None,
           model_dir: Optional[str] = None, eval_every: int = 0,
           checkpoint_every: Optional[int] = None, seed: int = 0,
           partitioner: Optional[Partitioner] = None, **data_options: Any) -> TunedPrompt:
    """Tune a prompt of `method` on `data` for `steps` steps; returns the `TunedPrompt`.

    Args:
      data: a registered seqio task or mixture name, a `file:` spec, a JSONL/CSV/TSV path, or a
        list of (input, target) pairs (or {'inputs', 'targets'} dicts).
      validation: the evaluation data for a path or a list (a task's own `validation` split
        otherwise); scored before and after training, and every `eval_every` steps.
      method: a name of `METHODS` ('plain', 'residual', 'superpos', 'p_tuning', 'dpt',
        'dept', 'smop', 'prefix'), a prompt hook, or a prompt generator (wrapped in
        `base.InputPrompt`).
      prompt_length: prompt tokens (Lester et al.: 100).
      learning_rate: replaces the method's default learning rate; `optimizer` replaces the
        method's optimizer.
      input_length, target_length: token lengths (default: the longest example of a file or
        list, plus EOS; 512 and 8 for a task).
      model_dir: the run directory (default: a new temporary one); an existing run in it is
        resumed, as the CLI does.
      data_options: for files and lists, `file_tasks.register_file_task`'s options: `input`,
        `target`, `metrics`, `labels`, `scoring`.
    """
    train_name, eval_name, lengths = self._data(data, validation, data_options)
    input_length = input_length or lengths[0]
    target_length = target_length or lengths[1]
    hook = prompt_hook(method, prompt_length, input_length)
    feature_lengths = {"inputs": int(input_length), "targets": int(target_length)}
    train_cfg = pipeline.DatasetConfig(train_name, feature_lengths, split="train",
                                       batch_size=batch_size, shuffle=True, seed=seed)
    eval_cfg = None if eval_name is None else pipeline.DatasetConfig(
        eval_name, feature_lengths, split="validation", batch_size=batch_size, shuffle=False,
        seed=seed)
    optimizer = optimizer or self._optimizer(method, learning_rate)
    model = self.model(hook)
    pipeline.check_vocabulary(train_cfg, self.config.vocab_size)
    programs = PromptPrograms.for_training(model, optimizer, partitioner, input_length,
                                           target_length, batch_size)
    model_dir = model_dir or os.path.join(tempfile.mkdtemp(prefix="prompt_jax_"), "run")
    result = trainer.run(
        PromptTuning(programs, train_cfg), model_dir=model_dir, train_steps=steps,
        eval_dataset_cfg=eval_cfg, initial_checkpoint_path=self.checkpoint,
        checkpoint_every_steps=checkpoint_every or steps, eval_every_steps=eval_every,
        max_decode_length=target_length, seed=seed)
    return TunedPrompt(self, programs, result.state.prompt_params, result.frozen_params,
                       result.summary, model_dir, eval_cfg)

  def _optimizer(self, method, learning_rate: Optional[float]) -> optax.GradientTransformation:
    if not isinstance(method, str):
      return optimizers.adafactor(**({} if learning_rate is None else
                                     {"learning_rate": learning_rate}))
    optimizer = METHODS[method].optimizer()
    if learning_rate is None:
      return optimizer
    settings = dict(optimizers.description(optimizer) or {})
    name = settings.pop("name", None)
    builder = {"adafactor": optimizers.adafactor, "adamw": optimizers.adamw}.get(name)
    if builder is None:
      raise ValueError(f"method {method!r}: its optimizer takes no learning_rate here; pass "
                       "optimizer= instead")
    settings["learning_rate"] = learning_rate
    return builder(**settings)

  def _data(self, data: Data, validation: Optional[Data],
            options: Mapping[str, Any]) -> tuple[str, Optional[str], tuple[int, int]]:
    """-> (training task name, evaluation task name or None, default (input, target) lengths)."""
    if isinstance(data, str) and not data.startswith("file:") and not os.path.exists(data):
      if validation is not None:
        raise ValueError(f"validation= is for files and lists; the task {data!r} is evaluated on "
                         "its own 'validation' split")
      if options:
        raise ValueError(f"{sorted(options)} are options of files and lists, not of the task "
                         f"{data!r}")
      pipeline.get_task_or_mixture(data, TASK_MODULE)
      return data, data, (512, 8)
    if isinstance(data, str) and data.startswith("file:"):
      if validation is not None or options:
        raise ValueError("a file: spec holds its own validation file and options; pass the path "
                         "instead to give them as keywords")
      name = pipeline.get_task_or_mixture(data).name
    elif isinstance(data, str):
      if validation is not None and not isinstance(validation, str):
        raise ValueError(f"validation= must be a file path when the training data is a file, got "
                         f"{type(validation).__name__}")
      name = file_tasks.register_file_task(train=data, validation=validation,
                                           vocabulary=self.vocabulary, **options)
    else:
      name = file_tasks.register_examples_task(train=data, validation=validation,
                                               vocabulary=self.vocabulary, **options)
    lengths = longest_example(name)
    has_validation = "validation" in seqio.get_mixture_or_task(name).splits
    return name, name if has_validation else None, lengths


def load_frozen(path: Optional[str], *, preset: Optional[str] = None,
                config: Optional[t5.T5Config] = None,
                vocabulary: Union[None, str, seqio.Vocabulary] = None) -> FrozenT5:
  """A frozen T5 by path: 'builtin:demo_t5_tiny.npz' (shipped), 'hf://owner/name[@revision]'
  (the Hugging Face Hub, `pip install "prompt_jax[hub]"`) or a Hugging Face model directory
  (architecture and vocabulary from its config.json and spiece.model), or a T5X checkpoint,
  Orbax directory or .npz with `preset=` (a `t5.PRESETS` name) or `config=`. `vocabulary`
  ('byte', 't5' or a SentencePiece model path) replaces the checkpoint's; T5's SentencePiece
  model otherwise. `path=None` with a preset gives random weights (tests)."""
  if preset is not None and config is not None:
    raise ValueError("give preset= or config=, not both")
  if preset is not None:
    config = t5.preset(preset)
  found_vocabulary = None
  if path and path.startswith(frozen_models.BUILTIN_PREFIX):
    name = path[len(frozen_models.BUILTIN_PREFIX):]
    if name in BUILTIN_MODELS and config is None:
      config = t5.preset(BUILTIN_MODELS[name][0])
      found_vocabulary = BUILTIN_MODELS[name][1]
  elif path and config is None:
    described = frozen_models.checkpoint_model(path)
    config = described.config
    found_vocabulary = described.vocabulary
  if config is None:
    raise ValueError(f"cannot tell the architecture of {path!r}: pass preset= (one of "
                     f"{', '.join(sorted(t5.PRESETS))}) or config=")
  return FrozenT5(config, path, vocabulary or found_vocabulary or "t5")


@dataclasses.dataclass
class TunedPrompt:
  """A trained prompt with its frozen model, ready to predict, score, evaluate and export.

  `model_dir` is the run directory the training wrote (every `prompt-jax` command works on it:
  `prompt-jax eval --model_dir=...` needs the run's gin files, see docs/python.md)."""

  frozen: FrozenT5
  programs: PromptPrograms
  prompt_params: Any
  frozen_params: Any
  summary: dict
  model_dir: str
  eval_cfg: Optional[pipeline.DatasetConfig] = None

  @property
  def input_length(self) -> int:
    return int(self.programs.dummy_batch["encoder_input_tokens"].shape[1])

  @property
  def target_length(self) -> int:
    return int(self.programs.dummy_batch["decoder_target_tokens"].shape[1])

  def predict(self, inputs: Sequence[str], *, decoding: Decoding = None,
              batch_size: int = 32, max_decode_length: Optional[int] = None) -> list[str]:
    """The best decode of each input: greedy, or `decoding` ('beam_search(num_decodes=4)',
    'temperature_sample(temperature=0.7, seed=1)' or a `models.decoding` object)."""
    return inference.predict_texts(
        self.programs, self.prompt_params, self.frozen_params, _texts(inputs, "inputs"),
        self.frozen.seqio_vocabulary, self.input_length,
        max_decode_length or self.target_length, batch_size=batch_size,
        decoding=_decoding(decoding))

  def decodes(self, inputs: Sequence[str], *, decoding: Decoding = "beam_search(num_decodes=4)",
              batch_size: int = 32) -> list[list[tuple[str, float]]]:
    """Every decode of `decoding` per input, best first, as (text, log-probability score)."""
    return inference.predict_decodes(
        self.programs, self.prompt_params, self.frozen_params, _texts(inputs, "inputs"),
        self.frozen.seqio_vocabulary, self.input_length, self.target_length,
        batch_size=batch_size, decoding=_decoding(decoding))

  def score(self, inputs: Sequence[str], targets: Sequence[str], *,
            batch_size: int = 32) -> np.ndarray:
    """[n] log-likelihood of each target given its input (summed over target tokens)."""
    inputs, targets = _texts(inputs, "inputs"), _texts(targets, "targets")
    if len(inputs) != len(targets):
      raise ValueError(f"score: {len(inputs)} inputs but {len(targets)} targets")
    vocabulary = self.frozen.seqio_vocabulary
    encoded = inference.encode_inputs(inputs, vocabulary, self.input_length)
    target_tokens = inference.encode_inputs(targets, vocabulary, self.target_length)
    scores = []
    for start in range(0, len(inputs), batch_size):
      rows = slice(start, start + batch_size)
      batch = {"encoder_input_tokens": encoded[rows], "decoder_target_tokens": target_tokens[rows],
               "decoder_input_tokens": np.pad(target_tokens[rows][:, :-1], ((0, 0), (1, 0))),
               "decoder_loss_weights": (target_tokens[rows] > 0).astype(np.float32)}
      batch, real = pipeline.pad_batch(batch, batch_size)
      scores.append(self.programs.score(self.prompt_params, self.frozen_params, batch)[:real])
    return np.concatenate(scores) if scores else np.zeros((0,), np.float32)

  def evaluate(self, data: Optional[str] = None, *, split: str = "validation",
               decoding: Decoding = None, batch_size: int = 32) -> dict[str, float]:
    """The task's metrics on `split` of `data` (a task name or `file:` spec; default the
    validation data given to `tune`)."""
    if data is None:
      if self.eval_cfg is None:
        raise ValueError("tune() had no validation data: pass evaluate(data=...)")
      name = self.eval_cfg.mixture_or_task_name
    else:
      name = pipeline.get_task_or_mixture(data, TASK_MODULE).name
    cfg = pipeline.DatasetConfig(
        name, {"inputs": self.input_length, "targets": self.target_length}, split=split,
        batch_size=batch_size, shuffle=False)
    evaluate = evaluators.TaskEvaluator(cfg, max_decode_length=self.target_length,
                                        decoding=_decoding(decoding))
    return evaluate(self.programs, self.prompt_params, self.frozen_params,
                    int(self.summary.get("step", 0)))

  def prompt_array(self) -> np.ndarray:
    """The prompt folded to the plain [length, embed] array the encoder sees (methods whose
    prompt depends on the input have none: ValueError)."""
    return prompt_export.fold_prompt(self.programs.model, self.prompt_params, self.frozen_params)

  def save_npy(self, path: str) -> str:
    """The folded prompt as float32 `.npy` (a new file) -> the path written."""
    return prompt_export.save_npy(self.prompt_array(), path)

  def save_peft(self, directory: str, base_model_name_or_path: Optional[str] = None) -> str:
    """The folded prompt as a PEFT prompt-tuning adapter directory -> `directory`."""
    prompt_export.save_peft(self.prompt_array(), directory, base_model_name_or_path)
    return directory

  def save_run(self, directory: str) -> str:
    """A copy of the run directory at `directory` (which must not exist) -> `directory`."""
    if os.path.exists(directory):
      raise ValueError(f"save_run: {directory!r} exists; give a new directory")
    shutil.copytree(self.model_dir, directory, ignore=shutil.ignore_patterns(".lock"))
    return directory


def longest_example(name: str, multiple: int = 8) -> tuple[int, int]:
  """(input, target) token lengths that hold every example of task or mixture `name` (EOS
  included), rounded up to a multiple of `multiple`."""
  provider = seqio.get_mixture_or_task(name)
  longest = {"inputs": 1, "targets": 1}
  for task in getattr(provider, "tasks", [provider]):
    for split in task.splits:
      dataset = task.get_dataset(sequence_length=None, split=split, shuffle=False,
                                 use_cached=False)
      for example in dataset.as_numpy_iterator():
        for key in longest:
          longest[key] = max(longest[key], len(example[key]))
  return tuple(-(-longest[key] // multiple) * multiple for key in ("inputs", "targets"))


def _texts(values: Sequence[str], what: str) -> list[str]:
  if isinstance(values, str):
    raise ValueError(f"{what} must be a list of strings, got one string {values[:40]!r}")
  values = list(values)
  for i, value in enumerate(values):
    if not isinstance(value, str):
      raise ValueError(f"{what}[{i}] must be a string, got {type(value).__name__} {value!r}")
  return values


def _decoding(decoding: Decoding):
  return decoding_lib.parse(decoding) if isinstance(decoding, str) else decoding

