"""Packages of the wheel; everything else is in pyproject.toml.

gin_configs/ stays at the repository's top level (the layout T5X and the prompt-tuning repo use)
and ships inside the package as `prompt_jax/gin_configs`, where the CLI's default gin search path
finds it, so after a plain `pip install` `prompt-jax train --gin_file=runs/demo.gin` runs from
any directory. The top-level tasks.py is a source-checkout shim for T5X's
`MIXTURE_OR_TASK_MODULE = 'tasks'`; the wheel installs no top-level module.
"""

from setuptools import find_namespace_packages, setup

SKIP = ["*__pycache__*"]
PACKAGES = find_namespace_packages(include=["prompt_jax", "prompt_jax.*"], exclude=SKIP)
GIN_CONFIGS = ["prompt_jax.gin_configs",
               *(f"prompt_jax.gin_configs.{name}"
                 for name in find_namespace_packages("gin_configs", exclude=SKIP))]

setup(
    packages=[*PACKAGES, *GIN_CONFIGS],
    package_dir={"prompt_jax.gin_configs": "gin_configs"},
    package_data={"prompt_jax.assets": ["*.npz"], **{name: ["*.gin"] for name in GIN_CONFIGS}},
)
