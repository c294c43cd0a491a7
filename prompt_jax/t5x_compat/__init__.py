"""Glue that lets stock T5X (`python -m t5x.train`) train our T5 module with a soft prompt.

Only the modules in this package import t5x, and only `models`, `write_checkpoint` and
`axes.adafactor_factor_rules` need it at all; nothing else in prompt_jax imports this package.
The gin files using it are in `gin_configs/t5x/`; see docs/t5x.md.
"""
