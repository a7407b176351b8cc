#!/usr/bin/env bash
# Real vLLM on the GPU machine under llmuxd and `llmux serve` (after vllm-carry.sh unpack).
#
#   gpu-vllm.sh models [SIZES]   make the test models in the background (setsid; SIZES default
#                                qwen3-0.6b,qwen3-8b): Qwen3-shaped, random bf16 weights, a
#                                tokenizer made here; /var/tmp/llmux-models/alpha-SIZE
#   gpu-vllm.sh validate SIZE    `llmux --validate` through D-Bus, every eviction policy
#   gpu-vllm.sh refuse SIZE MB   a checkpoint that cannot fit a state folder of MB is refused
#                                before CRIU runs (NoSpace names both figures), the model runs on
#   gpu-vllm.sh cross            the seeds' cross-container test (cross_container.py), A -> B -> C
#   gpu-vllm.sh check            vLLM imports, the GPU, the models made so far
# Output: $OUT (or ./gpu-out): the validator's and the cross test's logs, llmuxd's and the
# engines' logs, results.json. Extra arguments go to gpu_validate.py / cross_container.py.
set -uo pipefail
MODELS=${LLMUX_GPU_MODELS:-/var/tmp/llmux-models}
cmd=${1:-}; shift || true
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
export LLMUX_VLLM_COMMAND=${LLMUX_VLLM_COMMAND:-$_site/bin/vllm}
export HF_HUB_OFFLINE=1 VLLM_NO_USAGE_STATS=1 DO_NOT_TRACK=1
# FlashInfer does not travel (vllm-carry.sh): vLLM's V2 model runner imports it for its top-k/top-p
# sampler unless told not to, and falls back to its own PyTorch sampler when told.
export VLLM_USE_FLASHINFER_SAMPLER=${VLLM_USE_FLASHINFER_SAMPLER:-0}

wait_model() {  # SIZE: until alpha-SIZE is complete (the maker renames it into place)
    local i
    for i in $(seq 1 600); do
        [ -f "$MODELS/alpha-$1/.llmux-model.json" ] && return 0
        sleep 1
    done
    echo "gpu-vllm: model alpha-$1 not made; $MODELS/make.log:" >&2
    tail -20 "$MODELS/make.log" >&2
    return 1
}

case $cmd in
    models)
        mkdir -p "$MODELS"
        sizes=${1:-qwen3-0.6b,qwen3-8b}
        # setsid: the models are made while later device calls carry the rest
        setsid bash -c '
            for size in ${1//,/ }; do
                for name in alpha beta; do
                    [ "$name" = beta ] && [ "$size" != qwen3-0.6b ] && continue
                    "$0" packaging/vllm/make-model.py "$2/$name-$size" --name "$name" --size "$size"
                done
            done' "$PYTHON" "$sizes" "$MODELS" >>"$MODELS/make.log" 2>&1 </dev/null &
        echo "gpu-vllm: making $sizes in $MODELS (log: $MODELS/make.log)"
        ;;
    check)
        nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
        "$PYTHON" -c "import torch, vllm, importlib.metadata as m; print('torch', torch.__version__, 'vllm', m.version('vllm'))" &&
        "$PYTHON" -c "import vllm.entrypoints.openai.api_server" && echo "vllm api_server imports"
        ls -la "$MODELS" 2>/dev/null; tail -3 "$MODELS/make.log" 2>/dev/null; df -h /var/tmp | tail -1
        ;;
    validate)
        size=${1:?validate SIZE}; shift
        wait_model "$size" || exit 1
        "$PYTHON" packaging/gpu/gpu_validate.py --vllm "$MODELS/alpha-$size" --out "$out" "$@" 2>&1 |
            tee "$out/validate-$size.log" | grep -v "Warning\|warn("
        exit "${PIPESTATUS[0]}"
        ;;
    refuse)
        size=${1:?refuse SIZE MB}; mb=${2:?refuse SIZE MB}; shift 2
        wait_model "$size" || exit 1
        "$PYTHON" packaging/gpu/gpu_validate.py --vllm "$MODELS/alpha-$size" --out "$out" \
            --policies retain+checkpoint,offload+keep_running --state-limit-mb "$mb" "$@" 2>&1 |
            tee "$out/refuse-$size.log" | grep -v "Warning\|warn("
        # the verdict: refused by name with the GPU part, and the model served on after it
        grep -q "needs about .* MiB of it GPU memory" "$out/refuse-$size.log" &&
            grep -qE "^offload\+keep_running .* PASS" "$out/refuse-$size.log"
        ;;
    cross)
        wait_model qwen3-0.6b || exit 1
        "$PYTHON" packaging/demo/cross_container.py --vllm "$MODELS/alpha-qwen3-0.6b" --out "$out" "$@" 2>&1 |
            tee "$out/cross.log" | grep -v "Warning\|warn("
        exit "${PIPESTATUS[0]}"
        ;;
    *) sed -n '2,14p' "$0"; exit 2 ;;
esac
