#!/bin/bash
# The body of the slurm/*.sbatch templates (they exec it, so this is the batch shell and gets the
# preemption signal). Runs on the allocation's first node, from the directory sbatch was called in.
#
#   sbatch [sbatch options] slurm/train-1node.sbatch CONFIG [--section.field=value ...]
#
# Environment (sbatch passes the caller's environment by default):
#   LAUNCHER          torchrun (default) or deepspeed
#   NPROC_PER_NODE    ranks per node (default: SLURM_GPUS_ON_NODE, i.e. --gpus-per-node)
#   TPLUS_PYTHON      the interpreter that has tplus-dist (default: python)
#   CONTAINER_IMAGE   run the ranks in this image through pyxis/enroot (srun --container-image)
#   APPTAINER_IMAGE   run the ranks in this image through Apptainer (apptainer exec --nv)
#   CONTAINER_MOUNTS  host:container mounts for either (default: this directory at the same path);
#                     put the data, the run directory and the checkpoints on them
#   NCCL_*, UCX_*     passed through; NCCL_IB_HCA / NCCL_SOCKET_IFNAME are the usual ones to set per site
#
# Preemption: the templates ask for `--signal=B:USR1@120 --requeue`. On USR1 this shell sends USR1 to every
# process of the training step (`scancel --signal=USR1`): the ranks save a checkpoint at the end of the step
# and exit, the launchers (which ignore USR1) follow with exit code 75, and the job requeues itself; the
# requeued job runs the same command, which resumes from the run directory's latest checkpoint. Any stop with
# code 75 requeues; a run that finished (0), failed (1) or was refused (2) is not requeued.
set -uo pipefail

if [[ $# -lt 1 ]]; then
    echo "usage: sbatch slurm/train-1node.sbatch CONFIG [--section.field=value ...]" >&2
    exit 2
fi
CONFIG=$1
shift
LAUNCHER=${LAUNCHER:-torchrun}
NPROC=${NPROC_PER_NODE:-${SLURM_GPUS_ON_NODE:-}}
PYTHON=${TPLUS_PYTHON:-python}
MOUNTS=${CONTAINER_MOUNTS:-$PWD:$PWD}

SRUN_CONTAINER=()
RUN=("$PYTHON")
if [[ -n "${CONTAINER_IMAGE:-}" ]]; then
    SRUN_CONTAINER=(--container-image="$CONTAINER_IMAGE" --container-mounts="$MOUNTS" --container-workdir="$PWD")
fi
if [[ -n "${APPTAINER_IMAGE:-}" ]]; then
    RUN=(apptainer exec --nv --bind "$MOUNTS" --pwd "$PWD" "$APPTAINER_IMAGE" "$PYTHON")
fi

export TORCH_NCCL_ASYNC_ERROR_HANDLING=${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}

echo "tplus: job ${SLURM_JOB_ID} (restart ${SLURM_RESTART_COUNT:-0}) on ${SLURM_JOB_NODELIST}: $CONFIG $*"

# Every node must run the project: an image (or environment) without it or its requirements stops here, named.
CHECK="import torch, deepspeed, tplus_dist.train.run"
if ! srun --ntasks-per-node=1 "${SRUN_CONTAINER[@]}" "${RUN[@]}" -c "$CHECK" 2>"/tmp/tplus-import-$$.err"; then
    echo "tplus: '${RUN[*]} -c \"$CHECK\"' failed on the allocation" \
        "(${CONTAINER_IMAGE:-${APPTAINER_IMAGE:-no container}}): are tplus-dist and its requirements installed there?" >&2
    grep -v "^srun: error" "/tmp/tplus-import-$$.err" | tail -n 1 >&2
    rm -f "/tmp/tplus-import-$$.err"
    exit 2
fi
rm -f "/tmp/tplus-import-$$.err"

preempted=0
# shellcheck disable=SC2329  # invoked by the trap below
on_preempt() {
    [[ $preempted == 1 ]] && return
    preempted=1
    echo "tplus: preemption signal: the ranks save a checkpoint and stop; the job then requeues"
    scancel --signal=USR1 "$SLURM_JOB_ID"
}
trap on_preempt USR1

srun --ntasks-per-node=1 --kill-on-bad-exit=1 "${SRUN_CONTAINER[@]}" "${RUN[@]}" -m tplus_dist launch \
    --launcher "$LAUNCHER" ${NPROC:+--nproc-per-node "$NPROC"} "$CONFIG" "$@" &
step=$!
while kill -0 "$step" 2>/dev/null; do
    wait "$step"  # returns early when the trap runs; wait again until the step has ended
done
wait "$step"
rc=$?

# tplus launch exits with its ranks' code (tplus_dist/exitcodes.py): 75 means "stopped with a checkpoint, resume
# me" (the preemption above, a SIGTERM, a Ctrl-C); 0 finished; 1 failed; 2 bad input.
# A preempted step that ended otherwise (a signal before the ranks could handle it, in their first seconds) is
# requeued too, unless it finished (0) or its input is bad (2: it would fail again).
if [[ $rc == 75 || ( $preempted == 1 && $rc != 0 && $rc != 2 ) ]]; then
    echo "tplus: requeueing job $SLURM_JOB_ID: the training step exited with $rc (75: stopped with a checkpoint); the requeued job resumes the run"
    scontrol requeue "$SLURM_JOB_ID"
    exit 0
fi
if [[ $preempted == 1 ]]; then
    echo "tplus: preempted, but the training step exited with $rc (0 finished, 2 bad input), so the job is not requeued"
fi
exit "$rc"
