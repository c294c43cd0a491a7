"""The T5 module: T5X parameter names and axes, numerics against an independent NumPy pass,
the decoding cache, and the preset sizes."""

from __future__ import annotations

import importlib
import pkgutil

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from prompt_jax import params as params_lib
from prompt_jax import prompts
from prompt_jax.models import t5
from prompt_jax.models.encoder_decoder import EncoderDecoderModel
from prompt_jax.programs import PromptPrograms
from prompt_jax.prompts import base, hook, initializers
from prompt_jax.prompts.base import InputPrompt
from prompt_jax.prompts.plain import Prompt
from tests import reference_t5
from tests.test_import_graph import import_graph

# Values compared against tolerances: CI runs these again under another CPU instruction set.
pytestmark = pytest.mark.numerics

ENC = np.array([[5, 9, 17, 33, 60, 1, 0, 0], [7, 8, 1, 0, 0, 0, 0, 0]], np.int32)
DEC_IN = np.array([[0, 11, 12, 13, 14], [0, 21, 22, 0, 0]], np.int32)
DEC_TGT = np.array([[11, 12, 13, 14, 1], [21, 22, 1, 0, 0]], np.int32)


def _v1_0_tiny():
  return t5.T5Config(vocab_size=96, emb_dim=16, num_heads=2, head_dim=8, mlp_dim=24,
                     num_encoder_layers=2, num_decoder_layers=3, mlp_activations=("relu",),
                     logits_via_embedding=True, dropout_rate=0.0,
                     relative_attention_num_buckets=8, relative_attention_max_distance=16)


def _v1_1_tiny():
  return _v1_0_tiny().replace(mlp_activations=("gelu", "linear"), logits_via_embedding=False)


def _init(module, seed=0):
  return module.init(jax.random.key(seed), ENC, DEC_IN, DEC_TGT, enable_dropout=False)["params"]


def _randomise_norms(params, seed=1):
  """Layer-norm scales start at 1; perturb them so a wrong mapping shows in the output."""
  rng = np.random.default_rng(seed)
  flat = flax.traverse_util.flatten_dict(params, sep="/")
  for k in flat:
    if k.endswith("scale"):
      flat[k] = flat[k] + rng.normal(0, 0.3, flat[k].shape).astype(np.float32)
  return flax.traverse_util.unflatten_dict(flat, sep="/")


def test_parameter_names_and_axes_follow_t5x():
  params = _init(t5.Transformer(_v1_1_tiny()))
  names = set(flax.traverse_util.flatten_dict(nn.unbox(params), sep="/"))
  attn = lambda pre: {f"{pre}/{n}/kernel" for n in ("query", "key", "value", "out")}
  mlp = lambda pre: {f"{pre}/mlp/{n}/kernel" for n in ("wi_0", "wi_1", "wo")}
  expected = {"token_embedder/embedding", "encoder/relpos_bias/rel_embedding",
              "encoder/encoder_norm/scale", "decoder/relpos_bias/rel_embedding",
              "decoder/decoder_norm/scale", "decoder/logits_dense/kernel"}
  for i in range(2):
    pre = f"encoder/layers_{i}"
    expected |= attn(f"{pre}/attention") | mlp(pre)
    expected |= {f"{pre}/pre_attention_layer_norm/scale", f"{pre}/pre_mlp_layer_norm/scale"}
  for i in range(3):
    pre = f"decoder/layers_{i}"
    expected |= attn(f"{pre}/self_attention") | attn(f"{pre}/encoder_decoder_attention")
    expected |= mlp(pre) | {f"{pre}/pre_{n}_layer_norm/scale"
                            for n in ("self_attention", "cross_attention", "mlp")}
  assert names == expected
  specs = flax.traverse_util.flatten_dict(nn.get_partition_spec(params), sep="/")
  assert tuple(specs["token_embedder/embedding"]) == ("vocab", "embed")
  assert tuple(specs["encoder/layers_0/attention/query/kernel"]) == ("embed", "joined_kv")
  assert tuple(specs["decoder/layers_1/self_attention/out/kernel"]) == ("joined_kv", "embed")
  assert tuple(specs["decoder/layers_0/mlp/wi_1/kernel"]) == ("embed", "mlp")
  assert tuple(specs["encoder/relpos_bias/rel_embedding"]) == ("heads", "relpos_buckets")
  assert tuple(specs["decoder/logits_dense/kernel"]) == ("embed", "vocab")
  assert nn.unbox(params)["encoder"]["layers_0"]["attention"]["query"]["kernel"].shape == (16, 16)


