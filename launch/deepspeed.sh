#!/bin/bash
# Start training with the deepspeed CLI on this node (or on each node of a job, once per node): a hostfile is
# made from the allocation (SLURM_JOB_NODELIST) or the options, and each node starts its own ranks (--no_ssh).
#   launch/deepspeed.sh [--nproc-per-node G] [--nodes N --node-rank R --master-addr HOST] CONFIG [overrides]
exec "${TPLUS_PYTHON:-python}" -m tplus_dist launch --launcher deepspeed "$@"
