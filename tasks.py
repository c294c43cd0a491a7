"""seqio task registrations, importable from gin as `import tasks` (TASK_MODULE = 'tasks').

Importing this module registers every task the project provides.
"""

from prompt_jax.data import synthetic  # noqa: F401  (demo tasks)
