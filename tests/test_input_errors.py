"""Bad input gives one line naming the bad value, file or line, raised where the value enters
(issue 15): a table of bad inputs driven through `prompt-jax` (train, eval, infer,
infer-multitask, convert, export-prompt), and unit tests of the validators.

Every CLI case fails before anything is compiled; directories the run may touch (MODEL_DIR, the
inputs file, a convert destination) are byte-identical afterwards.
"""

from __future__ import annotations

import json
import logging
import os

import numpy as np
import pytest
import seqio
from safetensors.numpy import save_file

from prompt_jax.data import pipeline
from prompt_jax.interop import hf, peft, t5x
from prompt_jax.prompts import base
from prompt_jax.prompts.plain import Prompt
from prompt_jax.serving import inference, multitask_inference
from prompt_jax.storage import checkpoints, frozen_models, prompt_files
from prompt_jax.tools import convert
from tests.cli_harness import DEMO_GIN, assert_one_line_error, run_cli, snapshot
from tests.conftest import GIN_CONFIGS

DEMO_CHECKPOINT = "builtin:demo_t5_tiny.npz"
EMB = 64  # the demo model's emb_dim
SYNTHETIC = "prompt_jax.data.synthetic"


# ------------------------------------------------------------------------------- bad files


@pytest.fixture(scope="module")
def files(tmp_path_factory):
  """Paths of good and bad inputs, by name (all under one temporary directory)."""
  root = tmp_path_factory.mktemp("bad_inputs")
  rng = np.random.default_rng(0)
  paths = {"root": str(root)}

  def path(name):
    paths[name] = str(root / name)
    return root / name

  demo = open(frozen_models.resolve_path(DEMO_CHECKPOINT), "rb").read()
  path("truncated.npz").write_bytes(demo[:len(demo) // 2])
  path("random.npz").write_bytes(rng.bytes(4096))
  path("empty_dir").mkdir()
  path("junk_dir").mkdir()
  (root / "junk_dir" / "notes.txt").write_text("not a checkpoint\n")
  paths["missing"] = str(root / "no" / "such" / "model.npz")

  hf_bad = path("hf_bad_config")
  hf_bad.mkdir()
  (hf_bad / "config.json").write_text('{"model_type": "t5",\n  "d_model": 64,,\n}\n')
  save_file({"shared.weight": np.ones((4, 4), np.float32)}, str(hf_bad / "model.safetensors"))
  hf_cut = path("hf_truncated")
  hf_cut.mkdir()
  (hf_cut / "config.json").write_text(json.dumps({"model_type": "t5"}))
  save_file({"shared.weight": np.ones((64, 64), np.float32)}, str(hf_cut / "model.safetensors"))
  weights = (hf_cut / "model.safetensors").read_bytes()
  (hf_cut / "model.safetensors").write_bytes(weights[:len(weights) // 3])

  def prompt(name, array):
    np.save(path(name), array)

  good = rng.uniform(-0.5, 0.5, (4, EMB)).astype(np.float32)
  prompt("good.npy", good)
  prompt("good10.npy", rng.uniform(-0.5, 0.5, (10, EMB)).astype(np.float32))
  nan = rng.uniform(-0.5, 0.5, (10, EMB)).astype(np.float32)
  nan[3, 7] = np.nan
  nan[5, 0] = np.inf
  prompt("nan.npy", nan)
  prompt("int.npy", np.ones((10, EMB), np.int32))
  inf4 = good.copy()
  inf4[1, 2] = -np.inf
  prompt("inf4.npy", inf4)
  prompt("long.npy", np.zeros((9000, EMB), np.float32))
  path("text.npy").write_text("0.1 0.2 0.3\n")
  peft_bad = path("peft_bad")
  peft_bad.mkdir()
  (peft_bad / "adapter_config.json").write_text("{\"peft_type\": \"PROMPT_TUNING\"\n")
  save_file({"prompt_embeddings": good}, str(peft_bad / "adapter_model.safetensors"))

  def jsonl(name, data: bytes):
    path(name).write_bytes(data)

  ok = json.dumps({"inputs": "sentiment: a fine film"}) + "\n"
  jsonl("in.jsonl", ok.encode() * 2)
  jsonl("malformed.jsonl", (ok + "\n" + '{"inputs": "unterminated\n').encode())
  jsonl("latin1.jsonl", ok.encode() + '{"inputs": "caf\xe9"}\n'.encode("latin-1"))
  jsonl("no_inputs.jsonl", (ok + ok + json.dumps({"text": "x"}) + "\n").encode())
  multi = json.dumps({"task": "sentiment", "inputs": "a fine film"}) + "\n"
  jsonl("multi.jsonl", (multi + "\n" + json.dumps({"inputs": "no task"}) + "\n").encode())
  jsonl("multi_ok.jsonl", multi.encode())
  os.symlink(paths["in.jsonl"], path("link.jsonl"))

  existing = path("existing_peft")
  existing.mkdir()
  (existing / "keep.txt").write_text("precious\n")
  prompt("existing.npy", good)
  paths["new_out"] = str(root / "outputs" / "new")
  return paths


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, files):
  """A training run directory with one saved (tiny) checkpoint that records a truncated frozen
  checkpoint, for export-prompt."""
  root = tmp_path_factory.mktemp("run")
  manager = checkpoints.PromptCheckpointManager(str(root), 1)
  prompt = np.zeros((10, EMB), np.float32)
  state = {"step": np.asarray(5, np.int32),
           "prompt_params": {"encoder": {"prompt": {"prompt": {"prompt": prompt}}}}}
  manager.save(5, state, {"initial_checkpoint_path": files["truncated.npz"]}, force=True)
  manager.close()
  return str(root)


# --------------------------------------------------------------------------- the CLI table


def _train(*bindings):
  return ["train", f"--gin_file={DEMO_GIN}", "--gin.MODEL_DIR='{model_dir}'",
          "--gin.TRAIN_STEPS=2", "--gin.EVAL_PERIOD=0", *bindings]


def _train_from_file(prompt_file):
  return ["train", f"--gin_file={GIN_CONFIGS}/models/t5_1_1_tiny.gin",
          f"--gin_file={GIN_CONFIGS}/prompts/from_file.gin",
          f"--gin_file={GIN_CONFIGS}/runs/prompt_finetune.gin",
          f"--gin.PROMPT_FILE='{prompt_file}'", "--gin.PROMPT_LENGTH=10",
          "--gin.MODEL_DIR='{model_dir}'", "--gin.MIXTURE_OR_TASK_NAME='demo_sentiment'",
          f"--gin.TASK_MODULE='{SYNTHETIC}'",
          "--gin.TASK_FEATURE_LENGTHS={{'inputs': 64, 'targets': 16}}",
          f"--gin.INITIAL_CHECKPOINT_PATH='{DEMO_CHECKPOINT}'"]


def _eval(*bindings):
  return ["eval", f"--gin_file={GIN_CONFIGS}/models/t5_1_1_tiny.gin",
          f"--gin_file={GIN_CONFIGS}/prompts/uniform.gin",
          f"--gin_file={GIN_CONFIGS}/runs/eval.gin", "--gin.PROMPT_LENGTH=4",
          "--gin.MODEL_DIR='{model_dir}'", "--gin.MIXTURE_OR_TASK_NAME='demo_sentiment'",
          f"--gin.TASK_MODULE='{SYNTHETIC}'",
          "--gin.TASK_FEATURE_LENGTHS={{'inputs': 64, 'targets': 16}}", *bindings]


def _infer(inputs="{in.jsonl}", output="{new_out}.jsonl", prompt="{good.npy}", *bindings):
  return ["infer", f"--gin_file={GIN_CONFIGS}/models/t5_1_1_tiny.gin",
          f"--gin_file={GIN_CONFIGS}/prompts/uniform.gin",
          f"--gin_file={GIN_CONFIGS}/runs/infer.gin", "--gin.PROMPT_LENGTH=4",
          f"--gin.PROMPT_PATH='{prompt}'", f"--gin.INITIAL_CHECKPOINT_PATH='{DEMO_CHECKPOINT}'",
          f"--gin.INPUTS_PATH='{inputs}'", f"--gin.OUTPUT_PATH='{output}'",
          "--gin.INPUT_LENGTH=64", "--gin.MAX_DECODE_LENGTH=8", *bindings]


def _multitask(inputs="{multi_ok.jsonl}", output="{new_out}.jsonl", prompt="{good.npy}",
               checkpoint=DEMO_CHECKPOINT, *flags):
  return ["infer-multitask", f"--inputs={inputs}", f"--output={output}",
          f"--prompt=sentiment={prompt}", f"--checkpoint={checkpoint}", "--model=tiny",
          "--input_length=48", "--max_decode_length=8", *flags]


def _ckpt(key):
  return f"--gin.INITIAL_CHECKPOINT_PATH='{{{key}}}'"


# (id, argv with {placeholders}, substrings of the error line, watched path placeholder)
CASES = [
    # INITIAL_CHECKPOINT_PATH
    ("train-truncated-npz", _train(_ckpt("truncated.npz")), ["{truncated.npz}", "truncated"],
     "{model_dir}"),
    ("train-random-bytes-npz", _train(_ckpt("random.npz")), ["{random.npz}", "not a .npz"],
     "{model_dir}"),
    ("train-missing-checkpoint", _train(_ckpt("missing")), ["{missing}", "does not exist"],
     "{model_dir}"),
    ("train-empty-checkpoint-dir", _train(_ckpt("empty_dir")), ["{empty_dir}", "empty"],
     "{model_dir}"),
    ("train-junk-checkpoint-dir", _train(_ckpt("junk_dir")), ["{junk_dir}", "notes.txt"],
     "{model_dir}"),
    ("train-hf-corrupt-config", _train(_ckpt("hf_bad_config")),
     ["{hf_bad_config}/config.json:2", "not valid JSON"], "{model_dir}"),
    ("train-hf-truncated-safetensors", _train(_ckpt("hf_truncated")),
     ["{hf_truncated}/model.safetensors", "truncated"], "{model_dir}"),
    ("eval-random-bytes-npz", _eval(_ckpt("random.npz")), ["{random.npz}"], "{model_dir}"),
    # PROMPT_LENGTH and the encoder budget
    ("train-prompt-length-100000", _train("--gin.PROMPT_LENGTH=100000"),
     ["prompt length 100000", "inputs length 64", "max_encoder_length=8192"], "{model_dir}"),
    ("eval-prompt-length-100000", _eval("--gin.PROMPT_LENGTH=100000"),
     ["prompt length 100000", "max_encoder_length=8192"], "{model_dir}"),
    ("train-prompt-length-fraction", _train("--gin.PROMPT_LENGTH=2.5"),
     ["PROMPT_LENGTH", "2.5"], "{model_dir}"),
    ("train-prompt-length-zero", _train("--gin.PROMPT_LENGTH=0"), ["PROMPT_LENGTH", "got 0"],
     "{model_dir}"),
    # prompt files
    ("train-prompt-file-nan", _train_from_file("{nan.npy}"),
     ["{nan.npy}", "2 non-finite values", "[3, 7]"], "{model_dir}"),
    ("train-prompt-file-int", _train_from_file("{int.npy}"), ["{int.npy}", "int32"],
     "{model_dir}"),
    ("train-prompt-file-not-npy", _train_from_file("{text.npy}"), ["{text.npy}", "not a .npy"],
     "{model_dir}"),
    ("train-prompt-file-wrong-length", _train_from_file("{good.npy}"),
     ["{good.npy}", "has shape (4, 64), expected (10, 64)"], "{model_dir}"),
    # tasks
    ("train-unknown-task-far", _train("--gin.MIXTURE_OR_TASK_NAME='qqqqqqqq'"),
     ["'qqqqqqqq'", "closest: "], "{model_dir}"),
    ("train-missing-task-module", _train("--gin.TASK_MODULE='no_such_tasks_module'"),
     ["TASK_MODULE 'no_such_tasks_module'"], "{model_dir}"),
    # infer JSONL inputs and outputs
    ("infer-malformed-json", _infer("{malformed.jsonl}"), ["{malformed.jsonl}:3:", "JSON"],
     "{malformed.jsonl}"),
    ("infer-not-utf8", _infer("{latin1.jsonl}"), ["{latin1.jsonl}:2:", "UTF-8"],
     "{latin1.jsonl}"),
    ("infer-missing-inputs-key", _infer("{no_inputs.jsonl}"), ["{no_inputs.jsonl}:3:", "'inputs'"],
     "{no_inputs.jsonl}"),
    ("infer-output-is-input", _infer("{in.jsonl}", "{in.jsonl}"),
     ["OUTPUT_PATH '{in.jsonl}'", "overwrite"], "{in.jsonl}"),
    ("infer-output-symlink-to-input", _infer("{in.jsonl}", "{link.jsonl}"),
     ["{link.jsonl}", "overwrite"], "{in.jsonl}"),
    ("infer-output-relative-path-to-input", _infer("{in.jsonl}", "{in.jsonl@relative}"),
     ["{in.jsonl@relative}", "overwrite"], "{in.jsonl}"),
    ("infer-prompt-nan", _infer("{in.jsonl}", "{new_out}.jsonl", "{nan.npy}"),
     ["{nan.npy}", "non-finite"], "{in.jsonl}"),
    ("infer-vocabulary-larger-than-model",
     _infer("{in.jsonl}", "{new_out}.jsonl", "{good.npy}", "--gin.t5.T5Config.vocab_size=128"),
     ["259 ids", "128 rows"], "{in.jsonl}"),
    ("infer-unknown-task",
     _infer("{in.jsonl}", "{new_out}.jsonl", "{good.npy}", "--gin.INPUTS_PATH=None",
            "--gin.MIXTURE_OR_TASK_NAME='demo_sentimen'", f"--gin.TASK_MODULE='{SYNTHETIC}'"),
     ["'demo_sentimen'", "closest: demo_sentiment"], "{in.jsonl}"),
    # multi-task serving
    ("multitask-output-is-input", _multitask("{multi_ok.jsonl}", "{multi_ok.jsonl}"),
     ["--output '{multi_ok.jsonl}'", "overwrite"], "{multi_ok.jsonl}"),
    ("multitask-missing-task-key", _multitask("{multi.jsonl}"),
     ["{multi.jsonl}: line 3", "'task'"], "{multi.jsonl}"),
    ("multitask-prompt-inf", _multitask(prompt="{inf4.npy}"),
     ["{inf4.npy}", "1 non-finite value", "[1, 2]"], "{multi_ok.jsonl}"),
    ("multitask-peft-corrupt-config", _multitask(prompt="{peft_bad}"),
     ["{peft_bad}/adapter_config.json", "JSON"], "{multi_ok.jsonl}"),
    ("multitask-prompt-over-budget", _multitask(prompt="{long.npy}"),
     ["{long.npy}", "prompt length 9000", "inputs length 48", "8192"], "{multi_ok.jsonl}"),
    ("multitask-truncated-checkpoint", _multitask(checkpoint="{truncated.npz}"),
     ["{truncated.npz}"], "{multi_ok.jsonl}"),
    # convert
    ("convert-prompt-into-existing-dir",
     ["convert", "prompt", "{good.npy}", "{existing_peft}", "--to", "peft"],
     ["{existing_peft}", "already exists"], "{existing_peft}"),
    ("convert-prompt-onto-existing-npy", ["convert", "prompt", "{good.npy}", "{existing.npy}"],
     ["{existing.npy}", "already exists"], "{existing.npy}"),
    ("convert-prompt-nan-source", ["convert", "prompt", "{nan.npy}", "{new_out}.npy"],
     ["{nan.npy}", "non-finite"], "{new_out}.npy"),
    ("convert-prompt-not-npy-source", ["convert", "prompt", "{text.npy}", "{new_out}.npy"],
     ["{text.npy}", "not a .npy"], "{new_out}.npy"),
    ("convert-prompt-peft-corrupt-config", ["convert", "prompt", "{peft_bad}", "{new_out}.npy"],
     ["{peft_bad}/adapter_config.json:2", "not valid JSON"], "{new_out}.npy"),
    ("convert-hf-corrupt-config", ["convert", "hf-to-orbax", "{hf_bad_config}", "{new_out}"],
     ["{hf_bad_config}/config.json:2"], "{new_out}"),
    ("convert-hf-truncated-safetensors",
     ["convert", "hf-to-orbax", "{hf_truncated}", "{new_out}"],
     ["{hf_truncated}/model.safetensors"], "{new_out}"),
    # pretrain: an existing model file is never replaced unasked; the output is named
    ("pretrain-onto-existing-output",
     ["pretrain", f"--gin_file={GIN_CONFIGS}/runs/pretrain_demo.gin",
      "--gin.OUTPUT_PATH='{truncated.npz}'"],
     ["{truncated.npz}", "exists", "overwrite=True"], "{truncated.npz}"),
    ("pretrain-without-model-dir-or-output",
     ["pretrain", f"--gin_file={GIN_CONFIGS}/runs/pretrain_demo.gin"],
     ["MODEL_DIR", "OUTPUT_PATH"], "{model_dir}"),
    # export-prompt
    ("export-prompt-truncated-frozen-checkpoint",
     ["export-prompt", f"--gin_file={GIN_CONFIGS}/models/t5_1_1_tiny.gin",
      f"--gin_file={GIN_CONFIGS}/prompts/uniform.gin", "--gin.PROMPT_LENGTH=10",
      "--model_dir={run_dir}"], ["{truncated.npz}"], "{run_dir}"),
    ("export-prompt-missing-frozen-checkpoint",
     ["export-prompt", f"--gin_file={GIN_CONFIGS}/models/t5_1_1_tiny.gin",
      f"--gin_file={GIN_CONFIGS}/prompts/uniform.gin", "--gin.PROMPT_LENGTH=10",
      "--model_dir={run_dir}", "--initial_checkpoint_path={missing}"],
     ["{missing}", "does not exist"], "{run_dir}"),
]


def _fill(text: str, values: dict) -> str:
  for key, value in values.items():
    text = text.replace("{" + key + "}", value)
  return text.replace("{{", "{").replace("}}", "}")


@pytest.mark.parametrize("argv,names,watched", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_is_one_line(argv, names, watched, files, run_dir, tmp_path, capsys):
  model_dir = tmp_path / "model_dir"
  model_dir.mkdir()
  (model_dir / "marker.txt").write_text("untouched\n")
  values = dict(files, model_dir=str(model_dir), run_dir=run_dir)
  values["in.jsonl@relative"] = os.path.relpath(files["in.jsonl"])
  # Longest keys first, so that '{in.jsonl@relative}' is not read as '{in.jsonl}' + suffix.
  values = dict(sorted(values.items(), key=lambda kv: -len(kv[0])))
  argv = [_fill(a, values) for a in argv]
  watched = _fill(watched, values)
  before = snapshot(watched)
  result = run_cli(argv, capsys)
  assert_one_line_error(result, [_fill(n, values) for n in names], watched=watched,
                        before=before)


def test_the_table_is_large_enough():
  assert len(CASES) >= 22


# --------------------------------------------------------------------- prompt array checks


@pytest.mark.parametrize("array,message", [
    (np.ones((4, 8), np.int64), r"'p\.npy' has dtype int64; a prompt must be floating point"),
    (np.ones((4, 8), bool), r"has dtype bool"),
    (np.ones((4, 8), np.complex64), r"has dtype complex64"),
    (np.ones((4,), np.float32), r"must hold \[length, embed\], got shape \(4,\)"),
    (np.ones((2, 4, 8), np.float32), r"must hold \[length, embed\], got shape \(2, 4, 8\)"),
    (np.ones((0, 8), np.float32), r"has shape \(0, 8\): a prompt needs at least one token"),
    ([[1.0, 2.0]], r"holds a list, not a \.npy array"),
])
def test_check_prompt_array_refuses(array, message):
  with pytest.raises(ValueError, match=message):
    prompt_files.check_prompt_array(array, "p.npy")


def test_check_prompt_array_counts_non_finite_values_and_names_the_first():
  array = np.zeros((5, 8), np.float32)
  array[2, 3], array[4, 0], array[4, 1] = np.nan, np.inf, -np.inf
  with pytest.raises(ValueError, match=r"'p\.npy' has 3 non-finite values \(NaN or inf\); the "
                                       r"first is nan at index \[2, 3\]"):
    prompt_files.check_prompt_array(array, "p.npy")


def test_check_prompt_array_shapes_and_result():
  with pytest.raises(ValueError, match=r"prompt file 'p\.npy' has shape \(7, 32\), expected "
                                       r"\(7, 64\) \(prompt length, model emb_dim\)"):
    prompt_files.check_prompt_array(np.zeros((7, 32), np.float32), "p.npy", (7, 64))
  with pytest.raises(ValueError, match=r"expected \(2, 7, 32\) \(number of prompts"):
    prompt_files.check_prompt_array(np.zeros((7, 32), np.float32), "p.npy", (2, 7, 32))
  out = prompt_files.check_prompt_array(np.ones((3, 4), np.float64), "p.npy", (3, 4))
  assert out.dtype == np.float32 and out.shape == (3, 4)
  bank = prompt_files.check_prompt_array(np.ones((2, 3, 4), np.float16), "b.npy", allow_bank=True)
  assert bank.dtype == np.float32


def test_read_prompt_names_the_file(tmp_path):
  np.save(tmp_path / "ok.npy", np.ones((3, 4), np.float32))
  raw = (tmp_path / "ok.npy").read_bytes()
  (tmp_path / "cut.npy").write_bytes(raw[:len(raw) - 20])
  (tmp_path / "text.npy").write_text("hello\n")
  np.savez(tmp_path / "arch.npz", a=np.ones(3))
  cases = {"cut.npy": "not a readable .npy array", "text.npy": "not a .npy file",
           "arch.npz": "is a .npz archive"}
  for name, message in cases.items():
    with pytest.raises(ValueError, match=message) as info:
      prompt_files.read_prompt(str(tmp_path / name))
    assert str(tmp_path / name) in str(info.value)
  with pytest.raises(FileNotFoundError, match="does not exist"):
    prompt_files.read_prompt(str(tmp_path / "none.npy"))
  with pytest.raises(ValueError, match="is a directory"):
    prompt_files.read_prompt(str(tmp_path))


def test_from_array_keeps_the_shape_message(tmp_path):
  np.save(tmp_path / "p.npy", np.zeros((7, 32), np.float32))
  init = prompt_files.from_array(str(tmp_path / "p.npy"))
  with pytest.raises(ValueError, match=r"has shape \(7, 32\), expected \(7, 64\) \(prompt "
                                       r"length, model emb_dim\)"):
    init(None, (7, 64), None)


# ------------------------------------------------------------------ prompt length and budget


@pytest.mark.parametrize("length", [0, -3, 2.5, True, "10", None])
def test_prompt_length_must_be_a_positive_integer(length):
  with pytest.raises(ValueError, match=r"PROMPT_LENGTH \(Prompt.length\) must be an integer >= 1"):
    Prompt(length)


def test_encoder_budget_names_the_numbers():
  base.check_encoder_length(8000, 192)
  with pytest.raises(ValueError, match=r"prompt length 100000 \+ inputs length 512 = 100512 "
                                       r"encoder tokens exceed the budget "
                                       r"max_encoder_length=8192"):
    base.check_encoder_length(100000, 512)
  base.check_encoder_length(100000, 512, max_encoder_length=200000)
  with pytest.raises(ValueError, match="max_encoder_length must be an integer >= 1, got 0"):
    base.InputPrompt(Prompt(4), max_encoder_length=0)


def test_encoder_budget_is_checked_before_anything_is_allocated():
  from prompt_jax.models import t5  # pylint: disable=g-import-not-at-top
  from prompt_jax.models.encoder_decoder import EncoderDecoderModel
  model = EncoderDecoderModel(t5.Transformer(t5.preset("tiny"),
                                             base.InputPrompt(Prompt(100000))))
  with pytest.raises(ValueError, match="prompt length 100000 \\+ inputs length 64"):
    model.init_abstract(model.dummy_batch(32, 64, 16))  # eval_shape: abstract, no arrays
  roomy = EncoderDecoderModel(t5.Transformer(
      t5.preset("tiny"), base.InputPrompt(Prompt(9000), max_encoder_length=10000)))
  roomy.init_abstract(roomy.dummy_batch(1, 8, 2))


# ------------------------------------------------------------------------- tasks and data


def _demo_cfg(inputs=64, targets=16, name="demo_sentiment"):
  return pipeline.DatasetConfig(name, {"inputs": inputs, "targets": targets}, batch_size=4,
                                module=SYNTHETIC)


def test_check_vocabulary_names_both_sizes():
  assert pipeline.check_vocabulary(_demo_cfg(), 384) == 259
  with pytest.raises(ValueError, match=r"task 'demo_sentiment': its 'inputs' vocabulary "
                                       r"\(ByteVocabulary\) has 259 ids but the model's "
                                       r"embedding has 128 rows"):
    pipeline.check_vocabulary(_demo_cfg(), 128)
  with pytest.raises(ValueError, match="259 ids but the model's embedding has 200 rows"):
    pipeline.check_vocabulary(_demo_cfg(name="demo_pretrain_mixture"), 200)


def test_unknown_task_always_lists_names():
  for name, first in [("demo_sentimnt", "demo_sentiment"), ("zzzzzzzz", r"\w"),
                      ("sentiment", "demo_sentiment")]:
    with pytest.raises(ValueError, match=f"unknown seqio task or mixture '{name}'; closest: "
                                         f"{first}"):
      pipeline.get_task_or_mixture(name, SYNTHETIC)
  with pytest.raises(ValueError, match="TASK_MODULE 'no_such_pkg.tasks' cannot be imported"):
    pipeline.get_task_or_mixture("demo_sentiment", "no_such_pkg.tasks")


def test_training_batches_report_truncation_per_feature(caplog):
  with caplog.at_level(logging.WARNING, logger="prompt_jax.data.pipeline"):
    batch = next(pipeline.iterate_batches(_demo_cfg(inputs=20, targets=4)))
  assert batch["encoder_input_tokens"].shape == (4, 20)
  messages = [r.getMessage() for r in caplog.records if r.name == "prompt_jax.data.pipeline"]
  assert any(m.startswith("demo_sentiment: ") and "'inputs' longer than 20 tokens" in m
             for m in messages), messages
  assert any("of the first 1000 'train' examples have 'targets' longer than 4 tokens" in m
             for m in messages), messages
  caplog.clear()
  counts = pipeline.count_truncated(_demo_cfg(), sample=50)
  assert counts == {"demo_sentiment": {"inputs": 0, "targets": 0}}
  assert not [r for r in caplog.records if r.name == "prompt_jax.data.pipeline"]


# -------------------------------------------------------------------------------- JSONL


def test_read_jsonl_names_file_and_real_line(tmp_path):
  path = tmp_path / "in.jsonl"
  path.write_bytes(b'\xef\xbb\xbf{"inputs": "a"}\n\n  \n{"inputs": "b", "id": 2}\n')
  assert inference.read_jsonl_lines(str(path)) == [(1, {"inputs": "a"}),
                                                   (4, {"inputs": "b", "id": 2})]
  cases = [(b'{"inputs": "a"}\n\n{"inputs": \n', r"in\.jsonl:3: not valid JSON"),
           (b'{"inputs": "a"}\n{"inputs": "\xff"}\n', r"in\.jsonl:2: not UTF-8 \(byte 0xff"),
           (b'[1, 2]\n', r"in\.jsonl:1: expected a JSON object with a string 'inputs'"),
           (b'{"inputs": 3}\n', r"in\.jsonl:1: expected a JSON object")]
  for data, message in cases:
    path.write_bytes(data)
    with pytest.raises(ValueError, match=message):
      inference.read_jsonl(str(path))
  with pytest.raises(FileNotFoundError, match="does not exist"):
    inference.read_jsonl(str(tmp_path / "none.jsonl"))


def test_output_may_not_be_the_input(tmp_path, monkeypatch):
  inputs = tmp_path / "in.jsonl"
  inputs.write_text('{"inputs": "a"}\n')
  os.link(inputs, tmp_path / "hard.jsonl")
  os.symlink(inputs, tmp_path / "soft.jsonl")
  monkeypatch.chdir(tmp_path)
  for output in ["in.jsonl", "./sub/../in.jsonl", str(tmp_path / "soft.jsonl"), "hard.jsonl"]:
    (tmp_path / "sub").mkdir(exist_ok=True)
    with pytest.raises(ValueError, match="would overwrite the inputs"):
      inference.check_output_path(output, str(inputs))
  inference.check_output_path("out.jsonl", str(inputs))
  with pytest.raises(ValueError, match="is a directory"):
    inference.check_output_path(str(tmp_path), str(inputs))


def test_multitask_records_name_the_file_and_line():
  records = [{"task": "sentiment", "inputs": "a"}, {"inputs": "b"}]
  with pytest.raises(ValueError, match=r"in\.jsonl: line 7: expected a string 'task'"):
    multitask_inference.check_records(records, ["sentiment"], "in.jsonl", [1, 7])


def test_multitask_prompt_sources_are_checked(tmp_path):
  np.save(tmp_path / "int.npy", np.ones((3, 4), np.int8))
  with pytest.raises(ValueError, match="has dtype int8"):
    prompt_files.read_prompt(str(tmp_path / "int.npy"))
  bank = np.zeros((2, 3, 4), np.float32)
  bank[1, 0, 0] = np.nan
  np.save(tmp_path / "bank.npy", bank)
  prompt_files.read_prompt(f"{tmp_path / 'bank.npy'}#0")
  with pytest.raises(ValueError, match=r"bank\.npy#1' has 1 non-finite value"):
    prompt_files.read_prompt(f"{tmp_path / 'bank.npy'}#1")


# ------------------------------------------------------------------ frozen checkpoints


def test_frozen_checkpoint_files_name_the_problem(tmp_path, files):
  cases = {files["truncated.npz"]: "truncated or corrupt",
           files["random.npz"]: "not a .npz archive",
           files["empty_dir"]: "is an empty directory",
           files["junk_dir"]: "is not a checkpoint directory"}
  with open(tmp_path / "single.npz", "wb") as f:
    np.save(f, np.ones(3))
  cases[str(tmp_path / "single.npz")] = "single .npy array, not a .npz archive"
  np.savez(tmp_path / "empty.npz")
  cases[str(tmp_path / "empty.npz")] = "empty .npz archive"
  for path, message in cases.items():
    with pytest.raises(ValueError, match=message) as info:
      frozen_models.load_frozen_params(path, None)
    assert path in str(info.value)
  with pytest.raises(FileNotFoundError, match="does not exist"):
    frozen_models.load_frozen_params(files["missing"], None)
  with pytest.raises(ValueError, match="no built-in checkpoint 'nope.npz'.*demo_t5_tiny.npz"):
    frozen_models.load_frozen_params("builtin:nope.npz", None)
  only_config = tmp_path / "hf_config_only"
  only_config.mkdir()
  (only_config / "config.json").write_text("{}")
  (only_config / "pytorch_model.bin").write_bytes(b"")
  with pytest.raises(FileNotFoundError, match="neither model.safetensors.*need torch"):
    frozen_models.load_frozen_params(str(only_config), None)


def test_hf_files_name_the_file(tmp_path, files):
  with pytest.raises(ValueError, match=r"config\.json:2: not valid JSON: Expecting property "
                                       r"name enclosed in double quotes \(column 17\)"):
    hf.load_t5(files["hf_bad_config"])
  with pytest.raises(ValueError, match=r"model\.safetensors: not a readable safetensors file"):
    hf.read_tensors(files["hf_truncated"])
  (tmp_path / "latin.json").write_bytes(b'{"a": "\xe9"}')
  with pytest.raises(ValueError, match=r"latin\.json:1: not UTF-8"):
    hf.read_json(str(tmp_path / "latin.json"))
  (tmp_path / "list.json").write_text("[1]")
  with pytest.raises(ValueError, match=r"list\.json: expected a JSON object, got a JSON list"):
    hf.read_json(str(tmp_path / "list.json"))
  good = {"vocab_size": 32, "d_model": 4, "num_heads": 2, "d_kv": 2, "d_ff": 8, "num_layers": 1}
  hf.t5_config(good, True)
  for key, value in [("d_model", "4"), ("num_heads", None), ("d_ff", 2.5), ("vocab_size", 0)]:
    with pytest.raises(ValueError, match=f"config.json {key} must be a positive integer, got "
                                         f"{value!r}"):
      hf.t5_config(dict(good, **{key: value}), True)
  with pytest.raises(ValueError, match="feed_forward_proj must be"):
    hf.t5_config(dict(good, feed_forward_proj=3), True)


def test_t5x_corrupt_msgpack_names_the_file(tmp_path):
  checkpoint_dir = tmp_path / "checkpoint_1"
  checkpoint_dir.mkdir()
  (checkpoint_dir / "checkpoint").write_bytes(b"\x85\xa7version")
  with pytest.raises(ValueError, match=r"checkpoint_1/checkpoint: not a readable T5X msgpack"):
    t5x.load_prompt(str(checkpoint_dir))


def test_t5x_load_prompt_warns_for_a_reparameterised_prompt(tmp_path, caplog):
  prompt = np.ones((3, 4), np.float32)
  residual = {"encoder": {"prompt": {"prompt": {"prompt": prompt,
                                                "down": {"kernel": np.ones((4, 2), np.float32)}}}}}
  t5x.save_params(residual, str(tmp_path / "residual"), 1)
  t5x.save_prompt(prompt, str(tmp_path / "plain"), 1)
  with caplog.at_level(logging.WARNING, logger="prompt_jax.interop.t5x"):
    np.testing.assert_array_equal(t5x.load_prompt(str(tmp_path / "plain")), prompt)
    assert not caplog.records
    t5x.load_prompt(str(tmp_path / "residual"), t5x.PROMPT_PATH)  # an explicit leaf: no warning
    assert not caplog.records
    np.testing.assert_array_equal(t5x.load_prompt(str(tmp_path / "residual")), prompt)
  (record,) = caplog.records
  message = record.getMessage()
  assert "encoder/prompt/prompt/down/kernel" in message
  assert "prompt-jax export-prompt --t5x_checkpoint" in message


def test_peft_adapter_errors_name_the_file(tmp_path):
  good = np.ones((3, 4), np.float32)
  peft.save_prompt(good, str(tmp_path / "a"))
  weights = tmp_path / "a" / peft.WEIGHTS_FILE
  table = np.zeros((6, 4), np.float32)
  table[1, 1] = np.nan
  save_file({peft.TENSOR_KEY: table}, str(weights))
  with pytest.raises(ValueError, match=r"adapter_model\.safetensors' has 1 non-finite value"):
    peft.load_prompt(str(tmp_path / "a"))
  save_file({peft.TENSOR_KEY: np.ones((6, 4), np.int32)}, str(weights))
  with pytest.raises(ValueError, match=r"prompt_embeddings has dtype int32"):
    peft.load_prompt(str(tmp_path / "a"))
  weights.write_bytes(b"\x10\x00")
  with pytest.raises(ValueError, match=r"adapter_model\.safetensors: not a readable safetensors"):
    peft.load_prompt(str(tmp_path / "a"))
  config = tmp_path / "a" / peft.CONFIG_FILE
  config.write_text(json.dumps({"peft_type": "PROMPT_TUNING", "num_virtual_tokens": "3"}))
  save_file({peft.TENSOR_KEY: table * 0}, str(weights))
  with pytest.raises(ValueError, match=r"num_virtual_tokens must be a positive integer, got '3'"):
    peft.load_prompt(str(tmp_path / "a"))


def test_convert_never_overwrites(tmp_path):
  np.save(tmp_path / "p.npy", np.ones((3, 4), np.float32))
  (tmp_path / "empty").mkdir()
  written = convert.write_prompt(np.ones((3, 4), np.float32), str(tmp_path / "empty"), "peft")
  assert os.path.exists(os.path.join(written, peft.CONFIG_FILE))  # an empty directory is fine
  for dst, fmt in [(tmp_path / "p.npy", "npy"), (tmp_path / "p", "npy"), (tmp_path / "empty",
                                                                          "t5x")]:
    with pytest.raises(ValueError, match="already exists"):
      convert.write_prompt(np.ones((3, 4), np.float32), str(dst), fmt)
  assert convert.write_prompt(np.ones((3, 4), np.float32), str(tmp_path / "q"), "npy") == str(
      tmp_path / "q.npy")


def test_model_vocabulary_check_names_both_sizes():
  with pytest.raises(ValueError, match=r"--vocabulary \(ByteVocabulary\) has 259 ids but the "
                                       r"model's embedding has 100 rows"):
    inference.check_model_vocabulary(seqio.ByteVocabulary(), 100, "--vocabulary")
