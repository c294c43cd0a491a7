#!/usr/bin/env bash
# Create a TPU VM (a single host such as v4-8, or a multi-host pod slice such as v4-32).
#   ACCELERATOR=v4-32 ZONE=us-central2-b bash scripts/tpu/create_tpu_vm.sh
set -euo pipefail
source "$(dirname "$0")/common.sh"
gcloud compute tpus tpu-vm create "$TPU_NAME" --zone="$ZONE" $PROJECT_FLAG \
  --accelerator-type="$ACCELERATOR" --version="$RUNTIME"
