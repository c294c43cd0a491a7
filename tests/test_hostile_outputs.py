"""Outputs and values a hostile command line gives `prompt-jax`: an --output that is a prompt
file, an existing file or lies under a file; out-of-range decoding integers; a vocabulary that is
not a SentencePiece model; a `FILE.npy#ROW` prompt source for `convert prompt`. Each is one
`error:` line naming the value (files untouched), or, for #ROW, the row converted."""

from __future__ import annotations

import os

import numpy as np
import pytest

from prompt_jax.models import decoding
from prompt_jax.serving import prompt_export
from prompt_jax.storage import output_paths
from tests.cli_harness import DEMO_GIN, assert_one_line_error, run_cli, snapshot

CHECKPOINT = "--checkpoint=builtin:demo_t5_tiny.npz"
SMALL = ["--input_length=16", "--max_decode_length=2"]


@pytest.fixture
def files(tmp_path):
  """in.jsonl, a prompt p.npy [10, 64], a bank [3, 10, 64], an existing out.jsonl and a plain
  file `afile` (a parent that is not a directory)."""
  (tmp_path / "in.jsonl").write_text('{"task": "a", "inputs": "hello"}\n')
  np.save(tmp_path / "p.npy", np.full((10, 64), 0.01, np.float32))
  bank = np.arange(3 * 10 * 64, dtype=np.float32).reshape(3, 10, 64) / 1e4
  np.save(tmp_path / "bank.npy", bank)
  (tmp_path / "out.jsonl").write_text("keep me\n")
  (tmp_path / "afile").write_text("a file, not a directory\n")
  return tmp_path


def _one_line_error(result, names, watched):
  """The bad-input contract, with exactly one stderr line; `watched` unchanged."""
  before = watched[1]
  last = assert_one_line_error(result, names, watched=watched[0], before=before)
  assert len([line for line in result.err.splitlines() if line.strip()]) == 1, result.err
  return last


def _serve(tmp, *flags, command="infer"):
  return [command, f"--inputs={tmp}/in.jsonl", CHECKPOINT, *SMALL, *flags]


# ------------------------------------------------------------------- 1. infer-multitask --output


@pytest.mark.parametrize("command", ["infer", "infer-multitask"])
@pytest.mark.parametrize("case", ["prompt", "symlink", "bank-row", "dotted", "inputs"])
def test_output_that_is_an_input_file_is_refused(files, case, command, capsys):
  tmp = files
  os.symlink(tmp / "p.npy", tmp / "link.npy")
  output, prompts, named = {
      "prompt": (f"{tmp}/p.npy", [f"--prompt=a={tmp}/p.npy"], "p.npy"),
      "symlink": (f"{tmp}/link.npy", [f"--prompt=a={tmp}/p.npy"], "link.npy"),
      "bank-row": (f"{tmp}/bank.npy", [f"--prompt=b={tmp}/p.npy", f"--prompt=a={tmp}/bank.npy#1"],
                   "bank.npy"),
      "dotted": (f"{tmp}/x/../p.npy", [f"--prompt=a={tmp}/p.npy"], "x/../p.npy"),
      "inputs": (f"{tmp}/in.jsonl", [f"--prompt=a={tmp}/p.npy"], "in.jsonl"),
  }[case]
  watched = (tmp, snapshot(tmp))
  result = run_cli(_serve(tmp, f"--output={output}", *prompts, command=command), capsys)
  last = _one_line_error(result, ["--output", named], watched)
  assert ("prompt file" if case != "inputs" else "input file") in last


def test_existing_output_is_refused_unless_overwrite(files, capsys):
  tmp = files
  watched = (tmp, snapshot(tmp))
  argv = _serve(tmp, f"--output={tmp}/out.jsonl", f"--prompt=a={tmp}/p.npy")
  _one_line_error(run_cli(argv, capsys), [f"{tmp}/out.jsonl", "already exists", "--overwrite"],
                  watched)
  # --overwrite replaces it (and the gin form of `infer` does not take the flag)
  result = run_cli([*argv, "--overwrite"], capsys)
  assert result.code == 0, result.err
  lines = (tmp / "out.jsonl").read_text().splitlines()
  assert len(lines) == 1 and '"prediction"' in lines[0]
  result = run_cli(["infer", f"--gin_file={DEMO_GIN}", "--overwrite"], capsys)
  assert result.code == 2 and "--overwrite is a multi-task serving flag" in result.err


