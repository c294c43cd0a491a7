"""Using a trained prompt: what every serving command loads (`loading`), evaluators (the protocol
and the task's own metrics in `evaluators`, a prompt bank's in `ensemble`, a multi-task run's in
`multitask_evaluation`; by name and as `prompt-jax eval` in `evaluation`), predictions for
single- and multi-task inputs (`inference`, `multitask_inference`), and `prompt-jax
export-prompt` (`prompt_export`).
"""
