"""Training: the one loop (`trainer`) and its guards (`guards`), what a run records of itself
(`run_record`), what a regime supplies to the loop (`regimes`), the regimes beyond plain prompt
tuning (`spt_training`, `multitask_training`, `pretrain`), every optimizer, and SIGTERM handling
(`preemption`).
"""
