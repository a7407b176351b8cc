#!/usr/bin/env bash
# Builds llmux-host_<version>_<arch>.deb: llmuxd (llmux.service) and the llmux operator CLI
# (llmux.client, without the shim) for Debian's python3, the
# systemd unit, D-Bus policy and activation file, tmpfiles/sysusers entries, a default
# /etc/llmux/llmuxd.toml (conffile) and the CRIU 4.2 bundle under /usr/lib/llmux/criu.
#
# Usage: bash packaging/deb/build.sh [--out DIR] [--criu-bundle DIR]
#   --out DIR          where the .deb goes (default: dist/)
#   --criu-bundle DIR  use this CRIU bundle (made by packaging/criu/install-criu.sh) instead
#                      of the cached one ($LLMUX_CACHE/criu-bundle, built on first use)
# Needs dpkg-deb, python3 >= 3.11 with venv (or the project's .venv) and the registries
# (PyPI for setuptools when no .venv exists; Debian's archive for the CRIU bundle).
# Prints the .deb's path on stdout.
set -euo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
OUT=$ROOT/dist
BUNDLE=""
if [[ $(id -u) -eq 0 ]]; then CACHE_DEFAULT=/var/cache/llmux; else CACHE_DEFAULT=${XDG_CACHE_HOME:-$HOME/.cache}/llmux; fi
CACHE=${LLMUX_CACHE:-$CACHE_DEFAULT}
PACKAGE=llmux-host
MAINTAINER=${LLMUX_DEB_MAINTAINER:-llmux maintainers <llmux@example.org>}

log() { echo "build-deb: $*" >&2; }
die() { log "error: $*"; exit 1; }

while [[ $# -gt 0 ]]; do
    case "$1" in
        --out) OUT=${2:?--out needs a directory}; shift 2 ;;
        --out=*) OUT=${1#--out=}; shift ;;
        --criu-bundle) BUNDLE=${2:?--criu-bundle needs a directory}; shift 2 ;;
        -h|--help) sed -n '2,12p' "$0"; exit 0 ;;
        *) die "unknown argument: $1 (see --help)" ;;
    esac
done

command -v dpkg-deb >/dev/null || die "dpkg-deb is needed (Debian/Ubuntu: dpkg)"
umask 022
ARCH=$(dpkg --print-architecture)
VERSION=$(python3 -c 'import sys, tomllib; print(tomllib.load(open(sys.argv[1], "rb"))["project"]["version"])' \
    "$ROOT/pyproject.toml")
[[ $VERSION =~ ^[0-9][0-9A-Za-z.+~-]*$ ]] || die "pyproject.toml version '$VERSION' is not a Debian version"

