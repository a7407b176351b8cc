#!/usr/bin/env bash
# Installs a self-contained CRIU 4.x bundle (Debian sid's criu + its libraries + loader).
#
# Why a bundle: Debian 12's criu 3.17 fails `criu check` on recent kernels, 4.1 cannot dump
# TCP sockets on kernels >= 6.16, and sid's 4.2.1 needs glibc >= 2.38. So the .debs are only
# unpacked (never installed) into DEST/root, and DEST/criu runs the binary through the
# bundle's own dynamic loader and libraries. The result runs on any x86_64/arm64 Linux
# (Debian 12, Ubuntu 24.04, ...), whatever its glibc.
#
# Usage: install-criu.sh [--dest DIR] [--force]     (default DIR: /opt/llmux/criu)
# Network: Debian's archive only (deb.debian.org, or $LLMUX_DEBIAN_MIRROR).
set -euo pipefail

DEST=/opt/llmux/criu
FORCE=0
MIRROR=${LLMUX_DEBIAN_MIRROR:-http://deb.debian.org/debian}
SUITE=${LLMUX_CRIU_SUITE:-sid}
KEYRING=${LLMUX_DEBIAN_KEYRING:-/usr/share/keyrings/debian-archive-keyring.gpg}

while [[ $# -gt 0 ]]; do
    case "$1" in
        --dest) DEST=${2:?--dest needs a directory}; shift 2 ;;
        --dest=*) DEST=${1#--dest=}; shift ;;
        --force) FORCE=1; shift ;;
        -h|--help) sed -n '2,12p' "$0"; exit 0 ;;
        *) echo "install-criu.sh: unknown argument: $1" >&2; exit 2 ;;
    esac
done

log() { echo "install-criu: $*" >&2; }
die() { log "error: $*"; exit 1; }

[[ $DEST == /* ]] || DEST="$(pwd)/$DEST"

bundle_version() {
    # Prints the bundle's CRIU version ("4.2.1") or nothing.
    [[ -x "$DEST/criu" ]] || return 0
    "$DEST/criu" --version 2>/dev/null | sed -n 's/^Version: *//p' | head -n1
}

if [[ $FORCE -eq 0 ]]; then
    have=$(bundle_version)
    if [[ $have == 4.* ]]; then
        log "CRIU $have already installed in $DEST (use --force to reinstall)"
        exit 0
    fi
fi

command -v apt-get >/dev/null || die "apt-get is needed to fetch the Debian packages"
command -v dpkg >/dev/null || die "dpkg is needed to unpack the Debian packages"
[[ -r $KEYRING ]] || die "Debian archive keyring $KEYRING missing (apt-get install debian-archive-keyring)"

ARCH=$(dpkg --print-architecture)
case "$ARCH" in
    amd64) TRIPLET=x86_64-linux-gnu; LOADER=ld-linux-x86-64.so.2 ;;
    arm64) TRIPLET=aarch64-linux-gnu; LOADER=ld-linux-aarch64.so.1 ;;
    *) die "unsupported architecture $ARCH" ;;
esac

WORK=$(mktemp -d /tmp/llmux-criu-install.XXXXXX)
STAGE="$DEST.new.$$"
trap 'rm -rf "$WORK" "$STAGE"' EXIT
mkdir -p "$WORK/lists/partial" "$WORK/cache/archives/partial" "$WORK/debs"
: >"$WORK/status"
echo "deb [arch=$ARCH signed-by=$KEYRING] $MIRROR $SUITE main" >"$WORK/sources.list"

# A private apt configuration: the host's sources, package lists, cache and dpkg status are
# neither read nor touched, so nothing is installed on the host.
APT_OPTS=(
    -o "Dir::Etc::SourceList=$WORK/sources.list"
    -o "Dir::Etc::SourceParts=/dev/null"
    -o "Dir::State::Lists=$WORK/lists"
    -o "Dir::State::status=$WORK/status"
    -o "Dir::Cache=$WORK/cache"
    -o "APT::Architecture=$ARCH"
    -o "APT::Architectures::=$ARCH"
    -o "APT::Sandbox::User=root"
)

log "reading the $SUITE package list from $MIRROR"
apt-get "${APT_OPTS[@]}" -qq update