def test_v1_0_has_single_wi_and_no_logits_dense():
  names = set(flax.traverse_util.flatten_dict(nn.unbox(_init(t5.Transformer(_v1_0_tiny()))),
                                              sep="/"))
  assert "encoder/layers_0/mlp/wi/kernel" in names
  assert not any("wi_0" in n for n in names)
  assert "decoder/logits_dense/kernel" not in names


@pytest.mark.parametrize("make_config", [_v1_0_tiny, _v1_1_tiny], ids=["v1_0", "v1_1"])
def test_logits_match_independent_numpy_forward(make_config):
  cfg = make_config()
  module = t5.Transformer(cfg)
  params = _randomise_norms(nn.unbox(_init(module)))
  logits = np.asarray(module.apply({"params": params}, ENC, DEC_IN, DEC_TGT,
                                   enable_dropout=False))
  emb = np.asarray(params["token_embedder"]["embedding"])
  for b in range(ENC.shape[0]):
    ref = reference_t5.forward(params, cfg, emb[ENC[b]], ENC[b] > 0, DEC_IN[b], DEC_TGT[b] > 0)
    valid = DEC_TGT[b] > 0
    np.testing.assert_allclose(logits[b][valid], ref[valid], atol=2e-4, rtol=1e-4)


@pytest.mark.parametrize("placement", ["prefix", "prefix_after_bos", "suffix"])
def test_prompt_placements_match_numpy(placement):
  cfg = _v1_1_tiny()
  module = t5.Transformer(cfg, InputPrompt(Prompt(3, initializers.uniform()), placement))
  params = nn.unbox(_init(module))
  prompt = np.asarray(params["encoder"]["prompt"]["prompt"]["prompt"])
  logits = np.asarray(module.apply({"params": params}, ENC, DEC_IN, DEC_TGT,
                                   enable_dropout=False))
  emb = np.asarray(params["token_embedder"]["embedding"])
  for b in range(ENC.shape[0]):
    x, real = emb[ENC[b]], ENC[b] > 0
    n = int(real.sum())
    if placement == "prefix":
      seq, mask = np.concatenate([prompt, x]), np.concatenate([[True] * 3, real])
    elif placement == "prefix_after_bos":
      seq = np.concatenate([x[:1], prompt, x[1:]])
      mask = np.concatenate([real[:1], [True] * 3, real[1:]])
    else:
      seq = np.concatenate([x[:n], prompt, x[n:]])
      mask = np.concatenate([real[:n], [True] * 3, real[n:]])
    ref = reference_t5.forward(params, cfg, seq, mask, DEC_IN[b], DEC_TGT[b] > 0)
    valid = DEC_TGT[b] > 0
    np.testing.assert_allclose(logits[b][valid], ref[valid], atol=2e-4, rtol=1e-4)


