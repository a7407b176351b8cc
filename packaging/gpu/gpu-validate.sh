#!/usr/bin/env bash
# `llmux --validate` on the GPU machine through a private D-Bus and llmuxd (gpu_validate.py).
# Needs (carried): .whl/ (fetch-wheels.sh), .criu/ (install-criu.sh --dest .criu) and, where
# no dbus-daemon is installed, .dbus/ (packaging/dbus/bundle-dbus.sh).
#
# Usage: bash packaging/gpu/gpu-validate.sh [--weights-mb 8192] [--memory-tier-gb N] ...
set -uo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
"$PYTHON" packaging/gpu/gpu_validate.py --out "$out" "$@" 2>&1 | tee "$out/validate.log" |
    grep -v "Warning\|warn("
exit "${PIPESTATUS[0]}"
