"""``llmux --validate MODEL``: run real sleep/wake cycles on one model and print a table.

For each policy: a deterministic request, eviction, memory measured, activation,
the same request again; a policy passes when the model reached the state the
policy promises (no escalation) and answers exactly as before. ``retain+stop`` is the cold
start. "As before" has two answers where the model has two: vLLM prefills a prompt whose KV
blocks are in its prefix cache by another kernel path, and a model with near-tied logits
(random weights) can then answer otherwise, with no eviction at all. The baseline is asked
twice (cold, then from the cache); a policy that keeps the engine's KV cache (the weights
retained, the process suspended or checkpointed whole) is held to the second answer, one
whose sleep resets the cache (or a cold start) to the first. The rates (memory freed /
sleep time, memory back / wake time) are printed beside the limits they are held to,
measured in the same run: pinned host<->GPU copies (when PyTorch sees a GPU here) and the
disk's write and read speed.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import multiprocessing
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from llmux.shim.backend import backend_for
from llmux.shim.config import Config, EvictionPolicy, ProcessStrategy, WeightStrategy
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

    @property
    def sleep_gbps(self) -> float:
        """GB/s of memory freed by the eviction."""
        freed = max(0, self.mem_before - self.mem_after_sleep) * MIB
        return freed / self.sleep_secs / 1e9 if self.sleep_secs else 0.0

    @property
    def wake_gbps(self) -> float:
        """GB/s of memory brought back by the activation."""
        back = max(0, self.mem_after_wake - self.mem_after_sleep) * MIB
        return back / self.wake_secs / 1e9 if self.wake_secs else 0.0


MIB = 1 << 20
_PROBE_BYTES = 1 << 30


def measure_limits(directory: str | None = None) -> str:
    """One line: pinned H2D/D2H GB/s (PyTorch and a GPU here, else why not) and the disk's
    write (fsync'd) and read (file evicted from the page cache first) GB/s. The copies run
    in a child process, so that no CUDA context of the validator's stays on the GPU."""
    ctx = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(1, mp_context=ctx) as pool:
        parts = [pool.submit(_copy_speeds).result()]
    folder = directory or ("/var/tmp" if os.path.isdir("/var/tmp") else tempfile.gettempdir())
    try:
        write, read = _disk_speeds(folder)
        parts.append(f"disk ({folder}) write {write:.2f} GB/s, read {read:.2f} GB/s")
    except OSError as e:
        parts.append(f"disk ({folder}) not measured: {e}")
    return "Limits measured in this run: " + "; ".join(parts)


def _copy_speeds() -> str:
    try:
        import torch
    except ImportError:
        return "pinned copies not measured (no PyTorch here)"
    if not torch.cuda.is_available():
        return "pinned copies not measured (no GPU visible to PyTorch here)"
    host = torch.empty(_PROBE_BYTES, dtype=torch.uint8, pin_memory=True)
    device = torch.empty(_PROBE_BYTES, dtype=torch.uint8, device="cuda")
    rates = []
    for dst, src in ((device, host), (host, device), (device, host), (host, device)):
        torch.cuda.synchronize()
        t = time.perf_counter()
        dst.copy_(src, non_blocking=True)
        torch.cuda.synchronize()
        rates.append(_PROBE_BYTES / (time.perf_counter() - t) / 1e9)
    del host, device
    torch.cuda.empty_cache()
    return f"pinned H2D {max(rates[0::2]):.1f} GB/s, D2H {max(rates[1::2]):.1f} GB/s"


def _disk_speeds(folder: str, nbytes: int = _PROBE_BYTES // 2) -> tuple[float, float]:
    block = os.urandom(16 * MIB)
    fd, path = tempfile.mkstemp(prefix="llmux-validate-", dir=folder)
    try:
        t = time.perf_counter()
        written = 0
        while written < nbytes:
            written += os.write(fd, block[: min(len(block), nbytes - written)])
        os.fsync(fd)
        write = nbytes / (time.perf_counter() - t) / 1e9
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        t = time.perf_counter()
        done = 0
        while done < nbytes:
            chunk = os.pread(fd, 16 * MIB, done)
            if not chunk:
                break
            done += len(chunk)
        read = done / (time.perf_counter() - t) / 1e9
    finally:
        os.close(fd)
        os.unlink(path)
    return write, read


def in_fair_order(policies: list[EvictionPolicy]) -> list[EvictionPolicy]:
    """The policies that never offload the weights first, each group in the order given.
    After a level-1 sleep vLLM keeps weights-sized pinned buffers in PyTorch's host cache for
    the life of the process, and a checkpoint taken later would carry them: in production a
    model has one policy, so they never meet one that does not offload."""
    return sorted(policies, key=lambda p: p.weights is WeightStrategy.OFFLOAD)


async def run_validation(config: Config, model: str, policies: list[EvictionPolicy]) -> bool:
    ordered = in_fair_order(policies)
    if ordered != policies:
        print("Order: " + ", ".join(map(str, ordered)) + " (the policies that offload the "
              "weights last: the pinned buffers they leave would weigh on the others)")
    policies = ordered
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
    limits = await asyncio.to_thread(measure_limits)
    print(limits, flush=True)
    try:
        await lifecycle.start()
        print(f"Starting model '{model}'...", flush=True)
        t0 = time.monotonic()
        kind = await lifecycle.activate(model)
        print(f"Model is running ({kind or 'already running'}, "
              f"{time.monotonic() - t0:.1f} s).", flush=True)
        baseline = Baseline(cold=await _ask(supervisor, model),
                            warm=await _ask(supervisor, model))
        print(f"Baseline response: {baseline.cold!r}")
        if baseline.warm != baseline.cold:
            print(f"Asked again (the prompt now in the prefix cache): {baseline.warm!r}; "
                  "the policies that keep the KV cache are held to this answer")
        for policy in policies:
            print(f"\n--- Testing {policy} ---", flush=True)
            results.append(await _cycle(lifecycle, supervisor, model, policy, baseline, gpu))
    finally:
        print("\nStopping model...", flush=True)
        await lifecycle.aclose()
        await supervisor.aclose()
    _print_table(results, gpu)
    print(limits)
    ok = bool(results) and all(r.passed for r in results)
    print("\nResult: ALL PASSED" if ok else "\nResult: SOME FAILED")
    return ok


@dataclass(frozen=True)
class Baseline:
    """The answer before any eviction: from a cold prefix cache, and asked again."""

    cold: str
    warm: str

    def expected(self, policy: EvictionPolicy) -> tuple[str, str]:
        """The answer the policy must give, and its name."""
        if keeps_kv_cache(policy) and self.warm != self.cold:
            return self.warm, "the baseline asked again"
        return self.cold, "baseline"


def keeps_kv_cache(policy: EvictionPolicy) -> bool:
    """The engine comes back with its KV cache (and prefix cache) as it was: no vLLM sleep
    ran (the weights retained) and the process was not replaced by a cold start."""
    return (policy.weights is WeightStrategy.RETAIN
            and policy.process is not ProcessStrategy.STOP)


async def _cycle(lifecycle: Lifecycle, supervisor: Supervisor, model: str,
                 policy: EvictionPolicy, baseline: Baseline, gpu: bool) -> PolicyResult:
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
        want, which = baseline.expected(policy)
        r.response_matches = answer == want
        print(f"  Response: {answer!r} "
              f"({f'matches {which}' if r.response_matches else f'MISMATCH with {which}'})")
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
    """MiB: the GPU memory of the engine's processes (nvidia-smi's compute apps) when there
    is a GPU, else the engine tree's RSS. Only the engine's own processes count: the
    validator, other engines and other users of the GPU do not."""
    if gpu:
        await asyncio.sleep(1.0)  # let the driver account freed memory
        proc = await asyncio.create_subprocess_exec(
            "nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits",
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL)
        out, _ = await proc.communicate()
        pids = set(supervisor.pids(model))
        total = 0
        for line in out.decode().splitlines():
            pid, _, used = line.partition(",")
            if pid.strip().isdigit() and int(pid) in pids and used.strip().isdigit():
                total += int(used)
        return total
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
    print(f"{'Eviction':<28} {'Sleep (s)':>10} {'Wake (s)':>10} {'GB/s sleep/wake':>16} "
          f"{what + ' Before':>14} {what + ' After':>14} {what + ' Wake':>14} {'Response':>10} "
          f"{'Pass':>6}")
    print("-" * 129)
    for r in results:
        rates = f"{r.sleep_gbps:.1f}/{r.wake_gbps:.1f}"
        print(f"{r.policy!s:<28} {r.sleep_secs:>10.2f} {r.wake_secs:>10.2f} {rates:>16} "
              f"{r.mem_before:>10} MiB {r.mem_after_sleep:>10} MiB {r.mem_after_wake:>10} MiB "
              f"{_match_word(r.response_matches):>10} "
              f"{'PASS' if r.passed else 'FAIL':>6}")
    print(f"(GB/s: {what} freed by the eviction / brought back by the activation; "
          "retain+stop: the activation is a cold start)")
    if gpu:
        print(f"({what}: memory nvidia-smi lists for the engine's processes)")
    else:
        print(f"({what}: resident memory of the engine's process tree; no nvidia-smi here)")


def _match_word(matches: bool | None) -> str:
    return "-" if matches is None else "match" if matches else "MISMATCH"
