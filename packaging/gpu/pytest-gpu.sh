#!/usr/bin/env bash
# Runs the GPU-marked tests on the GPU machine (env.sh: the carried wheels, this checkout as
# the llmux package), pytest -m gpu with the arguments given (default: every GPU test of the
# shim).
#
# Usage: bash packaging/gpu/pytest-gpu.sh [PYTEST ARGS...]
#   e.g. bash packaging/gpu/pytest-gpu.sh tests/shim/test_memory_gpu.py
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
[ $# -gt 0 ] || set -- tests/shim/test_memory_gpu.py
"$PYTHON" -m pytest -p no:cacheprovider -m gpu -s -rs "$@"
