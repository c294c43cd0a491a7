"""The user's GLUE/SuperGLUE path, offline: tfds's real `glue/*` and `super_glue/*` builders
prepare archives laid out like GLUE's TSV and SuperGLUE's JSONL downloads, our seqio tasks read
the tfrecords through `TFDS_DATA_DIR`, and `prompt-jax train` runs on them.

Only the network is replaced, the way tfds's own `DatasetBuilderTestCase` does it: the
`DownloadManager`'s `download_and_extract` hands back archives the test wrote (tfds still
extracts them). The builders' `_split_generators`/`_generate_examples`, tfds's writer, our tasks
and the CLI run for real, unlike `tfds.testing.mock_data` (tests/test_tasks_glue.py), which skips
the preparation code: there a fresh install's `ModuleNotFoundError: importlib_resources` went
unnoticed.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import math
import os
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Callable, Optional
from unittest import mock

import pytest
import seqio
import tensorflow_datasets as tfds

from prompt_jax.data import glue, superglue

SPECS = {spec.name: spec for spec in glue.glue_specs() + superglue.super_glue_specs()}
SPLITS = ("train", "validation", "test")
UNLABELLED = "<unk>"  # our tasks' target for the unlabelled test splits (label -1)
SST2_LABELS = ("negative", "positive")  # SST-2's label column: 0 and 1


@dataclasses.dataclass(frozen=True)
class Raw:
  """One dataset as its download holds it, and the T5 examples our task must make of it."""

  task: str  # our T5 task name (its spec gives the tfds name and version to prepare)
  archive: str  # the download's file name (the last part of the builder's URL)
  files: dict[str, str]  # path inside the archive -> contents
  expected: dict[str, list[tuple[str, str]]]  # split -> (T5 inputs, targets), in any order


def _tsv(header: str, lines) -> str:
  return "\n".join([header, *lines]) + "\n"


def _jsonl(rows) -> str:
  return "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)


# ---------------------------------------------------------------------- rows (GLUE's TSVs)

# SST-2: (sentence, label name; None in test.tsv). As in SST-2.zip, sentences end with a space.
SST2 = {
    "train": [("hide new secretions from the parental units ", "negative"),
              ("contains no wit , only labored gags ", "negative"),
              ("that loves its characters and communicates something rather beautiful about "
               "human nature ", "positive"),
              ("the greatest musicians ", "positive")],
    "validation": [("it 's a charming and often affecting journey . ", "positive"),
                   ("unflinchingly bleak and desperate ", "negative")],
    "test": [("uneasy mishmash of styles and genres .", None),
             ("a sometimes tedious film .", None)],
}

# RTE: (sentence1, sentence2, label; None in test.tsv).
RTE = {
    "train": [("No Weapons of Mass Destruction Found in Iraq Yet.",
               "Weapons of Mass Destruction Found in Iraq.", "not_entailment"),
              ("A place of sorrow, after Pope John Paul II died, became a place of celebration, "
               "as Roman Catholic faithful gathered in downtown Chicago to mark the installation "
               "of new Pope Benedict XVI.",
               "Pope Benedict XVI is the new leader of the Roman Catholic Church.", "entailment"),
              ("Herceptin was already approved to treat the sickest breast cancer patients.",
               "Herceptin can be used to treat breast cancer.", "entailment"),
              ("Judie Vivian said that so far about 1,500 children have received treatment at "
               "the Vietnam Heart Institute in Ho Chi Minh City (formerly Saigon).",
               "Ho Chi Minh City was never called Saigon.", "not_entailment")],
    "validation": [("Dana Reeve, the widow of the actor Christopher Reeve, has died of lung "
                    "cancer at age 44.", "Christopher Reeve had an accident.", "not_entailment"),
                   ("Disease-causing bacteria are mutating faster than we can come up with new "
                    "antibiotics.", "Bacteria is winning the war against antibiotics.",
                    "entailment")],
    "test": [("Mangla was summoned after Madhumita's sister Nidhi Shukla, who was the first "
              "witness in the case.", "Shukla is related to Mangla.", None),
             ("Authorities in Brazil say that more than 200 people are being held hostage in a "
              "prison in the country's remote, Amazonian-jungle state of Rondonia.",
              "Authorities in Brazil hold 200 people as hostage.", None)],
}

# ----------------------------------------------------------------- rows (SuperGLUE's JSONL)

# BoolQ: {"question", "passage", "idx", "label": bool}; test.jsonl has no label.
BOOLQ = {
    "train": [
        {"question": "do iran and afghanistan speak the same language",
         "passage": "Persian language -- Persian (/ˈpɜːrʒən/), also known by its endonym Farsi, "
                    "is spoken in Iran, Afghanistan (officially known as Dari) and Tajikistan.",
         "idx": 0, "label": True},
        {"question": "can you use oyster card at epsom station",
         "passage": "Epsom railway station serves the town of Epsom in Surrey. It is outside "
                    "the London Oyster card zone.", "idx": 1, "label": False},
        {"question": "is confectionary sugar the same as powdered sugar",
         "passage": "Powdered sugar, also called confectioners' sugar or icing sugar, is a finely "
                    "ground sugar produced by milling granulated sugar.", "idx": 2, "label": True},
        {"question": "is the mojave desert part of the great basin",
         "passage": "The Mojave Desert borders the Great Basin Desert to its north; it is a "
                    "separate desert.", "idx": 3, "label": False}],
    "validation": [
        {"question": "is house tax and property tax are same",
         "passage": "Property tax or 'house tax' is a local tax on buildings, along with "
                    "appurtenant land.", "idx": 0, "label": True},
        {"question": "does ethanol take more energy make that produces",
         "passage": "Ethanol fuel -- the energy returned on energy invested for ethanol made "
                    "from corn in the U.S. is 1.3.", "idx": 1, "label": False}],
    "test": [
        {"question": "is the show the resident based on a true story",
         "passage": "The Resident is an American medical drama television series.", "idx": 0},
        {"question": "can a minor get a tattoo in new york",
         "passage": "In New York a person must be 18 or older to be tattooed.", "idx": 1}],
}

# CB: {"premise", "hypothesis", "label", "idx"}; test.jsonl has no label.
CB = {
    "train": [
        {"premise": "It was a complex language. Not written down but handed down. One might say "
                    "it was peeled down.", "hypothesis": "the language was peeled down",
         "label": "entailment", "idx": 0},
        {"premise": "B: What do you think, do you think we are, setting a trend?",
         "hypothesis": "they are setting a trend", "label": "neutral", "idx": 1},
        {"premise": "Valence the void-brain, Valence the virtuous valet. Why couldn't the figger "
                    "choose his own portion of titanic anatomy to shaft? Did he think he was "
                    "helping?", "hypothesis": "Valence was helping", "label": "contradiction",
         "idx": 2},
        {"premise": "\"I'm sure he won't mind,\" she said. I didn't think he would mind.",
         "hypothesis": "he would mind", "label": "contradiction", "idx": 3}],
    "validation": [
        {"premise": "Polly had to think quickly. They were still close enough to shore for him to "
                    "return her if she admitted she was not an experienced ocean sailor.",
         "hypothesis": "Polly was not an experienced ocean sailor", "label": "entailment",
         "idx": 0},
        {"premise": "\"Who knows? The point is, do we go with it or not?\" Do we assume there is "
                    "a shipment?", "hypothesis": "there is a shipment", "label": "neutral",
         "idx": 1}],
    "test": [
        {"premise": "Nicky approached her with the assumption that men are naturally right.",
         "hypothesis": "men are naturally right", "idx": 0},
        {"premise": "And I don't think that Heather will mind.", "hypothesis": "Heather will mind",
         "idx": 1}],
}

# GLUE's zips: <folder>/train.tsv and dev.tsv with labels, test.tsv with an index column.
# SuperGLUE's: <folder>/train.jsonl, val.jsonl, test.jsonl.
GLUE_FILES = {"train": "train.tsv", "validation": "dev.tsv", "test": "test.tsv"}
SUPER_GLUE_FILES = {"train": "train.jsonl", "validation": "val.jsonl", "test": "test.jsonl"}


def _sst2_tsv(split: str) -> str:
  if split == "test":
    return _tsv("index\tsentence", (f"{i}\t{s}" for i, (s, _) in enumerate(SST2[split])))
  return _tsv("sentence\tlabel", (f"{s}\t{SST2_LABELS.index(label)}"
                                  for s, label in SST2[split]))


def _rte_tsv(split: str) -> str:
  header = "index\tsentence1\tsentence2" + ("" if split == "test" else "\tlabel")
  return _tsv(header, ("\t".join([str(i), s1, s2] + ([label] if label else []))
                       for i, (s1, s2, label) in enumerate(RTE[split])))


def _label(label) -> str:
  return UNLABELLED if label is None else str(label)


RAW = [
    Raw("glue_sst2_v002", "SST-2.zip",
        {f"SST-2/{GLUE_FILES[s]}": _sst2_tsv(s) for s in SPLITS},
        {s: [(f"sst2 sentence: {text}", _label(label)) for text, label in SST2[s]]
         for s in SPLITS}),
    Raw("glue_rte_v002", "RTE.zip",
        {f"RTE/{GLUE_FILES[s]}": _rte_tsv(s) for s in SPLITS},
        {s: [(f"rte sentence1: {s1} sentence2: {s2}", _label(label)) for s1, s2, label in RTE[s]]
         for s in SPLITS}),
    Raw("super_glue_boolq_v102", "BoolQ.zip",
        {f"BoolQ/{SUPER_GLUE_FILES[s]}": _jsonl(BOOLQ[s]) for s in SPLITS},
        {s: [(f"boolq passage: {r['passage']} question: {r['question']}", _label(r.get("label")))
             for r in BOOLQ[s]] for s in SPLITS}),
    Raw("super_glue_cb_v102", "CB.zip",
        {f"CB/{SUPER_GLUE_FILES[s]}": _jsonl(CB[s]) for s in SPLITS},
        {s: [(f"cb hypothesis: {r['hypothesis']} premise: {r['premise']}", _label(r.get("label")))
             for r in CB[s]] for s in SPLITS}),
]


# ------------------------------------------------------------------------------ preparation


def _tree(path: Path) -> set[str]:
  return {str(p) for p in path.rglob("*")} if path.exists() else set()


def _offline_download_manager(archives: dict[str, Path], requested: list[str]):
  """Patch tfds's DownloadManager as DatasetBuilderTestCase does: `download_and_extract(url)`
  extracts (with tfds's own extractor) the archive the test wrote under the URL's file name;
  any other download fails the test."""

  def download_and_extract(self, url):
    requested.append(url)
    name = url.rsplit("/", 1)[-1]
    assert name in archives, f"unexpected download {url}"
    return self.extract(archives[name])

  def no_network(self, *args, **kwargs):
    raise AssertionError(f"network access attempted: {args}")

  return mock.patch.multiple(tfds.download.DownloadManager,
                             download_and_extract=download_and_extract, download=no_network,
                             download_checksums=no_network)


@dataclasses.dataclass
class Prepared:
  data_dir: Path
  builders: dict[str, tfds.core.DatasetBuilder]  # task name -> builder
  requested: list[str]  # URLs the builders asked for


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> Prepared:
  """Write the archives, then `download_and_prepare` every builder into a temporary data dir."""
  root = tmp_path_factory.mktemp("tfds_prepare")
  archives = {}
  for raw in RAW:
    archives[raw.archive] = root / "archives" / raw.archive
    archives[raw.archive].parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(archives[raw.archive], "w") as archive:
      for name, text in raw.files.items():
        archive.writestr(name, text)
  data_dir = root / "tensorflow_datasets"
  default_dir = Path(tfds.core.constants.DATA_DIR)  # `~/tensorflow_datasets` unless overridden
  default_before = _tree(default_dir / "glue") | _tree(default_dir / "super_glue")
  builders, requested = {}, []
  with tfds.testing.disable_gcs_access(), _offline_download_manager(archives, requested):
    for raw in RAW:
      name, version = SPECS[raw.task].tfds_name.split(":")
      builder = tfds.builder(name, version=version, data_dir=str(data_dir))
      builder.download_and_prepare(
          download_dir=str(root / "downloads"),
          download_config=tfds.download.DownloadConfig(try_download_gcs=False))
      builders[raw.task] = builder
  assert _tree(default_dir / "glue") | _tree(default_dir / "super_glue") == default_before
  return Prepared(data_dir, builders, requested)


def test_builders_prepare_tfrecords_from_the_raw_layouts(prepared):
  """Each builder asked for its own archive, found its files in GLUE's/SuperGLUE's layout and
  wrote every row of every split to tfrecords under the temporary data dir."""
  assert sorted(u.rsplit("/", 1)[-1] for u in prepared.requested) == sorted(
      raw.archive for raw in RAW)
  for raw in RAW:
    builder = prepared.builders[raw.task]
    assert Path(builder.data_dir).is_relative_to(prepared.data_dir), builder.data_dir
    assert list(Path(builder.data_dir).glob("*.tfrecord-*")), builder.data_dir
    for split in SPLITS:
      assert builder.info.splits[split].num_examples == len(raw.expected[split]), (raw.task,
                                                                                   split)


# ------------------------------------------------------------------------ our seqio tasks

# A fresh process reads the tasks the way a user's does: tfds takes its data dir from
# TFDS_DATA_DIR when it is imported, and seqio memoises the builders it opens.
READ_TASKS = """
import json, sys
import seqio
import prompt_jax.tasks  # registers every task

out, names = sys.argv[1], sys.argv[2:]
lengths = {"inputs": 2048, "targets": 32}  # longer than any row: nothing is trimmed
result = {}
for name in names:
  task = seqio.get_mixture_or_task(name)
  result[name] = {}
  for split in task.splits:
    ds = task.get_dataset(lengths, split=split, shuffle=False, use_cached=False)
    result[name][split] = [
        {key: ex[key].decode() for key in ("inputs_pretokenized", "targets_pretokenized")} |
        {key: ex[key].tolist() for key in ("inputs", "targets")}
        for ex in ds.as_numpy_iterator()]
with open(out, "w") as f:
  json.dump(result, f)
"""


def _env(data_dir: Path) -> dict[str, str]:
  return dict(os.environ, TFDS_DATA_DIR=str(data_dir))


def _tail(text: str, lines: int = 40) -> str:
  return "\n".join(text.splitlines()[-lines:])


@pytest.fixture(scope="module")
def task_examples(prepared, tmp_path_factory) -> dict:
  """{task: {split: [example]}} of the byte-vocabulary T5 and taskless tasks, read in a fresh
  process with TFDS_DATA_DIR set to the prepared data dir."""
  out = tmp_path_factory.mktemp("task_examples") / "examples.json"
  names = [f"{prefix}{raw.task}_bytes" for raw in RAW for prefix in ("", "taskless_")]
  proc = subprocess.run([sys.executable, "-c", READ_TASKS, str(out), *names],
                        env=_env(prepared.data_dir), capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, _tail(proc.stderr)
  return json.loads(out.read_text())


def _without_task_name(inputs: str) -> str:
  return inputs.split(" ", 1)[1]


@pytest.mark.parametrize("raw", RAW, ids=[raw.task for raw in RAW])
def test_tasks_read_the_prepared_rows_in_t5_format(task_examples, raw):
  """Our T5 task and its taskless twin yield exactly the rows written, as T5's text-to-text
  strings (`sst2 sentence: ...` -> `positive`; `<unk>` for the unlabelled test rows), tokenised
  by the byte vocabulary with EOS."""
  vocab = seqio.ByteVocabulary()
  variants: dict[str, Callable[[str], str]] = {raw.task: lambda s: s,
                                               f"taskless_{raw.task}": _without_task_name}
  for name, inputs_of in variants.items():
    examples = task_examples[f"{name}_bytes"]
    assert sorted(examples) == sorted(SPLITS), name
    for split in SPLITS:
      got = [(ex["inputs_pretokenized"], ex["targets_pretokenized"]) for ex in examples[split]]
      want = [(inputs_of(inputs), targets) for inputs, targets in raw.expected[split]]
      assert collections.Counter(got) == collections.Counter(want), (name, split)
      for ex in examples[split]:
        for feature in ("inputs", "targets"):
          text = ex[f"{feature}_pretokenized"]
          assert ex[feature] == list(vocab.encode(text)) + [vocab.eos_id], (name, split, text)


# ------------------------------------------------------------------------------- training


def _prompt_jax() -> Optional[str]:
  path = Path(sys.executable).with_name("prompt-jax")
  return str(path) if path.exists() else None


TRAINED = [raw for raw in RAW if raw.task in ("glue_sst2_v002", "super_glue_boolq_v102")]


@pytest.mark.parametrize("raw", TRAINED, ids=[raw.task for raw in TRAINED])
def test_cli_trains_two_steps_on_the_prepared_data(prepared, tmp_path, raw):
  """`prompt-jax train` (the tiny byte-level demo model) prompt-tunes two steps on the prepared
  rows of a GLUE and a SuperGLUE task, evaluating on their validation rows before and after."""
  executable = _prompt_jax()
  assert executable, f"no prompt-jax console script beside {sys.executable} (pip install -e .)"
  model_dir = tmp_path / "run"
  train_rows = raw.expected["train"]
  batch_size = len(raw.expected["validation"])  # the batches fit the few rows written
  proc = subprocess.run(
      [executable, "train", "--gin_file=runs/demo.gin", f"--gin.MODEL_DIR='{model_dir}'",
       f"--gin.MIXTURE_OR_TASK_NAME='taskless_{raw.task}_bytes'",
       "--gin.TASK_MODULE='prompt_jax.tasks'", "--gin.TRAIN_STEPS=2", "--gin.EVAL_PERIOD=0",
       "--gin.CHECKPOINT_PERIOD=2", f"--gin.BATCH_SIZE={batch_size}",
       f"--gin.EVAL_BATCH_SIZE={batch_size}"],
      cwd=tmp_path, env=_env(prepared.data_dir), capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, _tail(proc.stdout) + "\n" + _tail(proc.stderr)
  summary = json.loads((model_dir / "summary.json").read_text())
  assert summary["step"] == 2, summary
  assert math.isfinite(summary["train"]["loss"]), summary
  # The step trained on our rows: its targets are label names plus EOS in the byte vocabulary
  # (the last step's batch: `batch_size` of the rows written, so between the shortest and the
  # longest label's length per row).
  vocab = seqio.ByteVocabulary()
  lengths = [len(vocab.encode(label)) + 1 for _, label in train_rows]
  assert (batch_size * min(lengths) <= summary["train"]["nonpadding_tokens"]
          <= batch_size * max(lengths)), summary
  for evaluation in ("eval_untrained", "eval_trained"):
    assert 0.0 <= summary[evaluation]["accuracy"] <= 100.0, summary
  assert (model_dir / "prompts" / "prompt_2.npy").exists()
