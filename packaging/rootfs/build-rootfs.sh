#!/usr/bin/env bash
# Builds (or reuses) a Debian 12 tree that boots systemd in a podman container.
#
# The tree is debootstrap's minbase plus systemd, dbus and python3, then the packages the
# llmux-host .deb depends on, installed by apt inside the chroot from Debian's archive (so
# that a later `dpkg -i llmux-host_*.deb` needs no network). It is cached under
# $LLMUX_ROOTFS_CACHE (default /var/cache/llmux/rootfs) in a folder named by a hash of
# every input (this script, suite, mirror, architecture, package list): a second run with
# the same inputs only prints the path. The tree is never modified after it is built; boot
# it with `podman run --rootfs TREE:O` so that writes go to a throw-away layer.
#
# Usage: build-rootfs.sh [--deb FILE]... [--include PKG[,PKG...]]... [--suite S] [--mirror URL]
#                        [--cache DIR] [--force]
#   --deb FILE    add FILE's Depends (names only) to the packages installed in the tree
# Prints the tree's path on stdout. Needs root, debootstrap and Debian's archive.
set -euo pipefail

SCRIPT=$(readlink -f "$0")
SUITE=${LLMUX_ROOTFS_SUITE:-bookworm}
MIRROR=${LLMUX_DEBIAN_MIRROR:-http://deb.debian.org/debian}
CACHE=${LLMUX_ROOTFS_CACHE:-/var/cache/llmux/rootfs}
KEYRING=${LLMUX_DEBIAN_KEYRING:-/usr/share/keyrings/debian-archive-keyring.gpg}
FORCE=0
# What systemd-in-a-container and the system tests need (passwd gives useradd; procps ps).
BASE=(systemd systemd-sysv dbus python3 passwd procps)
EXTRA=()

log() { echo "build-rootfs: $*" >&2; }
die() { log "error: $*"; exit 1; }

deb_depends() {
    # The package names of a .deb's Depends field (versions and alternatives beyond the
    # first dropped: apt resolves versions inside the chroot).
    dpkg-deb -f "$1" Depends | tr ',' '\n' | sed -e 's/|.*//' -e 's/(.*)//' -e 's/[[:space:]]//g' \
        | grep -v '^$'
}

while [[ $# -gt 0 ]]; do
    case "$1" in
        --deb)
            [[ -f ${2:-} ]] || die "--deb needs an existing .deb file, got '${2:-}'"
            mapfile -t -O "${#EXTRA[@]}" EXTRA < <(deb_depends "$2"); shift 2 ;;
        --include) IFS=, read -r -a more <<<"${2:?--include needs a package list}"
            EXTRA+=("${more[@]}"); shift 2 ;;
        --suite) SUITE=${2:?--suite needs a name}; shift 2 ;;
        --mirror) MIRROR=${2:?--mirror needs a URL}; shift 2 ;;
        --cache) CACHE=${2:?--cache needs a directory}; shift 2 ;;
        --force) FORCE=1; shift ;;
        -h|--help) sed -n '2,17p' "$SCRIPT"; exit 0 ;;
        *) die "unknown argument: $1 (see --help)" ;;
    esac
done

[[ $(id -u) -eq 0 ]] || die "must run as root (debootstrap and chroot)"
command -v debootstrap >/dev/null || die "debootstrap missing (apt-get install debootstrap)"
[[ -r $KEYRING ]] || die "Debian archive keyring $KEYRING missing"
for p in "${EXTRA[@]}"; do
    [[ $p =~ ^[a-z0-9][a-z0-9+.-]+$ ]] || die "not a Debian package name: '$p'"
done

ARCH=$(dpkg --print-architecture)
# Sorted, unique and without the base packages, so the same set always gives the same key.
mapfile -t EXTRA < <(printf '%s\n' "${EXTRA[@]}" | grep -v '^$' | sort -u \
    | grep -vxF -f <(printf '%s\n' "${BASE[@]}") || true)
