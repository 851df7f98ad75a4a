#!/usr/bin/env bash
# Run sc_jax.train on every worker of a TPU pod slice. All workers run the same command;
# jax.distributed.initialize() finds the pod by itself (sc_jax.train calls it when it sees
# TPU_WORKER_HOSTNAMES / MEGASCALE_COORDINATOR_ADDRESS), and each worker feeds its own
# share of the global batch.
#
#   TPU_NAME=my-v5p-256 ZONE=us-east5-a ./experiments/launch/tpu_pod.sh \
#       experiments/configs/stage1.yaml mesh.fsdp=-1 train.run_dir=gs://bucket/stage1
#
# Setup once per slice: REPO_URL and the code are copied to every worker, then
# `pip install -r requirements.txt "jax[tpu]"` runs there. A preempted slice resumes when
# you rerun the same command (the run directory must be shared storage, e.g. a GCS bucket
# mounted with gcsfuse or a Filestore path).
set -euo pipefail
: "${TPU_NAME:?set TPU_NAME}" "${ZONE:?set ZONE}"
CONFIG=${1:?usage: tpu_pod.sh CONFIG [key=value ...]}
shift
PROJECT_FLAG=${PROJECT:+--project=$PROJECT}
REMOTE_DIR=${REMOTE_DIR:-sc_jax}
ssh_all() { gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone="$ZONE" $PROJECT_FLAG --worker=all --command="$1"; }

if [ "${SKIP_SETUP:-0}" != 1 ]; then
  gcloud compute tpus tpu-vm scp --recurse --zone="$ZONE" $PROJECT_FLAG --worker=all \
      "$(git rev-parse --show-toplevel)" "$TPU_NAME":"$REMOTE_DIR"
  ssh_all "cd $REMOTE_DIR && pip install -q -r requirements.txt 'jax[tpu]'"
fi
ssh_all "cd $REMOTE_DIR && python -m sc_jax.train --config $CONFIG $* 2>&1 | tee -a train-\$(hostname).log"
