#!/usr/bin/env bash
# Install prompt_jax and JAX for TPU on every worker.
#   REPO_URL=https://github.com/you/prompt_jax.git bash scripts/tpu/install.sh
set -euo pipefail
source "$(dirname "$0")/common.sh"
: "${REPO_URL:?set REPO_URL to the git URL of prompt_jax}"
on_all_workers "set -e; (test -d prompt_jax || git clone $REPO_URL prompt_jax); \
  cd prompt_jax && git pull --ff-only; \
  python3 -m pip install -U pip && python3 -m pip install -U 'jax[tpu]' -e . && \
  python3 -c 'import jax; print(jax.process_index(), jax.device_count())'"
