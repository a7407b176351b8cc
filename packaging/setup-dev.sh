#!/usr/bin/env bash
# Sets up a fresh Debian/Ubuntu machine (root) for the demo and the test suite:
# system packages, the CRIU 4.2 bundle, podman's runc settings and the virtualenv.
# Idempotent: a second run only checks.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
VENV=${LLMUX_VENV:-$ROOT/.venv}
SUDO=""
[ "$(id -u)" = 0 ] || SUDO=sudo

log() { printf '[setup] %s\n' "$*" >&2; }

APT_PKGS=(dbus podman runc debootstrap python3-venv python3-dev iproute2 util-linux procps
          psmisc systemd curl ca-certificates fuse-overlayfs uidmap
          libsystemd-dev pkg-config gcc  # these three build systemd-python (the [test] extra)
          chromium)  # the browser tier (tests/browser): Playwright drives the system's chromium
missing=()
for p in "${APT_PKGS[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
    log "installing: ${missing[*]}"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# podman here: runc (crun fails on cgroup v1 hybrid) and no default ulimits (no CAP_SYS_RESOURCE).
if [ ! -f /etc/containers/containers.conf ] || ! grep -q "default_ulimits" /etc/containers/containers.conf; then
    log "writing /etc/containers/containers.conf"
    $SUDO mkdir -p /etc/containers
    printf '[containers]\ndefault_ulimits = []\n\n[engine]\nruntime = "runc"\n' | $SUDO tee /etc/containers/containers.conf >/dev/null
fi

# The group whose members may call llmuxd (units/llmux.sysusers.conf on a real install).
getent group llmux >/dev/null || $SUDO groupadd --system llmux

# CRIU 4.2 (Debian 12's 3.17 fails on this kernel): a self-contained bundle.
$SUDO bash packaging/criu/install-criu.sh

if [ ! -x "$VENV/bin/python" ]; then
    log "creating virtualenv $VENV"
    python3 -m venv "$VENV"
fi
if ! "$VENV/bin/python" -c "import llmux.shim, llmux.common, llmux.service, llmux.client, openai, pytest, playwright" 2>/dev/null \
   || [ pyproject.toml -nt "$VENV/.llmux-installed" ]; then
    log "installing llmux (editable) and test dependencies"
    "$VENV/bin/pip" install -q --upgrade pip "setuptools>=77" >/dev/null
    "$VENV/bin/pip" install -q -e ".[test]"
    touch "$VENV/.llmux-installed"
fi
# PyTorch (CPU) makes the built-in engine run a real transformer; the wheel is local on
# our machines. Without it the engine's pure-Python backend is used.
if ! "$VENV/bin/python" -c "import torch" 2>/dev/null; then
    "$VENV/bin/pip" install -q "torch==2.13.0" 2>/dev/null && log "installed torch" \
        || log "torch not available: the built-in engine uses its pure-Python backend"
fi
# Real vLLM (the CPU build) for the `vllm` test tier, in a virtualenv of its own: it pins
# its own torch and must not change the project's. LLMUX_SKIP_VLLM=1 leaves it out.
if [ "${LLMUX_SKIP_VLLM:-0}" != 1 ]; then
    bash packaging/vllm/install-vllm.sh "${LLMUX_VLLM_VENV:-$ROOT/.cache/vllm-venv}"
fi
log "ready: $VENV"
