"""The shim in real podman containers, as an operator runs it: used by the end-to-end tests
and by tests/bench/bench_cross_container.py and bench_vllm.py.

Each container: `podman --runtime runc run -d --network=host --pid=host --ipc=host` (no
--privileged, no --init) on the rootfs packaging/containers/prepare-rootfs.sh checks (an
overlay of the host root: the container's own writable layer, mount namespace and
cgroups), with three bind mounts: the private bus's socket directory, a
Hugging-Face-style cache and the config (read-only). `llmux serve` runs as its command.
With ``network="bridge"`` a container has a network namespace of its own on podman's
default bridge instead: the shim listens on all of the container's addresses and the test
reaches it on a port published on the machine's loopback (``-p 127.0.0.1:HOST:PORT``).
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from tests.support.procs import free_port, kill_tagged
from tests.support.shimproc import toml_value

REPO = Path(__file__).resolve().parents[2]
PREPARE = REPO / "packaging" / "containers" / "prepare-rootfs.sh"
VENV = Path(sys.prefix)
LLMUX = VENV / "bin" / "llmux"

#: where the containers see the bus socket's directory, the HF cache and the config
BUS_DIR_IN = "/run/llmux-bus"
HF_IN = "/root/.cache/huggingface"
CONFIG_IN = "/etc/llmux/config.toml"
MODEL = "qwen3-0.6b"
PROMPT = [{"role": "user", "content": "Say hello"}]

SHIM_START_TIMEOUT_S = 90.0
REQUEST_TIMEOUT_S = 300.0


def podman(*args: str, check: bool = True,
           timeout: float = 120) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(["podman", "--runtime", "runc", *args], capture_output=True,
                          text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"podman {' '.join(args)} failed ({proc.returncode}):\n"
                             f"{proc.stdout}{proc.stderr}")
    return proc


def prepare_rootfs() -> str:
    """The --rootfs value (e.g. "/:O"), checked by the project's own script."""
    proc = subprocess.run(["bash", str(PREPARE), "--venv", str(VENV)], capture_output=True,
                          text=True, timeout=300)
    if proc.returncode != 0:
        raise RuntimeError(f"{PREPARE} failed:\n{proc.stderr}")
    return proc.stdout.strip().splitlines()[-1]


class Reaper:
    """Reaps the engine PIDs it is told about when they end as zombies of this process.

    CRIU restores a tree detached: its root is reparented to the nearest subreaper, which
    is this process when it is one (tests/service/core makes pytest one for the session),
    else PID 1. A zombie nobody reaps keeps its PID, and the next restore needs it.
    """

    def __init__(self) -> None:
        self.pids: set[int] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="reaper", daemon=True)

    def watch(self, pids: list[int]) -> None:
        self.pids.update(pids)

    def _loop(self) -> None:
        me = os.getpid()
        while not self._stop.wait(0.05):
            for pid in list(self.pids):
                try:
                    stat = Path(f"/proc/{pid}/stat").read_text()
                except OSError:
                    continue
                name = stat[stat.index("(") + 1:stat.rindex(")")]
                state, ppid = stat[stat.rindex(")") + 2:].split()[:2]
                if state == "Z" and int(ppid) == me and name.startswith("python"):
                    with contextlib.suppress(ChildProcessError):
                        os.waitpid(pid, os.WNOHANG)

    def __enter__(self) -> Reaper:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)


def read_cgroups(pid: int) -> dict[str, str]:
    out = {}
    for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines():
        _, hierarchy, path = line.split(":", 2)
        out[hierarchy] = path
    return out


def pidfd_targets(pid: int) -> set[int]:
    """PIDs that process `pid` holds pidfds for (from /proc/PID/fdinfo)."""
    found: set[int] = set()
    fd_dir = Path(f"/proc/{pid}/fd")
    for fd in fd_dir.iterdir():
        with contextlib.suppress(OSError):
            if os.readlink(fd) != "anon_inode:[pidfd]":
                continue
            for line in Path(f"/proc/{pid}/fdinfo/{fd.name}").read_text().splitlines():
                if line.startswith("Pid:"):
                    found.add(int(line.split()[1]))
    return found


