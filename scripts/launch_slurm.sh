#!/usr/bin/env bash
# Runs a command as one jax.distributed job on a SLURM allocation: one task per process, started by srun.
#
#   sbatch --nodes=2 --ntasks-per-node=8 --gpus-per-node=8 scripts/launch_slurm.sh python my_train.py ...
#   # or, inside an allocation (salloc):
#   scripts/launch_slurm.sh python my_train.py ...
#
# Each task calls esx.distributed.initialize_from_env(), which reads SLURM_NTASKS / SLURM_PROCID and takes the
# first host of SLURM_STEP_NODELIST as coordinator (port: $JAX_COORDINATOR_PORT, else $MASTER_PORT, else
# 20000 + SLURM_JOB_ID mod 20000). With one task per GPU, JAX gives each task its GPU (SLURM_LOCALID).
# Extra srun options: ESX_SRUN_ARGS="--cpus-per-task=12 --gpu-bind=none" scripts/launch_slurm.sh ...
#SBATCH --job-name=esx
#SBATCH --output=esx-%j.out
set -euo pipefail

if [[ $# -lt 1 ]]; then
  echo "usage: $0 command [args...]   (inside a SLURM allocation, or through sbatch)" >&2
  exit 2
fi
if [[ -z ${SLURM_JOB_ID:-} ]]; then
  echo "$0: not inside a SLURM allocation (use sbatch or salloc)" >&2
  exit 2
fi

# shellcheck disable=SC2086  # ESX_SRUN_ARGS is a list of options
exec srun --kill-on-bad-exit=1 ${ESX_SRUN_ARGS:-} "$@"
