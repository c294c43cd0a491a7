"""Multi-task serving: mixed-task batches on one frozen model, each line answered as if alone.

The shipped demo model was trained on inputs prefixed with 'sentiment: ', 'topic: ' or
'adjective: '. A prompt made of exactly the embedding rows of such a prefix gives the encoder the
same input as the prefixed text, so each served line must get the prediction the prompt-free
model gives the prefixed text -- an independent computation.
"""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest
import seqio

from prompt_jax.data import synthetic
from prompt_jax.interop import peft
from prompt_jax.models import decoding, t5
from prompt_jax.models.encoder_decoder import EncoderDecoderModel
from prompt_jax.serving import inference, multitask_inference
from prompt_jax.storage import frozen_models, prompt_files

DEMO_CHECKPOINT = "builtin:demo_t5_tiny.npz"
PREFIXES = {"sentiment": "sentiment: ", "topic": "topic: ", "adjective": "adjective: "}
INPUT_LENGTH, DECODE_LENGTH = 48, 8


@pytest.fixture(scope="module")
def frozen_numpy():
  return frozen_models.load_params_npz(frozen_models.resolve_path(DEMO_CHECKPOINT))


def _prefix_prompt(frozen, prefix):
  ids = seqio.ByteVocabulary().encode(prefix)
  return np.asarray(frozen["token_embedder"]["embedding"])[ids].astype(np.float32)


