#!/usr/bin/env bash
# Create a TPU VM, or with --queued a multi-host pod slice through queued resources.
#   tpu_setup/create.sh --name spark-pod --zone us-east5-a --accelerator v5p-32 --queued [--spot] [--dry-run]
# shellcheck source=SCRIPTDIR/lib.sh
source "$(dirname "$0")/lib.sh"
parse_args "$@"
tpu_create
