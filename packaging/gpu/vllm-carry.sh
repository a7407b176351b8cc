#!/usr/bin/env bash
# Carries real vLLM (the PyPI wheel built for the GPU machine's own torch 2.11.0 + CUDA 13) and
# everything the GPU scripts need to a machine that reaches no package registry and takes at
# most 64 MiB per device call.
#
#   here:   bash packaging/gpu/vllm-carry.sh prepare     -> .carry/part-NN (60 MiB each)
#   there:  one device call per part, each carrying .carry/part-NN and running
#           bash packaging/gpu/vllm-carry.sh receive     (parts gather in $STORE)
#           and after the last part
#           bash packaging/gpu/vllm-carry.sh unpack      (checks, unpacks, installs)
#           (a wheel found missing later: .carry/extra/NAME.whl, carried, then `receive`)
#
# What travels: vLLM 0.24.0 (repacked without the FlashAttention-2 kernels, which Hopper does
# not use: vLLM picks FlashAttention-3 there, and its loader treats a missing FA2 as
# unavailable; nor the vendored DeepGEMM/FMHA sources, only built for FP8/MoE and Blackwell;
# nor the MoE kernels, whose import vLLM suppresses when missing and a dense model never
# calls; nor the Rust frontend, used only when VLLM_RUST_FRONTEND_PATH asks for it),
# its requirements the machine lacks (vllm-requirements.txt), the llmux wheels of
# fetch-wheels.sh, the CRIU bundle (.criu) and the dbus-daemon bundle (.dbus).
# After `unpack`: wheels in $SITE (env.sh puts it on PYTHONPATH, `$SITE/bin/vllm` is the
# engine), .criu and .dbus in the checkout. `status` says which parts are there.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
VLLM_VERSION=${LLMUX_GPU_VLLM_VERSION:-0.24.0}
PART_MB=${LLMUX_CARRY_PART_MB:-60}
STORE=${LLMUX_CARRY_STORE:-/var/tmp/llmux-carry}
SITE=${LLMUX_GPU_SITE:-/tmp/llmux-gpu-site}
log() { echo "vllm-carry: $*" >&2; }

download() {  # DEST REQUIREMENT...
    local dest=$1; shift
    "${PYTHON:-python3}" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
        --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
        --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        --platform manylinux1_x86_64 --platform manylinux_2_5_x86_64 \
        --platform manylinux_2_24_x86_64 --platform manylinux_2_26_x86_64 \
        --platform manylinux_2_31_x86_64 --platform manylinux_2_34_x86_64 -d "$dest" "$@"
}

repack_vllm() {  # WHEEL OUT: the wheel without files the Hopper path never loads
    "${PYTHON:-python3}" - "$1" "$2" <<'PY'
import sys, zipfile
src, dst = sys.argv[1], sys.argv[2]
drop = ("vllm/vllm_flash_attn/_vllm_fa2_C", "vllm/third_party/deep_gemm/",
        "vllm/third_party/fmha_sm100/", "vllm/_moe_C_stable_libtorch", "vllm/vllm-rs")
with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", zipfile.ZIP_DEFLATED) as zout:
    for info in zin.infolist():
        if info.filename.startswith(drop):
            continue
        data = zin.read(info)
        if info.filename.endswith(".dist-info/RECORD"):
            data = b"".join(line + b"\n" for line in data.splitlines()
                            if not line.decode().startswith(drop))
        zout.writestr(info, data, compress_type=zipfile.ZIP_DEFLATED)
PY
}

prepare() {
    local stage=.carry/stage
    rm -rf .carry && mkdir -p "$stage/wheels"
    log "downloading vLLM $VLLM_VERSION and its requirements"
    local raw; raw=$(mktemp -d)
    download "$raw" "vllm==$VLLM_VERSION"
    repack_vllm "$raw"/vllm-*.whl "$stage/wheels/$(basename "$raw"/vllm-*.whl)"
    rm -rf "$raw"
    download "$stage/wheels" -r packaging/gpu/vllm-requirements.txt
    bash packaging/gpu/fetch-wheels.sh "$stage/wheels" >/dev/null
    [ -x .criu/criu ] || bash packaging/criu/install-criu.sh --dest .criu
    [ -x .dbus/dbus-daemon ] || bash packaging/dbus/bundle-dbus.sh --dest .dbus
    cp -a .criu "$stage/criu" && cp -a .dbus "$stage/dbus"
    tar -C "$stage" -cf .carry/payload.tar .
    rm -rf "$stage"
    (cd .carry && split -b "${PART_MB}M" -d -a 2 payload.tar part- && sha256sum payload.tar >payload.sha256 && rm payload.tar)
    local n; n=$(ls .carry/part-* | wc -l)
    log "$(du -sh .carry | cut -f1) in $n parts: carry .carry/part-00 .. part-$(printf %02d $((n - 1)))"
    log "and .carry/payload.sha256 with the last one, each in a call of its own"
}

receive() {
    mkdir -p "$STORE"
    shopt -s nullglob
    local got=0
    for f in .carry/part-* .carry/payload.sha256; do
        cp -f "$f" "$STORE/" && got=1 && log "received $(basename "$f") ($(du -h "$f" | cut -f1))"
    done
    # a wheel found missing after the unpack travels alone in .carry/extra/
    for f in .carry/extra/*.whl; do
        python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
            --target "$SITE" "$f" && got=1 && log "installed $(basename "$f") into $SITE"
    done
    [ "$got" = 1 ] || { log "nothing under .carry/ to receive"; exit 1; }
    status
}

status() { log "in $STORE: $(cd "$STORE" 2>/dev/null && ls | tr '\n' ' ')"; }

unpack() {
    [ -f "$STORE/payload.sha256" ] || { log "payload.sha256 not received yet"; status; exit 1; }
    local t0=$SECONDS out; out=$(mktemp -d /var/tmp/llmux-payload.XXXXXX)
    (cd "$STORE" && cat part-* >"$out/payload.tar" && cd "$out" &&
        sha256sum -c "$STORE/payload.sha256" >/dev/null) ||
        { log "the parts do not add up to the payload (a part is missing or damaged)"; status; exit 1; }
    tar -C "$out" -xf "$out/payload.tar" && rm "$out/payload.tar"
    rm -rf .criu .dbus && cp -a "$out/criu" .criu && cp -a "$out/dbus" .dbus
    log "installing $(ls "$out"/wheels/*.whl | wc -l) wheels into $SITE"
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target "$SITE" "$out"/wheels/*.whl
    rm -rf "$out"
    log "unpacked in $((SECONDS - t0)) s; engine: $SITE/bin/vllm"
}

case ${1:-} in
    prepare) prepare ;;
    receive) receive ;;
    unpack) unpack ;;
    status) status ;;
    *) sed -n '2,18p' "$0"; exit 2 ;;
esac
