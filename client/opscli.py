"""The operator commands of ``llmux``: the host service over D-Bus, a shim over HTTP.

  llmux host status                         llmuxd's versions, state directory, free space
  llmux checkpoints list | inspect NAME | delete NAME
  llmux checkpoints --explain NAME          what the checkpoint's bytes are (by mapping kind)
  llmux checkpoint MODEL --pid PID          dump a model's process tree (a job, with progress)
  llmux restore MODEL                       restore it into the caller's container
  llmux status [--url URL]                  a shim's GET /control/status as a table

Each takes ``--json`` (one JSON document on stdout, for scripts) and the D-Bus ones ``--bus``
(system, session or an address). Tables and the progress bar are rich's (python3-rich on a
host); what a pipe gets is plain text without styles or control codes. Exit codes: 0 success,
1 the service or shim refused or failed (its error name is printed), 2 bad usage, 130
interrupted (a running job is cancelled first).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import json
import os
import sys
import time
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any, TextIO

from rich.console import Console
from rich.progress import BarColumn, Progress, TaskID, TaskProgressColumn, TextColumn
from rich.table import Table

from llmux.common.contract import (
    CheckpointBreakdown,
    CheckpointInfo,
    ErrorName,
    MemoryPart,
    valid_model_name,
)

if TYPE_CHECKING:
    from llmux.client.hostclient import HostClient

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130

DEFAULT_URL = "http://127.0.0.1:3000"
BUS_ACCESS_DENIED = "org.freedesktop.DBus.Error.AccessDenied"
BUS_SERVICE_UNKNOWN = "org.freedesktop.DBus.Error.ServiceUnknown"
BUS_NO_REPLY = "org.freedesktop.DBus.Error.NoReply"

#: what to try next, by error name: the service's message says what, this says where to look
HINTS = {
    BUS_ACCESS_DENIED: "the bus policy lets root and members of group 'llmux' call llmuxd "
    "(usermod -aG llmux USER, then log in again)",
    BUS_SERVICE_UNKNOWN: "llmuxd is not installed or cannot start: systemctl status llmuxd; "
    "journalctl -u llmuxd",
    BUS_NO_REPLY: "llmuxd did not answer: systemctl status llmuxd; journalctl -u llmuxd",
    ErrorName.CRIU_FAILED: "the CRIU log excerpt above says why; journalctl -u llmuxd has more",
}

Handler = Callable[[argparse.Namespace], int]


# ------------------------------------------------------------------------------ formatting


def format_bytes(n: float) -> str:
    """1536 -> '1.5 KiB': binary units, as df -h and systemctl status show memory."""
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(value) < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def format_rate(bytes_per_s: float) -> str:
    return f"{bytes_per_s / 1e6:.0f} MB/s" if bytes_per_s > 0 else "-"


def format_time(unix: float) -> str:
    return datetime.fromtimestamp(unix).strftime("%Y-%m-%d %H:%M:%S") if unix > 0 else "-"


def format_pids(pids: Sequence[int], limit: int = 4) -> str:
    shown = ",".join(str(p) for p in pids[:limit])
    return f"{shown},+{len(pids) - limit}" if len(pids) > limit else (shown or "-")


def _table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> Table:
    """Left-aligned columns two spaces apart, no borders, like systemctl list-units."""
    table = Table(box=None, pad_edge=False, padding=(0, 1), header_style="bold",
                  show_edge=False)
    for header in headers:
        table.add_column(header, no_wrap=True, overflow="ignore")
    for row in rows:
        table.add_row(*row)
    return table


def render_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """The table as plain text (what a pipe gets), without trailing spaces."""
    console = Console(file=io.StringIO(), width=10_000, color_system=None, highlight=False)
    with console.capture() as capture:
        console.print(_table(headers, rows))
    return "\n".join(line.rstrip() for line in capture.get().splitlines())


def print_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
    """On a terminal rich's styled table, elsewhere render_table's plain text."""
    if sys.stdout.isatty():
        Console(highlight=False).print(_table(headers, rows))
    else:
        print(render_table(headers, rows))


def render_fields(pairs: Sequence[tuple[str, str]]) -> str:
    """'Key: value' lines with the values aligned, like systemctl status."""
    width = max((len(k) for k, _ in pairs), default=0)
    return "\n".join(f"{k.rjust(width)}: {v}" for k, v in pairs)


def print_json(value: Any, out: TextIO | None = None) -> None:
    print(json.dumps(value, indent=2, sort_keys=True, default=str), file=out or sys.stdout)


# ------------------------------------------------------------------------------ progress


@dataclass
class ProgressReporter:
    """Follows a job's Progress property: rich's bar on a TTY, plain lines otherwise.

    Plain lines come at every ``step`` of progress (10% by default) so that a log or CI
    output stays short; the bar is redrawn at most every ``min_interval`` seconds.
    """

    label: str
    stream: TextIO = field(default_factory=lambda: sys.stderr)
    tty: bool | None = None
    step: float = 0.1
    min_interval: float = 0.1
    width: int = 30
    _last_step: int = field(default=-1, init=False)
    _last_draw: float = field(default=0.0, init=False)
    _bar: Progress | None = field(default=None, init=False)
    _task: TaskID | None = field(default=None, init=False)

    def __post_init__(self) -> None:
        if self.tty is None:
            self.tty = self.stream.isatty()

    def __call__(self, progress: Any) -> None:
        """Takes a contract.JobProgress (fraction, bytes, rate)."""
        self.update(float(progress.fraction), int(progress.bytes), float(progress.rate))

    def update(self, fraction: float, nbytes: int = 0, rate: float = 0.0) -> None:
        fraction = min(max(fraction, 0.0), 1.0)
        detail = ", ".join(part for part in (format_bytes(nbytes) if nbytes else "",
                                             format_rate(rate) if rate > 0 else "") if part)
        if self.tty:
            now = time.monotonic()
            if now - self._last_draw < self.min_interval and fraction < 1.0:
                return
            self._last_draw = now
            bar, task = self._started()
            bar.update(task, completed=fraction, detail=detail)
            bar.refresh()
            return
        reached = int(fraction / self.step + 1e-9)
        if reached <= self._last_step:
            return
        self._last_step = reached
        self.stream.write(f"{self.label}: {fraction * 100:.0f}%"
                          + (f" ({detail})" if detail else "") + "\n")
        self.stream.flush()

    def _started(self) -> tuple[Progress, TaskID]:
        if self._bar is None or self._task is None:
            console = Console(file=self.stream, force_terminal=True, highlight=False)
            self._bar = Progress(
                TextColumn("{task.description}"),
                BarColumn(bar_width=self.width),
                TaskProgressColumn(),
                TextColumn("{task.fields[detail]}"),
                console=console, auto_refresh=False,
                redirect_stdout=False, redirect_stderr=False,
            )
            self._task = self._bar.add_task(self.label, total=1.0, detail="")
            self._bar.start()
        return self._bar, self._task

    def finish(self) -> None:
        """Ends the bar's line, so that what follows starts on a fresh one."""
        if self._bar is not None:
            self._bar.stop()
            self._bar = None


