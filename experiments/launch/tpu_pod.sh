#!/bin/bash
# Run sc_jax.train on every worker of a TPU pod slice. All workers run the same command,
# python -m sc_jax.train --config CONFIG [key=value ...] (PYTHON, default python3, is the interpreter);
# jax.distributed.initialize() finds the pod by itself (sc_jax.train calls it when it sees
# TPU_WORKER_HOSTNAMES / MEGASCALE_COORDINATOR_ADDRESS), and each worker feeds its own
# share of the global batch.
#
#   TPU_NAME=my-v5p-256 TPU_ZONE=us-east5-a ./experiments/launch/tpu_pod.sh \
#       experiments/configs/stage1.yaml mesh.fsdp=-1 train.run_dir=gs://bucket/stage1
#
# First this checkout is copied to every worker and its requirements installed there
# (SKIP_SETUP=1 skips that). A preempted slice resumes when you rerun the same command.
# The output of all workers goes to train-$TPU_NAME.log here.
# Rendered from sc_jax/sweep/templates.py, as the sweep's job scripts are: edit it there, then
#   python -c 'from sc_jax.sweep.templates import write_launch_scripts; write_launch_scripts()'
# Set TPU_NAME and TPU_ZONE (and TPU_PROJECT if not gcloud's default project). SC_JAX_DIR is the
# repository checkout on the workers (default: sc_jax under the home directory); relative paths in
# the arguments are relative to it. PYTHON is the workers' interpreter (e.g. a virtualenv's
# bin/python). The run directory must be on storage all workers share (every worker writes
# checkpoints), e.g. a GCS bucket mounted with gcsfuse or a Filestore path.
# (ZONE, PROJECT and REMOTE_DIR, the names of earlier versions, still work.)
set -euo pipefail
TPU_ZONE="${TPU_ZONE:-${ZONE:-}}"
TPU_PROJECT="${TPU_PROJECT:-${PROJECT:-}}"
: "${TPU_NAME:?set TPU_NAME to the TPU VM name}"
: "${TPU_ZONE:?set TPU_ZONE, e.g. us-central2-b}"
SC_JAX_DIR="${SC_JAX_DIR:-${REMOTE_DIR:-sc_jax}}"
PYTHON="${PYTHON:-python3}"
CONFIG=${1:?usage: tpu_pod.sh CONFIG [key=value ...]}
shift
ARGS="--config $CONFIG $*"
ssh_all() {
  gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone="$TPU_ZONE" ${TPU_PROJECT:+--project="$TPU_PROJECT"} \
    --worker=all --command="$1"
}
if [ "${SKIP_SETUP:-0}" != 1 ]; then  # copy this checkout to every worker and install it
  gcloud compute tpus tpu-vm scp --recurse --zone="$TPU_ZONE" ${TPU_PROJECT:+--project="$TPU_PROJECT"} \
    --worker=all "$(git rev-parse --show-toplevel)" "$TPU_NAME:$SC_JAX_DIR"
  ssh_all "cd $SC_JAX_DIR && $PYTHON -m pip install -q -r requirements.txt 'jax[tpu]'"
fi
ssh_all "cd $SC_JAX_DIR && $PYTHON -m sc_jax.train $ARGS" 2>&1 | tee -a "train-$TPU_NAME.log"
