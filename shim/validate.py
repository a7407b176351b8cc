"""``llmux --validate MODEL``: run real sleep/wake cycles on one model and print a table.

For each policy: a deterministic request, eviction, memory measured, activation,
the same request again; a policy passes when the model reached the state the
policy promises (no escalation) and answers exactly as before.
"""

from __future__ import annotations

import asyncio
import dataclasses
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from llmux.shim.backend import backend_for
from llmux.shim.config import Config, EvictionPolicy, ProcessStrategy
from llmux.shim.errors import ShimError
from llmux.shim.lifecycle import Lifecycle, ModelState
from llmux.shim.supervisor import Supervisor

EXPECTED_STATE = {
    ProcessStrategy.KEEP_RUNNING: ModelState.SLEEPING,
    ProcessStrategy.CUDA_SUSPEND: ModelState.SUSPENDED,
    ProcessStrategy.CHECKPOINT: ModelState.CHECKPOINTED,
    ProcessStrategy.STOP: ModelState.STOPPED,
}

PROMPT = "What is 2+2? Reply with just the number."


@dataclass
class PolicyResult:
    policy: EvictionPolicy
    sleep_secs: float = 0.0
    wake_secs: float = 0.0
    mem_before: int = 0
    mem_after_sleep: int = 0
    mem_after_wake: int = 0
    state: str = ""
    #: None: no answer to compare (the cycle failed before)
    response_matches: bool | None = None
    passed: bool = False
    error: str | None = None


async def run_validation(config: Config, model: str, policies: list[EvictionPolicy]) -> bool:
    m = config.models[model]
    if m.sleep_mode_override is None and any(p.weights != "retain" for p in policies):
        # the cycles put the weights to sleep: the engine needs vLLM's sleep mode for them
        m = dataclasses.replace(m, sleep_mode_override=True)
    only = dataclasses.replace(config, models={model: m})
    needs_host = only.needs_host or any(p.needs_host for p in policies)
    backend = backend_for(only) if needs_host or only.checkpoint else None
    if needs_host and backend is None:
        from llmux.shim.backend import HostServiceBackend

        backend = HostServiceBackend()
    supervisor = Supervisor(only)
    lifecycle = Lifecycle(only, supervisor, backend)
    gpu = shutil.which("nvidia-smi") is not None
    results: list[PolicyResult] = []
    try:
        await lifecycle.start()
        print(f"Starting model '{model}'...", flush=True)
        t0 = time.monotonic()
        kind = await lifecycle.activate(model)
        print(f"Model is running ({kind or 'already running'}, "
              f"{time.monotonic() - t0:.1f} s).", flush=True)
        baseline = await _ask(supervisor, model)
        print(f"Baseline response: {baseline!r}")
        for policy in policies:
            print(f"\n--- Testing {policy} ---", flush=True)
            results.append(await _cycle(lifecycle, supervisor, model, policy, baseline, gpu))
    finally:
        print("\nStopping model...", flush=True)
        await lifecycle.aclose()
        await supervisor.aclose()
    _print_table(results, gpu)
    ok = bool(results) and all(r.passed for r in results)
    print("\nResult: ALL PASSED" if ok else "\nResult: SOME FAILED")
    return ok


async def _cycle(lifecycle: Lifecycle, supervisor: Supervisor, model: str,
                 policy: EvictionPolicy, baseline: str, gpu: bool) -> PolicyResult:
    r = PolicyResult(policy)
    try:
        await lifecycle.activate(model)
        r.mem_before = await _memory(supervisor, model, gpu)
        t = time.monotonic()
        state = await lifecycle.evict(model, policy)
        r.sleep_secs = time.monotonic() - t
        r.state = state.value
        print(f"  Sleep took {r.sleep_secs:.2f} s, state {state}")
        r.mem_after_sleep = await _memory(supervisor, model, gpu)
        t = time.monotonic()
        await lifecycle.activate(model)
        r.wake_secs = time.monotonic() - t
        print(f"  Wake took {r.wake_secs:.2f} s")
        r.mem_after_wake = await _memory(supervisor, model, gpu)
        answer = await _ask(supervisor, model)
        r.response_matches = answer == baseline
        print(f"  Response: {answer!r} "
              f"({'matches baseline' if r.response_matches else 'MISMATCH'})")
        expected = EXPECTED_STATE[policy.process]
        if state is not expected:
            r.error = f"state {state}, expected {expected}"
            print(f"  {r.error}: {lifecycle.status(model).last_error}")
        r.passed = bool(r.response_matches) and r.error is None
    except ShimError as e:
        r.error = e.message
        print(f"  ERROR testing {policy}: {e.message}")
    return r


async def _ask(supervisor: Supervisor, model: str) -> str:
    body = {"model": model, "messages": [{"role": "user", "content": PROMPT}],
            "temperature": 0.0, "seed": 42, "max_tokens": 10}
    r = await supervisor.engines.call(model, "POST", "/v1/chat/completions", json=body,
                                      timeout_secs=120.0)
    content = r.json()["choices"][0]["message"]["content"]
    return str(content)


async def _memory(supervisor: Supervisor, model: str, gpu: bool) -> int:
    """MiB: GPU memory used (nvidia-smi) when there is a GPU, else the engine tree's RSS."""
    if gpu:
        await asyncio.sleep(1.0)  # let the driver account freed memory
        proc = await asyncio.create_subprocess_exec(
            "nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits",
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL)
        out, _ = await proc.communicate()
        return sum(int(x) for x in out.decode().split() if x.strip().isdigit())
    return sum(_rss_kb(pid) for pid in supervisor.pids(model)) // 1024


def _rss_kb(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return 0


def _print_table(results: list[PolicyResult], gpu: bool) -> None:
    what = "GPU" if gpu else "RSS"
    print()
    print(f"{'Eviction':<28} {'Sleep (s)':>10} {'Wake (s)':>10} {what + ' Before':>14} "
          f"{what + ' After':>14} {what + ' Wake':>14} {'Response':>10} {'Pass':>6}")
    print("-" * 112)
    for r in results:
        print(f"{r.policy!s:<28} {r.sleep_secs:>10.2f} {r.wake_secs:>10.2f} "
              f"{r.mem_before:>10} MiB {r.mem_after_sleep:>10} MiB {r.mem_after_wake:>10} MiB "
              f"{_match_word(r.response_matches):>10} "
              f"{'PASS' if r.passed else 'FAIL':>6}")
    if not gpu:
        print(f"({what}: resident memory of the engine's process tree; no nvidia-smi here)")


def _match_word(matches: bool | None) -> str:
    return "-" if matches is None else "match" if matches else "MISMATCH"
