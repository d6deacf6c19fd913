#!/usr/bin/env bash
# Train on every worker of a Cloud TPU VM pod slice (e.g. v4-32, v5p-64) at once.
#
#   TPU_NAME=my-pod ZONE=us-central2-b launch/tpu_vm_pod.sh configs/jit_b16_in256.py gs://bucket/jit_b16 \
#       [--config.optim.blr=...]
#
# Every host runs the same command; jit_jax.main calls jax.distributed.initialize(), which on TPU VMs
# finds the coordinator, process count and process id by itself (no flags needed). Each host feeds
# its own slice of the global batch. Requirements on every worker:
#   - this repository at $REPO_DIR (same commit everywhere), e.g. via `--worker=all --command="git clone"`
#   - a venv at $VENV with `pip install -e . "jax[tpu]"`
#   - WORKDIR readable and writable by all hosts (a gs:// bucket or a shared filesystem): checkpoints
#     are written cooperatively and every host must see the same latest step on restart.
#   - TFDS ImageNet already prepared under --config.data.data_dir (ideally gs://), since preparing it
#     needs the manual tars on one machine.
# Untested here (no TPU was available when this was written).
set -euo pipefail

if [[ $# -lt 2 ]]; then
    echo "usage: TPU_NAME=... ZONE=... $0 CONFIG WORKDIR [extra jit_jax.main flags]" >&2
    exit 2
fi
: "${TPU_NAME:?set TPU_NAME to the TPU VM name}"
: "${ZONE:?set ZONE to the TPU VM zone}"
CONFIG=$1
WORKDIR=$2
shift 2
REPO_DIR=${REPO_DIR:-'~/jit_jax'}  # expanded on the workers, not here
VENV=${VENV:-'~/venv'}
LOG=${LOG:-'~/jit_jax_train.log'}

# Quote each argument for the remote shell, so overrides with spaces or brackets survive the ssh hop.
ARGS=$(printf ' %q' --config="$CONFIG" --workdir="$WORKDIR" "$@")

# nohup + log file: the run survives a dropped ssh session; `tail -f $LOG` on a worker to follow it.
# --worker=all starts the command on all hosts concurrently; gcloud returns once every host has launched.
gcloud compute tpus tpu-vm ssh "$TPU_NAME" \
    --zone="$ZONE" ${PROJECT:+--project="$PROJECT"} \
    --worker=all \
    --command="cd $REPO_DIR && source $VENV/bin/activate && \
nohup python -m jit_jax.main$ARGS > $LOG 2>&1 < /dev/null &"
