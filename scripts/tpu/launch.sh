#!/usr/bin/env bash
# Plan, then start the same training command on every worker; JAX joins them into one job
# (PROMPT_JAX_MULTIHOST=1 -> jax.distributed.initialize() auto-detects the TPU pod).
# MODEL_DIR must be shared storage (gs://...) since Orbax writes checkpoints collectively.
#   MESH=4x4 ACCELERATOR=v5litepod-16 bash scripts/tpu/launch.sh --gin_file=runs/scale_xxl.gin \
#     --gin.MODEL_DIR="'gs://bucket/xxl_sst2'" --gin.MIXTURE_OR_TASK_NAME="'...'" \
#     --gin.INITIAL_CHECKPOINT_PATH="'gs://.../checkpoint_1100000'"
# First, here, `plan.sh` compiles the train step for the slice ACCELERATOR creates with the TPU
# compiler and stops the launch if it does not fit (SKIP_PLAN=1 skips it). The model axis of
# MESH becomes NUM_PARTITIONS. Output goes to ~/prompt_jax_train.log on each worker; worker 0
# shows progress.
set -euo pipefail
source "$(dirname "$0")/common.sh"
: "${MESH:?set MESH=DATAxMODEL, e.g. MESH=4x4 for the 16 chips of a v5litepod-16}"
if [[ "${SKIP_PLAN:-0}" != 1 ]]; then
  bash "$(dirname "$0")/plan.sh" --programs=train "$@"
fi
ARGS=$(printf ' %q' "$@" "--gin.NUM_PARTITIONS=${MESH#*x}")
on_all_workers "cd prompt_jax && PROMPT_JAX_MULTIHOST=1 nohup prompt-jax train$ARGS \
  > ~/prompt_jax_train.log 2>&1 &"
