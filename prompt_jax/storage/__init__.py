"""What a run keeps on disk and reads back: the run directory and its record (`run_dir`), the
trainable state's checkpoints (`checkpoints`), the frozen model in every format
(`frozen_models`), prompts in every format (`prompt_files`), metrics (`metric_writer`) and the
curves drawn from them (`curves`), and checks on outputs (`output_paths`).
"""
