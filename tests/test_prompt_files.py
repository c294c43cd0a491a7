"""`prompt_jax.storage.prompt_files`: every prompt source form reads back the array written, a run
directory's step selection, one-line errors naming the source, atomic writes; eval's
PROMPT_PATH takes every form with the metrics of the plain .npy."""

from __future__ import annotations

import os

import numpy as np
import pytest

from prompt_jax.interop import peft
from prompt_jax.storage import prompt_files, run_dir

PROMPT = np.arange(12, dtype=np.float32).reshape(3, 4) / 7
BANK = np.stack([PROMPT, PROMPT + 1, PROMPT - 1])


@pytest.fixture
def sources(tmp_path):
  """p.npy, bank.npy, a PEFT adapter, a run with exports at steps 5 (bank) and 20 (bank), and a
  single-prompt run with exports at steps 5 and 20."""
  np.save(tmp_path / "p.npy", PROMPT)
  np.save(tmp_path / "bank.npy", BANK)
  peft.save_prompt(PROMPT, str(tmp_path / "adapter"), "t5-small")
  for name, early, late in (("run", PROMPT * 0, PROMPT), ("multi", BANK * 0, BANK)):
    os.makedirs(tmp_path / name / run_dir.PROMPTS_DIR)
    np.save(run_dir.prompt_export_path(str(tmp_path / name), 5), early)
    np.save(run_dir.prompt_export_path(str(tmp_path / name), 20), late)
  return tmp_path


@pytest.mark.parametrize("source,expected,step", [
    ("p.npy", PROMPT, None),
    ("bank.npy#1", BANK[1], None),
    ("adapter", PROMPT, None),
    ("run", PROMPT, 20),  # the latest export (20 > 5 numerically, not as text)
    ("run@20", PROMPT, 20),
    ("run@5", PROMPT * 0, 5),
    ("run/prompts/prompt_20.npy", PROMPT, 20),
    ("multi#2", BANK[2], 20),
    ("multi@5#0", BANK[0] * 0, 5),
    ("multi/prompts/prompt_20.npy#1", BANK[1], 20),
])
def test_every_source_form_reads_back_the_array(sources, source, expected, step):
  got = prompt_files.read_prompt(str(sources / source))
  assert got.dtype == np.float32
  np.testing.assert_array_equal(got, expected)
  assert prompt_files.step_of(str(sources / source)) == step


def test_banks_where_allowed(sources):
  np.testing.assert_array_equal(
      prompt_files.read_prompt(str(sources / "bank.npy"), allow_bank=True), BANK)
  np.testing.assert_array_equal(
      prompt_files.read_prompt(str(sources / "multi"), allow_bank=True), BANK)
  np.testing.assert_array_equal(
      prompt_files.read_prompt(str(sources / "multi@5"), allow_bank=True), BANK * 0)


def test_source_files_and_formats(sources):
  s = str(sources)
  assert prompt_files.source_files(f"{s}/bank.npy#1") == [f"{s}/bank.npy"]
  assert prompt_files.source_files(f"{s}/run") == [run_dir.prompt_export_path(f"{s}/run", 20)]
  assert prompt_files.source_files(f"{s}/run@5") == [run_dir.prompt_export_path(f"{s}/run", 5)]
  assert sorted(os.path.basename(f) for f in prompt_files.source_files(f"{s}/adapter")) == [
      peft.CONFIG_FILE, peft.WEIGHTS_FILE]
  assert prompt_files.source_files(f"{s}/missing.npy") == []
  assert [prompt_files.source_format(f"{s}/{x}") for x in ("p.npy", "bank.npy#0", "adapter",
                                                           "run@5")] == ["npy", "npy", "peft",
                                                                         "run"]


def test_a_path_with_hash_or_at_that_exists_is_a_path(tmp_path):
  np.save(tmp_path / "a#1.npy", PROMPT)
  os.makedirs(tmp_path / "run@3" / run_dir.PROMPTS_DIR)
  np.save(run_dir.prompt_export_path(str(tmp_path / "run@3"), 7), PROMPT + 2)
  np.testing.assert_array_equal(prompt_files.read_prompt(str(tmp_path / "a#1.npy")), PROMPT)
  np.testing.assert_array_equal(prompt_files.read_prompt(str(tmp_path / "run@3")), PROMPT + 2)
  np.testing.assert_array_equal(prompt_files.read_prompt(f"{tmp_path / 'run@3'}@7"), PROMPT + 2)


def _bad_files(tmp_path):
  (tmp_path / "text.npy").write_text("hello\n")
  np.save(tmp_path / "vector.npy", np.ones(4, np.float32))
  nan = PROMPT.copy()
  nan[1, 2] = np.nan
  np.save(tmp_path / "nan.npy", nan)
  np.save(tmp_path / "int.npy", np.ones((3, 4), np.int32))
  os.makedirs(tmp_path / "empty_dir")
  os.makedirs(tmp_path / "fresh_run" / run_dir.CHECKPOINTS_DIR)


