"""seqio task registrations: gin's `TASK_MODULE = 'prompt_jax.tasks'` (the run files' default).

Importing this module registers every task the project provides:
  * the synthetic demo tasks (`prompt_jax.data.synthetic`, byte vocabulary);
  * GLUE and SuperGLUE under T5's names (`glue_sst2_v002`, `super_glue_boolq_v102`, ...), their
    `taskless_` and `_rank` variants and the proportional mixtures, with T5's SentencePiece
    vocabulary (or the one named by the PROMPT_JAX_VOCABULARY environment variable: a
    SentencePiece model path, or `byte`);
  * the same GLUE/SuperGLUE tasks with the byte vocabulary, suffixed `_bytes`
    (e.g. `taskless_glue_sst2_v002_bytes`), for byte-level models such as the tiny demo model.
"""

import seqio

from prompt_jax.data import (
    glue,
    superglue,
    synthetic,  # noqa: F401  (demo tasks)
)

glue.register()
superglue.register()
glue.register(seqio.ByteVocabulary(), suffix="_bytes")
superglue.register(seqio.ByteVocabulary(), suffix="_bytes")
