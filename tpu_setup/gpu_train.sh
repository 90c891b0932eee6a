#!/usr/bin/env bash
# Copy this checkout to the GPU hosts, install it (pinned, jax's CUDA 12 extra) and launch train.py: one host uses all its GPUs in one process; several
# hosts run one process each, the first host coordinating.
#   tpu_setup/gpu_train.sh --hosts localhost --workdir /data/runs/spark [--dry-run]
#   tpu_setup/gpu_train.sh --hosts gpu0,gpu1 --workdir gs://BUCKET/run [--port 12355] [--dry-run]
# shellcheck source=SCRIPTDIR/lib.sh
source "$(dirname "$0")/lib.sh"
parse_args "$@"
gpu_setup
gpu_train
