"""Write frozen T5 parameters as a full T5X checkpoint (target + Adafactor state), using T5X.

Any parameters our loader reads (`.npz`, our Orbax directory, a T5X or Hugging Face checkpoint,
`builtin:<name>`) become `<output_dir>/checkpoint_<step>/` in T5X's own (legacy msgpack +
tensorstore) format, written by `t5x.checkpoints.Checkpointer`, with freshly initialised T5X
Adafactor state, i.e. what a T5X pre-training run would leave behind. Requires t5x.

  python -m prompt_jax.t5x_compat.write_checkpoint --params=builtin:demo_t5_tiny.npz \
      --preset=tiny --output_dir=/tmp/t5x_demo_init
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Mapping, Optional, Sequence

import jax
import jax.numpy as jnp
import seqio
from flax import traverse_util
from t5x import adafactor
from t5x import checkpoints as t5x_checkpoints
from t5x import partitioning as t5x_partitioning
from t5x import utils as t5x_utils

from prompt_jax.models import t5
from prompt_jax.storage import frozen_models
from prompt_jax.t5x_compat import models

log = logging.getLogger(__name__)


def _nested(params: Mapping) -> dict:
  flat = traverse_util.flatten_dict(params, sep="/") if any(
      isinstance(v, Mapping) for v in params.values()) else dict(params)
  return traverse_util.unflatten_dict({tuple(k.split("/")): jnp.asarray(v)
                                       for k, v in flat.items()})


def write_t5x_checkpoint(params: Mapping, config: t5.T5Config, output_dir: str,
                         step: int = 0) -> str:
  """Saves `params` (nested or '/'-flat, no prompt) as `<output_dir>/checkpoint_<step>` with
  T5X's Checkpointer and returns that directory. Shapes must match `config`."""
  vocabulary = seqio.PassThroughVocabulary(size=config.vocab_size)
  model = models.PromptEncoderDecoderModel(
      module=t5.Transformer(config), input_vocabulary=vocabulary, output_vocabulary=vocabulary,
      optimizer_def=adafactor.Adafactor())
  partitioner = t5x_partitioning.PjitPartitioner(num_partitions=1)
  initializer = t5x_utils.TrainStateInitializer(
      optimizer_def=model.optimizer_def, init_fn=model.get_initial_variables,
      input_shapes={"encoder_input_tokens": (1, 8), "decoder_input_tokens": (1, 8)},
      input_types={"encoder_input_tokens": jnp.int32, "decoder_input_tokens": jnp.int32},
      partitioner=partitioner)
  state = initializer.from_scratch(jax.random.PRNGKey(0))
  params = _nested(params)
  expected = traverse_util.flatten_dict(jax.tree_util.tree_map(jnp.shape, state.params))
  found = traverse_util.flatten_dict(jax.tree_util.tree_map(jnp.shape, params))
  if expected != found:
    diff = sorted("/".join(k) for k in set(expected.items()) ^ set(found.items()))
    raise ValueError(f"params do not match {config}: differing (name, shape) entries "
                     f"{diff[:10]}")
  state = state.replace_params(params).replace_step(jnp.asarray(step, jnp.int32))
  checkpointer = t5x_checkpoints.Checkpointer(state, partitioner, output_dir)
  checkpointer.save(state)
  return os.path.join(output_dir, f"checkpoint_{step}")


def main(argv: Optional[Sequence[str]] = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--params", required=True,
                      help="frozen parameters: .npz, Orbax/T5X/HF directory or builtin:<name>")
  parser.add_argument("--preset", required=True,
                      help=f"architecture, one of {sorted(t5.PRESETS)}")
  parser.add_argument("--output_dir", required=True)
  parser.add_argument("--step", type=int, default=0)
  args = parser.parse_args(argv)
  config = t5.preset(args.preset)
  params = frozen_models.load_frozen_params(args.params, config)
  path = write_t5x_checkpoint(params, config, args.output_dir, args.step)
  print(f"wrote {path}")
  return 0


if __name__ == "__main__":
  logging.basicConfig(level=logging.INFO)
  sys.exit(main())
