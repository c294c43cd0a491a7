"""prompt_jax: soft prompt tuning of frozen T5 models in JAX/Flax."""

import os

# TensorFlow (used only by the seqio input pipeline) is chatty on import; keep it quiet.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

__version__ = "0.1.0"
