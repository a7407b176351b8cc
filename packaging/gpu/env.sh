# Sourced by the GPU-machine scripts, where nothing is pip-installed: the wheels of
# fetch-wheels.sh (.whl/, carried) go into a private site folder, this checkout becomes the
# `llmux` package through a folder of links (as the wheel lays it out), both go on PYTHONPATH.
# Sets: repo, PYTHON, out ($OUT or ./gpu-out), llmux_root (removed on exit).
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
PYTHON=${PYTHON:-python3}
out=${OUT:-$repo/gpu-out}
mkdir -p "$out"
# one weights file per model size, written once and shared by the benchmark and the validator
export HF_HOME=${HF_HOME:-/var/tmp/llmux-hf}
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
_wheels=${LLMUX_WHEELS:-$repo/.whl}
_site=/tmp/llmux-gpu-site
if compgen -G "$_wheels/*.whl" >/dev/null; then
    echo "installing $(ls "$_wheels"/*.whl | wc -l) wheels from $_wheels into $_site" >&2
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target "$_site" "$_wheels"/*.whl || echo "warning: wheels did not install" >&2
fi
llmux_root=$(mktemp -d /tmp/llmux-pyroot.XXXXXX)
trap 'rm -rf "$llmux_root"' EXIT
mkdir "$llmux_root/llmux"
: >"$llmux_root/llmux/__init__.py"
for _n in common service client shim; do ln -s "$repo/$_n" "$llmux_root/llmux/$_n"; done
export PYTHONPATH="$llmux_root:$_site${PYTHONPATH:+:$PYTHONPATH}"
cd "$repo"