def _records():
  """Three sentences x three tasks, interleaved so that every batch mixes tasks."""
  examples = synthetic.make_examples("validation")[:3]
  order = ["sentiment", "topic", "adjective"]
  return [{"task": order[(i + i // 3) % 3], "inputs": examples[i % 3]["sentence"],
           "answer": examples[i % 3][order[(i + i // 3) % 3]], "id": i} for i in range(9)]


def test_mixed_task_batches_answer_every_line_as_its_prefixed_text(tmp_path, frozen_numpy):
  vocabulary = seqio.ByteVocabulary()
  # Three sources: a .npy file, a PEFT adapter, a row of a bank export. 'topic: ' is shorter
  # (7 tokens) than the other two (11), so two banks serve the lines.
  np.save(tmp_path / "sentiment.npy", _prefix_prompt(frozen_numpy, PREFIXES["sentiment"]))
  peft.save_prompt(_prefix_prompt(frozen_numpy, PREFIXES["topic"]), str(tmp_path / "topic_peft"))
  bank_export = np.stack([np.zeros((11, 64), np.float32),
                          _prefix_prompt(frozen_numpy, PREFIXES["adjective"])])
  np.save(tmp_path / "bank.npy", bank_export)
  records = _records()
  with open(tmp_path / "in.jsonl", "w") as f:
    f.writelines(json.dumps(r) + "\n" for r in records)

  model = EncoderDecoderModel(t5.Transformer(t5.preset("tiny")))
  summary = multitask_inference.infer_multitask(
      model=model, inputs_path=str(tmp_path / "in.jsonl"), output_path=str(tmp_path / "out.jsonl"),
      prompts={"sentiment": str(tmp_path / "sentiment.npy"),
               "topic": str(tmp_path / "topic_peft"), "adjective": f"{tmp_path / 'bank.npy'}#1"},
      vocabulary=vocabulary, initial_checkpoint_path=DEMO_CHECKPOINT,
      input_length=INPUT_LENGTH, max_decode_length=DECODE_LENGTH, batch_size=4)
  assert summary["count"] == len(records)
  assert summary["banks"] == {11: ["sentiment", "adjective"], 7: ["topic"]}
  with open(tmp_path / "out.jsonl") as f:
    served = [json.loads(line) for line in f]
  assert [r["id"] for r in served] == [r["id"] for r in records]  # order and fields kept

  # Independent: the model without any prompt hook on the prefixed texts.
  texts = [PREFIXES[r["task"]] + r["inputs"] for r in records]
  tokens = inference.encode_inputs(texts, vocabulary, INPUT_LENGTH + 11)
  predicted = jax.jit(lambda p, b: model.predict_batch(p, b, DECODE_LENGTH))(
      frozen_numpy, {"encoder_input_tokens": tokens})
  expected = [vocabulary.decode([int(t) for t in row]) for row in np.asarray(predicted)]
  assert [r["prediction"] for r in served] == expected
  # The prompts matter: every sentence gets three different answers, mostly the right ones.
  for sentence in {r["inputs"] for r in records}:
    assert len({r["prediction"] for r in served if r["inputs"] == sentence}) == 3
  assert sum(r["prediction"] == r["answer"] for r in served) >= 7


def test_beam_search_serving_gives_each_line_the_beams_of_its_prefixed_text(tmp_path,
                                                                           frozen_numpy):
  """`main(decode='beam_search(...)')`: every beam of a line keeps that line's prompt in the
  mixed banks, so its beams and scores are those of the prompt-free model on the prefixed text."""
  vocabulary = seqio.ByteVocabulary()
  for task, prefix in PREFIXES.items():
    np.save(tmp_path / f"{task}.npy", _prefix_prompt(frozen_numpy, prefix))
  records = _records()
  with open(tmp_path / "in.jsonl", "w") as f:
    f.writelines(json.dumps(r) + "\n" for r in records)
  code = multitask_inference.main(inputs=str(tmp_path / "in.jsonl"),
                                  output=str(tmp_path / "out.jsonl"),
                                  prompts=[(t, str(tmp_path / f"{t}.npy")) for t in PREFIXES],
                                  checkpoint=DEMO_CHECKPOINT, input_length=INPUT_LENGTH,
                                  max_decode_length=DECODE_LENGTH, batch_size=4,
                                  decode="beam_search(num_decodes=3, alpha=0.6)",
                                  return_all_decodes=True)
  assert code == 0
  with open(tmp_path / "out.jsonl") as f:
    served = [json.loads(line) for line in f]
  model = EncoderDecoderModel(t5.Transformer(t5.preset("tiny")))
  tokens = inference.encode_inputs([PREFIXES[r["task"]] + r["inputs"] for r in records],
                                   vocabulary, INPUT_LENGTH + 11)
  beams, scores = jax.jit(lambda p, b: decoding.beam_search(model, p, b, DECODE_LENGTH, 3, 0.6))(
      frozen_numpy, {"encoder_input_tokens": tokens})
  for line, rows, row_scores in zip(served, np.asarray(beams), np.asarray(scores)):
    assert line["predictions"] == [vocabulary.decode([int(t) for t in row]) for row in rows]
    np.testing.assert_allclose(line["scores"], row_scores, atol=1e-4)
    assert line["prediction"] == line["predictions"][0]
  assert sum(r["prediction"] == r["answer"] for r in served) >= 7


def test_load_prompt_sources_and_errors(tmp_path):
  prompt = np.arange(12, dtype=np.float32).reshape(3, 4)
  run = tmp_path / "run" / "prompts"
  run.mkdir(parents=True)
  np.save(run / "prompt_5.npy", prompt * 0)
  np.save(run / "prompt_20.npy", prompt)  # the latest export wins (numerically, not as text)
  np.testing.assert_array_equal(prompt_files.read_prompt(str(tmp_path / "run")), prompt)
  np.save(tmp_path / "bank.npy", np.stack([prompt, prompt + 1]))
  np.testing.assert_array_equal(prompt_files.read_prompt(f"{tmp_path / 'bank.npy'}#1"), prompt + 1)
  with pytest.raises(ValueError, match=r"needs '#<row>'"):
    prompt_files.read_prompt(str(tmp_path / "bank.npy"))
  with pytest.raises(ValueError, match=r"0 <= row < N; got shape \(2, 3, 4\) and row '2'"):
    prompt_files.read_prompt(f"{tmp_path / 'bank.npy'}#2")
  with pytest.raises(FileNotFoundError, match="does not exist"):
    prompt_files.read_prompt(str(tmp_path / "missing.npy"))
  with pytest.raises(ValueError, match=r"line 2: task 'nli' has no prompt; prompts are given "
                                       r"for \['sentiment'\]"):
    multitask_inference.check_records([{"task": "sentiment", "inputs": "a"},
                             {"task": "nli", "inputs": "b"}], ["sentiment"])


def test_cli_routes_infer_multitask(tmp_path, frozen_numpy):
  from prompt_jax import cli  # pylint: disable=g-import-not-at-top
  np.save(tmp_path / "s.npy", _prefix_prompt(frozen_numpy, PREFIXES["sentiment"]))
  with open(tmp_path / "in.jsonl", "w") as f:
    f.write(json.dumps({"task": "sentiment", "inputs": _records()[0]["inputs"]}) + "\n")
  code = cli.main(["infer-multitask", f"--inputs={tmp_path / 'in.jsonl'}",
                   f"--output={tmp_path / 'out.jsonl'}", f"--prompt=sentiment={tmp_path / 's.npy'}",
                   f"--checkpoint={DEMO_CHECKPOINT}", "--model=tiny", "--input_length=48",
                   "--max_decode_length=8", "--batch_size=2"])
  assert code == 0
  with open(tmp_path / "out.jsonl") as f:
    assert json.loads(f.readline())["prediction"] in ("positive", "negative")
  code = cli.main(["infer-multitask", f"--inputs={tmp_path / 'in.jsonl'}",
                   f"--output={tmp_path / 'out.jsonl'}", f"--prompt=topic={tmp_path / 's.npy'}",
                   f"--checkpoint={DEMO_CHECKPOINT}"])
  assert code == 1  # line 1's task 'sentiment' has no prompt
