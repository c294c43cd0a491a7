"""Reading and writing other tools' formats: T5X checkpoints (`t5x`), Hugging Face T5
directories (`hf`) and PEFT prompt adapters (`peft`); `prompt-jax convert` is
`tools/convert.py`.

Importing this package imports none of them. Each imports only dependencies the package declares,
at its top: `hf` NumPy, safetensors and `models.t5` (jax, flax); `peft` NumPy, safetensors and
`hf`'s JSON and safetensors readers; `t5x` jax, flax, Orbax, tensorstore, msgpack, `models.t5` and
`partitioning`. None needs torch, transformers, peft or t5x, and none imports `storage`:
`storage.frozen_models` and `storage.prompt_files` import them.
"""
