"""The seeds' cross-container test, on real parts: a model checkpointed in container A comes
back warm in container B, then C, with llmuxd on the host doing CRIU's (and CUDA's) part.

1. llmuxd on a private system-style bus (the package's policy), CUDA through the driver API.
2. Container A runs `llmux serve`; a chat completion through the official `openai` client
   cold-starts the model (real vLLM by default); the answer is kept.
3. `POST /control/sleep` with the model's eviction (discard + checkpoint): the weights are
   dropped by vLLM's level-2 sleep, llmuxd checkpoints the tree (CUDA state, then CRIU).
4. Container A is removed.
5. Container B, from the same root with the same mounts, `POST /control/wake`: llmuxd
   restores the tree into B, the shim runs vLLM's `reload_weights` (its ZMQ path), and the
   answer equals A's; `/control/status` says the model came back by a restore.
6. Again from B to C, this time by the chat request alone (the time from the request to the
   first token is what an operator's client sees).

Containers: podman where it runs, else packaging/demo/nscontainer.py (the same layout made
with the kernel's parts; its docstring says what differs). Prints one line per step with its
time, writes results.json and the logs to --out; exits 0 only if every check passed.

Usage (the Python path as packaging/gpu/env.sh sets it):
  python3 packaging/demo/cross_container.py --vllm MODEL_DIR [--rounds 2] [--out DIR]
  python3 packaging/demo/cross_container.py --builtin            (the stand-in, e.g. on a CPU box)
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import httpx

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from nscontainer import NsContainer, PodmanContainer  # noqa: E402

Container = NsContainer | PodmanContainer
T = TypeVar("T")

MODEL = "qwen3-0.6b"
PROMPT = [{"role": "user", "content": "Name three colors."}]
VLLM_ARGS = "--dtype bfloat16 --max-model-len 2048 --kv-cache-memory-bytes 2G"



def ask_llmuxd(address: str, question: Callable[[Any], Awaitable[T]]) -> T:
    """``question(client)`` answered through llmux's own client (a GPU host may lack busctl)."""
    import asyncio

    from llmux.client.hostclient import HostClient

    async def ask() -> T:
        async with HostClient(address) as client:
            return await question(client)

    return asyncio.run(ask())


async def _listed(client: Any) -> list[str]:
    return [c.model for c in await client.list_checkpoints()]


def listed_checkpoints(address: str) -> list[str]:
    """The models llmuxd lists."""
    return ask_llmuxd(address, _listed)


def settled(address: str, model: str, within: float) -> tuple[float, str, int]:
    """Waits until llmuxd's work behind a dump is over for ``model`` (the zero-page pass,
    then the copy of the memory tier's images to disk: Storage leaves "memory"); returns
    (seconds waited, Storage, SizeBytes)."""
    async def info(client: Any) -> tuple[str, int]:
        for c in await client.list_checkpoints():
            if c.model == model:
                return c.storage, c.size_bytes
        return "", 0

    t = time.monotonic()
    storage, size = ask_llmuxd(address, info)
    while storage == "memory" and time.monotonic() - t < within:
        time.sleep(0.25)
        storage, size = ask_llmuxd(address, info)
    return time.monotonic() - t, storage, size


def explained(address: str, model: str) -> str:
    """`llmux checkpoints --explain MODEL` as text: what fills the checkpoint's images."""
    from llmux.client.opscli import render_breakdown

    async def breakdown(client: Any) -> str:
        return render_breakdown(await client.explain_checkpoint(model))

    return ask_llmuxd(address, breakdown)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Run:
    """The checks and timings of one run; printed as they come, saved at the end."""

    def __init__(self, out: Path) -> None:
        self.out = out
        self.steps: list[dict[str, Any]] = []
        self.failed = 0

    def step(self, name: str, ok: bool, secs: float | None = None, **data: Any) -> None:
        self.steps.append({"step": name, "ok": ok, "secs": secs, **data})
        self.failed += not ok
        took = f" {secs:.2f} s" if secs is not None else ""
        extra = " ".join(f"{k}={v}" for k, v in data.items())
        print(f"{'PASS' if ok else 'FAIL'} {name}{took} {extra}", flush=True)

    def save(self) -> None:
        (self.out / "results.json").write_text(json.dumps(self.steps, indent=1))