candidate=$(apt-cache "${APT_OPTS[@]}" policy criu | sed -n 's/^ *Candidate: *//p')
[[ $candidate == 4.* ]] || die "Debian $SUITE offers criu '$candidate', need 4.x"
log "criu $candidate from Debian $SUITE"

# criu, libcompel1 and the transitive closure of their library dependencies (the binary
# loads ~22 libraries; libc6 brings the loader). Non-library packages are left out.
mapfile -t PACKAGES < <(
    apt-cache "${APT_OPTS[@]}" depends --recurse --no-recommends --no-suggests \
        --no-conflicts --no-breaks --no-replaces --no-enhances criu libcompel1 |
        grep -v '^ ' | grep -E '^(criu|lib)' | sort -u
)
log "downloading ${#PACKAGES[@]} packages: ${PACKAGES[*]}"
(cd "$WORK/debs" && apt-get "${APT_OPTS[@]}" -qq download "${PACKAGES[@]}")

mkdir -p "$STAGE/root"
for deb in "$WORK"/debs/*.deb; do
    dpkg -x "$deb" "$STAGE/root"
done
[[ -x "$STAGE/root/usr/sbin/criu" ]] || die "criu binary missing from the unpacked packages"
# Documentation, manuals and locales are not needed to run the binary.
rm -rf "$STAGE/root/usr/share/doc" "$STAGE/root/usr/share/man" "$STAGE/root/usr/share/locale" \
    "$STAGE/root/usr/share/lintian" "$STAGE/root/usr/share/info"

# Debian 13+ is merged-/usr; older packages may still ship /lib. Both go on the path.
LOADER_PATH=usr/lib/$TRIPLET/$LOADER
[[ -e "$STAGE/root/$LOADER_PATH" ]] || LOADER_PATH=lib/$TRIPLET/$LOADER
[[ -e "$STAGE/root/$LOADER_PATH" ]] || die "dynamic loader $LOADER missing from libc6"

cat >"$STAGE/criu" <<EOF
#!/bin/sh
# CRIU $candidate from Debian $SUITE, run through its own loader and libraries
# (installed by llmux packaging/criu/install-criu.sh; the host's glibc is never used).
R="\$(dirname "\$(readlink -f "\$0")")/root"
exec "\$R/$LOADER_PATH" --library-path "\$R/usr/lib/$TRIPLET:\$R/lib/$TRIPLET" "\$R/usr/sbin/criu" "\$@"
EOF
chmod 0755 "$STAGE/criu"
echo "$candidate" >"$STAGE/VERSION"

# Every library the binary needs must resolve inside the bundle, never on the host.
R="$STAGE/root"
resolved=$("$R/$LOADER_PATH" --library-path "$R/usr/lib/$TRIPLET:$R/lib/$TRIPLET" \
    --list "$R/usr/sbin/criu")
if grep -q 'not found' <<<"$resolved"; then
    die "libraries missing from the bundle: $(grep 'not found' <<<"$resolved" | tr -s ' \n' ' ')"
fi
foreign=$(grep '=>' <<<"$resolved" | grep -v "=> $R/" || true)
[[ -z $foreign ]] || die "libraries resolved outside the bundle: $foreign"

got=$("$STAGE/criu" --version | sed -n 's/^Version: *//p' | head -n1)
[[ $got == 4.* ]] || die "the bundled criu reports version '$got'"

# Swap into place only when complete; an interrupted install leaves the old one intact.
mkdir -p "$(dirname "$DEST")"
if [[ -e $DEST ]]; then
    rm -rf "$DEST.old.$$"
    mv "$DEST" "$DEST.old.$$"
fi
mv "$STAGE" "$DEST"
rm -rf "$DEST.old.$$"
log "installed CRIU $got in $DEST ($(du -sh "$DEST" | cut -f1))"

if [[ $(id -u) -eq 0 ]]; then
    if out=$("$DEST/criu" check 2>&1); then
        log "criu check: $(tail -n1 <<<"$out")"
    else
        log "warning: 'criu check' failed on this kernel:"
        grep -v 'RLIMIT_NOFILE' <<<"$out" | tail -n 5 >&2
    fi
fi
echo "$DEST/criu"
