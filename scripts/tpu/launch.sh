#!/usr/bin/env bash
# Start the same training command on every worker; JAX joins them into one job
# (PROMPT_JAX_MULTIHOST=1 -> jax.distributed.initialize() auto-detects the TPU pod).
# MODEL_DIR must be shared storage (gs://...) since Orbax writes checkpoints collectively.
#   bash scripts/tpu/launch.sh --gin_file=runs/scale_xxl.gin --gin.NUM_PARTITIONS=4 \
#     --gin.MODEL_DIR="'gs://bucket/xxl_sst2'" --gin.MIXTURE_OR_TASK_NAME="'...'" \
#     --gin.INITIAL_CHECKPOINT_PATH="'gs://.../checkpoint_1100000'"
# Output goes to ~/prompt_jax_train.log on each worker; worker 0 shows progress.
set -euo pipefail
source "$(dirname "$0")/common.sh"
ARGS=$(printf ' %q' "$@")
on_all_workers "cd prompt_jax && PROMPT_JAX_MULTIHOST=1 nohup prompt-jax train$ARGS \
  > ~/prompt_jax_train.log 2>&1 &"
