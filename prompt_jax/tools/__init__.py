"""Commands around training: memory plans from the compiler (`plan`, with the TPU slices in
`topology`, device acquisition in `plan_devices`, analytic FLOPs in `flops`, the printout in
`plan_report`), sweeps and their plots (`sweep`, `sweep_plots`), format conversion (`convert`),
multi-host start-up (`distributed`).
"""
