"""The CUDA path of the host service, for real, in one go (run on the GPU machine as root).

1. Starts a process tree holding a PyTorch model on the GPU: the built-in engine
   (python -m llmux.shim.builtin serve ... --device cuda) when it imports, else
   packaging/gpu/torch_target.py.
2. Suspends it through the driver's checkpoint API (service/core/cuda.py, mode
   "api"): the GPU memory nvidia-smi shows for its pids goes to 0 and comes back
   on resume, and the answers before and after are identical.
3. Checkpoints it with its CUDA state: lock + checkpoint through the API, criu
   dump, criu restore, restore + unlock through the API; same pids, same answers.
4. Prints the timings (lock, checkpoint, dump, restore, unlock) and GB/s.

Every check prints a PASS or FAIL line; the exit status is 0 only if all passed.
--device cpu runs the same flow without CUDA (CUDA steps are SKIPped), to try
the CRIU half on a machine without a GPU.

The repository is not pip-installed on the GPU machine: a temporary folder with
llmux/{common,service,client,shim} symlinks into this checkout is put first on sys.path and on
the children's PYTHONPATH, after whatever PYTHONPATH (unpacked wheels) is set.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import importlib
import importlib.util
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable, Coroutine, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO, TypeVar

REPO = Path(__file__).resolve().parents[2]
PR_SET_CHILD_SUBREAPER = 36
T = TypeVar("T")


# --------------------------------------------------------------------------- output


class Report:
    """PASS/FAIL/SKIP lines and timings, echoed to stdout and to an optional log file."""

    def __init__(self, log: TextIO | None) -> None:
        self.log = log
        self.failures: list[str] = []
        self.passes = 0
        self.timings: dict[str, float] = {}
        self.facts: dict[str, Any] = {}

    def say(self, text: str) -> None:
        print(text, flush=True)
        if self.log:
            self.log.write(text + "\n")
            self.log.flush()

    def check(self, ok: bool, what: str, detail: str = "") -> bool:
        line = f"{'PASS' if ok else 'FAIL'} {what}" + (f": {detail}" if detail else "")
        self.say(line)
        if ok:
            self.passes += 1
        else:
            self.failures.append(what)
        return ok

    def skip(self, what: str, why: str) -> None:
        self.say(f"SKIP {what}: {why}")

    @contextlib.contextmanager
    def timed(self, name: str) -> Iterator[None]:
        started = time.monotonic()
        try:
            yield
        finally:
            self.timings[name] = time.monotonic() - started


# --------------------------------------------------------------------------- imports


def make_import_root(workdir: Path) -> Path:
    """A folder whose llmux/ package points at this checkout's common/, service/, client/ and
    shim/."""
    root = workdir / "pyroot"
    pkg = root / "llmux"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    for name in ("common", "service", "client", "shim"):
        (pkg / name).symlink_to(REPO / name, target_is_directory=True)
    sys.path.insert(0, str(root))
    old = os.environ.get("PYTHONPATH", "")
    os.environ["PYTHONPATH"] = str(root) + (os.pathsep + old if old else "")
    importlib.invalidate_caches()
    return root


# --------------------------------------------------------------------------- processes


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def children_of() -> dict[int, list[int]]:
    kids: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        kids.setdefault(ppid, []).append(int(entry.name))
    return kids


def process_tree(root: int) -> list[int]:
    kids = children_of()
    out, todo = [], [root]
    while todo:
        pid = todo.pop(0)
        out.append(pid)
        todo.extend(sorted(kids.get(pid, [])))
    return out


def alive(pid: int) -> bool:
    """True for a live process (a zombie counts as gone, though its pid is still taken)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def reap_children() -> None:
    """We are a subreaper: collect every exited child (the tree's orphans included)."""
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


