"""Reading and writing other tools' formats: T5X checkpoints (`t5x`), Hugging Face T5
directories (`hf`) and PEFT prompt adapters (`peft`); `convert` is the `prompt-jax convert`
command. Each module is imported on demand so that none of them loads the others' dependencies.
"""
