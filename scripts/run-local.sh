#!/usr/bin/env bash
# `make run`: the proxy under gunicorn plus one local worker on this machine's
# Docker engine, SQLite under $DATA_DIR.
#
# Ctrl-C: a terminal signals its whole foreground process group, which would
# stop the proxy together with the worker and leave a running job `running`.
# So the proxy and the worker run in sessions of their own (setsid) and only
# this script hears Ctrl-C; its trap only counts (the loops below act on it):
# first Ctrl-C, the worker drains (finishes or hands back its jobs) while the
# proxy still answers, then the proxy stops; a second Ctrl-C, the worker stops
# its jobs at once (and hands them back), then the proxy stops.
set -euo pipefail
DATA_DIR=${DATA_DIR:-$PWD/var}
HOST=${HOST:-127.0.0.1}
PORT=${PORT:-3000}
URL="http://$HOST:$PORT"
[[ $HOST == 0.0.0.0 ]] && URL="http://127.0.0.1:$PORT"
export JOBCLOUD_DATA_DIR=$DATA_DIR

interrupts=0
proxy=
worker=
trap 'interrupts=$((interrupts + 1))' INT TERM
trap shutdown EXIT

alive() { [[ -n $1 ]] && kill -0 "$1" 2>/dev/null; }

# Waits until one of the given processes exits, a signal arrives, or a second
# passes. A trapped signal ends a `wait` early, but one that lands just before
# the wait starts would leave it waiting for a process that may run for
# minutes: the loops around this re-check `interrupts` at least every second.
pause_on() {
    sleep 1 &
    local sleeper=$!
    wait -n "$@" "$sleeper" 2>/dev/null || true
    kill "$sleeper" 2>/dev/null || true
}

shutdown() {
    trap - EXIT
    echo "stopping jobcloud..."
    local seen=$interrupts
    if alive "$worker"; then
        echo "the worker finishes or hands back its jobs (Ctrl-C again: stop them now)"
        kill -TERM "$worker" 2>/dev/null || true   # (it may have just exited)
        while alive "$worker"; do
            pause_on "$worker"
            if ((interrupts > seen)) && alive "$worker"; then
                seen=$interrupts
                kill -TERM "$worker" 2>/dev/null || true   # its second signal: containers stopped, jobs handed back
            fi
        done
    fi
    if alive "$proxy"; then
        kill -TERM "$proxy" 2>/dev/null || true
        while alive "$proxy"; do
            pause_on "$proxy"
            if ((interrupts > seen)); then
                kill -INT "$proxy" 2>/dev/null || true   # gunicorn: quick shutdown
            fi
        done
    fi
}

# The database and the first admin account are made before the proxy starts,
# so that the one-time password can be printed last, once the worker has
# joined, instead of scrolling away among the start-up lines (empty when
# there are users already).
first_start=$(jobcloud-proxy init --bind "$HOST:$PORT")

setsid jobcloud-proxy serve --bind "$HOST:$PORT" &
proxy=$!

for ((i = 0; i < 240 && interrupts == 0; i++)); do
    curl -fsS -o /dev/null "$URL/healthz" 2>/dev/null && break
    alive "$proxy" || { echo "the proxy did not start" >&2; exit 1; }
    sleep 0.25
done
((interrupts == 0)) || exit 0

# The per-job disk quota loop-mounts a file system, which needs root; a
# non-root `make run` (Docker through the docker group) runs jobs without it.
if [[ $(id -u) != 0 && -z ${JOBCLOUD_WORKER_DISK_QUOTA:-} ]]; then
    echo "note: not root, so jobs run without a per-job disk quota (JOBCLOUD_WORKER_DISK_QUOTA=false)"
    export JOBCLOUD_WORKER_DISK_QUOTA=false
fi

# The local worker enrolls itself with a token made for it now (valid one hour;
# it rejoins with its own secret after that).
token=$(jobcloud enroll create --label "local worker" --expires 3600)
started=$(mktemp)
JOBCLOUD_WORKER_PROXY_URL=$URL JOBCLOUD_WORKER_ENROLLMENT_TOKEN=$token \
JOBCLOUD_WORKER_NAME=${WORKER_NAME:-local} JOBCLOUD_WORKER_DATA_DIR=$DATA_DIR/worker \
    setsid jobcloud-worker &
worker=$!

# The worker writes its secret just after it says "registered as": a secret
# newer than the worker means the start-up lines are all out.
secret=$DATA_DIR/worker/worker-secret
while ((interrupts == 0)) && alive "$worker" && ! [[ $secret -nt $started ]]; do
    sleep 0.1 || true   # (a Ctrl-C ends it: then the password is still printed)
done
rm -f "$started"

echo
echo "jobcloud is running at $URL (proxy + 1 local worker). Ctrl-C stops it."
if [[ -n $first_start ]]; then
    echo
    printf '%s\n' "$first_start"
fi
echo
# Until Ctrl-C, or until either exits on its own (then the other is stopped).
while ((interrupts == 0)) && alive "$proxy" && alive "$worker"; do
    pause_on "$proxy" "$worker"
done