# ---------------------------------------------------------------------- 2. export-prompt --output


EXPORT = ["export-prompt", "--gin_file=models/t5_1_1_tiny.gin", "--gin_file=prompts/uniform.gin"]


@pytest.mark.parametrize("how", ["model_dir", "t5x_checkpoint"])
def test_export_refuses_an_existing_output(files, how, capsys):
  tmp = files
  watched = (tmp, snapshot(tmp))
  source = f"--model_dir={tmp}" if how == "model_dir" else f"--t5x_checkpoint={tmp}/none"
  result = run_cli([*EXPORT, source, f"--output={tmp}/p.npy"], capsys)
  last = _one_line_error(result, [f"{tmp}/p.npy", "already exists"], watched)
  assert "choose another --output or delete the file" in last
  result = run_cli([*EXPORT, source, f"--output={tmp}/afile/x.npy"], capsys)
  _one_line_error(result, [f"{tmp}/afile/x.npy", f"{tmp}/afile", "is a file"], watched)


def test_save_npy_is_new_only_and_atomic(files):
  tmp = files
  before = (tmp / "p.npy").read_bytes()
  with pytest.raises(ValueError, match=r"'.*p\.npy' already exists; choose another --output"):
    prompt_export.save_npy(np.zeros((2, 3)), str(tmp / "p.npy"))
  with pytest.raises(ValueError, match=r"'.*/p\.npy' already exists"):  # np.save's suffix
    prompt_export.save_npy(np.zeros((2, 3)), str(tmp / "p"))
  with pytest.raises(ValueError, match=r"afile/sub/x\.npy' cannot be written: '.*afile' is a "
                                       r"file"):
    prompt_export.save_npy(np.zeros((2, 3)), str(tmp / "afile" / "sub" / "x.npy"))
  assert (tmp / "p.npy").read_bytes() == before
  written = prompt_export.save_npy(np.ones((2, 3), np.float64), str(tmp / "new" / "q"))
  assert written == str(tmp / "new" / "q.npy")
  loaded = np.load(written)
  assert loaded.dtype == np.float32 and loaded.shape == (2, 3)
  assert sorted(os.listdir(tmp / "new")) == ["q.npy"]  # no temporary file left


# ---------------------------------------------------------------------- 3. decoding integers


@pytest.mark.parametrize("spec,names", [
    ("beam_search(num_decodes=" + "9" * 20000 + ")", ["num_decodes=999999999999...",
                                                       "20000 digits", "[1, 65536]"]),
    ("beam_search(num_decodes=" + "9" * 4000 + ")", ["num_decodes", "4000 digits"]),
    ("beam_search(num_decodes=65537)", ["num_decodes", "65537", "[1, 65536]"]),
    ("temperature_sample(num_decodes=100000000000)", ["num_decodes", "100000000000"]),
    ("temperature_sample(seed=-1)", ["seed", "got -1", "2**32"]),
    ("temperature_sample(seed=4294967296)", ["seed", "4294967296"]),
    ("temperature_sample(seed=" + "9" * 100 + ")", ["seed=999999999999...", "100 digits"]),
    ("temperature_sample(seed=True)", ["seed", "True"]),
    ("temperature_sample(topk=" + "9" * 30 + ")", ["topk", "30 digits"]),
    ("temperature_sample(temperature=" + "9" * 400 + ")", ["temperature", "about 40"]),
])
def test_out_of_range_decoding_integers(files, spec, names, capsys):
  tmp = files
  with pytest.raises(ValueError) as e:
    decoding.parse(spec)
  message = str(e.value)
  assert "\n" not in message and len(message) < 400, message[:500]
  for name in names:
    assert name in message, (name, message)
  watched = (tmp, snapshot(tmp))
  result = run_cli(_serve(tmp, f"--output={tmp}/new.jsonl", f"--prompt=a={tmp}/p.npy",
                          f"--decode={spec}"), capsys)
  _one_line_error(result, names, watched)


def test_decoding_bounds_in_the_python_api():
  assert decoding.BeamSearch(65536).num_decodes == 65536
  assert decoding.TemperatureSampling(seed=2**32 - 1, num_decodes=65536).seed == 2**32 - 1
  with pytest.raises(ValueError, match=r"seed must be an integer in \[0, 2\*\*32 - 1\], got -3"):
    decoding.TemperatureSampling(seed=-3)
  with pytest.raises(ValueError, match=r"got an integer of about \d+ digits"):
    decoding.BeamSearch(10**5000)  # its repr alone would raise
  with pytest.raises(ValueError, match="alpha"):
    decoding.BeamSearch(4, alpha=10**400)  # too large for a float: not finite


