#!/usr/bin/env bash
# The demo: sets the machine up, starts the shim with two built-in-engine models, sends
# chat requests that switch between them, shows /control/status; then llmuxd checkpoints a
# model in one container and restores it in the next (packaging/demo/cross_container.py).
# LLMUX_DEMO_VLLM=1 runs that second half with real vLLM (the CPU build).
set -euo pipefail
cd "$(dirname "$0")/.."
bash packaging/setup-dev.sh
VENV=${LLMUX_VENV:-$PWD/.venv}
CONFIG=${1:-packaging/demo/demo.toml}
PORT=$("$VENV/bin/python" -c "import sys,tomllib;print(tomllib.load(open(sys.argv[1],'rb'))['port'])" "$CONFIG")
URL=http://127.0.0.1:$PORT

"$VENV/bin/llmux" serve --config "$CONFIG" &
SHIM=$!
trap 'kill -TERM $SHIM 2>/dev/null; wait $SHIM 2>/dev/null || true' EXIT
for _ in $(seq 1 150); do
    curl -fs "$URL/health" >/dev/null 2>&1 && break
    kill -0 $SHIM 2>/dev/null || { echo "demo: the shim exited (see above)" >&2; exit 1; }
    sleep 0.2
done
curl -fs "$URL/health" >/dev/null || { echo "demo: the shim did not answer on $URL" >&2; exit 1; }

ask() {
    printf '\n>>> %s: %s\n' "$1" "$2"
    "$VENV/bin/python" - "$URL" "$1" "$2" <<'PY'
import sys, time
from openai import OpenAI
url, model, prompt = sys.argv[1:4]
client = OpenAI(base_url=f"{url}/v1", api_key="demo")
t = time.monotonic()
r = client.chat.completions.create(model=model, messages=[{"role": "user", "content": prompt}],
                                   max_tokens=16)
print(f"<<< {r.model} ({time.monotonic() - t:.2f}s): {r.choices[0].message.content}")
PY
}
ask qwen3-0.6b "Say hello"
ask gemma-3-1b "Say hello"
ask qwen3-0.6b "Say hello"
printf '\n== GET /control/status\n'
curl -s "$URL/control/status" | "$VENV/bin/python" -m json.tool

# The headline: llmuxd on a private bus checkpoints the model in one container and restores
# it in another (podman here; namespaces where podman does not run), cold start and restore
# side by side. LLMUX_DEMO_VLLM=1: real vLLM (the CPU build: no sleep mode, so the weights
# stay in the checkpoint) instead of the built-in engine.
kill -TERM $SHIM 2>/dev/null; wait $SHIM 2>/dev/null || true
trap - EXIT
printf '\n== A checkpoint taken in one container, restored in the next\n'
cross=(packaging/demo/cross_container.py --out "${TMPDIR:-/tmp}/llmux-demo-cross")
if [ "${LLMUX_DEMO_VLLM:-0}" = 1 ]; then
    VLLM_VENV=${LLMUX_VLLM_VENV:-$PWD/.cache/vllm-venv}
    model=$PWD/.cache/vllm-models/demo-tiny
    "$VLLM_VENV/bin/python" packaging/vllm/make-model.py "$model" --name demo >/dev/null 2>&1
    LLMUX_VLLM_COMMAND=$VLLM_VENV/bin/vllm "$VENV/bin/python" "${cross[@]}" --vllm "$model" \
        --eviction retain+checkpoint \
        --vllm-args "--dtype float32 --max-model-len 512 --enforce-eager --kv-cache-memory-bytes 64M"
else
    "$VENV/bin/python" "${cross[@]}" --builtin
fi
