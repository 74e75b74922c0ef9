#!/usr/bin/env bash
# Makes sure a Docker engine answers on this machine: installs docker.io when
# dockerd is missing (root, Debian/Ubuntu), starts dockerd in the background
# when `docker info` fails, and waits until it answers. Idempotent.
#
# It also registers the OCI runtimes the worker may name (its `runtimes`
# setting) in dockerd's config file: jobcloud-runc, runc under a second name,
# so tests/test_worker_runtime.py can see a configured runtime reach the engine
# (the default is runc too), and crun when it is installed (scripts/system-deps.sh).
# A running dockerd reloads them on SIGHUP: it is never restarted for this, as
# other work may be using it. A reload takes the runtimes from the file alone,
# so every one of them is in the file, none on dockerd's command line.
#
# crun 1.8 (Debian 12) refuses a cgroup v1 host whose v2 hierarchy holds a
# controller ("cgroups in hybrid mode not supported, drop all controllers from
# cgroupv2"); on the build machines that is hugetlb, which no v1 hierarchy took.
# As root, with crun installed, such a controller is bound to a v1 hierarchy of
# its own like the others (free_v2_controllers); docs/PERFORMANCE.md, "crun".
#
# There is no systemd on the build machines, so dockerd is started by hand;
# its log goes to $DOCKERD_LOG (default /var/log/jobcloud-dockerd.log).
set -euo pipefail

DOCKERD_LOG=${DOCKERD_LOG:-/var/log/jobcloud-dockerd.log}
DAEMON_JSON=${DOCKER_DAEMON_JSON:-/etc/docker/daemon.json}
# dockerd usually answers in 3-8 s here; 60 s leaves room for a slow first start.
WAIT_S=${DOCKER_UP_WAIT_S:-60}

is_root() { [[ $(id -u) -eq 0 ]]; }

# The runtimes to register, as name=path words.
wanted_runtimes() {
    echo "jobcloud-runc=runc"
    if command -v crun >/dev/null 2>&1; then
        echo "crun=$(command -v crun)"
    fi
}

# Adds the wanted runtimes to $DAEMON_JSON, keeping whatever else it holds.
write_runtimes() {
    python3 - "$DAEMON_JSON" $(wanted_runtimes) <<'PY'
import json, os, sys
path, wanted = sys.argv[1], dict(w.split("=", 1) for w in sys.argv[2:])
try:
    with open(path) as f:
        config = json.load(f)
except FileNotFoundError:
    config = {}
runtimes = config.setdefault("runtimes", {})
if all(runtimes.get(name, {}).get("path") == p for name, p in wanted.items()):
    sys.exit(0)
runtimes.update({name: {"path": p} for name, p in wanted.items()})
os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
with open(path + ".tmp", "w") as f:
    json.dump(config, f, indent=2)
    f.write("\n")
os.replace(path + ".tmp", path)
print(f"docker-up: registered {', '.join(sorted(wanted))} in {path}")
PY
}

# Binds each controller of a hybrid host's v2 hierarchy to a v1 hierarchy of
# its own, so crun starts containers. Only when no v2 cgroup uses it (empty
# subtree_control): the kernel refuses to move a controller in use. runc, which
# uses the v1 hierarchies on such a host, then also puts each container in a
# hugetlb cgroup, as on any v1 host that mounts it; containers already running
# are not touched. Idempotent: once moved, the v2 hierarchy lists none.
free_v2_controllers() {
    local v2=/sys/fs/cgroup/unified controller
    [[ -r $v2/cgroup.controllers && -d /sys/fs/cgroup/memory ]] || return 0
    if [[ -n $(cat "$v2/cgroup.subtree_control") ]]; then
        echo "docker-up: cgroup v2 controllers are in use ($(cat "$v2/cgroup.subtree_control"));" \
             "crun cannot start containers on this host" >&2
        return 0
    fi
    for controller in $(cat "$v2/cgroup.controllers"); do
        if mkdir -p "/sys/fs/cgroup/$controller" 2>/dev/null \
           && mount -t cgroup -o "$controller" cgroup "/sys/fs/cgroup/$controller"; then
            echo "docker-up: cgroup controller $controller moved to a v1 hierarchy (crun refuses" \
                 "a v2 hierarchy holding controllers next to v1 ones)"
        else
            echo "docker-up: could not move cgroup controller $controller off the v2 hierarchy;" \
                 "crun cannot start containers on this host" >&2
        fi
    done
}

if is_root && command -v crun >/dev/null 2>&1; then
    free_v2_controllers
fi

# Whether the running engine lists every wanted runtime.
runtimes_loaded() {
    local have name
    have=$(docker info --format '{{json .Runtimes}}' 2>/dev/null) || return 1
    for name in $(wanted_runtimes | cut -d= -f1); do
        [[ $have == *"\"$name\""* ]] || return 1
    done
}

if docker info >/dev/null 2>&1; then
    if runtimes_loaded; then
        exit 0
    fi
    if ! is_root; then
        echo "docker-up: the engine lacks runtimes ($(wanted_runtimes | tr '\n' ' ')); run this" \
             "script as root to register them" >&2
        exit 0
    fi
    write_runtimes
    echo "docker-up: reloading dockerd's configuration (SIGHUP)"
    kill -HUP "$(pgrep -x dockerd | head -1)"
    for ((i = 0; i < WAIT_S * 4; i++)); do
        if runtimes_loaded; then
            exit 0
        fi
        sleep 0.25
    done
    echo "docker-up: dockerd did not load the runtimes from $DAEMON_JSON; see $DOCKERD_LOG" >&2
    exit 1
fi

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
    write_runtimes
    echo "docker-up: starting dockerd (log: $DOCKERD_LOG)"
    # setsid: dockerd must outlive the make/pytest process that started it.
    setsid dockerd --host unix:///var/run/docker.sock --config-file "$DAEMON_JSON" \
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
