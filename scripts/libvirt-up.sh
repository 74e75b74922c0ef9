#!/usr/bin/env bash
# Makes sure libvirt's QEMU driver answers on this machine: starts virtlogd and
# libvirtd when they are not running (there is no systemd on the build
# machines), lets libvirt's QEMU (user libvirt-qemu) open /dev/kvm, and waits
# until `virsh -c qemu:///system version` answers. Idempotent. The packages come
# from scripts/system-deps.sh.
#
# Logs go to $LIBVIRT_LOG_DIR (default /var/log/jobcloud-libvirt).
set -euo pipefail

LOG_DIR=${LIBVIRT_LOG_DIR:-/var/log/jobcloud-libvirt}
# libvirtd answers in about a second here; 30 s leaves room for a slow first start.
WAIT_S=${LIBVIRT_UP_WAIT_S:-30}

answers() { virsh -c qemu:///system version >/dev/null 2>&1; }

if ! command -v libvirtd >/dev/null 2>&1 || ! command -v virsh >/dev/null 2>&1; then
    echo "libvirt-up: libvirtd/virsh missing; run scripts/system-deps.sh as root" >&2
    exit 1
fi
if [[ $(id -u) -ne 0 ]]; then
    answers && exit 0
    echo "libvirt-up: libvirtd is not answering on qemu:///system; start it as root:" \
         "sudo virtlogd -d && sudo libvirtd -d" >&2
    exit 1
fi

# /dev/kvm is root-only on these machines; QEMU runs as libvirt-qemu (group kvm).
# Harmless where KVM guests do not boot: the scaler then uses domain type qemu.
if [[ -c /dev/kvm ]] && getent group kvm >/dev/null; then
    chgrp kvm /dev/kvm && chmod 660 /dev/kvm
fi

mkdir -p "$LOG_DIR"
# setsid: the daemons must outlive the make/pytest process that started them.
if ! pgrep -x virtlogd >/dev/null 2>&1; then
    echo "libvirt-up: starting virtlogd (log: $LOG_DIR/virtlogd.log)"
    setsid virtlogd >>"$LOG_DIR/virtlogd.log" 2>&1 </dev/null &
fi
if ! pgrep -x libvirtd >/dev/null 2>&1; then
    echo "libvirt-up: starting libvirtd (log: $LOG_DIR/libvirtd.log)"
    setsid libvirtd >>"$LOG_DIR/libvirtd.log" 2>&1 </dev/null &
fi

for ((i = 0; i < WAIT_S * 4; i++)); do
    answers && exit 0
    sleep 0.25
done
echo "libvirt-up: libvirtd did not answer within ${WAIT_S}s; see $LOG_DIR/libvirtd.log" >&2
exit 1
