"""MODEL_DIR/metrics.jsonl (one line per logged scalar, truncated on resume) and the curves drawn
from it: `prompt_jax.storage.curves` and `prompt-jax curves`."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from prompt_jax import cli
from prompt_jax.storage import curves, metric_writer
from prompt_jax.storage.metric_writer import METRICS_FILE, MetricWriter


def _write_run(model_dir, train_steps=(10, 20, 30), eval_steps=(0, 20), offset=0.0):
  """A run's logs through MetricWriter: train loss (+ cross_ent_loss), eval accuracy and f1."""
  train = MetricWriter(str(model_dir), "train", enabled=True)
  evals = MetricWriter(str(model_dir), "eval", enabled=True)
  written = []
  for step in eval_steps:
    scores = {"accuracy": 50.0 + step + offset, "f1": 40.0 + step / 2 + offset}
    evals.write(step, scores)
    written += [(step, "eval", k, v) for k, v in scores.items()]
  for step in train_steps:
    metrics = {"loss": 3.0 / step + offset, "cross_ent_loss": 2.5 / step + offset}
    train.write(step, metrics)
    written += [(step, "train", k, v) for k, v in metrics.items()]
  train.close()
  evals.close()
  return written


def _lines(model_dir):
  return [(r["step"], r["split"], r["name"], r["value"])
          for r in metric_writer.read_metrics(str(model_dir))]


def test_every_write_is_a_line_per_metric(tmp_path):
  written = _write_run(tmp_path)
  assert sorted(_lines(tmp_path)) == sorted(written)
  raw = (tmp_path / METRICS_FILE).read_text().splitlines()
  assert len(raw) == len(written)
  record = json.loads(raw[0])
  assert set(record) == {"step", "time", "split", "name", "value"}
  assert isinstance(record["step"], int) and isinstance(record["time"], float)
  # The TensorBoard events are still written.
  assert [s for s, _ in metric_writer.read_scalars(str(tmp_path / "train"))["loss"]] == [10, 20, 30]


def test_a_disabled_writer_writes_no_line(tmp_path):
  MetricWriter(str(tmp_path), "train", enabled=False).write(1, {"loss": 1.0})
  assert not (tmp_path / METRICS_FILE).exists()


def test_truncate_drops_the_train_and_eval_lines_after_the_step(tmp_path):
  written = _write_run(tmp_path, train_steps=(10, 20, 30, 40), eval_steps=(0, 20, 40))
  MetricWriter(str(tmp_path), "eval_validation", enabled=True).write(40, {"accuracy": 1.0})
  dropped = metric_writer.truncate_metrics(str(tmp_path), 20, enabled=True)
  expected = [w for w in written if w[0] <= 20] + [(40, "eval_validation", "accuracy", 1.0)]
  assert sorted(_lines(tmp_path)) == sorted(expected)
  assert dropped == len(written) + 1 - len(expected)
  assert not [n for n in os.listdir(tmp_path) if n.endswith(".tmp")]
  # The resumed run writes its steps again: each once.
  MetricWriter(str(tmp_path), "train", enabled=True).write(30, {"loss": 0.5})
  steps = [s for s, split, name, _ in _lines(tmp_path) if (split, name) == ("train", "loss")]
  assert steps == [10, 20, 30]


def test_a_cut_short_last_line_is_skipped_then_removed(tmp_path):
  written = _write_run(tmp_path, train_steps=(10, 20), eval_steps=(0,))
  path = tmp_path / METRICS_FILE
  cut = '{"step": 30, "time": 1.0, "split": "train", "name": "lo'
  with open(path, "a") as f:  # a kill in the middle of a write
    f.write(cut)
  assert sorted(_lines(tmp_path)) == sorted(written)
  metric_writer.truncate_metrics(str(tmp_path), 20, enabled=True)
  text = path.read_text()
  assert cut not in text and text.endswith("\n")
  assert [tuple(json.loads(line)[k] for k in ("step", "split", "name", "value"))
          for line in text.splitlines()] == _lines(tmp_path)
  assert sorted(_lines(tmp_path)) == sorted(written)


def test_a_write_after_a_kill_mid_line_gives_whole_lines(tmp_path):
  """An eval-only command appending after a killed run: the cut line stays one bad line."""
  written = _write_run(tmp_path, train_steps=(10, 20), eval_steps=(0,))
  path = tmp_path / METRICS_FILE
  cut = '{"step": 30, "time": 1.0, "split": "train", "name": "lo'
  with open(path, "a") as f:
    f.write(cut)
  MetricWriter(str(tmp_path), "eval_validation", enabled=True).write(20, {"accuracy": 9.0})
  expected = sorted([*written, (20, "eval_validation", "accuracy", 9.0)])
  assert sorted(_lines(tmp_path)) == expected
  assert cut + "\n" in path.read_text()
  metric_writer.truncate_metrics(str(tmp_path), 20, enabled=True)
  assert cut not in path.read_text() and sorted(_lines(tmp_path)) == expected


