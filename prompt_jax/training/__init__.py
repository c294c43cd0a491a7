"""Training: the one loop (`trainer`), what a regime supplies to it (`regimes`), the regimes
beyond plain prompt tuning (`spt_training`, `multitask_training`, `pretrain`), every optimizer,
SIGTERM handling, metric writing and the curves drawn from it.
"""
