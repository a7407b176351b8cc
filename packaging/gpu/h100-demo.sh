#!/usr/bin/env bash
# The CUDA path of the host service on the GPU machine, in one go: CUDA suspend/resume of a
# process holding a PyTorch model on the GPU through the driver's checkpoint API, then a CRIU
# checkpoint/restore of it with its CUDA state. Prints PASS/FAIL lines and timings; exits 0
# only if every check passed. Run as root; packaging/gpu/README.md has the whole recipe.
#
# Usage: packaging/gpu/h100-demo.sh [--weights-mb N] [--target auto|builtin|torch] [--tests]
#                                   [--criu PATH] [--criu-direct] [--images-dir DIR]
#                                   [--keep-images] [--skip-criu] [--device cuda|cpu] [--out DIR]
# Needs: python3 with torch (the GPU machine's own); the CRIU bundle at .criu/criu (from
# packaging/criu/install-criu.sh --dest .criu) unless --criu or --skip-criu; for the built-in
# engine and --tests, the wheels of packaging/gpu/fetch-wheels.sh in .whl/ (installed here into
# a private site folder) or already on PYTHONPATH. With $OUT set (the device machine),
# demo.log, results.json and the CRIU logs are written there too.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
PYTHON=${PYTHON:-python3}
WHEELS=${LLMUX_WHEELS:-$repo/.whl}
if compgen -G "$WHEELS/*.whl" >/dev/null; then
    site=/tmp/llmux-gpu-site
    echo "installing $(ls "$WHEELS"/*.whl | wc -l) wheels from $WHEELS into $site"
    if "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target "$site" "$WHEELS"/*.whl; then
        export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
    else
        echo "warning: the wheels did not install; going on with PYTHONPATH as it is" >&2
    fi
fi
extra=()
if [[ -n ${OUT:-} && " $* " != *" --out "* ]]; then
    extra+=(--out "$OUT")
fi
export PYTHONUNBUFFERED=1
exec "$PYTHON" "$repo/packaging/gpu/h100_demo.py" "${extra[@]}" "$@"