def toml_config(*, port: int, engine_port: int, bus_address: str, tag: str,
                weights_mb: int, backend: str, keep_images: bool = True,
                listen: str = "127.0.0.1",
                model: dict[str, Any] | None = None, top: dict[str, Any] | None = None,
                engine_env: dict[str, str] | None = None) -> str:
    """The shim config mounted read-only at CONFIG_IN: one model, MODEL. By default the
    built-in engine with discard+checkpoint; ``model`` replaces its table (e.g. real vLLM)."""
    env = {"LLMUX_TEST_TAG": tag, "LLMUX_BUILTIN_BACKEND": backend, **(engine_env or {})}
    env_text = ", ".join(f"{k} = {json.dumps(v)}" for k, v in env.items())
    if model is not None:
        table = {**model, "port": engine_port, "env": {**model.get("env", {}), **env}}
        model_text = "\n".join(f"{k} = {toml_value(v)}" for k, v in table.items())
    else:
        model_text = f"""\
model_path = "Qwen/Qwen3-0.6B"
port = {engine_port}
engine = "builtin"
weights_mb = {weights_mb}
eviction = {{ weights = "discard", process = "checkpoint" }}
startup_timeout_secs = 300
env = {{ {env_text} }}"""
    top_text = "".join(f"{k} = {toml_value(v)}\n" for k, v in (top or {}).items())
    return f"""\
{top_text}host = {json.dumps(listen)}
port = {port}
metrics_port = 0
log_dir = "/tmp/llmux-logs"

[policy]
min_active_secs = 0
request_timeout_secs = {REQUEST_TIMEOUT_S:g}

[checkpoint]
bus = {json.dumps(bus_address)}
keep_images = {"true" if keep_images else "false"}
job_timeout_secs = 600

[models."{MODEL}"]
{model_text}
"""


@dataclass
class ShimContainer:
    """One `llmux serve` container and an HTTP client for its port (``port``: where the
    test reaches it on the machine's loopback, published when the container has a network of
    its own)."""

    name: str
    port: int
    engine_port: int
    client: httpx.Client
    cid: str = ""

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def inspect(self, fmt: str) -> str:
        return podman("inspect", self.name, "--format", fmt).stdout.strip()

    @property
    def shim_pid(self) -> int:
        """The container's first process, `llmux serve` (a host PID: --pid=host)."""
        return int(self.inspect("{{.State.Pid}}"))

    @property
    def net_ns(self) -> str:
        """The shim process's network namespace, e.g. "net:[4026532301]"."""
        return os.readlink(f"/proc/{self.shim_pid}/ns/net")

    def logs(self) -> str:
        proc = podman("logs", self.name, check=False)
        return (proc.stdout + proc.stderr)[-6000:]

    def status(self) -> dict[str, Any]:
        answer = self.client.get(f"{self.url}/control/status")
        assert answer.status_code == 200, answer.text
        body: dict[str, Any] = answer.json()
        return body

    def model_status(self) -> dict[str, Any]:
        found: dict[str, Any] = self.status()["models"][MODEL]
        return found

    def chat(self, max_tokens: int = 10) -> httpx.Response:
        return self.client.post(f"{self.url}/v1/chat/completions", json={
            "model": MODEL, "messages": PROMPT, "max_tokens": max_tokens, "temperature": 0})

    def answer(self) -> str:
        """The assistant's text for the fixed prompt; fails with the shim's log otherwise."""
        r = self.chat()
        assert r.status_code == 200, f"{r.status_code} {r.text}\n{self.logs()}"
        body = r.json()
        text = str(body["choices"][0]["message"]["content"])
        assert text.strip(), f"empty answer: {body}"
        return text

    def first_token(self) -> str:
        """One chat completion of one token: the benchmarks' time to the first token."""
        r = self.chat(max_tokens=1)
        if r.status_code != 200:
            raise RuntimeError(f"chat completion failed: {r.status_code} {r.text}\n"
                               f"{self.logs()}")
        return str(r.json()["choices"][0]["message"]["content"])

    def control(self, action: str) -> dict[str, Any]:
        r = self.client.post(f"{self.url}/control/{action}", json={"model": MODEL})
        assert r.status_code == 200, f"/control/{action}: {r.status_code} {r.text}\n{self.logs()}"
        body: dict[str, Any] = r.json()
        return body

    def engine(self, method: str, path: str, **kw: Any) -> httpx.Response:
        """The engine's own API: through its tree's unix socket when it has a network of
        its own (llmux.shim.netns), else on its port on the host's loopback.

        Connection: close, so that the test holds no connection into the engine that a later
        dump would have to carry (the shim waits for the engine's port to be idle first).
        """
        headers = {"Connection": "close", **kw.pop("headers", {})}
        url = f"http://127.0.0.1:{self.engine_port}{path}"
        sock = self.engine_socket()
        if sock is None:
            return self.client.request(method, url, headers=headers, **kw)
        with httpx.Client(transport=httpx.HTTPTransport(uds=str(sock)), timeout=60) as c:
            return c.request(method, url, headers=headers, **kw)

    def engine_socket(self) -> Path | None:
        """The engine's unix socket as the host sees it (None: there is none)."""
        sock = Path(f"/proc/{self.shim_pid}/root/tmp/llmux-engine-{MODEL}-"
                    f"{self.engine_port}/engine.sock")
        return sock if sock.exists() else None

    def kill(self) -> None:
        """SIGKILL the shim: it cannot stop its engines; only the container's end can."""
        podman("kill", "--signal", "KILL", self.name)
        podman("wait", self.name, check=False)

    def stop(self) -> None:
        podman("stop", "--time", "30", self.name)

    def remove(self) -> None:
        self.client.close()
        podman("rm", "--force", "--time", "5", self.name, check=False)


