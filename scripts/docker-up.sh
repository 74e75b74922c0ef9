#!/usr/bin/env bash
# Makes sure a Docker engine answers on this machine: installs docker.io when
# dockerd is missing (root, Debian/Ubuntu), starts dockerd in the background
# when `docker info` fails, and waits until it answers. Idempotent.
#
# There is no systemd on the build machines, so dockerd is started by hand;
# its log goes to $DOCKERD_LOG (default /var/log/jobcloud-dockerd.log).
set -euo pipefail

DOCKERD_LOG=${DOCKERD_LOG:-/var/log/jobcloud-dockerd.log}
# dockerd usually answers in 3-8 s here; 60 s leaves room for a slow first start.
WAIT_S=${DOCKER_UP_WAIT_S:-60}

if docker info >/dev/null 2>&1; then
    exit 0
fi

is_root() { [[ $(id -u) -eq 0 ]]; }

if ! command -v dockerd >/dev/null 2>&1; then
    if ! is_root; then
        echo "docker-up: no Docker engine here; run as root, or: sudo apt-get install -y docker.io" \
             "&& sudo dockerd &" >&2
        exit 1
    fi
    echo "docker-up: installing docker.io"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends docker.io >/dev/null
fi

if ! is_root; then
    echo "docker-up: dockerd is installed but not answering; start it as root:" \
         "sudo dockerd --host unix:///var/run/docker.sock &" >&2
    exit 1
fi

if ! pgrep -x dockerd >/dev/null 2>&1; then
    echo "docker-up: starting dockerd (log: $DOCKERD_LOG)"
    # setsid: dockerd must outlive the make/pytest process that started it.
    # jobcloud-runc: runc under a second name, so tests/test_worker_runtime.py can
    # see a configured runtime reach the engine (the default is runc too).
    setsid dockerd --host unix:///var/run/docker.sock --add-runtime jobcloud-runc=runc \
        >>"$DOCKERD_LOG" 2>&1 < /dev/null &
fi

for ((i = 0; i < WAIT_S * 4; i++)); do
    if docker info >/dev/null 2>&1; then
        exit 0
    fi
    sleep 0.25
done
echo "docker-up: dockerd did not answer within ${WAIT_S}s; see $DOCKERD_LOG" >&2
exit 1
