#!/bin/bash
# Start training with torchrun on this node (or on each node of a job, once per node):
#   launch/torchrun.sh [--nproc-per-node G] [--nodes N --node-rank R --master-addr HOST] CONFIG [overrides]
# Inside a SLURM allocation the nodes, this node's rank and the rendezvous come from SLURM's environment.
# --dry-run prints the command instead. See `python -m tplus_dist launch --help`.
exec "${TPLUS_PYTHON:-python}" -m tplus_dist launch --launcher torchrun "$@"