def test_cached_decoding_matches_teacher_forcing():
  cfg = _v1_1_tiny()
  module = t5.Transformer(cfg, InputPrompt(Prompt(2, initializers.uniform())))
  params = nn.unbox(_init(module))
  full = np.asarray(module.apply({"params": params}, ENC, DEC_IN, jnp.ones_like(DEC_IN),
                                 enable_dropout=False))
  encoded = module.apply({"params": params}, ENC, enable_dropout=False, method=module.encode)
  length = DEC_IN.shape[1]
  cache = module.init(jax.random.key(0), ENC, DEC_IN, DEC_IN, decode=True,
                      enable_dropout=False)["cache"]
  cache = jax.tree_util.tree_map(jnp.zeros_like, cache)
  for i in range(length):
    token = DEC_IN[:, i:i + 1]
    step, variables = module.apply({"params": params, "cache": cache}, encoded, ENC, token,
                                   token, enable_dropout=False, decode=True,
                                   max_decode_length=length, mutable=["cache"],
                                   method=module.decode)
    cache = variables["cache"]
    np.testing.assert_allclose(np.asarray(step)[:, 0], full[:, i], atol=1e-5)


def test_dropout_changes_outputs_only_when_enabled():
  cfg = _v1_1_tiny().replace(dropout_rate=0.3)
  module = t5.Transformer(cfg)
  params = _init(module)
  run = lambda enable, seed: np.asarray(module.apply(
      {"params": params}, ENC, DEC_IN, DEC_TGT, enable_dropout=enable,
      rngs={"dropout": jax.random.key(seed)}))
  np.testing.assert_array_equal(run(False, 0), run(False, 1))
  assert np.abs(run(True, 0) - run(True, 1)).max() > 1e-3


# Parameter counts of the T5 1.1 sizes (methods.md section 4), from abstract shapes only.
@pytest.mark.parametrize("name,expected", [("t5_1_1_small", 77e6), ("t5_1_1_base", 248e6),
                                           ("t5_1_1_large", 783e6), ("t5_1_1_xl", 2.85e9),
                                           ("t5_1_1_xxl", 11.1e9)])
def test_preset_parameter_counts(name, expected):
  module = t5.Transformer(t5.preset(name))
  tokens = jnp.ones((1, 4), jnp.int32)
  shapes = jax.eval_shape(lambda: module.init(jax.random.key(0), tokens, tokens, tokens,
                                              enable_dropout=False))["params"]
  count = sum(np.prod(x.shape) for x in jax.tree_util.tree_leaves(nn.unbox(shapes)))
  assert abs(count - expected) / expected < 0.01, count


def test_config_rejects_bad_values_by_name():
  with pytest.raises(ValueError, match="num_heads.*-1"):
    t5.T5Config(num_heads=-1)
  with pytest.raises(ValueError, match="mlp_activations.*'swish2'"):
    t5.T5Config(mlp_activations=("swish2",))
  with pytest.raises(ValueError, match="unknown T5 preset 'huge'"):
    t5.preset("huge")


# ------------------------------------------------------------------------- the hook contract


class TaskPrompt(nn.Module):
  """A hook the model has never heard of: its own batch feature `task_ids` [b] picks one of
  `num_tasks` prompts per example (what a multi-task prompt does). Its parameter's first axis,
  `toy_task`, has no partitioning rule anywhere. It subclasses nothing of prompt_jax: it defines
  every member of the contract (`prompts.hook.PromptHook`) itself."""

  input_features = ("task_ids",)
  scan_layer_inputs = None  # per-layer stacks only

  num_tasks: int
  length: int
  embed: int

  def setup(self):
    self.prompts = self.param(
        "prompts", nn.with_logical_partitioning(nn.initializers.uniform(1.0),
                                                ("toy_task", "prompt", "prompt_embed")),
        (self.num_tasks, self.length, self.embed))

  def _task_ids(self, prompt_features, batch_size):
    if "task_ids" in prompt_features:
      return prompt_features["task_ids"]
    if self.is_initializing():
      return jnp.zeros((batch_size,), jnp.int32)
    raise ValueError("TaskPrompt needs batch['task_ids']")

  def __call__(self, input_tokens, embedded_inputs, embedding_table, prompt_features):
    task_ids = self._task_ids(prompt_features, input_tokens.shape[0])
    chosen = jnp.take(self.prompts, task_ids, axis=0).astype(embedded_inputs.dtype)
    return (base.insert_prompt(chosen, embedded_inputs, input_tokens, "prefix"),
            self.input_mask(input_tokens))

  def input_mask(self, input_tokens):
    return base.prompt_mask(input_tokens, self.length, "prefix")

  def layer_inputs(self, layer, hidden, input_tokens, prompt_features):
    self.sow("intermediates", f"task_ids_before_layer_{layer}",
             self._task_ids(prompt_features, hidden.shape[0]))
    return hidden

  def attention_prefixes(self, batch_size, layout, prompt_features):
    return None

  def export(self, embedding_table):
    return self.prompts


