# Settings shared by the scripts in this folder; override any of them in the environment.
#   TPU_NAME      name of the TPU VM / queued resource       (default prompt-jax)
#   ZONE          a zone that has the accelerator             (default us-central2-b)
#   ACCELERATOR   e.g. v4-8 (1 host), v4-32 (4 hosts), v5litepod-16 (4 hosts)
#   RUNTIME       TPU VM software version                     (default tpu-ubuntu2204-base)
#   PROJECT       gcloud project                              (default: gcloud's current one)
#   REPO_URL      where workers clone prompt_jax from         (required by install.sh)
TPU_NAME=${TPU_NAME:-prompt-jax}
ZONE=${ZONE:-us-central2-b}
ACCELERATOR=${ACCELERATOR:-v4-32}
RUNTIME=${RUNTIME:-tpu-ubuntu2204-base}
PROJECT_FLAG=${PROJECT:+--project=$PROJECT}
# Run a command on every worker of the TPU VM (all hosts of a pod slice) at once.
on_all_workers() {
  gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone="$ZONE" $PROJECT_FLAG --worker=all \
    --command="$1"
}
