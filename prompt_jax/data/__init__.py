"""Input pipelines: seqio tasks to batched numpy arrays in T5X's feature names.

Importing this package changes nothing process-wide: `pipeline.host_only_tensorflow()` keeps
TensorFlow off the accelerators when a pipeline is first built.
"""