# ------------------------------------------------------------------ 4. outputs under a file


@pytest.mark.parametrize("argv,name", [
    (["infer", "--output={tmp}/afile/o.jsonl"], "--output '{tmp}/afile/o.jsonl'"),
    (["infer-multitask", "--output={tmp}/afile/sub/o.jsonl"], "{tmp}/afile/sub/o.jsonl"),
    (["plan", f"--gin_file={DEMO_GIN}", "--mesh=1x1", "--json={tmp}/afile/plan.json"],
     "--json '{tmp}/afile/plan.json'"),
], ids=["infer", "infer-multitask", "plan-json"])
def test_output_under_a_file(files, argv, name, capsys):
  tmp = files
  argv = [a.format(tmp=tmp) for a in argv]
  if argv[0] != "plan":
    argv = _serve(tmp, *argv[1:], f"--prompt=a={tmp}/p.npy", command=argv[0])
  watched = (tmp, snapshot(tmp))
  _one_line_error(run_cli(argv, capsys), [name.format(tmp=tmp), "is a file, not a directory"],
                  watched)


def test_check_output_path_helper(files):
  tmp = files
  assert output_paths.check_output_path(str(tmp / "new" / "x.json"), "--json")
  with pytest.raises(ValueError, match="is a directory"):
    output_paths.check_output_path(str(tmp), "--json")
  with pytest.raises(ValueError, match="must be a file path"):
    output_paths.check_output_path("", "--json")
  output_paths.check_output_path(str(tmp / "out.jsonl"), "--output")  # no hint: may replace
  with pytest.raises(ValueError, match="already exists; do X"):
    output_paths.check_output_path(str(tmp / "out.jsonl"), "--output", exists_hint="do X")


# ------------------------------------------------------------------- 5. --vocabulary not a model


@pytest.mark.parametrize("which", ["jsonl", "npy", "directory"])
def test_vocabulary_that_is_not_a_sentencepiece_model(files, which, capsys):
  tmp = files
  path = {"jsonl": tmp / "in.jsonl", "npy": tmp / "p.npy", "directory": tmp}[which]
  watched = (tmp, snapshot(tmp))
  result = run_cli(_serve(tmp, f"--output={tmp}/new.jsonl", f"--prompt=a={tmp}/p.npy",
                          f"--vocabulary={path}"), capsys)
  _one_line_error(result, [f"--vocabulary '{path}'", "not a SentencePiece model file"], watched)


# ------------------------------------------------------------ 6. convert prompt FILE.npy#ROW


def test_convert_prompt_takes_a_bank_row(files, capsys):
  tmp = files
  result = run_cli(["convert", "prompt", f"{tmp}/bank.npy#1", f"{tmp}/row1.npy"], capsys)
  assert result.code == 0, result.err
  np.testing.assert_array_equal(np.load(tmp / "row1.npy"), np.load(tmp / "bank.npy")[1])
  assert "10 x 64 prompt (npy -> npy)" in result.out


@pytest.mark.parametrize("source,names", [
    ("bank.npy#3", ["bank.npy#3", "0 <= row < N", "(3, 10, 64)", "row '3'"]),
    ("bank.npy#-1", ["bank.npy#-1", "row '-1'"]),
    ("bank.npy#x", ["bank.npy#x", "row 'x'"]),
    ("bank.npy#" + "9" * 5000, ["5000 characters", "0 <= row < N"]),
    ("p.npy#0", ["p.npy#0", "bank export", "(10, 64)"]),
    ("nope.npy#1", ["nope.npy#1", "does not exist"]),
])
def test_convert_prompt_bad_bank_row(files, source, names, capsys):
  tmp = files
  watched = (tmp, snapshot(tmp))
  result = run_cli(["convert", "prompt", f"{tmp}/{source}", f"{tmp}/row.npy"], capsys)
  last = _one_line_error(result, names, watched)
  assert len(last) < 400


def test_convert_prompt_output_under_a_file(files, capsys):
  tmp = files
  watched = (tmp, snapshot(tmp))
  result = run_cli(["convert", "prompt", f"{tmp}/p.npy", f"{tmp}/afile/x.npy"], capsys)
  _one_line_error(result, [f"{tmp}/afile/x.npy", "is a file"], watched)