def _prompt_hook_classes():
  """Every encoder hook class of prompt_jax/prompts (a Linen module with `input_mask`)."""
  found = set()
  for info in pkgutil.iter_modules(prompts.__path__):
    module = importlib.import_module(f"{prompts.__name__}.{info.name}")
    found |= {c for c in vars(module).values() if isinstance(c, type)
              and issubclass(c, nn.Module) and hasattr(c, "input_mask")}
  return sorted(found, key=lambda c: c.__name__)


def test_every_prompt_hook_defines_the_whole_contract():
  # The model reads these members directly (no getattr defaults), so every hook has them all.
  contract = {*hook.PromptHook.__annotations__,
              *(n for n, v in vars(hook.PromptHook).items()
                if callable(v) and (n == "__call__" or not n.startswith("_")))}
  assert contract == {"input_features", "__call__", "input_mask", "layer_inputs",
                      "scan_layer_inputs", "attention_prefixes", "export"}
  classes = _prompt_hook_classes()
  assert {"InputPrompt", "PromptBank", "DeepPrompt", "SelectivePrompt", "SharedTaskPrompt",
          "MPTPrompt"} <= {c.__name__ for c in classes}
  for cls in [*classes, TaskPrompt]:
    missing = [name for name in contract if not hasattr(cls, name)]
    assert not missing, (cls.__name__, missing)
    assert isinstance(cls.input_features, tuple), cls.__name__
  assert isinstance(InputPrompt(Prompt(2)), hook.PromptHook)


def test_the_model_imports_nothing_from_prompts():
  graph = import_graph()
  edges = {(m, e) for m, targets in graph.items() if m.startswith("prompt_jax.models")
           for e in targets if e.startswith("prompt_jax.prompts")}
  assert not edges, edges


def _task_batch(task_ids):
  return {"encoder_input_tokens": ENC, "decoder_input_tokens": DEC_IN,
          "decoder_target_tokens": DEC_TGT, "decoder_loss_weights": (DEC_TGT > 0).astype(np.int32),
          "task_ids": np.asarray(task_ids, np.int32), "unrelated_feature": np.ones((2, 3))}


