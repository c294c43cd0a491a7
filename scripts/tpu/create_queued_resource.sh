#!/usr/bin/env bash
# Ask for a TPU slice through a queued resource (waits for capacity; add --spot or
# --best-effort for preemptible capacity), then poll until it is ACTIVE.
#   ACCELERATOR=v5litepod-16 ZONE=us-west4-a bash scripts/tpu/create_queued_resource.sh
set -euo pipefail
source "$(dirname "$0")/common.sh"
gcloud compute tpus queued-resources create "$TPU_NAME-qr" --zone="$ZONE" $PROJECT_FLAG \
  --node-id="$TPU_NAME" --accelerator-type="$ACCELERATOR" --runtime-version="$RUNTIME" \
  ${QR_FLAGS:-}
until gcloud compute tpus queued-resources describe "$TPU_NAME-qr" --zone="$ZONE" \
    $PROJECT_FLAG --format='value(state.state)' | grep -q ACTIVE; do
  echo "waiting for $TPU_NAME-qr to become ACTIVE..."; sleep 60
done
