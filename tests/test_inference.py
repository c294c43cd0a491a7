"""`prompt-jax infer`: JSONL in, JSONL with predictions out; the same predictions as decoding
in-process; task splits on mock GLUE data; truncation is logged."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys

import gin
import numpy as np
import pytest
import seqio

import prompt_jax.tasks  # noqa: F401  (registers the GLUE tasks)
from prompt_jax.models import decoding, t5
from prompt_jax.models.encoder_decoder import EncoderDecoderModel
from prompt_jax.prompts import initializers
from prompt_jax.prompts.base import InputPrompt
from prompt_jax.prompts.plain import Prompt
from prompt_jax.serving import inference, loading
from tests.conftest import GIN_CONFIGS, REPO_ROOT
from tests.test_tasks_glue import mock_glue

DEMO_CHECKPOINT = "builtin:demo_t5_tiny.npz"
PROMPT_LENGTH = 4


def _model():
  return EncoderDecoderModel(t5.Transformer(
      t5.preset("tiny"), InputPrompt(Prompt(PROMPT_LENGTH, initializers.uniform()))))


@pytest.fixture(scope="module")
def prompt_file(tmp_path_factory):
  path = tmp_path_factory.mktemp("prompt") / "prompt_7.npy"
  np.save(path, np.random.default_rng(0).uniform(-0.5, 0.5, (PROMPT_LENGTH, 64)))
  return str(path)


def test_encode_inputs_truncates_with_a_logged_count(caplog):
  vocab = seqio.ByteVocabulary()
  with caplog.at_level(logging.WARNING, logger="prompt_jax.serving.inference"):
    tokens = inference.encode_inputs(["ab", "abcdefgh"], vocab, 5)
  np.testing.assert_array_equal(tokens, [[100, 101, 1, 0, 0], [100, 101, 102, 103, 1]])
  assert "1 of 2 inputs are longer than 5 tokens" in caplog.text


def test_read_jsonl_names_the_bad_line(tmp_path):
  path = tmp_path / "in.jsonl"
  path.write_text('{"inputs": "fine"}\n\n{"text": "no inputs"}\n')
  with pytest.raises(ValueError, match=r"in.jsonl:3: expected a JSON object"):
    inference.read_jsonl(str(path))


def test_cli_infer_writes_the_in_process_predictions(tmp_path, prompt_file):
  inputs = tmp_path / "in.jsonl"
  texts = ["sentiment: the soup was awful", "topic: this film was truly wonderful", "x" * 80]
  inputs.write_text("".join(json.dumps({"inputs": t, "id": i}) + "\n"
                            for i, t in enumerate(texts)))
  output = tmp_path / "out" / "predictions.jsonl"
  env = dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="3")
  result = subprocess.run(
      [sys.executable, "-m", "prompt_jax.cli", "infer", "--gin_file=models/t5_1_1_tiny.gin",
       "--gin_file=prompts/uniform.gin", "--gin_file=runs/infer.gin",
       f"--gin.PROMPT_LENGTH={PROMPT_LENGTH}", f"--gin.PROMPT_PATH='{prompt_file}'",
       f"--gin.INITIAL_CHECKPOINT_PATH='{DEMO_CHECKPOINT}'", f"--gin.INPUTS_PATH='{inputs}'",
       f"--gin.OUTPUT_PATH='{output}'", "--gin.INPUT_LENGTH=64", "--gin.MAX_DECODE_LENGTH=12",
       "--gin.INFER_BATCH_SIZE=2"],
      cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-2000:]
  assert "wrote 3 predictions (prompt at step 7)" in result.stdout
  lines = [json.loads(line) for line in output.read_text().splitlines()]
  assert [(r["id"], r["inputs"]) for r in lines] == list(enumerate(texts))

  pt, frozen = loading.build_programs(_model(), DEMO_CHECKPOINT)
  prompt = loading.prompt_params_from_array(pt, np.load(prompt_file))
  expected = inference.predict_texts(pt, prompt, frozen, texts, seqio.ByteVocabulary(), 64, 12,
                                     batch_size=2)
  assert [r["prediction"] for r in lines] == expected
  # The shipped model was pretrained on "sentiment: ..." inputs.
  assert expected[0] == "negative"


def _beam_inputs(tmp_path):
  texts = ["sentiment: the soup was awful", "topic: this film was truly wonderful",
           "adjective: the rice was bland"]
  inputs = tmp_path / "in.jsonl"
  inputs.write_text("".join(json.dumps({"inputs": t, "id": i}) + "\n"
                            for i, t in enumerate(texts)))
  return texts, inputs


def test_infer_writes_the_n_best_beams_with_their_scores(tmp_path, prompt_file):
  """3 beams, alpha 0: `prediction` is the best, `predictions`/`scores` all three best first,
  and each score is the teacher-forced log-likelihood of its text (`programs.score`)."""
  texts, inputs = _beam_inputs(tmp_path)
  output = tmp_path / "beams.jsonl"
  vocab = seqio.ByteVocabulary()
  inference.infer(model=_model(), output_path=str(output), inputs_path=str(inputs),
                  vocabulary=vocab, initial_checkpoint_path=DEMO_CHECKPOINT,
                  prompt_path=prompt_file, input_length=64, max_decode_length=12, batch_size=2,
                  decoding=decoding.BeamSearch(num_decodes=3, alpha=0.0),
                  return_all_decodes=True)
  lines = [json.loads(line) for line in output.read_text().splitlines()]
  assert [r["id"] for r in lines] == [0, 1, 2]
  pt, frozen = loading.build_programs(_model(), DEMO_CHECKPOINT)
  prompt = loading.prompt_params_from_array(pt, np.load(prompt_file))
  for line, text in zip(lines, texts):
    assert set(line) == {"inputs", "id", "prediction", "predictions", "scores"}
    assert line["prediction"] == line["predictions"][0] and len(line["predictions"]) == 3
    assert line["scores"] == sorted(line["scores"], reverse=True)
    targets = np.zeros((3, 12), np.int32)
    for j, prediction in enumerate(line["predictions"]):
      ids = list(vocab.encode(prediction))
      ids += [1] if len(ids) < 12 else []  # EOS, unless the beam filled all 12 positions
      targets[j, :len(ids)] = ids
    batch = {"encoder_input_tokens": inference.encode_inputs([text] * 3, vocab, 64),
             "decoder_target_tokens": targets,
             "decoder_input_tokens": np.pad(targets[:, :-1], ((0, 0), (1, 0))),
             "decoder_loss_weights": (targets > 0).astype(np.int32)}
    np.testing.assert_allclose(pt.score(prompt, frozen, batch), line["scores"], atol=1e-4)


def test_cli_infer_decodes_with_the_gin_decode_fn(tmp_path, prompt_file):
  """--gin.DECODE_FN / decoding.BeamSearch.* / RETURN_ALL_DECODES reach `inference.infer`: the
  file holds the in-process beams."""
  texts, inputs = _beam_inputs(tmp_path)
  output = tmp_path / "beams.jsonl"
  env = dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="3")
  result = subprocess.run(
      [sys.executable, "-m", "prompt_jax.cli", "infer", "--gin_file=models/t5_1_1_tiny.gin",
       "--gin_file=prompts/uniform.gin", "--gin_file=runs/infer.gin",
       f"--gin.PROMPT_LENGTH={PROMPT_LENGTH}", f"--gin.PROMPT_PATH='{prompt_file}'",
       f"--gin.INITIAL_CHECKPOINT_PATH='{DEMO_CHECKPOINT}'", f"--gin.INPUTS_PATH='{inputs}'",
       f"--gin.OUTPUT_PATH='{output}'", "--gin.INPUT_LENGTH=64", "--gin.MAX_DECODE_LENGTH=12",
       "--gin.INFER_BATCH_SIZE=2", "--gin.DECODE_FN=@decoding.BeamSearch()",
       "--gin.decoding.BeamSearch.num_decodes=2", "--gin.decoding.BeamSearch.alpha=0.0",
       "--gin.RETURN_ALL_DECODES=True"],
      cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-2000:]
  lines = [json.loads(line) for line in output.read_text().splitlines()]
  pt, frozen = loading.build_programs(_model(), DEMO_CHECKPOINT)
  prompt = loading.prompt_params_from_array(pt, np.load(prompt_file))
  expected = inference.predict_decodes(pt, prompt, frozen, texts, seqio.ByteVocabulary(), 64, 12,
                                       batch_size=2, decoding=decoding.BeamSearch(2, 0.0))
  assert [r["predictions"] for r in lines] == [[t for t, _ in d] for d in expected]
  np.testing.assert_allclose([r["scores"] for r in lines], [[s for _, s in d] for d in expected],
                             atol=1e-5)
  assert [r["prediction"] for r in lines] == [d[0][0] for d in expected]


def test_infer_on_a_mock_glue_split(tmp_path, prompt_file):
  output = tmp_path / "sst2.jsonl"
  with mock_glue(5):
    result = inference.infer(model=_model(), output_path=str(output),
                             initial_checkpoint_path=DEMO_CHECKPOINT,
                             task="taskless_glue_sst2_v002_bytes", split="validation",
                             input_length=64, max_decode_length=12, batch_size=4,
                             prompt_path=prompt_file)
  lines = [json.loads(line) for line in output.read_text().splitlines()]
  assert result["count"] == len(lines) == 5
  for line in lines:
    assert set(line) == {"inputs", "targets", "prediction"}
    assert line["inputs"].startswith("sentence: ")
    assert line["targets"] in ("negative", "positive")


def test_infer_needs_exactly_one_source():
  with pytest.raises(ValueError, match="exactly one of INPUTS_PATH"):
    inference.infer(model=_model(), output_path="/tmp/unused.jsonl")


def test_eval_gin_configures_run_evaluation():
  gin.clear_config()
  try:
    gin.add_config_file_search_path(str(GIN_CONFIGS))
    gin.parse_config_files_and_bindings(
        [str(GIN_CONFIGS / f) for f in ("models/t5_1_1_tiny.gin", "prompts/uniform.gin",
                                        "runs/eval.gin")],
        ["MIXTURE_OR_TASK_NAME = 'taskless_glue_rte_v002_rank'", "MODEL_DIR = '/tmp/run'"],
        finalize_config=False)
    assert gin.query_parameter("%MODEL_DIR") == "/tmp/run"
    cfg = gin.get_configurable("eval/prompt_jax.data.pipeline.DatasetConfig")()
    assert cfg.mixture_or_task_name == "taskless_glue_rte_v002_rank"
    assert cfg.split == "validation" and not cfg.shuffle and cfg.module == "prompt_jax.tasks"
  finally:
    gin.clear_config()
