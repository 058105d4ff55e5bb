#!/usr/bin/env bash
# Train on a Cloud TPU VM slice: every worker runs the same `cfmjax train` (a base or a distillation
# config: `cfmjax train` runs either); JAX finds its peers itself.
#
#   TPU_NAME=cfm-v4-32 ZONE=us-central2-b ACCELERATOR=v4-32 \
#     launch/tpu_pod.sh experiments/base_flow/owt_170m.py gs://BUCKET/runs/owt_170m [--config.key=value ...]
#
# Steps (each printed first):
#   1. create the TPU VM if `describe` does not find it, reuse it otherwise (RUNTIME picks the image;
#      SPOT=1 asks for a preemptible slice);
#   2. ship the code: a tarball of this checkout's tracked files (`git ls-files`, uncommitted edits
#      included) copied to every worker, or, with REPO_URL=..., `git clone`/`git pull` of REF on
#      every worker;
#   3. install it on every worker into ~/cfmjax/.venv with the TPU build of JAX;
#   4. start the same training command on all workers at once, one ssh per worker in parallel, each
#      worker's output in logs/<TPU_NAME>/worker_<i>.log on this machine.
# CFMJAX_DISTRIBUTED=auto makes cfmjax call `jax.distributed.initialize()` with no arguments, which on
# a TPU slice reads the coordinator, process count and process id from the TPU metadata.
# The workdir must be shared storage (a gs:// bucket) so that every host writes the same checkpoint.
# Re-running the script after a preemption resumes from the latest checkpoint in the workdir.
#
# DRY_RUN=1 prints the commands instead of running them (NUM_WORKERS then defaults to 4).
set -euo pipefail
if [[ $# -lt 2 ]]; then
  echo "usage: TPU_NAME=... ZONE=... ACCELERATOR=... $0 CONFIG WORKDIR [flags]" >&2
  exit 2
fi
: "${TPU_NAME:?set TPU_NAME}" "${ZONE:?set ZONE}" "${ACCELERATOR:?set ACCELERATOR (e.g. v4-32)}"
RUNTIME=${RUNTIME:-tpu-ubuntu2204-base}
JAX_VERSION=${JAX_VERSION:-0.10.2}
config=$1 workdir=$2
shift 2
cd "$(dirname "$0")/.."
dry=${DRY_RUN:-0}

run() {  # prints the command; runs it unless DRY_RUN=1
  printf '+'; printf ' %q' "$@"; echo
  if [[ "$dry" != 1 ]]; then "$@"; fi
}
tpu=(gcloud compute tpus tpu-vm)

# 1. Create or reuse.
if [[ "$dry" == 1 ]] || ! "${tpu[@]}" describe "$TPU_NAME" --zone "$ZONE" >/dev/null 2>&1; then
  run "${tpu[@]}" create "$TPU_NAME" --zone "$ZONE" --accelerator-type "$ACCELERATOR" --version "$RUNTIME" \
    ${SPOT:+--spot}
else
  echo "reusing TPU VM $TPU_NAME"
fi

# 2. Code.
if [[ -n "${REPO_URL:-}" ]]; then
  run "${tpu[@]}" ssh "$TPU_NAME" --zone "$ZONE" --worker=all --command \
    "if [ -d ~/cfmjax/.git ]; then git -C ~/cfmjax fetch -q origin && git -C ~/cfmjax checkout -q ${REF:-main} && git -C ~/cfmjax pull -q --ff-only || true; else git clone -q --branch ${REF:-main} $REPO_URL ~/cfmjax; fi"
else
  tarball=/tmp/cfmjax-${TPU_NAME}.tar.gz
  git ls-files > "$tarball.files"
  run tar -czf "$tarball" -T "$tarball.files"
  run "${tpu[@]}" scp --zone "$ZONE" --worker=all "$tarball" "$TPU_NAME":/tmp/cfmjax.tar.gz
  run "${tpu[@]}" ssh "$TPU_NAME" --zone "$ZONE" --worker=all --command \
    "mkdir -p ~/cfmjax && tar -xzf /tmp/cfmjax.tar.gz -C ~/cfmjax"
fi

# 3. Install.
run "${tpu[@]}" ssh "$TPU_NAME" --zone "$ZONE" --worker=all --command \
  "cd ~/cfmjax && python3 -m venv .venv && .venv/bin/pip install -q -e . 'jax[tpu]==$JAX_VERSION'"

# 4. Train: the same command on every worker, one log per worker.
printf -v flags ' %q' "$@"
train="cd ~/cfmjax && CFMJAX_DISTRIBUTED=auto .venv/bin/python -m cfmjax train --config=$config --workdir=$workdir${flags% }"
if [[ "$dry" == 1 ]]; then
  num_workers=${NUM_WORKERS:-4}
else
  num_workers=${NUM_WORKERS:-$("${tpu[@]}" describe "$TPU_NAME" --zone "$ZONE" \
    --format='value(networkEndpoints.len())')}
fi
[[ "$dry" == 1 ]] || mkdir -p "logs/$TPU_NAME"
pids=()
for ((w = 0; w < num_workers; w++)); do
  echo "+ ${tpu[*]} ssh $TPU_NAME --zone $ZONE --worker=$w --command '$train' > logs/$TPU_NAME/worker_$w.log 2>&1 &"
  if [[ "$dry" != 1 ]]; then
    "${tpu[@]}" ssh "$TPU_NAME" --zone "$ZONE" --worker="$w" --command "$train" \
      > "logs/$TPU_NAME/worker_$w.log" 2>&1 &
    pids+=($!)
  fi
done
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=$?; done
echo "logs: logs/$TPU_NAME/worker_*.log"
exit "$status"
