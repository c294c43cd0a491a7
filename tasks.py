"""T5X's `MIXTURE_OR_TASK_MODULE = 'tasks'` convention, for runs started from a source checkout.

The registrations live in the package (`prompt_jax.tasks`, which an installed wheel also has);
importing this module only imports that one.
"""

import prompt_jax.tasks  # noqa: F401  (registers the demo, GLUE and SuperGLUE tasks)
