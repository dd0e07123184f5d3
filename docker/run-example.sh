#!/bin/bash
# Train in the image with the data and checkpoint folders mounted from the host. Resuming is the same command:
# the run directory under /checkpoints holds the latest checkpoint.
#   docker/run-example.sh /path/to/data /path/to/checkpoints configs/models/llama-1.1b.yaml [--section.field=value ...]
set -euo pipefail
if [[ $# -lt 3 ]]; then
    echo "usage: $0 DATA_DIR CHECKPOINT_DIR CONFIG [--section.field=value ...]" >&2
    exit 2
fi
DATA=$(realpath "$1")
CKPT=$(realpath "$2")
CONFIG=$3
shift 3
exec docker run --rm --gpus all --ipc=host --ulimit memlock=-1 --ulimit stack=67108864 \
    -v "$DATA":/data -v "$CKPT":/checkpoints "${TPLUS_IMAGE:-tplus-dist}" \
    tplus launch "$CONFIG" --data.cache_dir=/data --log.run_dir=/checkpoints/run "$@"
