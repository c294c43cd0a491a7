"""Commands around training: memory plans from the compiler (`plan`), sweeps and their plots
(`sweep`, `sweep_plots`), format conversion (`convert`), multi-host start-up (`distributed`).
"""