def test_truncate_without_a_file_or_on_another_host_does_nothing(tmp_path):
  assert metric_writer.truncate_metrics(str(tmp_path), 0, enabled=True) == 0
  assert not (tmp_path / METRICS_FILE).exists()
  _write_run(tmp_path)
  before = (tmp_path / METRICS_FILE).read_bytes()
  assert metric_writer.truncate_metrics(str(tmp_path), 0, enabled=False) == 0
  assert (tmp_path / METRICS_FILE).read_bytes() == before


def _pixels(path):
  from matplotlib import image  # pylint: disable=g-import-not-at-top
  return np.asarray(image.imread(str(path)))


def test_plot_run_draws_the_curves(tmp_path):
  a, b = tmp_path / "a", tmp_path / "b"
  _write_run(a)
  _write_run(b, offset=7.0)
  path = curves.plot_run(str(a))
  assert path == str(a / curves.CURVES_FILE)
  pixels = _pixels(path)
  assert pixels.ndim == 3 and pixels.std() > 0.01  # not a blank canvas
  other = _pixels(curves.plot_run(str(b)))
  assert other.shape != pixels.shape or not np.array_equal(other, pixels)
  # Redrawing the same data gives the same image.
  again = curves.plot_run(str(a), str(tmp_path / "again.png"))
  assert np.array_equal(_pixels(again), pixels)
  assert sorted(os.listdir(a)) == sorted(["curves.png", "eval", "train", METRICS_FILE])


def test_the_panels_follow_the_metrics(tmp_path):
  _write_run(tmp_path)
  runs = [curves._load(str(tmp_path))]  # pylint: disable=protected-access
  assert curves._panels(runs) == [  # pylint: disable=protected-access
      ("train", "training loss", ["loss", "cross_ent_loss"]),
      ("eval", "validation accuracy", ["accuracy"]), ("eval", "validation f1", ["f1"])]


def test_plot_runs_compares_two_runs(tmp_path):
  a, b = tmp_path / "run_a", tmp_path / "run_b"
  _write_run(a)
  _write_run(b, train_steps=(10, 20), eval_steps=(20,), offset=3.0)
  before = {p: p.read_bytes() for p in (a / METRICS_FILE, b / METRICS_FILE)}
  path = curves.plot_runs([str(a), str(b)], str(tmp_path / "out" / "compare.png"))
  pixels = _pixels(path)
  assert pixels.std() > 0.01
  single = _pixels(curves.plot_run(str(a), str(tmp_path / "single.png")))
  assert single.shape != pixels.shape or not np.array_equal(single, pixels)
  assert {p: p.read_bytes() for p in before} == before
  assert curves._labels([str(a), str(b) + "/"]) == ["run_a", "run_b"]  # pylint: disable=protected-access


def test_bad_inputs_and_outputs_are_one_line_errors(tmp_path):
  _write_run(tmp_path / "run")
  (tmp_path / "empty").mkdir()
  with pytest.raises(ValueError, match=r"empty has no metrics.jsonl: is it a training run"):
    curves.plot_run(str(tmp_path / "empty"))
  with pytest.raises(ValueError, match="empty has no metrics.jsonl"):
    curves.plot_runs([str(tmp_path / "run"), str(tmp_path / "empty")], str(tmp_path / "x.png"))
  (tmp_path / "file").write_text("x")
  with pytest.raises(ValueError, match=r"file' is a file, not a directory") as error:
    curves.plot_run(str(tmp_path / "run"), str(tmp_path / "file" / "curves.png"))
  assert "\n" not in str(error.value)
  metrics = tmp_path / "run" / METRICS_FILE
  before = metrics.read_bytes()
  with pytest.raises(ValueError, match="is an input"):
    curves.plot_runs([str(tmp_path / "run")], str(metrics))
  assert metrics.read_bytes() == before


def test_the_cli_writes_the_curves(tmp_path, capsys):
  a, b = tmp_path / "a", tmp_path / "b"
  _write_run(a)
  _write_run(b, offset=1.0)
  assert cli.main(["curves", str(a)]) == 0
  assert capsys.readouterr().out.strip() == f"wrote {a / 'curves.png'}"
  assert _pixels(a / "curves.png").std() > 0.01
  out = tmp_path / "both.png"
  assert cli.main(["curves", str(a), str(b), f"--output={out}"]) == 0
  assert capsys.readouterr().out.strip() == f"wrote {out}"
  assert out.is_file()


def test_the_cli_names_what_is_wrong(tmp_path, capsys):
  _write_run(tmp_path / "a")
  (tmp_path / "not_a_run").mkdir()
  assert cli.main(["curves", str(tmp_path / "not_a_run")]) == 1
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and err[0].startswith("error: ")
  assert str(tmp_path / "not_a_run") in err[0] and "metrics.jsonl" in err[0]
  assert cli.main(["curves", str(tmp_path / "a"), str(tmp_path / "a")]) == 1
  assert "needs --output" in capsys.readouterr().err
  assert cli.main(["curves"]) == 2
  assert "error:" in capsys.readouterr().err