KEY=$( { sha256sum "$SCRIPT" | cut -d' ' -f1; echo "$SUITE $MIRROR $ARCH"
         printf '%s\n' "${BASE[@]}" "${EXTRA[@]}"; } | sha256sum | cut -c1-16)
DIR="$CACHE/$SUITE-$ARCH-$KEY"
TREE="$DIR/tree"

mkdir -p "$CACHE"
exec 9>"$CACHE/.lock"
flock 9  # one build at a time; a second caller waits and then reuses the result

if [[ $FORCE -eq 1 ]]; then rm -rf "$DIR"; fi
if [[ -f $DIR/complete ]]; then
    log "reusing $TREE"
    echo "$TREE"
    exit 0
fi

STAGE="$DIR.new.$$"
cleanup() {
    local m
    for m in proc dev/pts dev; do
        if mountpoint -q "$STAGE/tree/$m" 2>/dev/null; then umount -l "$STAGE/tree/$m" || true; fi
    done
    # Never delete through a mount that is still attached (it would be the host's /dev).
    if grep -q " $STAGE/" /proc/self/mountinfo; then
        log "mounts left under $STAGE; not deleting it"
    else
        rm -rf "$STAGE"
    fi
}
trap cleanup EXIT
rm -rf "$DIR" "$DIR".new.*
mkdir -p "$STAGE"

started=$SECONDS
log "debootstrap $SUITE ($ARCH, minbase + ${BASE[*]}) from $MIRROR"
base_list=$(IFS=,; echo "${BASE[*]}")
debootstrap --variant=minbase --arch="$ARCH" --keyring="$KEYRING" --include="$base_list" \
    "$SUITE" "$STAGE/tree" "$MIRROR" >"$STAGE/debootstrap.log" 2>&1 \
    || { tail -n 20 "$STAGE/debootstrap.log" >&2; die "debootstrap failed"; }

T="$STAGE/tree"
if [[ ${#EXTRA[@]} -gt 0 ]]; then
    log "apt-get install in the chroot: ${EXTRA[*]}"
    echo "deb $MIRROR $SUITE main" >"$T/etc/apt/sources.list"
    # Nothing may start services inside the chroot.
    printf '#!/bin/sh\nexit 101\n' >"$T/usr/sbin/policy-rc.d"
    chmod 0755 "$T/usr/sbin/policy-rc.d"
    mount -t proc proc "$T/proc"
    mount --bind /dev "$T/dev"
    mount --bind /dev/pts "$T/dev/pts"
    cp /etc/resolv.conf "$T/etc/resolv.conf"
    env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin DEBIAN_FRONTEND=noninteractive LC_ALL=C \
        chroot "$T" sh -c 'apt-get update -qq && apt-get install -y -qq --no-install-recommends "$@"' \
        apt "${EXTRA[@]}" >"$STAGE/apt.log" 2>&1 \
        || { tail -n 20 "$STAGE/apt.log" >&2; die "apt-get install in the chroot failed"; }
    umount "$T/dev/pts" "$T/dev" "$T/proc"
    rm -f "$T/usr/sbin/policy-rc.d"
    : >"$T/etc/resolv.conf"
fi

# A container has no consoles to log in on; an empty machine-id is filled at each boot.
chroot "$T" systemctl mask getty@tty1.service console-getty.service >/dev/null 2>&1 || true
: >"$T/etc/machine-id"
echo llmux-test >"$T/etc/hostname"
rm -rf "$T"/var/cache/apt/archives/*.deb "$T"/var/lib/apt/lists/*_Packages
printf '%s\n' "${BASE[@]}" "${EXTRA[@]}" >"$STAGE/packages"

mkdir -p "$DIR"
mv "$STAGE/tree" "$STAGE/packages" "$STAGE"/*.log "$DIR/"
touch "$DIR/complete"
log "built $TREE in $((SECONDS - started)) s ($(du -sh "$TREE" | cut -f1))"
echo "$TREE"