# ------------------------------------------------------------------------------ running


@dataclass(frozen=True)
class Failure:
    name: str
    message: str

    def to_json(self) -> dict[str, Any]:
        return {"error": {"name": self.name, "message": self.message}}


def _report(failure: Failure, as_json: bool) -> int:
    if as_json:
        print_json(failure.to_json())
    print(f"llmux: error: {failure.name}: {failure.message}", file=sys.stderr)
    hint = HINTS.get(failure.name)
    if hint:
        print(f"llmux: hint: {hint}", file=sys.stderr)
    return EXIT_FAILED


def _run(args: argparse.Namespace, work: Callable[[], Coroutine[Any, Any, int]]) -> int:
    """Runs one command's coroutine; every failure becomes a named error and an exit code."""
    from llmux.client.hostclient import HostServiceError

    try:
        return asyncio.run(work())
    except HostServiceError as exc:
        return _report(Failure(exc.dbus_name, exc.message), args.json)
    except ShimHTTPError as exc:
        return _report(Failure(exc.name, exc.message), args.json)
    except KeyboardInterrupt:
        print("llmux: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


def _usage(message: str) -> int:
    print(f"llmux: error: {message}", file=sys.stderr)
    return EXIT_USAGE


def _run_for_model(args: argparse.Namespace, name: str,
                   work: Callable[[], Coroutine[Any, Any, int]]) -> int:
    """_run for a command on one model; an invalid name is a usage error, before any call."""
    if not valid_model_name(name):
        return _usage(f"invalid model name {name!r}")
    return _run(args, work)


def _host(args: argparse.Namespace) -> HostClient:
    """A client of llmuxd on args.bus (imported when a D-Bus command runs)."""
    from llmux.client.hostclient import HostClient

    return HostClient(args.bus)


def _checkpoint_row(info: CheckpointInfo) -> list[str]:
    return [
        info.model or "?",
        format_bytes(info.size_bytes),
        format_time(info.created),
        str(info.root_pid),
        format_pids(info.pids),
        info.owner,
        f"{info.dump_seconds:.1f} s",
        info.location,
        info.storage or "-",
        str(info.live_trees),
    ]


def _checkpoint_json(info: CheckpointInfo) -> dict[str, Any]:
    """The properties with the Manifest property parsed (it is JSON text on the bus)."""
    out = info.to_properties()
    if isinstance(out.get("Manifest"), str):
        with contextlib.suppress(ValueError):
            out["Manifest"] = json.loads(out["Manifest"])
    return out


# ------------------------------------------------------------------------------ D-Bus commands


def cmd_host_status(args: argparse.Namespace) -> int:
    from llmux.client.hostclient import HostServiceError

    async def work() -> int:
        async with _host(args) as client:
            info = await client.info()
            try:
                count: int | None = len(await client.list_checkpoints())
            except HostServiceError as exc:
                if exc.dbus_name != BUS_ACCESS_DENIED:
                    raise
                count = None  # the policy lets anyone read the properties, not the list
        if args.json:
            print_json({**info.to_properties(), "Checkpoints": count, "Bus": args.bus})
            return EXIT_OK
        print(render_fields([
            ("Service", f"llmuxd {info.version or '?'}"),
            ("Bus", args.bus),
            ("CRIU", info.criu_version or "?"),
            ("Kernel", info.kernel_release or "?"),
            ("NVIDIA driver", info.driver_version or "none"),
            ("State directory", info.state_dir or "?"),
            ("Free space", format_bytes(info.free_bytes)),
            ("Checkpoints", "(not permitted: root or group llmux)" if count is None
             else str(count)),
        ]))
        return EXIT_OK

    return _run(args, work)


def cmd_checkpoints_list(args: argparse.Namespace) -> int:
    async def work() -> int:
        async with _host(args) as client:
            found = await client.list_checkpoints()
        if args.json:
            print_json([_checkpoint_json(p) for p in found])
            return EXIT_OK
        if not found:
            print("no checkpoints")
            return EXIT_OK
        headers = ["MODEL", "SIZE", "CREATED", "ROOT PID", "PIDS", "OWNER", "DUMP", "WHERE",
                   "STORAGE", "LIVE"]
        print_table(headers, [_checkpoint_row(p) for p in found])
        total = sum(p.size_bytes for p in found)
        print(f"\n{len(found)} checkpoint(s), {format_bytes(total)}")
        for p in found:
            if p.problem:
                print(f"warning: checkpoint {p.model}: {p.problem}")
        return EXIT_OK

    return _run(args, work)


def cmd_checkpoints_inspect(args: argparse.Namespace) -> int:
    async def work() -> int:
        async with _host(args) as client:
            props = await client.get_checkpoint(args.name)
        if props is None:
            return _report(Failure(ErrorName.NOT_FOUND, f"no checkpoint of {args.name}"),
                           args.json)
        if args.json:
            print_json(_checkpoint_json(props))
            return EXIT_OK
        pairs = [
            ("Model", props.model),
            ("Owner", props.owner),
            ("Created", format_time(props.created)),
            ("Size", format_bytes(props.size_bytes)),
            ("Where", props.location),
            ("Dump time", f"{props.dump_seconds:.2f} s"),
            ("Root PID", str(props.root_pid)),
            ("PIDs", " ".join(str(p) for p in props.pids) or "-"),
            ("CUDA PIDs", " ".join(str(p) for p in props.cuda_pids) or "-"),
            ("CRIU", props.criu_version),
            ("Kernel", props.kernel_release),
            ("NVIDIA driver", props.driver_version or "none"),
        ]
        print(render_fields(pairs))
        manifest = _checkpoint_json(props).get("Manifest")
        if isinstance(manifest, dict):
            print("\nManifest:")
            print(json.dumps(manifest, indent=2, sort_keys=True))
        return EXIT_OK

    return _run_for_model(args, args.name, work)


def _part_row(part: MemoryPart) -> list[str]:
    def share(n: int) -> str:
        return f"{format_bytes(n)} ({100 * n / part.stored_bytes:.0f}%)" if n else "-"

    return [part.kind, format_bytes(part.stored_bytes), share(part.zero_bytes),
            share(part.file_equal_bytes), share(part.duplicate_bytes), str(part.mappings),
            format_bytes(part.mapped_bytes)]


PART_HEADERS = ["KIND", "STORED", "ZERO PAGES", "= FILE", "DUPLICATES", "MAPPINGS", "MAPPED"]


def render_breakdown(b: CheckpointBreakdown) -> str:
    """ExplainCheckpoint's answer as text: totals by kind, then each process, then files."""
    stored = sum(p.stored_bytes for p in b.totals())
    zero = sum(p.zero_bytes for p in b.totals()) + sum(f.zero_bytes for f in b.files)
    equal = sum(p.file_equal_bytes for p in b.totals())
    duplicate = sum(p.duplicate_bytes for p in b.totals())
    out = [render_fields([
        ("Model", b.model),
        ("Images", f"{format_bytes(b.images_bytes)} ({format_bytes(stored)} of pages, "
                   f"{format_bytes(b.other_images_bytes)} of other records)"),
        ("Saved files", format_bytes(b.files_bytes)),
        ("Zero pages", format_bytes(zero)),
        ("Pages = file", format_bytes(equal)),
        ("Duplicate pages", format_bytes(duplicate)),
    ]), "", "All processes:", render_table(PART_HEADERS, [_part_row(p) for p in b.totals()
                                                          if p.stored_bytes or p.mappings])]
    for proc in b.processes:
        out += ["", f"PID {proc.pid} ({proc.comm or '?'}): {format_bytes(proc.stored_bytes)}",
                render_table(PART_HEADERS, [_part_row(p) for p in proc.parts if p.stored_bytes])]
    if b.shared:
        out += ["", "Shared memory:", render_table(PART_HEADERS, [_part_row(p) for p in b.shared])]
    if b.files:
        out += ["", "Saved files:", render_table(PART_HEADERS, [_part_row(p) for p in b.files])]
    return "\n".join(out)


def cmd_checkpoints_explain(args: argparse.Namespace) -> int:
    async def work() -> int:
        async with _host(args) as client:
            breakdown = await client.explain_checkpoint(args.explain)
        if args.json:
            print_json(json.loads(breakdown.to_json()))
        else:
            print(render_breakdown(breakdown))
        return EXIT_OK

    return _run_for_model(args, args.explain, work)


def _checkpoints_bare(args: argparse.Namespace) -> int:
    """``llmux checkpoints`` without a command: --explain NAME, or a usage error."""
    if args.explain:
        return cmd_checkpoints_explain(args)
    return _usage("llmux checkpoints: give a command (list, inspect, delete) or --explain NAME")


def cmd_checkpoints_delete(args: argparse.Namespace) -> int:
    async def work() -> int:
        async with _host(args) as client:
            await client.delete_checkpoint(args.name)
        if args.json:
            print_json({"deleted": args.name})
        else:
            print(f"deleted the checkpoint of {args.name}")
        return EXIT_OK

    return _run_for_model(args, args.name, work)


async def _job_with_progress(
    args: argparse.Namespace, label: str,
    call: Callable[[HostClient, ProgressReporter], Awaitable[CheckpointInfo]],
) -> tuple[CheckpointInfo, float]:
    """Runs a checkpoint or restore job behind a progress bar labelled ``label``; the
    checkpoint's properties and the seconds it took in all."""
    progress = ProgressReporter(label)
    started = time.monotonic()
    try:
        async with _host(args) as client:
            props = await call(client, progress)
        progress.update(1.0, props.size_bytes)
    finally:
        progress.finish()
    return props, time.monotonic() - started


def cmd_checkpoint(args: argparse.Namespace) -> int:
    if not valid_model_name(args.model):
        return _usage(f"invalid model name {args.model!r}")
    if args.pid < 2:
        return _usage(f"--pid must be the model engine's root PID, got {args.pid}")

    async def work() -> int:
        props, elapsed = await _job_with_progress(
            args, f"checkpoint {args.model}",
            lambda client, progress: client.checkpoint(
                args.model, args.pid, leave_running=args.leave_running,
                progress=progress, timeout=args.timeout))
        if args.json:
            print_json({**_checkpoint_json(props), "ElapsedSeconds": elapsed})
            return EXIT_OK
        size = props.size_bytes
        dump = props.dump_seconds
        print(f"checkpointed {args.model} (PID {args.pid}, {len(props.pids)} "
              f"process(es)): {format_bytes(size)}; CRIU dump {dump:.1f} s "
              f"({format_rate(size / dump if dump > 0 else 0.0)}), {elapsed:.1f} s in all"
              + ("; left running" if args.leave_running else ""))
        return EXIT_OK

    return _run(args, work)


def cmd_restore(args: argparse.Namespace) -> int:
    async def work() -> int:
        props, elapsed = await _job_with_progress(
            args, f"restore {args.model}",
            lambda client, progress: client.restore(
                args.model, keep_images=not args.delete_images,
                progress=progress, timeout=args.timeout))
        if args.json:
            print_json({**_checkpoint_json(props), "ElapsedSeconds": elapsed,
                        "ImagesKept": not args.delete_images})
            return EXIT_OK
        print(f"restored {args.model}: root PID {props.root_pid or '?'}, PIDs "
              f"{format_pids(props.pids, limit=8)} in {elapsed:.1f} s"
              + ("; checkpoint deleted" if args.delete_images else ""))
        return EXIT_OK

    return _run_for_model(args, args.model, work)


# ------------------------------------------------------------------------------ HTTP command


class ShimHTTPError(Exception):
    """The shim could not be reached or answered with an error."""

    def __init__(self, name: str, message: str):
        super().__init__(message)
        self.name = name
        self.message = message


#: the environment variable holding the key ``llmux status`` sends (an admin key where the
#: shim has admin keys); an environment variable, not an option, keeps it out of ps and
#: shell histories
API_KEY_ENV = "LLMUX_API_KEY"


async def fetch_status(url: str, timeout: float = 10.0,  # noqa: ASYNC109
                       api_key: str | None = None) -> dict[str, Any]:
    """GET URL/control/status; the shim's JSON, or ShimHTTPError saying what went wrong.

    ``api_key`` (default: $LLMUX_API_KEY) goes as ``Authorization: Bearer KEY``."""
    import httpx

    target = url.rstrip("/") + "/control/status"
    key = api_key if api_key is not None else os.environ.get(API_KEY_ENV)
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    try:
        async with httpx.AsyncClient(timeout=timeout) as client:
            response = await client.get(target, headers=headers)
    except httpx.HTTPError as exc:
        raise ShimHTTPError("Unreachable", f"cannot reach the shim at {target}: {exc}") from exc
    if response.status_code in (401, 403):
        if response.status_code == 403:
            need = f"{API_KEY_ENV} is an api key; the shim wants an admin key ([auth] admin_keys)"
        elif key:
            need = f"the key in {API_KEY_ENV} is not one of the shim's"
        else:
            need = (f"the shim has API keys: set {API_KEY_ENV} to one (an admin key where it "
                    "has admin keys)")
        raise ShimHTTPError(f"HTTP{response.status_code}",
                            f"{target} refused the request ({response.status_code}): {need}")
    if response.status_code != 200:
        raise ShimHTTPError(f"HTTP{response.status_code}",
                            f"{target} answered {response.status_code}: {response.text[:300]}")
    try:
        body = response.json()
    except ValueError:
        raise ShimHTTPError("BadResponse", f"{target} did not answer JSON") from None
    if not isinstance(body, dict) or not isinstance(body.get("models"), dict):
        raise ShimHTTPError("BadResponse", f"{target} answered no models table: {body!r:.300}")
    return body


def status_rows(body: dict[str, Any]) -> list[list[str]]:
    rows = []
    for name, model in sorted(body["models"].items()):
        model = model if isinstance(model, dict) else {}
        rows.append([
            name,
            str(model.get("state", "?")),
            "*" if model.get("active") or body.get("active") == name else "",
            format_pids(list(model.get("pids") or [])),
            str(model.get("last_wake") or "-"),
            str(model.get("in_flight", 0)),
            str(model.get("queued", 0)),
        ])
    return rows


def cmd_status(args: argparse.Namespace) -> int:
    async def work() -> int:
        body = await fetch_status(args.url, args.timeout)
        if args.json:
            print_json(body)
            return EXIT_OK
        headers = ["MODEL", "STATE", "ACTIVE", "PIDS", "LAST WAKE", "IN FLIGHT", "QUEUED"]
        print_table(headers, status_rows(body))
        summary = [f"active: {body.get('active') or 'none'}"]
        if "queue_depth" in body:
            summary.append(f"queued: {body['queue_depth']}")
        if body.get("switching"):
            summary.append("switching")
        print("\n" + "  ".join(summary))
        return EXIT_OK

    return _run(args, work)


# ------------------------------------------------------------------------------ wiring


def _common(parser: argparse.ArgumentParser, *, bus: bool = True) -> None:
    parser.add_argument("--json", action="store_true",
                        help="print one JSON document on stdout (for scripts)")
    if bus:
        parser.add_argument("--bus", default=os.environ.get("LLMUX_BUS", "system"),
                            help='where llmuxd is: "system" (default, or $LLMUX_BUS), '
                                 '"session" or a D-Bus address')


def _timeout(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--timeout", type=float, default=None, metavar="SECONDS",
                        help="give up (and cancel the job) after this long; default: wait")


def add_client_commands(
    subparsers: argparse._SubParsersAction[argparse.ArgumentParser],
) -> None:
    """Adds host, checkpoints, checkpoint, restore and status to ``llmux``'s subparsers.

    Each command sets ``func`` (Namespace -> exit code), as cli.main expects.
    """
    host = subparsers.add_parser("host", help="the host service (llmuxd) over D-Bus")
    host_sub = host.add_subparsers(dest="host_command", metavar="COMMAND")
    host.set_defaults(func=lambda _a: _usage("llmux host: give a command (status)"))
    host_status = host_sub.add_parser("status", help="llmuxd's versions, state dir, free space")
    _common(host_status)
    host_status.set_defaults(func=cmd_host_status)

    cps = subparsers.add_parser("checkpoints", help="list, inspect or delete checkpoints")
    cps.add_argument("--explain", metavar="NAME", default=None,
                     help="what a checkpoint's bytes are: per process, by kind of mapping, "
                          "with its zero pages and the pages equal to the file they map")
    _common(cps)
    cps_sub = cps.add_subparsers(dest="checkpoints_command", metavar="COMMAND")
    cps.set_defaults(func=_checkpoints_bare)
    listing = cps_sub.add_parser("list", help="every checkpoint on this host")
    _common(listing)
    listing.set_defaults(func=cmd_checkpoints_list)
    inspect = cps_sub.add_parser("inspect", help="one checkpoint's manifest")
    inspect.add_argument("name", metavar="NAME", help="model name")
    _common(inspect)
    inspect.set_defaults(func=cmd_checkpoints_inspect)
    delete = cps_sub.add_parser("delete", help="delete a checkpoint (its images and files)")
    delete.add_argument("name", metavar="NAME", help="model name")
    _common(delete)
    delete.set_defaults(func=cmd_checkpoints_delete)

    checkpoint = subparsers.add_parser(
        "checkpoint", help="dump a model's process tree to disk (CRIU, via llmuxd)")
    checkpoint.add_argument("model", metavar="MODEL", help="name to store the checkpoint under")
    checkpoint.add_argument("--pid", type=int, required=True,
                            help="root PID of the model's engine process tree")
    checkpoint.add_argument("--leave-running", action="store_true",
                            help="keep the tree running after the dump")
    _timeout(checkpoint)
    _common(checkpoint)
    checkpoint.set_defaults(func=cmd_checkpoint)

    restore = subparsers.add_parser(
        "restore", help="restore a model's checkpoint into the caller's container")
    restore.add_argument("model", metavar="MODEL")
    restore.add_argument("--delete-images", action="store_true",
                         help="delete the checkpoint once restored (default: keep it)")
    _timeout(restore)
    _common(restore)
    restore.set_defaults(func=cmd_restore)

    status = subparsers.add_parser(
        "status", help="a running shim's models (GET /control/status)",
        epilog=f"A shim with [auth] keys needs one: set {API_KEY_ENV} (an admin key where "
               "the shim has admin keys).")
    status.add_argument("--url", default=DEFAULT_URL,
                        help=f"the shim's base URL (default {DEFAULT_URL})")
    status.add_argument("--timeout", type=float, default=10.0, metavar="SECONDS")
    _common(status, bus=False)
    status.set_defaults(func=cmd_status)


def build_parser() -> argparse.ArgumentParser:
    """``llmux`` with the operator commands only: the host package's /usr/bin/llmux.

    In a shim's container ``llmux`` is llmux.shim.cli, which adds these same commands
    to serve and validate-config.
    """
    parser = argparse.ArgumentParser(
        prog="llmux", description="llmux operator commands: the host service and the shims.")
    add_client_commands(parser.add_subparsers(dest="command", metavar="COMMAND"))
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    func: Handler | None = getattr(args, "func", None)
    if func is None:
        parser.print_usage(sys.stderr)
        return _usage("give a command (host, checkpoints, checkpoint, restore, status)")
    return func(args)


if __name__ == "__main__":
    sys.exit(main())