def test_a_new_hook_reads_its_own_batch_feature_end_to_end():
  cfg = _v1_1_tiny()
  model = EncoderDecoderModel(t5.Transformer(cfg, TaskPrompt(3, 2, cfg.emb_dim)))
  assert model.prompt_feature_names == ("task_ids",)
  params = nn.unbox(model.init(jax.random.key(0), model.dummy_batch(2, 8, 5)))  # no task_ids
  prompts = np.asarray(params["encoder"]["prompt"]["prompts"])
  frozen = params_lib.split_params(params)[1]
  plain = EncoderDecoderModel(t5.Transformer(cfg, InputPrompt(Prompt(2))))
  plain_params = lambda task: params_lib.merge_params(
      {"encoder": {"prompt": {"prompt": {"prompt": jnp.asarray(prompts[task])}}}}, frozen)

  batch = _task_batch([2, 0])
  logits = np.asarray(model.logits(params, batch))
  predictions = np.asarray(model.predict_batch(params, batch, 5))
  for row, task in enumerate([2, 0]):  # example j sees exactly the prompt of its task
    np.testing.assert_allclose(logits[row],
                               np.asarray(plain.logits(plain_params(task), batch))[row],
                               atol=1e-5, rtol=0)
    np.testing.assert_array_equal(
        predictions[row], np.asarray(plain.predict_batch(plain_params(task), batch, 5))[row])
  assert np.abs(logits - np.asarray(model.logits(params, _task_batch([1, 1])))).max() > 1e-3

  # Through loss_fn the gradient reaches exactly the prompts of the tasks in the batch.
  loss, _ = model.loss_fn(params, batch, None)
  assert np.isfinite(float(loss))
  grads = jax.grad(lambda p: model.loss_fn(p, batch, None)[0])(params)
  row_norms = np.abs(np.asarray(grads["encoder"]["prompt"]["prompts"])).sum(axis=(1, 2))
  assert row_norms[0] > 0 and row_norms[2] > 0 and row_norms[1] == 0

  # Every hook call during encoding sees the same mapping.
  _, state = model.module.apply({"params": params}, ENC, enable_dropout=False,
                                prompt_features={"task_ids": jnp.asarray([2, 0])},
                                method=model.module.encode, mutable=["intermediates"])
  seen = state["intermediates"]["encoder"]["prompt"]
  assert sorted(seen) == [f"task_ids_before_layer_{i}" for i in range(cfg.num_encoder_layers)]
  for value in seen.values():
    np.testing.assert_array_equal(value[0], [2, 0])

  with pytest.raises(ValueError, match=r"TaskPrompt needs batch\['task_ids'\]"):
    model.logits(params, {k: v for k, v in batch.items() if k != "task_ids"})


def test_programs_forward_the_hooks_features_and_replicate_its_axes():
  cfg = _v1_1_tiny()
  model = EncoderDecoderModel(t5.Transformer(cfg, TaskPrompt(3, 2, cfg.emb_dim)))
  programs = PromptPrograms(model, input_length=ENC.shape[1])
  assert tuple(programs.prompt_shardings["encoder"]["prompt"]["prompts"].spec) == (
      None, None, None)  # `toy_task` has no rule: replicated, no partitioning edit needed
  params = nn.unbox(model.init(jax.random.key(0), model.dummy_batch(2, 8, 5)))
  prompt_params, frozen = params_lib.split_params(params)
  for tasks in ([2, 0], [1, 1]):
    batch = _task_batch(tasks)
    np.testing.assert_allclose(programs.score(prompt_params, frozen, batch),
                               np.asarray(model.score_batch(params, batch)), atol=1e-4,
                               rtol=1e-5)
    np.testing.assert_array_equal(programs.predict(prompt_params, frozen, batch, 5),
                                  np.asarray(model.predict_batch(params, batch, 5)))
  assert np.abs(programs.score(prompt_params, frozen, _task_batch([2, 0]))
                - programs.score(prompt_params, frozen, _task_batch([1, 1]))).max() > 1e-3
  np.testing.assert_array_equal(programs.export_prompt(prompt_params, frozen),
                                prompt_params["encoder"]["prompt"]["prompts"])


def test_features_nobody_reads_are_refused_by_the_hook_or_the_model():
  cfg = _v1_1_tiny()
  ids = {"prompt_ids": jnp.zeros((2,), jnp.int32)}
  single = t5.Transformer(cfg, InputPrompt(Prompt(2)))
  with pytest.raises(ValueError, match="^InputPrompt holds one prompt; prompt_ids need a prompt "
                                       "bank"):
    single.apply({"params": nn.unbox(_init(single))}, ENC, DEC_IN, DEC_TGT, enable_dropout=False,
                 prompt_features=ids)
  bare = t5.Transformer(cfg)
  with pytest.raises(ValueError, match="^prompt_ids were given but the model has no prompt"):
    bare.apply({"params": nn.unbox(_init(bare))}, ENC, DEC_IN, DEC_TGT, enable_dropout=False,
               prompt_features=ids)
  assert EncoderDecoderModel(bare).prompt_feature_names == ()
  assert base.export_prompt(bare.prompt, {}) is None
