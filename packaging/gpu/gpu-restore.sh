#!/usr/bin/env bash
# One GPU-machine session measuring restore to first token: the gpu-marked tests of the
# built-in engine (CUDA virtual memory, graphs, distributed) and the checkpointer, then
# tests/bench/bench_gpu_restore.py. Everything goes to $OUT (or ./gpu-out) as it runs.
#
# Usage: packaging/gpu/gpu-restore.sh [--tests-only|--bench-only] [bench options...]
# Needs (carried): .whl/ (packaging/gpu/fetch-wheels.sh), .criu/ (install-criu.sh --dest .criu).
set -uo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
mode=all
case ${1:-} in --tests-only) mode=tests; shift ;; --bench-only) mode=bench; shift ;; esac
{
    date -u; uname -r; nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
    python3 -c 'import torch; print("torch", torch.__version__, torch.version.cuda)'
    df -h /var/tmp /dev/shm; free -g; cat /sys/kernel/mm/transparent_hugepage/enabled; command -v dbus-daemon || echo "no dbus-daemon"
    .criu/criu --version; .criu/criu check 2>&1 | tail -1
} > "$out/env.txt" 2>&1
cat "$out/env.txt"
if [[ $mode != bench ]]; then
    timeout "${TESTS_TIMEOUT:-150}" python3 -m pytest -q -rs -p no:cacheprovider -m gpu \
        tests/builtin/test_gpu.py tests/service/test_cuda.py 2>&1 | tee "$out/gpu-tests.log" | tail -25
fi
if [[ $mode != tests ]]; then
    timeout "${BENCH_TIMEOUT:-420}" python3 tests/bench/bench_gpu_restore.py --criu "$repo/.criu/criu" --out "$out" "$@" \
        2>&1 | grep -v "^  \|Warning\|warn(" | tail -60
fi
