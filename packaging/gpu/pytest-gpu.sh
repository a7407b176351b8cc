#!/usr/bin/env bash
# Runs the GPU-marked tests on the GPU machine, where nothing is pip-installed: the wheels of
# packaging/gpu/fetch-wheels.sh (in .whl/, carried there) go into a private site folder, this
# checkout becomes the llmux package through a folder of links (as h100_demo.py does), then
# pytest -m gpu runs with the arguments given (default: every GPU test of the shim).
#
# Usage: bash packaging/gpu/pytest-gpu.sh [PYTEST ARGS...]
#   e.g. bash packaging/gpu/pytest-gpu.sh tests/shim/test_memory_gpu.py
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
PYTHON=${PYTHON:-python3}
WHEELS=${LLMUX_WHEELS:-$repo/.whl}
site=/tmp/llmux-gpu-site
if compgen -G "$WHEELS/*.whl" >/dev/null; then
    echo "installing $(ls "$WHEELS"/*.whl | wc -l) wheels from $WHEELS into $site"
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target "$site" "$WHEELS"/*.whl
fi
root=$(mktemp -d /tmp/llmux-pyroot.XXXXXX)
trap 'rm -rf "$root"' EXIT
mkdir "$root/llmux"
: > "$root/llmux/__init__.py"
for name in service client shim; do
    ln -s "$repo/$name" "$root/llmux/$name"
done
export PYTHONPATH="$root:$site${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
cd "$repo"
[ $# -gt 0 ] || set -- tests/shim/test_memory_gpu.py
"$PYTHON" -m pytest -p no:cacheprovider -m gpu -s -rs "$@"
