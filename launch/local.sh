#!/usr/bin/env bash
# Train on this machine.
#
#   launch/local.sh CONFIG WORKDIR [--config.key=value ...]
#   FAKE_DEVICES=8 launch/local.sh experiments/base_flow/markov_tiny.py /tmp/m --config.mesh.tensor=2
#   NUM_PROCESSES=2 FAKE_DEVICES=4 launch/local.sh experiments/base_flow/markov_tiny.py /tmp/m2
#
# FAKE_DEVICES=N splits the CPU into N XLA devices, so a mesh can be rehearsed on a laptop.
# NUM_PROCESSES=P starts P processes on localhost that form one JAX job (coordinator
# 127.0.0.1:PORT, default 12355), exactly as P hosts would: a rehearsal of a multi-host run. Their
# logs go to WORKDIR/process_<i>.log. PYTHON overrides the interpreter (default: python).
# DRY_RUN=1 prints the commands instead of running them.
set -euo pipefail
if [[ $# -lt 2 ]]; then
  echo "usage: $0 CONFIG WORKDIR [--config.key=value ...]" >&2
  exit 2
fi
config=$1 workdir=$2
shift 2
cd "$(dirname "$0")/.."
cmd=("${PYTHON:-python}" -m cfmjax train "--config=${config}" "--workdir=${workdir}" "$@")
if [[ -n "${FAKE_DEVICES:-}" ]]; then
  export XLA_FLAGS="${XLA_FLAGS:-} --xla_force_host_platform_device_count=${FAKE_DEVICES}"
  export JAX_PLATFORMS=${JAX_PLATFORMS:-cpu}
fi
xla_flags=${XLA_FLAGS:-}
xla_flags="XLA_FLAGS='${xla_flags# }'"
num_processes=${NUM_PROCESSES:-1}
if [[ "$num_processes" == 1 ]]; then
  if [[ "${DRY_RUN:-0}" == 1 ]]; then
    echo "+ $xla_flags ${cmd[*]}"
  else
    exec "${cmd[@]}"
  fi
  exit
fi
coordinator=127.0.0.1:${PORT:-12355}
[[ "${DRY_RUN:-0}" == 1 ]] || mkdir -p "$workdir"
pids=()
for ((p = 0; p < num_processes; p++)); do
  env_vars=(CFMJAX_COORDINATOR_ADDRESS=$coordinator CFMJAX_NUM_PROCESSES=$num_processes CFMJAX_PROCESS_ID=$p)
  if [[ "${DRY_RUN:-0}" == 1 ]]; then
    echo "+ $xla_flags ${env_vars[*]} ${cmd[*]} > $workdir/process_$p.log 2>&1 &"
  else
    env "${env_vars[@]}" "${cmd[@]}" > "$workdir/process_$p.log" 2>&1 &
    pids+=($!)
  fi
done
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=$?; done
exit "$status"
