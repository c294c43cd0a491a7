"""`prompt_jax.api`: docs/python.md's code blocks run as written, and the API's own checks."""

from __future__ import annotations

import contextlib
import io
import json
import os
import re

import numpy as np
import pytest

from prompt_jax import api
from prompt_jax import params as params_lib
from prompt_jax.interop import hf
from prompt_jax.models import t5
from prompt_jax.prompts import base, plain
from tests.conftest import REPO_ROOT, shared_fixture

DOC = REPO_ROOT / "docs" / "python.md"


def python_blocks(path) -> list[str]:
  """The ```python blocks of a markdown file, in order (```text blocks are not run)."""
  return re.findall(r"```python\n(.*?)```", path.read_text(), re.S)


def test_docs_python_md_runs_as_written_and_the_prompt_learns(monkeypatch):
  monkeypatch.chdir(REPO_ROOT)  # the doc's paths are the checkout's examples/
  namespace: dict = {}
  printed = io.StringIO()
  for block in python_blocks(DOC):
    with contextlib.redirect_stdout(printed):
      exec(compile(block, str(DOC), "exec"), namespace)  # noqa: S102
  tuned = namespace["tuned"]
  summary = tuned.summary
  # What the doc claims in prose: about a third before, all of the dev file after training.
  assert summary["eval_untrained"]["accuracy"] < 60, summary
  assert summary["eval_trained"]["accuracy"] >= 95, summary
  assert tuned.predict(["the soup was bland", "this film was superb"]) == ["negative",
                                                                         "positive"]
  # evaluate() rescores the validation file with the final prompt: the loop's own final score.
  assert tuned.evaluate()["accuracy"] == pytest.approx(summary["eval_trained"]["accuracy"])
  assert namespace["scores"].shape == (2,)
  exported = np.load(os.path.join(namespace["out"], "prompt.npy"))
  np.testing.assert_array_equal(exported, tuned.prompt_array())
  with open(os.path.join(namespace["out"], "adapter", "adapter_config.json")) as f:
    assert json.load(f)["num_virtual_tokens"] == 10
  assert os.path.exists(os.path.join(namespace["out"], "run", "run.json"))
  # The list of pairs and the module method trained through the same loop, into their own runs.
  for name in ("tuned_on_list", "tuned_own"):
    other = namespace[name]
    assert other.model_dir != tuned.model_dir and os.path.exists(
        os.path.join(other.model_dir, "run.json"))
  assert isinstance(namespace["tuned_own"].programs.model.module.prompt, base.InputPrompt)


def test_score_is_the_sum_of_target_token_log_probabilities():
  """Independent computation: the model's logits under teacher forcing, log-softmaxed in NumPy
  and summed over the target tokens (EOS included)."""
  frozen = api.load_frozen("builtin:demo_t5_tiny.npz")
  tuned = frozen.tune([("the soup was bland", "negative")] * 8, prompt_length=4, steps=1,
                      batch_size=8)
  inputs, targets = ["the soup was bland", "this film was superb"], ["negative", "fun"]
  scores = tuned.score(inputs, targets)
  vocabulary = frozen.seqio_vocabulary
  programs = tuned.programs
  merged = params_lib.merge_params(tuned.prompt_params, tuned.frozen_params)
  for text, target, score in zip(inputs, targets, scores):
    tokens = np.zeros((1, tuned.input_length), np.int32)
    ids = list(vocabulary.encode(text)) + [1]
    tokens[0, :len(ids)] = ids
    target_ids = list(vocabulary.encode(target)) + [1]
    decoder_targets = np.zeros((1, tuned.target_length), np.int32)
    decoder_targets[0, :len(target_ids)] = target_ids
    decoder_inputs = np.pad(decoder_targets[:, :-1], ((0, 0), (1, 0)))
    logits = programs.model.module.apply({"params": merged}, tokens, decoder_inputs,
                                         decoder_targets, enable_dropout=False)
    logits = np.asarray(logits, np.float64)[0]
    log_probs = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1,
                                keepdims=True)) - logits.max(-1, keepdims=True)
    expected = sum(log_probs[i, t] for i, t in enumerate(target_ids))
    # float32 logits summed over a few tokens: rounding well below 1e-4.
    assert score == pytest.approx(expected, abs=1e-4)


def test_a_bare_generator_is_wrapped_and_a_wrong_object_is_named():
  generator = plain.Prompt(length=3)
  hook = api.prompt_hook(generator, 100)
  assert isinstance(hook, base.InputPrompt) and hook.prompt is generator
  ready = base.InputPrompt(prompt=plain.Prompt(length=3))
  assert api.prompt_hook(ready, 100) is ready
  with pytest.raises(ValueError, match=r"unknown prompt method 'plian'; known: plain, "):
    api.prompt_hook("plian", 10)
  with pytest.raises(ValueError, match=r"must be a name .* got 3"):
    api.prompt_hook(3, 10)


def test_load_frozen_names_what_it_cannot_tell():
  frozen = api.load_frozen("builtin:demo_t5_tiny.npz")
  assert frozen.config == t5.preset("tiny") and frozen.vocabulary == "byte"
  with pytest.raises(ValueError, match=r"give preset= or config=, not both"):
    api.load_frozen(None, preset="tiny", config=t5.preset("tiny"))
  with pytest.raises(ValueError, match=r"cannot tell the architecture of None"):
    api.load_frozen(None)


def test_readme_from_python_block_is_the_tested_one():
  """README's "From Python" block is docs/python.md's first block, which the test above runs."""
  readme = (REPO_ROOT / "README.md").read_text().split("## From Python", 1)[1]
  block = re.search(r"```python\n(.*?)```", readme, re.S).group(1)
  assert block == python_blocks(DOC)[0]


def test_a_hugging_face_directory_brings_its_architecture(tmp_path):
  fixture = shared_fixture("hf_t5_tiny_v1_1")
  frozen = api.load_frozen(str(fixture))
  config, _ = hf.load_t5(str(fixture))
  assert frozen.config == config and frozen.checkpoint == str(fixture)
  # The fixture ships no spiece.model: T5's SentencePiece model is the default vocabulary.
  assert frozen.vocabulary == "t5"
