#!/usr/bin/env bash
# Pre-flight, on this machine (no TPU needed; pip install -e ".[tpu]" for the TPU compiler):
# compile the programs for the slice that ACCELERATOR creates (prompt-jax plan --topology) and
# exit non-zero, with the compiler's message, when they do not fit its chips.
#   MESH=4x4 ACCELERATOR=v5litepod-16 bash scripts/tpu/plan.sh --gin_file=runs/scale_xxl.gin
# MESH is DATAxMODEL, one device per chip (data x model = the slice's chips).
set -euo pipefail
source "$(dirname "$0")/common.sh"
: "${MESH:?set MESH=DATAxMODEL, e.g. MESH=4x4 for the 16 chips of a v5litepod-16}"
prompt-jax plan --topology="$ACCELERATOR" --mesh="$MESH" "$@"
