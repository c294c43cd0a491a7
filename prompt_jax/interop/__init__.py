"""Reading and writing other tools' formats: T5X checkpoints (`t5x`), Hugging Face T5
directories (`hf`) and PEFT prompt adapters (`peft`). Each module is imported on demand so that
none of them loads the others' dependencies; `prompt-jax convert` is `tools/convert.py`.
"""
