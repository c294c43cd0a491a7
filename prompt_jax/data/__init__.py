"""Input pipelines: seqio tasks to batched numpy arrays in T5X's feature names."""

import tensorflow as tf

# The input pipeline runs on the host; keep TensorFlow off any accelerator JAX uses.
tf.config.set_visible_devices([], "GPU")