def wait_gone(pids: Sequence[int], timeout: float) -> bool:
    """Wait until no pid exists at all (zombies reaped): a restore needs the pids free."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        reap_children()
        if not any(Path(f"/proc/{p}").exists() for p in pids):
            return True
        time.sleep(0.05)
    return False


def kill_tree(pids: Sequence[int]) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)
    wait_gone(pids, 10)


def http_get(url: str, timeout: float = 60, data: bytes | None = None) -> bytes:
    headers = {"Content-Type": "application/json"} if data is not None else {}
    if not url.startswith("http://127.0.0.1:"):
        raise ValueError(f"only loopback HTTP is asked: {url}")
    request = urllib.request.Request(url, data=data, headers=headers)  # noqa: S310
    with urllib.request.urlopen(request, timeout=timeout) as response:  # noqa: S310
        body: bytes = response.read()
        return body


def wait_http(url: str, timeout: float, proc: subprocess.Popen[bytes] | None) -> None:
    deadline = time.monotonic() + timeout
    last = ""
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"the target exited with status {proc.returncode} before serving")
        try:
            http_get(url, timeout=5)
            return
        except OSError as exc:
            last = str(exc)
        time.sleep(0.5)
    raise RuntimeError(f"{url} did not answer within {timeout:.0f} s ({last})")


# --------------------------------------------------------------------------- GPU facts


def _smi(*query: str) -> str | None:
    smi = shutil.which("nvidia-smi")
    if not smi:
        return None
    try:
        done = subprocess.run(
            [smi, *query, "--format=csv,noheader,nounits"],
            capture_output=True,
            text=True,
            check=False,
            timeout=60,
        )
    except subprocess.TimeoutExpired:
        return None
    return done.stdout if done.returncode == 0 else None


def gpu_total_used_mib() -> int | None:
    out = _smi("--query-gpu=memory.used")
    if out is None:
        return None
    with contextlib.suppress(ValueError):
        return sum(int(line.strip()) for line in out.splitlines() if line.strip())
    return None


GPU_BASELINE: list[int] = []
"""Total GPU memory used before the target started: the fallback when nvidia-smi lists no
per-process memory (as on some virtual machines)."""


def nvidia_smi_used_mib(pids: Sequence[int]) -> int | None:
    """GPU memory nvidia-smi shows for these pids; None without nvidia-smi.

    When it lists none of them, the growth of the GPU's total used memory since the demo
    started is given instead (0 while suspended either way).
    """
    out = _smi("--query-compute-apps=pid,used_memory")
    if out is None:
        return None
    listed = False
    total = 0
    wanted = set(pids)
    for line in out.splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) == 2 and parts[0].isdigit() and int(parts[0]) in wanted:
            with contextlib.suppress(ValueError):
                total += int(parts[1])
                listed = True
    if listed or not GPU_BASELINE:
        return total
    now = gpu_total_used_mib()
    return max(0, now - GPU_BASELINE[0]) if now is not None else total


def dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


# --------------------------------------------------------------------------- targets


@dataclass
class Target:
    """A started process tree and how to ask it for a deterministic answer."""

    name: str
    proc: subprocess.Popen[bytes]
    port: int
    ask: Callable[[], str]
    log_path: Path
    health_path: str = "/health"
    pids: list[int] = field(default_factory=list)

    def tail(self, lines: int = 20) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        return ""


def _spawn(argv: list[str], log_path: Path, env: dict[str, str]) -> subprocess.Popen[bytes]:
    """A new session (no controlling tty: CRIU needs no --shell-job), stdin /dev/null and an
    O_APPEND log, so that nothing of the tree points outside it."""
    log_fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        return subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=log_fd,
            stderr=log_fd,
            start_new_session=True,
            cwd="/",
            env=env,
        )
    finally:
        os.close(log_fd)


BUILTIN_NEEDS = ("starlette", "anyio", "uvicorn", "h11", "click", "httptools", "zmq", "torch")


def builtin_available() -> str:
    """ "" when the built-in engine imports here, else why not."""
    missing = [m for m in BUILTIN_NEEDS if importlib.util.find_spec(m) is None]
    if missing:
        return f"missing {', '.join(missing)} (packaging/gpu/fetch-wheels.sh fetches them)"
    try:
        if importlib.util.find_spec("llmux.shim.builtin.__main__") is None:
            return "llmux.shim.builtin has no __main__"
        importlib.import_module("llmux.shim.builtin.cli")
    except Exception as exc:  # any import failure means: use the plain torch target
        return f"{type(exc).__name__}: {exc}"
    return ""


def start_builtin(args: argparse.Namespace, workdir: Path) -> Target:
    port = free_port()
    log_path = workdir / "target.log"
    model = "llmux-demo"
    argv = [
        sys.executable,
        "-m",
        "llmux.shim.builtin",
        "serve",
        model,
        "--port",
        str(port),
        "--host",
        "127.0.0.1",
        "--device",
        args.device,
        "--weights-mb",
        str(args.weights_mb),
    ]
    env = dict(os.environ)
    env.setdefault("XDG_CACHE_HOME", str(workdir / "cache"))
    proc = _spawn(argv, log_path, env)
    body = json.dumps(
        {"model": model, "prompt": "The GPU checkpoint says", "max_tokens": 24, "temperature": 0}
    ).encode()

    def ask() -> str:
        answer = json.loads(http_get(f"http://127.0.0.1:{port}/v1/completions", data=body))
        return str(answer["choices"][0]["text"])

    return Target("built-in engine", proc, port, ask, log_path)


def start_torch(args: argparse.Namespace, workdir: Path) -> Target:
    port = free_port()
    log_path = workdir / "target.log"
    script = REPO / "packaging" / "gpu" / "torch_target.py"
    argv = [sys.executable, str(script), "--port", str(port)]
    argv += ["--weights-mb", str(args.weights_mb), "--device", args.device]
    proc = _spawn(argv, log_path, dict(os.environ))

    def ask() -> str:
        return http_get(f"http://127.0.0.1:{port}/answer").decode()

    return Target("plain PyTorch process", proc, port, ask, log_path)


# --------------------------------------------------------------------------- CRIU


def find_criu(explicit: str) -> str:
    candidates = [explicit] if explicit else []
    candidates += [os.environ.get("LLMUX_CRIU", ""), str(REPO / ".criu" / "criu")]
    candidates += ["/opt/llmux/criu/criu", shutil.which("criu") or ""]
    for path in candidates:
        if path and os.access(path, os.X_OK) and Path(path).is_file():
            return path
    return ""


def criu_version(criu: str) -> str:
    done = subprocess.run([criu, "--version"], capture_output=True, text=True, check=False)
    match = re.search(r"Version:\s*(\S+)", done.stdout)
    return match.group(1) if match else done.stdout.strip()[:80]


# Flags as in ../shared/TESTBED.md: a tree that is its own session needs no --shell-job;
# cgroups are left alone (this demo restores into the same host).
CRIU_COMMON = ["--tcp-established", "--ext-unix-sk", "--link-remap", "--file-locks", "-v4"]


class CriuDriver:
    """criu dump/restore: through the service's own llmux.service.core.criu.CriuTool when it
    imports (so the service's flags are the ones shown to work), else with the argv above."""

    def __init__(self, criu: str, direct: bool) -> None:
        self.criu = criu
        self.via = "argv built here"
        self.tool: Any = None
        if direct:
            return
        try:
            from llmux.service.core import criu as service_criu

            self.tool = sync(service_criu.CriuTool.locate(criu))
            self.module: Any = service_criu
            self.via = "llmux.service.core.criu.CriuTool"
        except Exception as exc:  # an older or missing service module: drive CRIU directly
            self.via += f" (service CriuTool unusable: {type(exc).__name__}: {exc})"

    def dump(self, root: int, images: Path) -> tuple[bool, str]:
        for stale in Path("/dev/shm").glob("link_remap.*"):
            with contextlib.suppress(OSError):
                stale.unlink()
        if self.tool is not None:
            try:
                sync(self.tool.dump(self.module.DumpRequest(pid=root, images_dir=images)))
            except Exception as exc:
                return False, str(exc)
            return True, ""
        argv = [self.criu, "dump", "--tree", str(root), "--images-dir", str(images)]
        argv += ["--log-file", str(images / "dump.log"), "--manage-cgroups=ignore", *CRIU_COMMON]
        done = subprocess.run(argv, capture_output=True, text=True, check=False)
        return done.returncode == 0, log_tail(images / "dump.log")

    def restore(self, images: Path, pidfile: Path) -> tuple[bool, str]:
        if self.tool is not None:
            request = self.module.RestoreRequest(images_dir=images, pidfile=pidfile)
            try:
                sync(self.tool.restore(request))
            except Exception as exc:
                return False, str(exc)
            return True, ""
        argv = [self.criu, "restore", "--images-dir", str(images), "--restore-detached"]
        argv += ["--pidfile", str(pidfile), "--log-file", str(images / "restore.log")]
        argv += ["--manage-cgroups=ignore", *CRIU_COMMON]
        done = subprocess.run(argv, capture_output=True, text=True, check=False)
        return done.returncode == 0, log_tail(images / "restore.log")


def log_tail(path: Path, lines: int = 15) -> str:
    with contextlib.suppress(OSError):
        text = path.read_text(errors="replace").splitlines()
        errors = [line for line in text if "Error" in line or "error" in line]
        return "\n".join((errors or text)[-lines:])
    return "(no log)"


# --------------------------------------------------------------------------- the demo


def sync(work: Coroutine[Any, Any, T]) -> T:
    """The checkpointer is async (the daemon's event loop); the demo runs one step at a time."""
    return asyncio.run(work)


def gbps(nbytes: float, seconds: float) -> str:
    return f"{nbytes / seconds / 1e9:.2f} GB/s" if seconds > 0 and nbytes > 0 else "n/a"


def suspend_resume(
    report: Report, target: Target, cuda: Any, cuda_pids: list[int], before: str, mib0: int | None
) -> None:
    """Stage 2: CUDA suspend/resume alone, the process stays alive."""
    report.say("\n== CUDA suspend and resume through the driver API")
    try:
        sync(cuda.lock_and_checkpoint(cuda_pids))
    except Exception as exc:
        report.check(False, "suspend (lock + checkpoint)", f"{type(exc).__name__}: {exc}")
        return
    report.timings["suspend.lock"] = cuda.last_timings.phases.get("lock", 0.0)
    report.timings["suspend.checkpoint"] = cuda.last_timings.phases.get("checkpoint", 0.0)
    states = sync(cuda.states(cuda_pids))
    report.check(
        all(s.name == "CHECKPOINTED" for s in states.values()),
        "driver reports every CUDA pid CHECKPOINTED",
        ", ".join(f"{p}={s.name}" for p, s in states.items()),
    )
    mib1 = nvidia_smi_used_mib(target.pids)
    report.check(
        mib1 == 0, "GPU memory of the tree after suspend is 0 MiB", f"{mib0} -> {mib1} MiB"
    )
    report.facts["suspended_mib"] = mib1
    try:
        sync(cuda.restore_and_unlock(cuda_pids))
    except Exception as exc:
        report.check(False, "resume (restore + unlock)", f"{type(exc).__name__}: {exc}")
        return
    report.timings["resume.restore"] = cuda.last_timings.phases.get("restore", 0.0)
    report.timings["resume.unlock"] = cuda.last_timings.phases.get("unlock", 0.0)
    mib2 = nvidia_smi_used_mib(target.pids)
    report.check(
        mib2 is not None and mib0 is not None and mib2 > 0 and mib2 >= mib0 * 0.9,
        "GPU memory comes back after resume",
        f"{mib1} -> {mib2} MiB (before: {mib0} MiB)",
    )
    after = target.ask()
    report.check(after == before, "identical answer after suspend/resume", _short(after))
    gpu_bytes = (mib0 or 0) * 2**20
    report.say(
        f"   lock {report.timings['suspend.lock']:.3f} s, checkpoint "
        f"{report.timings['suspend.checkpoint']:.3f} s "
        f"({gbps(gpu_bytes, report.timings['suspend.checkpoint'])}), restore "
        f"{report.timings['resume.restore']:.3f} s "
        f"({gbps(gpu_bytes, report.timings['resume.restore'])}), unlock "
        f"{report.timings['resume.unlock']:.3f} s"
    )


def criu_cycle(
    report: Report,
    target: Target,
    cuda: Any,
    cuda_pids: list[int],
    before: str,
    mib0: int | None,
    criu: str,
    images: Path,
    direct: bool,
) -> None:
    """Stage 3: lock + checkpoint, criu dump, criu restore, restore + unlock."""
    report.say(f"\n== CRIU checkpoint and restore with the CUDA state ({criu_version(criu)})")
    driver = CriuDriver(criu, direct)
    report.say(f"   CRIU {criu}, driven by {driver.via}")
    images.mkdir(mode=0o700, parents=True, exist_ok=True)
    pids = list(target.pids)
    try:
        sync(cuda.lock_and_checkpoint(cuda_pids))
    except Exception as exc:
        report.check(False, "lock + checkpoint before dump", f"{type(exc).__name__}: {exc}")
        return
    report.timings["criu.lock"] = cuda.last_timings.phases.get("lock", 0.0)
    report.timings["criu.checkpoint"] = cuda.last_timings.phases.get("checkpoint", 0.0)
    with report.timed("criu.dump"):
        dumped, why = driver.dump(target.proc.pid, images)
    if not report.check(dumped, "criu dump"):
        report.say(why)
        with contextlib.suppress(Exception):
            sync(cuda.restore_and_unlock(cuda_pids))  # the tree is still alive: thaw it
        return
    image_bytes = dir_bytes(images)
    report.facts["image_bytes"] = image_bytes
    target.proc.wait(timeout=30)
    report.check(wait_gone(pids, 30), "the dumped tree is gone and its pids are free")
    pidfile = images.parent / "restored.pid"
    with contextlib.suppress(OSError):
        pidfile.unlink()
    with report.timed("criu.restore"):
        restored_ok, why = driver.restore(images, pidfile)
    if not report.check(restored_ok, "criu restore"):
        report.say(why)
        return
    root = int(pidfile.read_text().strip())
    restored = process_tree(root)
    target.pids = restored
    report.check(sorted(restored) == sorted(pids), "same pids after restore", f"{restored}")
    try:
        sync(cuda.restore_and_unlock(cuda_pids))
    except Exception as exc:
        report.check(False, "restore + unlock after criu restore", f"{type(exc).__name__}: {exc}")
        return
    report.timings["criu.cuda_restore"] = cuda.last_timings.phases.get("restore", 0.0)
    report.timings["criu.unlock"] = cuda.last_timings.phases.get("unlock", 0.0)
    mib3 = nvidia_smi_used_mib(restored)
    if mib0 is None:
        report.skip("GPU memory after restore", "no nvidia-smi / no GPU")
    else:
        report.check(
            mib3 is not None and mib3 > 0 and mib3 >= mib0 * 0.9,
            "GPU memory comes back after criu restore + CUDA restore",
            f"{mib3} MiB (before: {mib0} MiB)",
        )
    after = target.ask()
    report.check(after == before, "identical answer after criu restore", _short(after))
    t = report.timings
    gpu_bytes = (mib0 or 0) * 2**20
    report.say(
        f"   lock {t['criu.lock']:.3f} s | checkpoint {t['criu.checkpoint']:.3f} s "
        f"({gbps(gpu_bytes, t['criu.checkpoint'])}) | dump {t['criu.dump']:.3f} s "
        f"({image_bytes / 1e9:.2f} GB image, {gbps(image_bytes, t['criu.dump'])}) | "
        f"restore {t['criu.restore']:.3f} s ({gbps(image_bytes, t['criu.restore'])}) | "
        f"CUDA restore {t['criu.cuda_restore']:.3f} s ({gbps(gpu_bytes, t['criu.cuda_restore'])})"
        f" | unlock {t['criu.unlock']:.3f} s"
    )


def _short(text: str, limit: int = 160) -> str:
    text = text.replace("\n", " ")
    return text if len(text) <= limit else text[:limit] + "..."


def run(args: argparse.Namespace, report: Report, workdir: Path) -> None:
    from llmux.service.core.cuda import driver_version, make_cuda_checkpointer

    report.say(f"llmux CUDA checkpoint demo: repo {REPO}, python {sys.version.split()[0]}")
    report.say(f"   driver {driver_version() or '(none)'}, kernel {os.uname().release}")
    gpu = args.device == "cuda"
    cuda: Any = make_cuda_checkpointer("api" if gpu else "off")
    if gpu and cuda.problem():
        report.check(False, "driver checkpoint API usable", cuda.problem())
        return
    why_not = builtin_available() if args.target in ("auto", "builtin") else "not asked for"
    if args.target == "builtin" and why_not:
        report.check(False, "built-in engine importable", why_not)
        return
    use_builtin = not why_not
    if not use_builtin:
        report.say(f"   built-in engine not used ({why_not}): plain PyTorch target")
    baseline = gpu_total_used_mib() if gpu else None
    if baseline is not None:
        GPU_BASELINE.append(baseline)
        report.say(f"   GPU memory used before the target starts: {baseline} MiB")
    target = (start_builtin if use_builtin else start_torch)(args, workdir)
    report.say(f"\n== Starting the {target.name} with {args.weights_mb} MiB of weights")
    try:
        _with_target(args, report, target, cuda, gpu, workdir)
    finally:
        kill_tree(process_tree(target.proc.pid) if alive(target.proc.pid) else target.pids)
        with contextlib.suppress(Exception):
            target.proc.wait(timeout=5)


def _with_target(
    args: argparse.Namespace, report: Report, target: Target, cuda: Any, gpu: bool, workdir: Path
) -> None:
    try:
        with report.timed("start"):
            wait_http(
                f"http://127.0.0.1:{target.port}{target.health_path}",
                args.start_timeout,
                target.proc,
            )
    except RuntimeError as exc:
        report.check(False, f"{target.name} starts", f"{exc}\n{target.tail()}")
        return
    target.pids = process_tree(target.proc.pid)
    report.check(
        True, f"{target.name} serves", f"pids {target.pids}, {report.timings['start']:.1f} s"
    )
    before = target.ask()
    report.say(f"   answer: {_short(before)}")
    report.check(target.ask() == before, "the answer is deterministic (asked twice)")
    cuda_pids = cuda.cuda_pids(target.pids)
    mib0 = nvidia_smi_used_mib(target.pids)
    report.facts.update(pids=target.pids, cuda_pids=cuda_pids, gpu_mib=mib0)
    if gpu:
        if not report.check(bool(cuda_pids), "CUDA processes found in the tree", f"{cuda_pids}"):
            return
        report.check(bool(mib0), "the tree holds GPU memory", f"{mib0} MiB")
        suspend_resume(report, target, cuda, cuda_pids, before, mib0)
    else:
        report.skip("CUDA suspend/resume", "--device cpu")
    if args.skip_criu:
        report.skip("CRIU checkpoint/restore", "--skip-criu")
        return
    criu = find_criu(args.criu)
    if not criu:
        report.check(False, "CRIU found", "none at --criu, $LLMUX_CRIU, .criu/criu or on PATH")
        return
    images = Path(args.images_dir) / "images"
    shutil.rmtree(images, ignore_errors=True)
    failed_before = len(report.failures)
    try:
        criu_cycle(report, target, cuda, cuda_pids, before, mib0, criu, images, args.criu_direct)
    finally:
        if args.out:
            for name in ("dump.log", "restore.log"):
                with contextlib.suppress(OSError):
                    shutil.copy(images / name, Path(args.out) / f"criu-{name}")
        if not args.keep_images:
            shutil.rmtree(images, ignore_errors=True)
    if args.engine == "off":
        report.skip("the service's CheckpointEngine", "--engine off")
    elif len(report.failures) > failed_before or not alive(target.proc.pid):
        report.skip("the service's CheckpointEngine", "the direct CRIU stage failed")
    else:
        state = Path(args.images_dir) / "state"
        try:
            engine_cycle(report, target, gpu, before, mib0, criu, state, args.engine == "on")
        finally:
            if not args.keep_images:
                shutil.rmtree(state, ignore_errors=True)


class TreeReaper:
    """Reaps the tree's pids (and only them) while the service's engine waits for them to go.

    The dumped root is this demo's child and, as we are a subreaper, so become its orphans:
    their zombies would hold the pids a restore needs. waitpid(-1) is not used, as it could
    take the exit status of a criu run the engine itself waits for.
    """

    def __init__(self, pids: Sequence[int]) -> None:
        self.pids = list(pids)
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self.stop.wait(0.05):
            for pid in self.pids:
                with contextlib.suppress(ChildProcessError, OSError):
                    os.waitpid(pid, os.WNOHANG)

    def __enter__(self) -> TreeReaper:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join()


def engine_cycle(
    report: Report,
    target: Target,
    gpu: bool,
    before: str,
    mib0: int | None,
    criu: str,
    state: Path,
    required: bool,
) -> None:
    """Stage 4: the same through llmux.service.core.engine.CheckpointEngine, the daemon's own
    library: Suspend/Resume, then Checkpoint/Restore with its manifest and timings."""
    report.say("\n== The same through the service's CheckpointEngine (the daemon's library)")
    try:
        from llmux.service.core.authz import Caller
        from llmux.service.core.engine import CheckpointEngine, EngineConfig
    except Exception as exc:
        if required:
            report.check(False, "CheckpointEngine importable", f"{type(exc).__name__}: {exc}")
        else:
            report.skip("the service's CheckpointEngine", f"not importable: {exc}")
        return
    model = "h100-demo"
    root = target.proc.pid
    caller = Caller(pid=os.getpid(), uid=0)
    config = EngineConfig(state_dir=state, criu_path=criu, cuda_mode="api" if gpu else "off")
    try:
        engine = sync(CheckpointEngine.open(config))
    except Exception as exc:
        report.check(False, "CheckpointEngine.open", f"{type(exc).__name__}: {exc}")
        return
    if gpu:
        try:
            with report.timed("engine.suspend"):
                suspended = sync(engine.suspend(caller, model, root))
            mib = nvidia_smi_used_mib(target.pids)
            report.check(
                mib == 0 and bool(suspended.cuda_pids),
                "engine.suspend frees the GPU memory",
                f"cuda pids {suspended.cuda_pids}, {mib0} -> {mib} MiB",
            )
            with report.timed("engine.resume"):
                sync(engine.resume(caller, model, root))
            mib = nvidia_smi_used_mib(target.pids)
            report.check(
                mib is not None and mib0 is not None and mib >= mib0 * 0.9 and mib > 0,
                "engine.resume brings it back",
                f"{mib} MiB",
            )
            report.check(target.ask() == before, "identical answer after engine suspend/resume")
        except Exception as exc:
            report.check(False, "engine suspend/resume", f"{type(exc).__name__}: {exc}")
            return
    pids = list(target.pids)
    try:
        with TreeReaper(pids), report.timed("engine.checkpoint"):
            manifest = sync(engine.checkpoint(caller, model, root))
    except Exception as exc:
        report.check(False, "engine.checkpoint", f"{type(exc).__name__}: {exc}")
        return
    report.check(
        True,
        "engine.checkpoint",
        f"{manifest.images_bytes / 1e9:.2f} GB, CUDA {manifest.cuda_seconds:.3f} s, "
        f"dump {manifest.dump_seconds:.3f} s, cuda pids {manifest.cuda_pids}, "
        f"driver {manifest.driver_version or '-'}",
    )
    report.timings["engine.cuda_checkpoint"] = manifest.cuda_seconds
    report.timings["engine.dump"] = manifest.dump_seconds
    with contextlib.suppress(Exception):
        target.proc.wait(timeout=10)
    report.check(wait_gone(pids, 30), "the tree is gone after engine.checkpoint")
    try:
        with report.timed("engine.restore"):
            sync(engine.restore(caller, model, keep_images=False))
    except Exception as exc:
        report.check(False, "engine.restore", f"{type(exc).__name__}: {exc}")
        return
    restored = process_tree(root) if alive(root) else []
    target.pids = restored
    report.check(sorted(restored) == sorted(pids), "engine.restore: same pids", f"{restored}")
    if gpu:
        mib = nvidia_smi_used_mib(restored)
        report.check(
            mib is not None and mib0 is not None and mib >= mib0 * 0.9 and mib > 0,
            "GPU memory back after engine.restore",
            f"{mib} MiB",
        )
    after = target.ask()
    report.check(after == before, "identical answer after engine checkpoint/restore")
    nbytes = manifest.images_bytes
    report.say(
        f"   engine: checkpoint {report.timings['engine.checkpoint']:.3f} s "
        f"(dump {manifest.dump_seconds:.3f} s, {gbps(nbytes, manifest.dump_seconds)}), "
        f"restore {report.timings['engine.restore']:.3f} s "
        f"({gbps(nbytes, report.timings['engine.restore'])} incl. CUDA restore)"
    )


def run_gpu_tests(report: Report) -> None:
    """tests/service/test_cuda.py -m gpu, with the same import root (needs only pytest)."""
    report.say("\n== pytest -m gpu tests/service/test_cuda.py")
    if importlib.util.find_spec("pytest") is None:
        report.skip("GPU tests", "pytest is not installed here (carry its wheels)")
        return
    argv = [sys.executable, "-m", "pytest", "-q", "-rs", "-m", "gpu", "-p", "no:cacheprovider"]
    argv += ["tests/service/test_cuda.py"]
    done = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, check=False)
    report.say(done.stdout[-3000:] + done.stderr[-1000:])
    ran = re.search(r"(\d+) passed", done.stdout)
    report.check(
        done.returncode == 0 and ran is not None,
        "GPU tests of the checkpointer",
        f"pytest exit {done.returncode}, {ran.group(0) if ran else 'none passed'}",
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", choices=("auto", "builtin", "torch"), default="auto")
    parser.add_argument("--weights-mb", type=int, default=2048)
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--criu", default="", help="criu program (default: .criu/criu, PATH)")
    parser.add_argument("--images-dir", default="/var/tmp/llmux-h100-demo")
    parser.add_argument("--keep-images", action="store_true")
    parser.add_argument(
        "--criu-direct", action="store_true", help="drive criu here, not via the service's CriuTool"
    )
    parser.add_argument("--skip-criu", action="store_true")
    parser.add_argument("--tests", action="store_true", help="also run the gpu-marked tests")
    parser.add_argument(
        "--engine",
        choices=("auto", "on", "off"),
        default="auto",
        help="stage 4 through the service's CheckpointEngine (auto: when it imports)",
    )
    parser.add_argument("--start-timeout", type=float, default=300)
    parser.add_argument("--out", default="", help="folder for demo.log, results.json, CRIU logs")
    args = parser.parse_args(argv)
    if args.weights_mb <= 0:
        parser.error("--weights-mb must be positive")
    if os.geteuid() != 0 and not args.skip_criu:
        parser.error("run as root (CRIU and the driver's checkpoint API of another process)")
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)  # restored trees become our children
    os.umask(0o077)
    Path(args.images_dir).mkdir(mode=0o700, parents=True, exist_ok=True)
    log = None
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        log = open(Path(args.out) / "demo.log", "w")  # noqa: SIM115 (closed below)
    report = Report(log)
    workdir = Path(tempfile.mkdtemp(prefix="llmux-h100-demo-"))
    try:
        make_import_root(workdir)
        run(args, report, workdir)
        if args.tests:
            run_gpu_tests(report)
    except Exception as exc:
        report.check(False, "demo ran to its end", f"{type(exc).__name__}: {exc}")
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
        with contextlib.suppress(OSError):
            (Path(args.images_dir) / "restored.pid").unlink()
    report.say(
        "\n== Timings (s): " + json.dumps({k: round(v, 3) for k, v in report.timings.items()})
    )
    verdict = "PASS" if not report.failures and report.passes else "FAIL"
    report.say(
        f"{verdict}: {report.passes} checks passed, {len(report.failures)} failed"
        + (f" ({', '.join(report.failures)})" if report.failures else "")
    )
    if args.out:
        results = {
            "verdict": verdict,
            "timings": report.timings,
            "failures": report.failures,
            **report.facts,
        }
        (Path(args.out) / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    if log:
        log.close()
    return 0 if verdict == "PASS" else 1


if __name__ == "__main__":
    sys.exit(main())
