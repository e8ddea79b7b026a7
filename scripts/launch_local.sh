#!/usr/bin/env bash
# Runs N copies of a command on this machine as one jax.distributed job (CPU collectives, or one GPU each).
#
#   scripts/launch_local.sh N command [args...]
#
# Process i gets JAX_COORDINATOR_ADDRESS=127.0.0.1:PORT, JAX_NUM_PROCESSES=N and JAX_PROCESS_ID=i, which
# esx.distributed.initialize_from_env() reads. PORT is $JAX_COORDINATOR_PORT if set, else a free port.
# Set ESX_LOCAL_GPUS=1 to pin process i to GPU i (JAX_LOCAL_DEVICE_IDS=i). If any process fails, the others
# are stopped and the script exits with that process's status.
set -uo pipefail

if [[ $# -lt 2 || ! $1 =~ ^[0-9]+$ || $1 -lt 1 ]]; then
  echo "usage: $0 NUM_PROCESSES command [args...]" >&2
  exit 2
fi
num=$1
shift

port=${JAX_COORDINATOR_PORT:-$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}

pids=()
stop_all() {
  for pid in "${pids[@]}"; do
    kill "$pid" 2>/dev/null || true
  done
}
trap 'stop_all; exit 130' INT TERM

for ((i = 0; i < num; i++)); do
  if [[ ${ESX_LOCAL_GPUS:-0} == 1 ]]; then
    JAX_LOCAL_DEVICE_IDS=$i JAX_COORDINATOR_ADDRESS=127.0.0.1:$port JAX_NUM_PROCESSES=$num JAX_PROCESS_ID=$i "$@" &
  else
    JAX_COORDINATOR_ADDRESS=127.0.0.1:$port JAX_NUM_PROCESSES=$num JAX_PROCESS_ID=$i "$@" &
  fi
  pids+=($!)
done

status=0
for ((left = num; left > 0; left--)); do
  wait -n
  rc=$?
  if [[ $rc -ne 0 && $status -eq 0 ]]; then
    status=$rc
    echo "launch_local.sh: a process exited with status $rc; stopping the others" >&2
    stop_all
  fi
done
exit "$status"
