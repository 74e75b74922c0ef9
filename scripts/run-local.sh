#!/usr/bin/env bash
# `make run`: the proxy under gunicorn plus one local worker on this machine's
# Docker engine, SQLite under $DATA_DIR. Ctrl-C stops both.
set -euo pipefail
DATA_DIR=${DATA_DIR:-$PWD/var}
HOST=${HOST:-127.0.0.1}
PORT=${PORT:-3000}
URL="http://$HOST:$PORT"
[[ $HOST == 0.0.0.0 ]] && URL="http://127.0.0.1:$PORT"
export JOBCLOUD_DATA_DIR=$DATA_DIR

pids=()
stop() {
    trap - INT TERM EXIT
    echo "stopping jobcloud..."
    # The worker first: it finishes or hands back its jobs while the proxy still answers.
    for ((i = ${#pids[@]} - 1; i >= 0; i--)); do
        kill -TERM "${pids[$i]}" 2>/dev/null || true
        wait "${pids[$i]}" 2>/dev/null || true
    done
}
trap stop INT TERM EXIT

jobcloud-proxy serve --bind "$HOST:$PORT" &
pids+=($!)

for ((i = 0; i < 240; i++)); do
    curl -fsS -o /dev/null "$URL/healthz" 2>/dev/null && break
    kill -0 "${pids[0]}" 2>/dev/null || { echo "the proxy did not start" >&2; exit 1; }
    sleep 0.25
done

# The local worker enrolls itself with a token made for it now (valid one hour).
token=$(jobcloud enroll create --label "local worker" --expires 3600)
JOBCLOUD_WORKER_PROXY_URL=$URL JOBCLOUD_WORKER_ENROLLMENT_TOKEN=$token \
JOBCLOUD_WORKER_NAME=${WORKER_NAME:-local} JOBCLOUD_WORKER_DATA_DIR=$DATA_DIR/worker \
    jobcloud-worker &
pids+=($!)

echo
echo "jobcloud is running at $URL (proxy + 1 local worker). Ctrl-C stops it."
echo
wait -n "${pids[@]}"