def gpu_mib(pids: list[int]) -> int:
    """MiB nvidia-smi lists for these processes (0 without nvidia-smi)."""
    if not shutil.which("nvidia-smi"):
        return 0
    out = subprocess.run(["nvidia-smi", "--query-compute-apps=pid,used_memory",
                          "--format=csv,noheader,nounits"], capture_output=True, text=True,
                         check=False).stdout
    total = 0
    for line in out.splitlines():
        pid, _, used = line.partition(",")
        if pid.strip().isdigit() and int(pid) in pids and used.strip().isdigit():
            total += int(used)
    return total


class Shim:
    """One container running `llmux serve`, and the operator's clients for it."""

    def __init__(self, container: Container, port: int) -> None:
        self.container = container
        self.url = f"http://127.0.0.1:{port}"
        self.http = httpx.Client(timeout=1800, trust_env=False)

    def wait_healthy(self, within: float = 120) -> None:
        deadline = time.monotonic() + within
        while time.monotonic() < deadline:
            try:
                if self.http.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            if not self.container.running():
                break
            time.sleep(0.2)
        raise RuntimeError(f"the shim in {self.container.name} did not become healthy")

    def status(self) -> dict[str, Any]:
        body: dict[str, Any] = self.http.get(f"{self.url}/control/status").json()
        found: dict[str, Any] = body["models"][MODEL]
        return found

    def control(self, action: str) -> tuple[int, dict[str, Any], float]:
        t = time.monotonic()
        r = self.http.post(f"{self.url}/control/{action}", json={"model": MODEL})
        return r.status_code, r.json(), time.monotonic() - t

    def chat(self) -> tuple[str, float, float]:
        """(answer, seconds to the first token, seconds in all) through the openai client."""
        from openai import OpenAI

        client = OpenAI(base_url=f"{self.url}/v1", api_key="none", timeout=1800,
                        max_retries=0)
        t = time.monotonic()
        first: float | None = None
        parts: list[str] = []
        stream = client.chat.completions.create(model=MODEL, messages=PROMPT,  # type: ignore[arg-type]
                                                max_tokens=16, temperature=0, stream=True)
        for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                if first is None:
                    first = time.monotonic() - t
                parts.append(chunk.choices[0].delta.content)
        total = time.monotonic() - t
        return "".join(parts), first if first is not None else total, total


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    engine = parser.add_mutually_exclusive_group(required=True)
    engine.add_argument("--vllm", metavar="MODEL_DIR", help="real vLLM serving this model")
    engine.add_argument("--builtin", action="store_true", help="the built-in stand-in")
    parser.add_argument("--vllm-args", default=VLLM_ARGS)
    parser.add_argument("--rounds", type=int, default=2, help="restores into new containers")
    parser.add_argument("--eviction", default="discard+checkpoint",
                        help="weights+process (retain+checkpoint where vLLM has no sleep "
                             "mode, as on a CPU)")
    bundles = (str(REPO / ".criu" / "criu"), "/opt/llmux/criu/criu")
    parser.add_argument("--criu", default=next(
        (p for p in bundles if os.access(p, os.X_OK)), "criu"),
        help="the CRIU 4.2 bundle (default: .criu/criu, else setup-dev.sh's)")
    parser.add_argument("--dbus-daemon", default=str(REPO / ".dbus" / "dbus-daemon"))
    parser.add_argument("--cuda-mode", choices=("api", "off"),
                        default="api" if shutil.which("nvidia-smi") else "off")
    parser.add_argument("--container", choices=("auto", "podman", "ns"), default="auto",
                        help="podman where it runs (auto), else namespaces (nscontainer.py)")
    parser.add_argument("--workdir", default="/var/tmp")
    parser.add_argument("--settle", type=float, default=120.0, metavar="SECONDS",
                        help="after each sleep, wait up to this long for llmuxd's work behind "
                             "the dump (zero-page pass, copy to disk) so that the next restore "
                             "reads the images an operator's later restores read; 0: no wait")
    parser.add_argument("--out", default=os.environ.get("OUT") or str(REPO / "gpu-out"))
    args = parser.parse_args()

    os.environ["LLMUX_CRIU"] = args.criu
    if os.access(args.dbus_daemon, os.X_OK):
        os.environ["LLMUX_DBUS_DAEMON"] = args.dbus_daemon
    sys.path.insert(0, str(REPO))  # the tests' support package: tests.support.*
    from tests.support import llmuxd_harness as harness

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    run = Run(out)
    work = Path(tempfile.mkdtemp(prefix="llmux-cross-", dir=args.workdir))
    if len(os.fsencode(work / "system_bus_socket")) > 99:  # dbus-daemon's limit
        work.rmdir()
        raise SystemExit(f"--workdir {args.workdir} is too long a path for the bus socket "
                         "(at most 99 bytes in all): give a shorter one")
    os.chmod(work, 0o755)  # noqa: S103 (the bus socket's folder: the policy decides)
    base = Path(tempfile.mkdtemp(prefix="llmux-ctr-", dir=args.workdir))
    port, engine_port = free_port(), free_port()
    if args.vllm:
        table: dict[str, Any] = {
            "engine": "vllm", "model_path": args.vllm, "extra_args": args.vllm_args.split(),
            "env": {"HF_HUB_OFFLINE": "1"}}
    else:
        table = {"engine": "builtin", "model_path": "Qwen/Qwen3-0.6B", "weights_mb": 64,
                 "env": {"LLMUX_BUILTIN_BACKEND": "pure"}}
    table.update({"port": engine_port, "startup_timeout_secs": 900, "probe_timeout_secs": 300,
                  "eviction": dict(zip(("weights", "process"), args.eviction.split("+"),
                                       strict=True))})
    containers: list[Container] = []
    kind = args.container
    if kind == "auto":
        kind = "podman" if PodmanContainer.available() else "ns"
    print(f"containers: {kind}", flush=True)
    with harness.running_bus(work) as bus, harness.running_llmuxd(
            bus, work, command=[sys.executable, "-m", "llmux.service.main"],
            cuda_mode=args.cuda_mode) as daemon:
        config = {"host": "127.0.0.1", "port": port, "metrics_port": 0,
                  "log_dir": str(work / "logs"),
                  "vllm_command": os.environ.get("LLMUX_VLLM_COMMAND", "vllm"),
                  "policy": {"min_active_secs": 0, "request_timeout_secs": 1800},
                  "checkpoint": {"bus": bus.address, "keep_images": True,
                                 "job_timeout_secs": 900},
                  "models": {MODEL: table}}
        (work / "llmux.json").write_text(json.dumps(config, indent=1))
        # what the shim needs from outside the rootfs: this work folder (bus socket, config,
        # logs), the models' cache (as `-v ~/.cache/huggingface:...` in the README's podman
        # command) and the Python path where it lies on a per-container tree (/tmp)
        (work / "hf").mkdir()
        binds = [(str(work), str(work)), (str(work / "hf"), "/root/.cache/huggingface")] + [
            (p, p) for p in os.environ.get("PYTHONPATH", "").split(":")
            if p.startswith(("/tmp/", "/run/")) and os.path.isdir(p)]
        env = {**os.environ, "HOME": "/root"}

        def start(letter: str) -> Shim:
            ctr: Container = (PodmanContainer if kind == "podman" else NsContainer)(
                letter, base, binds)
            containers.append(ctr)
            t = time.monotonic()
            ctr.start([sys.executable, "-m", "llmux.shim.cli", "serve", "--config",
                       str(work / "llmux.json")], env, work / f"shim-{letter}.log")
            shim = Shim(ctr, port)
            shim.wait_healthy()
            run.step(f"container {letter} up", True, time.monotonic() - t, pid=ctr.pid)
            return shim

        def check(name: str, cond: bool, **data: Any) -> bool:
            run.step(name, cond, **data)
            return cond

        def settle(letter: str) -> None:
            if not args.settle:
                return
            secs, storage, size = settled(bus.address, MODEL, args.settle)
            check(f"the work behind {letter}'s dump is over", storage != "memory",
                  secs=round(secs, 2), storage=storage, images_mib=size >> 20)

        def guarded(name: str, fn: Callable[[], None]) -> bool:
            try:
                fn()
                return True
            except Exception as e:  # a step's failure is reported, then cleaned up
                run.step(name, False, error=f"{type(e).__name__}: {e}")
                return False

        baseline = ""

        def round_one() -> None:
            nonlocal baseline
            shim = start("A")
            baseline, first, total = shim.chat()
            status = shim.status()
            check("cold start in A", bool(baseline) and status["last_wake"] == "cold",
                  first_token_s=round(first, 2), total_s=round(total, 2),
                  answer=json.dumps(baseline), gpu_mib=gpu_mib(status["pids"]))
            pids = list(status["pids"])
            code, body, secs = shim.control("sleep")
            check(f"sleep: {args.eviction}", code == 200 and body.get("state")
                  == "checkpointed", secs=round(secs, 2), body=json.dumps(body)[:300])
            time.sleep(1)
            check("asleep: the tree is gone, its GPU memory freed",
                  not any(Path(f"/proc/{p}").exists() for p in pids) and gpu_mib(pids) == 0,
                  pids=pids)
            check("llmuxd lists the checkpoint", MODEL in listed_checkpoints(bus.address))
            settle("A")
            try:  # what the image holds, for the performance page (not a check)
                t = time.monotonic()
                text = explained(bus.address, MODEL)
                (out / "explain-A.txt").write_text(text)
                print(f"explain ({time.monotonic() - t:.1f} s):\n{text}", flush=True)
            except Exception as e:  # reported, the test goes on
                print(f"explain failed: {type(e).__name__}: {e}", flush=True)
            shim.container.remove()

        def next_round(letter: str, how: str) -> None:
            shim = start(letter)
            if how == "control":
                code, body, secs = shim.control("wake")
                check(f"wake in {letter} (POST /control/wake)",
                      code == 200 and body.get("state") == "running", secs=round(secs, 2),
                      body=json.dumps(body)[:300])
                answer, first, _ = shim.chat()
                first += secs  # the restore ran in the wake: from the operator's call on
            else:
                answer, first, _ = shim.chat()
            status = shim.status()
            check(f"restored in {letter}, not cold-started", status["last_wake"] == "restore",
                  last_wake=status["last_wake"], request_to_first_token_s=round(first, 2),
                  gpu_mib=gpu_mib(status["pids"]))
            reloaded = args.vllm and args.eviction.startswith("discard")
            check(f"same answer in {letter}" + (" (weights reloaded through vLLM after the "
                                                 "restore)" if reloaded else ""),
                  answer == baseline, answer=json.dumps(answer))
            if letter != chr(ord("A") + args.rounds):
                code, body, secs = shim.control("sleep")
                check(f"sleep in {letter}: {args.eviction}",
                      code == 200 and body.get("state") == "checkpointed", secs=round(secs, 2))
                settle(letter)
                shim.container.remove()

        ok = guarded("round A", round_one)
        for i in range(args.rounds):
            if not ok:
                break
            letter = chr(ord("B") + i)
            ok = guarded(f"round {letter}",
                         lambda letter=letter, i=i: next_round(  # type: ignore[misc]
                             letter, "control" if i == 0 else "request"))
        for ctr in reversed(containers):
            ctr.remove()
        (out / "llmuxd-cross.log").write_text(daemon.log())
    for log in (work / "logs").glob("*.log"):
        shutil.copy(log, out / f"cross-{log.name}")
    for log in work.glob("shim-*.log"):
        shutil.copy(log, out / f"cross-{log.name}")
    subprocess.run(["pkill", "-KILL", "-f", f"[-]-port {engine_port}( |$)"], check=False)
    run.save()
    shutil.rmtree(base, ignore_errors=True)
    shutil.rmtree(work, ignore_errors=True)
    times = {s["step"]: s.get("first_token_s", s.get("request_to_first_token_s"))
             for s in run.steps}
    cold = times.get("cold start in A")
    restored = [(k.split()[2].rstrip(","), v) for k, v in times.items()
                if k.startswith("restored in") and v is not None]
    if cold is not None and restored:
        print("\nTo the first token: cold start in A " + f"{cold:.2f} s; " + "; ".join(
            f"restore in {c} {v:.2f} s" for c, v in restored)
              + f" ({kind} containers, {args.eviction})")
    print(f"\n{len(run.steps) - run.failed} passed, {run.failed} failed")
    return 0 if run.failed == 0 and ok else 1


if __name__ == "__main__":
    sys.exit(main())
