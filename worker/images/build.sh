#!/usr/bin/env bash
# Builds the jobcloud job images offline (no container registry is needed):
# debootstrap a Debian rootfs with the packages of worker/images/NAME.packages,
# add the non-root user `job` (uid/gid $JOB_UID), and `docker import` it as jobcloud/NAME.
# The worker runs every job as that uid (its `job_uid` setting, 700000 by default):
# no account on any host (docs/SECURITY.md); the entry here only names it inside.
#
# Rebuilding when nothing changed is quick: the rootfs tarball is cached under
# $JOBCLOUD_IMAGE_CACHE keyed by a hash of the package list (and of this
# script), and an image already carrying that key as a label is left alone.
#
# MPLBACKEND=Agg: jobs have no display. Debian's /etc/matplotlibrc names TkAgg,
# which pyplot (and seaborn) would first try to load, without Tk, in every job.
#
# Usage: build.sh [NAME...]   (default: python ml); needs root for debootstrap.
set -euo pipefail
JOB_UID=${JOB_UID:-700000}

HERE=$(cd "$(dirname "$0")" && pwd)
SUITE=${JOBCLOUD_IMAGE_SUITE:-bookworm}
MIRROR=${JOBCLOUD_IMAGE_MIRROR:-http://deb.debian.org/debian}
CACHE=${JOBCLOUD_IMAGE_CACHE:-$HERE/../../var/image-cache}
FORCE=${JOBCLOUD_IMAGE_FORCE:-0}

main() {
    local names=("$@")
    ((${#names[@]})) || names=(python ml)
    mkdir -p "$CACHE"
    for name in "${names[@]}"; do
        build_one "$name"
    done
}

build_one() {
    local name=$1 list="$HERE/$1.packages"
    [[ -f $list ]] || die "no package list $list"
    local packages key tarball image="jobcloud/$name:latest"
    packages=$(grep -v '^\s*#' "$list" | tr -s ' \n' '\n' | sed '/^$/d' | sort -u | paste -sd, -)
    key=$( (echo "$SUITE $packages $JOB_UID"; cat "$0") | sha256sum | cut -c1-16)
    tarball="$CACHE/$name-$key.tar"

    if [[ $FORCE != 1 ]] && [[ $(docker image inspect -f '{{index .Config.Labels "jobcloud.key"}}' \
            "$image" 2>/dev/null || true) == "$key" ]]; then
        echo "build-images: $image is up to date ($key)"
        return
    fi
    if [[ $FORCE == 1 || ! -s $tarball ]]; then
        make_rootfs_tarball "$packages" "$tarball"
    fi
    echo "build-images: importing $image from $tarball"
    docker import \
        --change "LABEL jobcloud.key=$key" \
        --change "LABEL jobcloud.packages=$packages" \
        --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
        --change 'ENV LANG=C.UTF-8' \
        --change 'ENV PYTHONDONTWRITEBYTECODE=1' \
        --change 'ENV MPLCONFIGDIR=/tmp' \
        --change 'ENV MPLBACKEND=Agg' \
        --change 'ENV HOME=/tmp' \
        --change "USER $JOB_UID:$JOB_UID" \
        --change 'WORKDIR /job' \
        --change 'CMD ["python3"]' \
        "$tarball" "$image" >/dev/null
    # Old tarballs of this image are dead weight once the new one is imported.
    find "$CACHE" -maxdepth 1 -name "$name-*.tar" ! -name "$(basename "$tarball")" -delete
}

make_rootfs_tarball() {
    local packages=$1 tarball=$2
    [[ $(id -u) -eq 0 ]] || die "debootstrap needs root (or reuse a cached tarball in $CACHE)"
    command -v debootstrap >/dev/null || die "debootstrap missing: apt-get install -y debootstrap"
    local rootfs
    rootfs=$(mktemp -d "${TMPDIR:-/tmp}/jobcloud-rootfs.XXXXXX")
    # The rootfs is only needed until it is tarred; remove it whatever happens.
    trap 'rm -rf "${rootfs:-}"; trap - RETURN' RETURN
    echo "build-images: debootstrap $SUITE with $packages"
    debootstrap --variant=minbase --include="$packages" "$SUITE" "$rootfs" "$MIRROR" \
        > "$CACHE/debootstrap.log" 2>&1 || die "debootstrap failed; see $CACHE/debootstrap.log"
    add_job_user "$rootfs"
    mkdir -p "$rootfs/job/input" "$rootfs/job/output"
    # Package caches and lists are not needed at run time and only grow the image.
    rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/* \
           "$rootfs"/usr/share/doc/* "$rootfs"/usr/share/man/* "$rootfs"/usr/share/locale/*
    tar -C "$rootfs" --numeric-owner -cf "$tarball.partial" .
    mv "$tarball.partial" "$tarball"
}

add_job_user() {
    local rootfs=$1
    grep -q '^job:' "$rootfs/etc/passwd" && return
    # Edit the files directly: no chroot, so no /proc or /dev needs mounting.
    echo "job:x:$JOB_UID:$JOB_UID:jobcloud job:/tmp:/bin/sh" >> "$rootfs/etc/passwd"
    echo "job:x:$JOB_UID:" >> "$rootfs/etc/group"
    echo 'job:!:19000:0:99999:7:::' >> "$rootfs/etc/shadow"
}

die() { echo "build-images: $*" >&2; exit 1; }

main "$@"
