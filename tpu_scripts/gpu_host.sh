#!/usr/bin/env bash
# Runs finetune.py on the GPUs of one host.
#
#   tpu_scripts/gpu_host.sh --mesh fsdp=8 --method lora ...          one process, every GPU
#   PROCS=8 tpu_scripts/gpu_host.sh --mesh fsdp=8 --method lora ...  one process per GPU
#
# With PROCS=N it starts N processes on this host, joined through a coordinator on
# localhost:$PORT (a free port by default), process i using GPU i (--local-device-ids i).
# If one process fails, the others are stopped. PYTHON picks the interpreter.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
PYTHON=${PYTHON:-python}
PROCS=${PROCS:-1}

if [[ "$PROCS" -eq 1 ]]; then
  exec "$PYTHON" "$HERE/finetune.py" "$@"
fi

PORT=${PORT:-$("$PYTHON" -c 'import socket; s = socket.socket(); s.bind(("localhost", 0)); print(s.getsockname()[1])')}
pids=()
stop() { for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done; }
trap stop INT TERM
for ((i = 0; i < PROCS; i++)); do
  "$PYTHON" "$HERE/finetune.py" --coordinator "localhost:$PORT" --num-processes "$PROCS" \
    --process-id "$i" --local-device-ids "$i" "$@" &
  pids+=("$!")
done
status=0
for ((n = 0; n < PROCS; n++)); do
  if ! wait -n; then
    status=1
    stop
  fi
done
exit "$status"
