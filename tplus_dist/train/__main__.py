"""`python -m tplus_dist.train CONFIG [--section.key=value ...]`: the same as `tplus train`, for launchers that
start modules (`torchrun --nproc_per_node N -m tplus_dist.train ...`, `deepspeed --num_gpus N --module
tplus_dist.train ...`)."""

import sys

from tplus_dist.cli import main

raise SystemExit(main(["train", *sys.argv[1:]]))
