"""Using a trained prompt: evaluation (`evaluation`), ensembles of prompts (`ensemble`),
predictions for single- and multi-task inputs (`inference`, `multitask_inference`), and the
`export-prompt` command (`prompt_export`).
"""