UNITS=(
    "units/llmuxd.service:usr/lib/systemd/system/llmuxd.service"
    "units/org.llmux.Host1.conf:usr/share/dbus-1/system.d/org.llmux.Host1.conf"
    "units/org.llmux.Host1.service:usr/share/dbus-1/system-services/org.llmux.Host1.service"
    "units/llmux.tmpfiles.conf:usr/lib/tmpfiles.d/llmux.conf"
    "units/llmux.sysusers.conf:usr/lib/sysusers.d/llmux.conf"
    "packaging/examples/llmuxd.toml:etc/llmux/llmuxd.toml"
    "packaging/examples/shim.toml:usr/share/doc/$PACKAGE/examples/config.toml"
    "packaging/deb/debian/copyright:usr/share/doc/$PACKAGE/copyright"
)
missing=()
for pair in "${UNITS[@]}"; do [[ -f $ROOT/${pair%%:*} ]] || missing+=("${pair%%:*}"); done
[[ ${#missing[@]} -eq 0 ]] || die "missing in the repository: ${missing[*]}"

WORK=$(mktemp -d /tmp/llmux-deb.XXXXXX)
trap 'rm -rf "$WORK"' EXIT
STAGE=$WORK/$PACKAGE
mkdir -p "$STAGE/DEBIAN"

# --- Python: a wheel built from a copy of the sources (never in the shared work tree),
# unpacked into Debian's dist-packages. Debian's python3 packages provide the dependencies.
PY=${LLMUX_VENV:-$ROOT/.venv}/bin/python
if ! { [[ -x $PY ]] && "$PY" -c 'import setuptools, pip' 2>/dev/null; }; then
    log "no project .venv: making a build venv with setuptools from PyPI"
    python3 -m venv "$WORK/venv" || die "python3 -m venv failed (apt-get install python3-venv)"
    "$WORK/venv/bin/pip" install -q "setuptools>=77" wheel
    PY=$WORK/venv/bin/python
fi
mkdir -p "$WORK/src" "$WORK/wheel"
# the service, the client and what they share: the shim runs in containers, not on the host
cp -r "$ROOT/common" "$ROOT/service" "$ROOT/client" "$ROOT/setup.py" "$ROOT/pyproject.toml" "$WORK/src/"
if [[ -f $ROOT/README.md ]]; then cp "$ROOT/README.md" "$WORK/src/"; else echo "# llmux" >"$WORK/src/README.md"; fi
find "$WORK/src" \( -name __pycache__ -o -name '*.egg-info' \) -prune -exec rm -rf {} +
log "building the llmux $VERSION wheel"
"$PY" -m pip wheel -q --no-deps --no-build-isolation -w "$WORK/wheel" "$WORK/src" >"$WORK/wheel.log" 2>&1 \
    || { tail -n 20 "$WORK/wheel.log" >&2; die "building the wheel failed"; }
WHEEL=$(ls "$WORK"/wheel/llmux-*.whl)
SITE=$STAGE/usr/lib/python3/dist-packages
mkdir -p "$SITE"
python3 -m zipfile -e "$WHEEL" "$SITE"
# dpkg owns these files: without RECORD pip refuses to uninstall them.
rm -f "$SITE"/llmux-*.dist-info/RECORD "$SITE"/llmux-*.dist-info/direct_url.json
echo dpkg >"$SITE"/llmux-"$VERSION".dist-info/INSTALLER
[[ -f $SITE/llmux/service/main.py ]] || die "the wheel has no llmux/service/main.py"
[[ -f $SITE/llmux/client/opscli.py ]] || die "the wheel has no llmux/client/opscli.py"
[[ -f $SITE/llmux/common/contract.py ]] || die "the wheel has no llmux/common/contract.py"
[[ ! -e $SITE/llmux/shim ]] || die "the host package must not carry the shim (llmux/shim)"
# the wheel's entry points name the shim's llmux; /usr/bin below is what runs
rm -f "$SITE"/llmux-"$VERSION".dist-info/entry_points.txt

mkdir -p "$STAGE/usr/bin"
for entry in "llmuxd:llmux.service.main" "llmux:llmux.client.opscli"; do
    cat >"$STAGE/usr/bin/${entry%%:*}" <<EOF
#!/usr/bin/python3
import sys

from ${entry#*:} import main

sys.exit(main())
EOF
    chmod 0755 "$STAGE/usr/bin/${entry%%:*}"
done

# --- units, D-Bus files, tmpfiles/sysusers, the default configuration, documentation
for pair in "${UNITS[@]}"; do
    install -D -m 0644 "$ROOT/${pair%%:*}" "$STAGE/${pair#*:}"
done
if [[ -f $ROOT/README.md ]]; then
    install -D -m 0644 "$ROOT/README.md" "$STAGE/usr/share/doc/$PACKAGE/README.md"
fi
grep -q '^ExecStart=/usr/bin/llmuxd' "$STAGE/usr/lib/systemd/system/llmuxd.service" \
    || die "units/llmuxd.service must start /usr/bin/llmuxd (ExecStart=/usr/bin/llmuxd ...)"
install -d "$STAGE/usr/share/man/man1" "$STAGE/usr/share/man/man8"
gzip -9n -c "$HERE/man/llmux.1" >"$STAGE/usr/share/man/man1/llmux.1.gz"
gzip -9n -c "$HERE/man/llmuxd.8" >"$STAGE/usr/share/man/man8/llmuxd.8.gz"
cat >"$WORK/changelog" <<EOF
$PACKAGE ($VERSION) unstable; urgency=medium

  * Built from the llmux repository by packaging/deb/build.sh.

 -- $MAINTAINER  $(date -R -u -d "@${SOURCE_DATE_EPOCH:-$(date +%s)}")
EOF
gzip -9n -c "$WORK/changelog" >"$STAGE/usr/share/doc/$PACKAGE/changelog.gz"

# --- CRIU 4.2 bundle (its own loader and libraries), as llmuxd.toml's criu = points to
if [[ -z $BUNDLE ]]; then
    BUNDLE=$CACHE/criu-bundle
    log "CRIU bundle: $BUNDLE"
    bash "$ROOT/packaging/criu/install-criu.sh" --dest "$BUNDLE" >/dev/null
fi
[[ -x $BUNDLE/criu && -d $BUNDLE/root ]] || die "$BUNDLE is not a CRIU bundle (no criu wrapper and root/)"
mkdir -p "$STAGE/usr/lib/llmux"
cp -a "$BUNDLE" "$STAGE/usr/lib/llmux/criu"
grep -q '^criu = "/usr/lib/llmux/criu/criu"' "$STAGE/etc/llmux/llmuxd.toml" \
    || die "packaging/examples/llmuxd.toml must set criu = \"/usr/lib/llmux/criu/criu\""

# --- metadata
for script in postinst prerm postrm; do
    install -m 0755 "$HERE/debian/$script" "$STAGE/DEBIAN/$script"
done
install -D -m 0644 "$HERE/debian/lintian-overrides" "$STAGE/usr/share/lintian/overrides/$PACKAGE"
echo /etc/llmux/llmuxd.toml >"$STAGE/DEBIAN/conffiles"
SIZE=$(du -sk --exclude=DEBIAN "$STAGE" | cut -f1)
sed -e "s/@VERSION@/$VERSION/" -e "s|@MAINTAINER@|$MAINTAINER|" -e "s/@ARCH@/$ARCH/" -e "s/@INSTALLED_SIZE@/$SIZE/" \
    "$HERE/debian/control.in" >"$STAGE/DEBIAN/control"
(cd "$STAGE" && find . -path ./DEBIAN -prune -o -type f -printf '%P\0' | LC_ALL=C sort -z \
    | xargs -0 md5sum >DEBIAN/md5sums)

mkdir -p "$OUT"
DEB=$(cd "$OUT" && pwd)/${PACKAGE}_${VERSION}_${ARCH}.deb
dpkg-deb --root-owner-group -Zxz --build "$STAGE" "$DEB" >/dev/null
log "built $DEB ($(du -h "$DEB" | cut -f1), installed size ${SIZE} KiB)"
echo "$DEB"
