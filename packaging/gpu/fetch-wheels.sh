#!/usr/bin/env bash
# Downloads (here, where PyPI is reachable) the wheels the GPU machine lacks for
# packaging/gpu/h100-demo.sh: the built-in engine's dependencies and pytest (for --tests), and for
# packaging/gpu/pytest-gpu.sh: the shim's own dependencies and pytest-asyncio.
# torch is the GPU machine's own. The wheels are for its python3 (CPython 3.12, x86_64).
#
# Usage: packaging/gpu/fetch-wheels.sh [DIR]       (default DIR: .whl in the repo root)
# On the GPU machine: python3 -m pip install -q --no-index --no-deps --no-compile \
#     --no-cache-dir --upgrade --target /tmp/site DIR/*.whl && export PYTHONPATH=/tmp/site
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
DEST=${1:-.whl}
PY=${PYTHON:-python3}
PYVER=${LLMUX_GPU_PYTHON_VERSION:-3.12}
# Pinned to what the project's own virtualenv runs, so the demo exercises tested versions.
WHEELS=(
    starlette==1.10.0 anyio==4.16.0 idna==3.20 typing_extensions==4.16.0
    uvicorn==0.54.0 click==8.5.1 h11==0.16.0 httptools==0.9.0 pyzmq==27.3.0
    pytest==9.2.0 pluggy==1.7.0 iniconfig==2.3.1 packaging==26.3
    # the shim itself, for the GPU tests that run it (tests/shim/test_memory_gpu.py)
    aiohttp==3.14.5 multidict==7.2.1 yarl==1.25.1 frozenlist==1.8.0 aiosignal==1.4.0
    propcache==0.5.4 aiohappyeyeballs==2.7.1 attrs==26.1.0
    httpx==0.28.1 httpcore==1.0.9 certifi==2026.10.19.post1
    prometheus_client==0.26.0 dbus-next==0.2.3 uvloop==0.23.0
    nvidia-ml-py==13.615.71 pytest-asyncio==1.5.0
    # llmuxd, for llmux --validate through D-Bus (gpu-validate.sh)
    rich==15.0.0 markdown-it-py==4.3.0 mdurl==0.1.2 pygments==2.21.0
)
mkdir -p "$DEST"
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version "$PYVER" \
    --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    --platform manylinux1_x86_64 --platform any -d "$DEST" "${WHEELS[@]}"
# sdnotify ships only a source archive: a pure-Python wheel built here runs anywhere
"$PY" -m pip wheel -q --no-deps -w "$DEST" sdnotify==0.3.2
ls -1 "$DEST"
du -sh "$DEST"
