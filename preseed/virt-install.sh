#!/usr/bin/env bash
# Installs a jobcloud worker VM from Debian 12's network installer, unattended,
# with preseed/preseed.cfg. Takes 10-20 minutes with KVM, over an hour under
# software emulation (it downloads and installs ~400 packages).
#
# Usage: JOBCLOUD_ENROLLMENT_TOKEN=jce_... AUTHORIZED_KEYS=FILE preseed/virt-install.sh NAME PROXY_URL
#   e.g. JOBCLOUD_ENROLLMENT_TOKEN=$(cat token) AUTHORIZED_KEYS=~/.ssh/id_ed25519.pub \
#        preseed/virt-install.sh worker-1 http://proxy.lab:3000
#   The token comes from the environment, not the command line, so it shows in
#   neither `ps` nor the shell history. AUTHORIZED_KEYS is required: the admin
#   account's password is locked, so an SSH key is the only way in.
# Environment: MEMORY_MB (2048), VCPUS (2), DISK_GB (20), VIRT_TYPE (kvm; qemu where
#   KVM guests do not boot), NETWORK (default: libvirt's "default" NAT network),
#   IMAGES (jobcloud/python,jobcloud/ml),
#   LIBVIRT_URI (qemu:///system), LOCATION (the bookworm installer tree).
#
# The worker package and its units go into the installer's initrd next to the
# preseed (d-i reads /preseed.cfg from there by itself); late_command installs
# them. The VM's identity goes in a NoCloud seed attached as a cdrom, read at
# first boot by the same unit the cloned VMs use (docs/VMS.md).
set -euo pipefail
cd "$(dirname "$0")/.."

[[ $# -eq 2 ]] || { sed -n '6,11p' "$0" >&2; exit 2; }
NAME=$1 PROXY_URL=$2
[[ -n ${JOBCLOUD_ENROLLMENT_TOKEN:-} ]] || { echo "set JOBCLOUD_ENROLLMENT_TOKEN (jobcloud enroll create)" >&2; exit 2; }
[[ -r ${AUTHORIZED_KEYS:-} ]] || { echo "set AUTHORIZED_KEYS to a readable SSH public key file: jcadmin logs in only with it" >&2; exit 2; }
MEMORY_MB=${MEMORY_MB:-2048}
VCPUS=${VCPUS:-2}
DISK_GB=${DISK_GB:-20}
VIRT_TYPE=${VIRT_TYPE:-kvm}
NETWORK=${NETWORK:-network=default}
IMAGES=${IMAGES:-jobcloud/python,jobcloud/ml}
LIBVIRT_URI=${LIBVIRT_URI:-qemu:///system}
LOCATION=${LOCATION:-http://deb.debian.org/debian/dists/bookworm/main/installer-amd64/}
STATE_DIR=${STATE_DIR:-var-vm/installs}

command -v virt-install >/dev/null || { echo "virt-install missing: apt-get install virtinst" >&2; exit 1; }

mkdir -p "$STATE_DIR"
STATE_DIR=$(cd "$STATE_DIR" && pwd)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

# The worker package (sources only) and the guest files, as late_command expects them.
mkdir -p "$work/pkg/worker" "$work/pkg/guest"
cp worker/*.py "$work/pkg/worker/"
cp vm_provisioning/guest/* "$work/pkg/guest/"
printf 'JOBCLOUD_WORKER_IMAGES=%s\n' "$IMAGES" > "$work/pkg/guest/template.env"
tar -C "$work/pkg" -czf "$work/jobcloud-worker.tar.gz" .
inject=(--initrd-inject preseed/preseed.cfg --initrd-inject "$work/jobcloud-worker.tar.gz")
cp "$AUTHORIZED_KEYS" "$work/authorized_keys"
inject+=(--initrd-inject "$work/authorized_keys")

# The identity seed, written by the same code the scaler uses.
seed="$STATE_DIR/$NAME-seed.iso"
PYTHONPATH=. "${PYTHON:-.venv/bin/python}" - "$seed" "$NAME" "$PROXY_URL" <<'PY'
import os, sys, uuid
from pathlib import Path
from vm_provisioning.seed import Identity, write_seed
path, name, url = sys.argv[1:]
token = os.environ["JOBCLOUD_ENROLLMENT_TOKEN"]
write_seed(Path(path), Identity(instance_id=str(uuid.uuid4()), hostname=name,
                                worker_name=name, proxy_url=url, enrollment_token=token))
PY

exec virt-install --connect "$LIBVIRT_URI" --name "$NAME" --virt-type "$VIRT_TYPE" \
    --memory "$MEMORY_MB" --vcpus "$VCPUS" --os-variant debian12 \
    --disk "path=$STATE_DIR/$NAME.qcow2,size=$DISK_GB,format=qcow2,bus=virtio" \
    --disk "path=$seed,device=cdrom,readonly=on" \
    --network "$NETWORK" --graphics none --console pty,target_type=serial \
    --location "$LOCATION" "${inject[@]}" \
    --extra-args "auto=true priority=critical console=ttyS0,115200n8" \
    --noautoconsole --wait -1
