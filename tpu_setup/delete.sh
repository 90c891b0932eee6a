#!/usr/bin/env bash
# Delete the TPU VM (or, with --queued, the queued resource and its slice).
#   tpu_setup/delete.sh --name spark-pod --zone us-east5-a [--queued] [--dry-run]
# shellcheck source=SCRIPTDIR/lib.sh
source "$(dirname "$0")/lib.sh"
parse_args "$@"
tpu_delete