@pytest.mark.parametrize("source,error,message", [
    ("missing.npy", FileNotFoundError, "does not exist"),
    ("missing.npy#1", FileNotFoundError, "does not exist"),
    ("text.npy", ValueError, "is not a .npy file"),
    ("int.npy", ValueError, "has dtype int32"),
    ("vector.npy", ValueError, "must hold [length, embed], got shape (4,)"),
    ("nan.npy", ValueError, "has 1 non-finite value (NaN or inf); the first is nan at index "
                            "[1, 2]"),
    ("bank.npy", ValueError, "a bank export needs '#<row>'"),
    ("bank.npy#3", ValueError, "0 <= row < N; got shape (3, 3, 4) and row '3'"),
    ("bank.npy#x", ValueError, "row 'x'"),
    ("p.npy#0", ValueError, "needs a [N, length, embed] bank export"),
    ("p.npy@3", ValueError, "'@<step>' selects an export of a run directory"),
    ("run@7", ValueError, "step 7 was not exported; the run directory has prompts for steps "
                          "[5, 20]"),
    ("run@last", ValueError, "'@<step>' needs a step number, got 'last'"),
    ("run#0", ValueError, "0 <= row < N; got shape (3, 4)"),
    ("adapter#0", ValueError, "do not apply to a PEFT adapter directory"),
    ("empty_dir", ValueError, "cannot tell the prompt format"),
    ("fresh_run", FileNotFoundError, "has no prompts/prompt_<step>.npy export yet"),
])
def test_each_bad_source_is_one_line_naming_it(sources, source, error, message):
  _bad_files(sources)
  with pytest.raises(error) as info:
    prompt_files.read_prompt(str(sources / source))
  text = str(info.value)
  assert message in text and len(text.splitlines()) == 1, text
  named = str(sources / source)
  assert named in text or os.path.dirname(named) in text, text


def test_write_npy_is_atomic_and_refuses_an_existing_file(tmp_path):
  written = prompt_files.write_npy(PROMPT.astype(np.float64), str(tmp_path / "out"))
  assert written == str(tmp_path / "out.npy")
  back = np.load(written)
  assert back.dtype == np.float32
  np.testing.assert_array_equal(back, PROMPT)
  assert sorted(os.listdir(tmp_path)) == ["out.npy"]  # no temporary file left behind
  with pytest.raises(ValueError, match="already exists") as info:
    prompt_files.write_npy(PROMPT, written)
  assert written in str(info.value)
  prompt_files.write_npy(PROMPT + 1, written, overwrite=True)
  np.testing.assert_array_equal(prompt_files.read_prompt(written), PROMPT + 1)
  (tmp_path / "afile").write_text("x")
  with pytest.raises(ValueError, match="is a file"):
    prompt_files.write_npy(PROMPT, str(tmp_path / "afile" / "p.npy"))
  with pytest.raises(ValueError, match=r"got shape \(4,\)"):
    prompt_files.write_npy(np.ones(4), str(tmp_path / "v.npy"))


# ------------------------------------------------------------------- eval's PROMPT_PATH


def test_eval_prompt_path_forms_give_the_npy_metrics(tmp_path):
  """PROMPT_PATH as a bank row, a run directory and MODEL_DIR@STEP: the same prompt
  parameters, step and metrics as the plain .npy (the shipped tiny model, mock SST-2)."""
  from prompt_jax.serving import evaluators, loading  # pylint: disable=g-import-not-at-top
  from tests.test_evaluation import DEMO_CHECKPOINT, LENGTHS, TASK, _cfg, _model, mock_glue
  model = _model()
  programs, frozen = loading.build_programs(model, DEMO_CHECKPOINT)
  prompt = np.random.default_rng(0).uniform(
      -0.5, 0.5, (4, model.config.emb_dim)).astype(np.float32)
  np.save(tmp_path / "prompt_30.npy", prompt)
  np.save(tmp_path / "bank.npy", np.stack([prompt * 0, prompt]))
  os.makedirs(tmp_path / "run" / run_dir.PROMPTS_DIR)
  np.save(run_dir.prompt_export_path(str(tmp_path / "run"), 30), prompt)
  np.save(run_dir.prompt_export_path(str(tmp_path / "run"), 10), prompt * 0)
  evaluator = evaluators.TaskEvaluator(_cfg(TASK), max_decode_length=LENGTHS["targets"])
  results = {}
  for form in ("prompt_30.npy", "bank.npy#1", "run", "run@30"):
    params, step = loading.load_prompt_params(programs, frozen,
                                                 prompt_path=str(tmp_path / form))
    with mock_glue(8):
      results[form] = (step, evaluator(programs, params, frozen, step))
  assert {form: step for form, (step, _) in results.items()} == {
      "prompt_30.npy": 30, "bank.npy#1": 0, "run": 30, "run@30": 30}
  expected = results["prompt_30.npy"][1]
  assert expected
  for form, (_, metrics) in results.items():
    assert metrics == expected, form


def test_convert_and_from_array_take_every_source(sources, capsys):
  from prompt_jax import cli  # pylint: disable=g-import-not-at-top
  assert cli.main(["convert", "prompt", f"{sources}/run@5", f"{sources}/out5.npy"]) == 0
  assert "3 x 4 prompt (run -> npy)" in capsys.readouterr().out
  np.testing.assert_array_equal(np.load(sources / "out5.npy"), PROMPT * 0)
  assert cli.main(["convert", "prompt", f"{sources}/multi#1", f"{sources}/row.npy"]) == 0
  np.testing.assert_array_equal(np.load(sources / "row.npy"), BANK[1])
  assert cli.main(["convert", "prompt", f"{sources}/run@6", f"{sources}/x.npy"]) == 1
  err = capsys.readouterr().err.strip()
  assert "step 6 was not exported" in err and "[5, 20]" in err and len(err.splitlines()) == 1
  init = prompt_files.from_array(f"{sources}/bank.npy#2")
  np.testing.assert_array_equal(np.asarray(init(None, (3, 4), None)), BANK[2])
  init = prompt_files.from_array(f"{sources}/multi@5", bank_mean=True)
  np.testing.assert_array_equal(np.asarray(init(None, (3, 4), None)), BANK.mean(0) * 0)
