#!/usr/bin/env bash
# Launch train.py on every host of the slice at once (jax.distributed finds the hosts itself).
#   tpu_setup/train.sh --name spark-pod --zone us-east5-a --workdir gs://BUCKET/spark_2b \
#       [--config configs/spark_gemma2_2b.py] [--dry-run] [-- --config.train.steps=1000]
# shellcheck source=SCRIPTDIR/lib.sh
source "$(dirname "$0")/lib.sh"
parse_args "$@"
tpu_train
