#!/usr/bin/env bash
# Train on this machine.
#
#   launch/local.sh CONFIG WORKDIR [--config.key=value ...]
#   FAKE_DEVICES=8 launch/local.sh experiments/base_flow/markov_tiny.py /tmp/m --config.mesh.tensor=2
#
# FAKE_DEVICES=N splits the CPU into N XLA devices, so a mesh can be rehearsed on a laptop.
# DRY_RUN=1 prints the command instead of running it.
set -euo pipefail
if [[ $# -lt 2 ]]; then
  echo "usage: $0 CONFIG WORKDIR [--config.key=value ...]" >&2
  exit 2
fi
config=$1 workdir=$2
shift 2
cd "$(dirname "$0")/.."
cmd=(python -m cfmjax train "--config=${config}" "--workdir=${workdir}" "$@")
if [[ -n "${FAKE_DEVICES:-}" ]]; then
  export XLA_FLAGS="${XLA_FLAGS:-} --xla_force_host_platform_device_count=${FAKE_DEVICES}"
fi
if [[ "${DRY_RUN:-0}" == 1 ]]; then
  echo "XLA_FLAGS=${XLA_FLAGS:-} ${cmd[*]}"
else
  exec "${cmd[@]}"
fi
