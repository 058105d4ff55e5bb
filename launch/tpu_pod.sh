#!/usr/bin/env bash
# Train on a Cloud TPU VM slice (every worker runs the same command; JAX finds its peers itself).
#
#   TPU_NAME=cfm-v4-32 ZONE=us-central2-b ACCELERATOR=v4-32 \
#     launch/tpu_pod.sh experiments/base_flow/owt_170m.py gs://BUCKET/runs/owt_170m [--config.key=value ...]
#
# Creates the TPU VM if it does not exist (reuses it otherwise), copies this checkout to every
# worker, installs it with the TPU build of JAX, starts training on all workers at once, and keeps
# one log per worker under logs/<TPU_NAME>/ on this machine. The workdir must be shared storage
# (a gs:// bucket) so that every host writes the same Orbax checkpoint.
# DRY_RUN=1 prints the gcloud commands instead of running them.
set -euo pipefail
if [[ $# -lt 2 ]]; then
  echo "usage: TPU_NAME=... ZONE=... ACCELERATOR=... $0 CONFIG WORKDIR [flags]" >&2
  exit 2
fi
: "${TPU_NAME:?set TPU_NAME}" "${ZONE:?set ZONE}" "${ACCELERATOR:?set ACCELERATOR (e.g. v4-32)}"
RUNTIME=${RUNTIME:-tpu-ubuntu2204-base}
config=$1 workdir=$2
shift 2
cd "$(dirname "$0")/.."

run() {
  if [[ "${DRY_RUN:-0}" == 1 ]]; then echo "$*"; else "$@"; fi
}

if [[ "${DRY_RUN:-0}" == 1 ]] || ! gcloud compute tpus tpu-vm describe "$TPU_NAME" --zone "$ZONE" >/dev/null 2>&1; then
  run gcloud compute tpus tpu-vm create "$TPU_NAME" --zone "$ZONE" --accelerator-type "$ACCELERATOR" --version "$RUNTIME"
fi
run gcloud compute tpus tpu-vm scp --recurse --zone "$ZONE" --worker=all . "$TPU_NAME":~/cfmjax
run gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone "$ZONE" --worker=all --command \
  "cd ~/cfmjax && python3 -m venv .venv && .venv/bin/pip install -q -e . 'jax[tpu]==0.10.2'"
mkdir -p "logs/$TPU_NAME"
train="cd ~/cfmjax && .venv/bin/python -m cfmjax train --config=$config --workdir=$workdir $*"
# One ssh per worker, in parallel, so each worker's output lands in its own log file.
num_workers=${NUM_WORKERS:-$(gcloud compute tpus tpu-vm describe "$TPU_NAME" --zone "$ZONE" \
  --format='value(networkEndpoints.len())' 2>/dev/null || echo 1)}
for ((w = 0; w < num_workers; w++)); do
  if [[ "${DRY_RUN:-0}" == 1 ]]; then
    echo "gcloud compute tpus tpu-vm ssh $TPU_NAME --zone $ZONE --worker=$w --command \"$train\" > logs/$TPU_NAME/worker_$w.log"
  else
    gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone "$ZONE" --worker="$w" --command "$train" \
      > "logs/$TPU_NAME/worker_$w.log" 2>&1 &
  fi
done
wait
