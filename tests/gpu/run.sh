#!/usr/bin/env bash
# make gpu-check: every GPU path of the project in one command (tests/gpu/check.py), at most eight minutes after
# `source .gpu/setup.sh` (../shared/gpu/README.md). Arguments go to check.py: --dry-run (CPU), --out DIR,
# --only pytest,loss,bench, --providers ..., --loss-runs ...; see `tests/gpu/run.sh --help`.
set -euo pipefail
cd "$(dirname "$0")/../.."
# the kit's python on the GPU host (it put /tmp/site and the project on PYTHONPATH); `make gpu-check-dry` passes the venv's
PY=${PY:-python3}
exec "$PY" tests/gpu/check.py "$@"
