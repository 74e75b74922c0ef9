#!/usr/bin/env bash
# Installs the system packages the test suite needs (PostgreSQL server; Chromium,
# which tests/test_browser.py drives through Playwright; debootstrap for the job
# images; QEMU, libvirt and genisoimage for the worker VMs; crun), on a fresh
# Debian/Ubuntu machine. Idempotent: does nothing when all is present.
set -euo pipefail

need=()
pg_bin=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -1 || true)
[[ -n "$pg_bin" && -x "$pg_bin/initdb" && -x "$pg_bin/pg_ctl" ]] || need+=(postgresql)
# Debian's own build: Playwright's browser download is not used.
[[ -x /usr/bin/chromium ]] || need+=(chromium)
# The job images are debootstrapped Debian root filesystems (no registry here).
command -v debootstrap >/dev/null 2>&1 || need+=(debootstrap)
# Worker VMs (issue #4): QEMU and libvirt (started by scripts/libvirt-up.sh),
# libvirt-dev + pkg-config to build libvirt-python, genisoimage for the seed ISOs.
command -v qemu-system-x86_64 >/dev/null 2>&1 || need+=(qemu-system-x86)
command -v qemu-img >/dev/null 2>&1 || need+=(qemu-utils)
command -v libvirtd >/dev/null 2>&1 || need+=(libvirt-daemon-system)
command -v virsh >/dev/null 2>&1 || need+=(libvirt-clients)
[[ -f /usr/include/libvirt/libvirt.h ]] || need+=(libvirt-dev)
command -v gcc >/dev/null 2>&1 || need+=(gcc)
command -v pkg-config >/dev/null 2>&1 || need+=(pkg-config)
command -v genisoimage >/dev/null 2>&1 || need+=(genisoimage)
# Each job's disk quota is an ext4 image the worker makes (worker/jobdisk.py).
command -v mkfs.ext4 >/dev/null 2>&1 || [[ -x /usr/sbin/mkfs.ext4 || -x /sbin/mkfs.ext4 ]] \
    || need+=(e2fsprogs)
# crun: an OCI runtime that starts containers faster than runc; scripts/docker-up.sh
# registers it with dockerd, and a worker uses it for the images its `runtimes` names.
command -v crun >/dev/null 2>&1 || need+=(crun)
# The code editor's bundle is built with npm from the registry (scripts/build-editor.sh).
command -v npm >/dev/null 2>&1 || need+=(nodejs npm)
# `python -m bench s3` reads the bytes the proxy sent from the kernel's TCP counters (ss).
command -v ss >/dev/null 2>&1 || need+=(iproute2)

if ((${#need[@]} == 0)); then
    exit 0
fi
if [[ $(id -u) -ne 0 ]]; then
    echo "system-deps: missing ${need[*]}; run as root or: sudo apt-get install -y ${need[*]}" >&2
    exit 1
fi
echo "system-deps: installing ${need[*]}"
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
