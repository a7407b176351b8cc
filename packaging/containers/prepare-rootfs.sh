#!/usr/bin/env bash
# Prepares (and checks) the root filesystem the end-to-end tests and the cross-container
# benchmark run their shim containers on; prints the value for `podman run --rootfs`.
#
# The rootfs is an overlay of the host's own root (`--rootfs /:O`): the Python, the
# virtualenv with llmux installed and the CRIU-free shim are all already there, nothing is
# pulled from a container registry, and podman gives every container its own writable
# upper layer (thrown away with the container), its own mount namespace and its own
# cgroups. That is exactly what the cross-container restore has to cope with: files that
# exist only in one container's upper layer, another container's merged rootfs, another
# container's cgroups.
#
# Usage: prepare-rootfs.sh [--rootfs DIR] [--venv DIR] [--runtime runc]
#   --rootfs DIR  the lower layer (default /). Any tree that holds the virtualenv at the
#                 same path works, e.g. one from packaging/rootfs/build-rootfs.sh with the
#                 project installed into it.
#   --venv DIR    the virtualenv the shim runs from (default: the repository's .venv)
# Needs root, podman and runc (packaging/setup-dev.sh installs and configures them).
# Idempotent and cheap: it builds nothing; the check container is removed again.
set -euo pipefail

SCRIPT=$(readlink -f "$0")
REPO=$(cd "$(dirname "$SCRIPT")/../.." && pwd)
ROOTFS=/
VENV=${LLMUX_VENV:-$REPO/.venv}
RUNTIME=runc

log() { echo "prepare-rootfs: $*" >&2; }
die() { log "error: $*"; exit 1; }

while [[ $# -gt 0 ]]; do
    case "$1" in
        --rootfs) ROOTFS=${2:?--rootfs needs a directory}; shift 2 ;;
        --venv) VENV=${2:?--venv needs a directory}; shift 2 ;;
        --runtime) RUNTIME=${2:?--runtime needs a name}; shift 2 ;;
        -h|--help) sed -n '2,20p' "$SCRIPT"; exit 0 ;;
        *) die "unknown argument: $1 (see --help)" ;;
    esac
done

[[ $(id -u) -eq 0 ]] || die "must run as root (rootful podman; llmuxd acts on the containers' processes)"
command -v podman >/dev/null || die "podman is missing (bash packaging/setup-dev.sh)"
command -v "$RUNTIME" >/dev/null || die "OCI runtime $RUNTIME is missing (apt-get install $RUNTIME)"
[[ -d $ROOTFS ]] || die "rootfs $ROOTFS is not a directory"
ROOTFS=$(readlink -f "$ROOTFS")
VENV=$(readlink -f "$VENV")
[[ -x $VENV/bin/llmux ]] || die "no llmux in $VENV (bash packaging/setup-dev.sh)"

# Without this, runc fails to apply podman's default rlimits here (no CAP_SYS_RESOURCE).
if ! grep -qs '^default_ulimits *= *\[\]' /etc/containers/containers.conf; then
    die "/etc/containers/containers.conf lacks 'default_ulimits = []' under [containers] \
(bash packaging/setup-dev.sh writes it)"
fi

# The overlay takes the lower directory's own filesystem only, not what is mounted below
# it: the virtualenv (and the Python it links to) must be on that filesystem.
python_bin=$(readlink -f "$VENV/bin/python")
for path in "$VENV" "$python_bin"; do
    inside=$ROOTFS${path#/}
    [[ $ROOTFS == / ]] && inside=$path
    mnt=$(findmnt -n -o TARGET -T "$inside")
    root_mnt=$(findmnt -n -o TARGET -T "$ROOTFS")
    [[ $mnt == "$root_mnt" ]] || die "$path is on the mount $mnt, not on the rootfs \
$root_mnt: an overlay of $ROOTFS would not show it (put the virtualenv on that filesystem)"
done

# One throw-away container: the shim's entry point starts inside it with the test flags.
name=llmux-rootfs-check-$$
trap 'podman rm -f "$name" >/dev/null 2>&1 || true' EXIT
if ! out=$(podman --runtime "$RUNTIME" run --rm --name "$name" --network=host --pid=host \
        --ipc=host --rootfs "$ROOTFS:O" "$VENV/bin/llmux" --help 2>&1); then
    die "a container on --rootfs $ROOTFS:O cannot run $VENV/bin/llmux:
$out"
fi
log "ok: containers on $ROOTFS:O run $VENV/bin/llmux"
echo "$ROOTFS:O"
