#!/usr/bin/env bash
# Put this repo on every worker (--repo URL: clone it; default: copy this checkout) and install it
# with the pinned pyproject.toml plus jax's TPU extra.
#   tpu_setup/setup.sh --name spark-pod --zone us-east5-a [--repo https://…/spark.git] [--dry-run]
# shellcheck source=SCRIPTDIR/lib.sh
source "$(dirname "$0")/lib.sh"
parse_args "$@"
tpu_copy_repo
tpu_install
