#!/usr/bin/env bash
# Bundles this machine's dbus-daemon with its libraries and dynamic loader into DEST, so that a
# private bus can run where no dbus-daemon is installed and nothing can be installed (the GPU
# machine: packaging/gpu/gpu-validate.sh carries it there). DEST/dbus-daemon runs the binary
# through the bundle's own loader, whatever the glibc of the machine it runs on.
#
# Usage: bundle-dbus.sh [--dest DIR]     (default DIR: .dbus; needs dbus-daemon installed here)
set -euo pipefail
DEST=.dbus
case ${1:-} in
    --dest) DEST=${2:?--dest needs a directory} ;;
    --dest=*) DEST=${1#--dest=} ;;
    "") ;;
    *) echo "bundle-dbus.sh: unknown argument: $1" >&2; exit 2 ;;
esac
BIN=$(command -v dbus-daemon) || { echo "bundle-dbus.sh: dbus-daemon is not installed here" >&2; exit 1; }
BIN=$(readlink -f "$BIN")
STAGE="$DEST.new.$$"
trap 'rm -rf "$STAGE"' EXIT
mkdir -p "$STAGE/lib"
cp "$BIN" "$STAGE/lib/dbus-daemon.bin"
# every library the loader resolves (ldd's "=> path" and the loader itself, which has no "=>")
ldd "$BIN" | awk '/=> \//{print $3} /^\t\/.*ld-linux/{print $1}' | while read -r lib; do
    cp -L "$lib" "$STAGE/lib/"
done
LOADER=$(cd "$STAGE/lib" && ls ld-linux-*.so.* | head -n1)
cat >"$STAGE/dbus-daemon" <<WRAP
#!/bin/sh
# dbus-daemon from $(. /etc/os-release && echo "$PRETTY_NAME"), run through its own loader and libraries
L="\$(dirname "\$(readlink -f "\$0")")/lib"
exec "\$L/$LOADER" --library-path "\$L" "\$L/dbus-daemon.bin" "\$@"
WRAP
chmod 0755 "$STAGE/dbus-daemon"
"$STAGE/dbus-daemon" --version | head -n1 >&2
rm -rf "$DEST"
mv "$STAGE" "$DEST"
echo "$DEST/dbus-daemon"