@dataclass
class ShimFactory:
    """Starts shim containers that all share one bus, cache and config; removes them all."""

    rootfs: str
    bus_dir: Path
    bus_address_in: str
    workdir: Path
    weights_mb: int = 16
    backend: str = "pure"
    tag: str = field(default_factory=lambda: secrets.token_hex(6))
    port: int = field(default_factory=free_port)
    engine_port: int = field(default_factory=free_port)
    started: list[ShimContainer] = field(default_factory=list)
    #: the model's table instead of the built-in engine's, and extra top-level keys
    model: dict[str, Any] | None = None
    top: dict[str, Any] | None = None
    #: more environment for the engine (e.g. LLMUX_PID_NAMESPACE=0)
    engine_env: dict[str, str] | None = None
    #: "host" (the machine's network) or "bridge" (a network namespace of the container's
    #: own, ``port`` published on a free port of the machine's loopback)
    network: str = "host"

    def __post_init__(self) -> None:
        self.hf = self.workdir / "hf"
        self.hf.mkdir(parents=True, exist_ok=True)
        self.config = self.workdir / "config.toml"
        self.config.write_text(toml_config(
            port=self.port, engine_port=self.engine_port, bus_address=self.bus_address_in,
            tag=self.tag, weights_mb=self.weights_mb, backend=self.backend,
            listen="0.0.0.0" if self.network == "bridge" else "127.0.0.1",
            model=self.model, top=self.top, engine_env=self.engine_env))

    def argv(self, name: str, host_port: int) -> list[str]:
        """`podman run` for one shim container: the flags the README documents (on the
        bridge: its own network, ``port`` published at ``host_port`` on loopback)."""
        if self.network == "bridge":
            net = ["--network=bridge", "-p", f"127.0.0.1:{host_port}:{self.port}"]
        else:
            assert self.network == "host", self.network
            net = ["--network=host"]
        return ["run", "-d", "--name", name, *net, "--pid=host", "--ipc=host",
                "--label", f"llmux-e2e={self.tag}",
                "-v", f"{self.bus_dir}:{BUS_DIR_IN}",
                "-v", f"{self.hf}:{HF_IN}",
                "-v", f"{self.config}:{CONFIG_IN}:ro",
                "-v", "/proc:/run/llmux/proc:ro",
                "--rootfs", self.rootfs,
                str(LLMUX), "serve", "--config", CONFIG_IN]

    def start(self, letter: str) -> ShimContainer:
        name = f"llmux-e2e-{self.tag}-{letter}"
        host_port = free_port() if self.network == "bridge" else self.port
        shim = ShimContainer(name, host_port, self.engine_port,
                             httpx.Client(timeout=REQUEST_TIMEOUT_S, trust_env=False))
        self.started.append(shim)
        shim.cid = podman(*self.argv(name, host_port)).stdout.strip()
        deadline = time.monotonic() + SHIM_START_TIMEOUT_S
        while True:
            state = shim.inspect("{{.State.Status}}")
            if state not in ("running", "created", "configured"):
                raise AssertionError(f"container {name} is {state}:\n{shim.logs()}")
            with contextlib.suppress(httpx.HTTPError):
                if shim.client.get(f"{shim.url}/health", timeout=2).status_code == 200:
                    return shim
            if time.monotonic() > deadline:
                raise AssertionError(f"shim in {name} not healthy in {SHIM_START_TIMEOUT_S:g} s:"
                                     f"\n{shim.logs()}")
            time.sleep(0.1)

    def cleanup(self) -> list[int]:
        """Remove every container started here; kill and return anything left behind."""
        for shim in self.started:
            shim.remove()
        leftovers = podman("ps", "-a", "-q", "--filter", f"label=llmux-e2e={self.tag}",
                           check=False).stdout.split()
        for cid in leftovers:
            podman("rm", "--force", cid, check=False)
        return kill_tagged(self.tag)


@contextlib.contextmanager
def shim_factory(**kw: Any) -> Iterator[ShimFactory]:
    factory = ShimFactory(**kw)
    try:
        yield factory
    finally:
        factory.cleanup()
