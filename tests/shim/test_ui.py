"""The operator page's server side: the page and its files, the state it polls, the log
stream it follows, the checkpoint panel without llmuxd, and the log follower's bounds.

A real shim in the test's loop (real built-in engines, HTTP on loopback); the page in a
real browser is tests/browser.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Any

import httpx

from llmux.shim.transitions import Action, BroughtBack, Switch, WakeKind
from llmux.shim.ui import LogFollower, SwitchHistory
from tests.support.proxy_fixtures import ShimFactory, chat_body


class SSEReader:
    """Events of a text/event-stream answer, as (event, JSON data), read as they come."""

    def __init__(self, resp: httpx.Response) -> None:
        self._chunks = resp.aiter_text()
        self._buf = ""

    async def take(self, want: int, within: float = 30.0) -> list[tuple[str, Any]]:
        return await asyncio.wait_for(self._take(want), within)

    async def _take(self, want: int) -> list[tuple[str, Any]]:
        out: list[tuple[str, Any]] = []
        while len(out) < want:
            while "\n\n" not in self._buf:
                self._buf += await anext(self._chunks)
            block, self._buf = self._buf.split("\n\n", 1)
            event, data = "message", []
            for line in block.split("\n"):
                if line.startswith("event:"):
                    event = line[6:].strip()
                elif line.startswith("data:"):
                    data.append(line[5:].strip())
            if data:
                out.append((event, json.loads("\n".join(data))))
        return out


async def test_page_and_static_files_are_served(shim_factory: ShimFactory,
                                                http: httpx.AsyncClient) -> None:
    shim = await shim_factory(["a", "b"])
    page = await http.get(f"{shim.url}/ui")
    assert page.status_code == 200
    assert page.headers["content-type"].startswith("text/html")
    # nothing from elsewhere: every script and style is the shim's own
    assert "default-src 'self'" in page.headers["content-security-policy"]
    assert '<script src="/ui/static/ui.js"' in page.text
    assert "http://" not in page.text and "https://" not in page.text
    for name, kind in (("ui.js", "javascript"), ("ui.css", "text/css")):
        r = await http.get(f"{shim.url}/ui/static/{name}")
        assert r.status_code == 200 and kind in r.headers["content-type"], (name, r.headers)
        assert "https://" not in r.text and "http://" not in r.text
    assert (await http.get(f"{shim.url}/ui/static/../app.py")).status_code == 404


async def test_state_shows_status_switches_and_switch_log(
        shim_factory: ShimFactory, http: httpx.AsyncClient) -> None:
    shim = await shim_factory(["a", "b"])
    st = (await http.get(f"{shim.url}/ui/api/state")).json()
    assert set(st["status"]["models"]) == {"a", "b"}
    assert st["switches"] == [] and st["log"] == [] and st["seq"] == 0
    for model in ("a", "b"):
        r = await http.post(f"{shim.url}/v1/chat/completions", json=chat_body(model, "x"))
        assert r.status_code == 200, r.text
    st = (await http.get(f"{shim.url}/ui/api/state")).json()
    assert st["status"]["active"] == "b"
    first, second = st["switches"]
    assert first["from"] is None and first["to"] == "a" and first["wake"] == "cold"
    assert first["strategy"] is None and first["sleep_secs"] is None
    assert second["from"] == "a" and second["to"] == "b" and second["ok"] is True
    assert second["strategy"] == "offload+keep_running" and second["sleep_secs"] >= 0
    assert second["wake"] == "cold" and 0 <= second["wake_secs"] <= second["seconds"]
    assert second["waiting"] == 1  # the request for b, admitted when the switch ended
    assert st["came_back"]["b"]["how"] == "cold"
    texts = [line["text"] for line in st["log"]]
    assert any("switch a -> b: ok" in t for t in texts), texts
    # ``since`` gives only what is newer
    later = (await http.get(f"{shim.url}/ui/api/state", params={"since": st["seq"]})).json()
    assert later["log"] == []
    # a wake from sleep is told as a wake, with its time
    r = await http.post(f"{shim.url}/v1/chat/completions", json=chat_body("a", "y"))
    assert r.status_code == 200
    st = (await http.get(f"{shim.url}/ui/api/state")).json()
    assert st["switches"][-1]["wake"] == "wake"
    assert st["came_back"]["a"]["how"] == "wake" and st["came_back"]["a"]["secs"] >= 0
    bad = await http.get(f"{shim.url}/ui/api/state", params={"since": "x"})
    assert bad.status_code == 400 and "since" in bad.json()["error"]["message"]


async def test_log_stream_follows_the_engine_log(shim_factory: ShimFactory,
                                                 http: httpx.AsyncClient) -> None:
    shim = await shim_factory(["a", "b"])
    async with http.stream("GET", f"{shim.url}/ui/api/logs/a") as resp:
        assert resp.status_code == 200
        assert resp.headers["content-type"].startswith("text/event-stream")
        events = SSEReader(resp)
        (kind, opened), (_, first) = await events.take(2)
        assert kind == "open" and opened["path"] == str(shim.supervisor.log_path("a"))
        assert first["missing"] is True  # a has never started: no log yet
        assert shim.history is not None
        r = await http.post(f"{shim.url}/v1/chat/completions", json=chat_body("a", "x"))
        assert r.status_code == 200
        lines: list[str] = []
        while not any("/health is now 200" in line for line in lines):
            (_, data), = await events.take(1)
            lines += data["lines"]
        assert lines[0].startswith("--- llmux"), lines  # the supervisor's header, then the engine
    unknown = await http.get(f"{shim.url}/ui/api/logs/nope")
    assert unknown.status_code == 404 and "nope" in unknown.json()["error"]["message"]


async def test_open_log_stream_does_not_hold_the_shutdown(
        shim_factory: ShimFactory, http: httpx.AsyncClient) -> None:
    """uvicorn's graceful shutdown waits for open responses; a page left open must not make
    every stop of the shim take its whole grace period."""
    shim = await shim_factory(["a"])
    async with http.stream("GET", f"{shim.url}/ui/api/logs/a") as resp:
        await SSEReader(resp).take(2)
        t0 = asyncio.get_running_loop().time()
        await asyncio.wait_for(shim.stop(), 20)
        assert asyncio.get_running_loop().time() - t0 < 10


async def test_checkpoint_panel_says_why_it_is_empty(
        shim_factory: ShimFactory, http: httpx.AsyncClient, tmp_path: Path) -> None:
    shim = await shim_factory(["a"])
    body = (await http.get(f"{shim.url}/ui/api/checkpoints")).json()
    assert body["available"] is False and body["checkpoints"] == []
    assert "[checkpoint]" in body["reason"]
    # a host service configured but not there (no model needs it, so the shim runs)
    nowhere = f"unix:path={tmp_path}/no-such-bus"
    shim2 = await shim_factory(["a"], top={"checkpoint": {"bus": nowhere}})
    body = (await http.get(f"{shim2.url}/ui/api/checkpoints")).json()
    assert body["available"] is False
    assert "cannot reach the llmux host service" in body["reason"], body
    assert "no-such-bus" in body["reason"], body


# ------------------------------------------------------------------ the follower's bounds


def test_follower_backlog_appends_partial_lines_and_truncation(tmp_path: Path) -> None:
    path = tmp_path / "m.log"
    f = LogFollower(path, backlog=64, chunk=1024)
    assert f.read().missing
    assert not f.read().missing  # told once
    path.write_bytes(b"".join(b"old line %03d\n" % i for i in range(20)))
    first = f.read()
    # only the file's last 64 bytes, without the cut line at their start
    assert first.lines == ["old line 016", "old line 017", "old line 018", "old line 019"]
    with open(path, "ab") as out:
        out.write(b"new one\nhalf")
    assert f.read().lines == ["new one"]
    with open(path, "ab") as out:
        out.write(b" done\r\nprogress 10%\rprogress 90%\n")
    assert f.read().lines == ["half done", "progress 90%"]
    assert f.read().lines == []
    path.write_bytes(b"after truncation\n")
    again = f.read()
    assert again.reset and again.lines == ["after truncation"]
    os.unlink(path)
    path.write_bytes(b"a new file\n")  # replaced (another inode), longer than the offset
    replaced = f.read()
    assert replaced.reset and replaced.lines == ["a new file"]


def test_follower_skips_ahead_of_a_fast_writer(tmp_path: Path) -> None:
    path = tmp_path / "m.log"
    path.write_bytes(b"")
    f = LogFollower(path, backlog=64, chunk=100)
    assert f.read().lines == []
    with open(path, "ab") as out:
        out.write(b"".join(b"line %04d\n" % i for i in range(100)))  # 1000 bytes
    got = f.read()
    assert got.skipped_bytes == 900
    assert got.lines == [f"line {i:04d}" for i in range(91, 100)]  # line 0090 was cut


def test_history_is_bounded() -> None:
    h = SwitchHistory(limit=5)
    for i in range(12):
        h.observe_transition("a", Action.COLD_START, "cold", 0.1)
        ok = i % 2 == 0
        h.observe_switch(Switch("a", (), BroughtBack("a", WakeKind.COLD, 0.1) if ok else None,
                                0.2, ok, at=0.0, waiting=0))
    assert len(h.switches) == 5 and len(h.lines) == 5
    assert h.seq == 24
    assert [x["seq"] for x in h.lines_since(21)] == [22, 23, 24]


def test_the_page_is_in_the_wheel(tmp_path: Path) -> None:
    """The shim serves the page from its installed package: the wheel must carry it."""
    repo = Path(__file__).resolve().parents[2]
    src = tmp_path / "src"
    src.mkdir()
    for name in ("setup.py", "pyproject.toml", "README.md"):
        shutil.copy(repo / name, src / name)
    for folder in ("common", "client", "shim"):  # what the shim's image builds it from
        shutil.copytree(repo / folder, src / folder,
                        ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    out = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps",
                          "--no-build-isolation", str(src), "-w", str(tmp_path / "dist")],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    (wheel,) = (tmp_path / "dist").glob("llmux-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for name in ("index.html", "ui.js", "ui.css"):
        assert f"llmux/shim/static/{name}" in names, sorted(names)
    assert "llmux/shim/ui.py" in names


async def test_restorable_here_is_llmuxds_answer(builtin_config: Any) -> None:
    """The panel's "restorable here" is what llmuxd's CheckRestore answers for this shim's
    container, with llmuxd's reason; the panel adds only that a model is not its own.
    (The manifest rules themselves: tests/service/test_restorecheck.py.)"""
    from llmux.shim.errors import HostRefused
    from llmux.shim.ui import HostCheckpoints

    class Llmuxd:
        def __init__(self) -> None:
            self.asked: list[str] = []

        async def check_restore(self, model: str) -> str | None:
            self.asked.append(model)
            if model == "c":
                raise HostRefused("host service: restore check of model c failed: "
                                  "org.llmux.Error.AccessDenied: checkpoint 'c' belongs to "
                                  "uid 7", http_status=403, error_type="permission_error")
            return {"a": None,
                    "b": "checkpoint 'b' was dumped by CRIU 3.19; this host runs CRIU 4.2.1"
                    }[model]

    host = Llmuxd()
    panel = HostCheckpoints(builtin_config(["a", "b", "c"]), backend=host)
    assert "no model of that name" in (await panel.why_not_here("zz") or "")
    assert host.asked == []  # not this shim's: llmuxd is not asked
    assert await panel.why_not_here("a") is None
    assert "CRIU 3.19" in (await panel.why_not_here("b") or "")
    assert "uid 7" in (await panel.why_not_here("c") or "")
    assert host.asked == ["a", "b", "c"]
    alone = HostCheckpoints(builtin_config(["a"]))
    assert "no host service" in (await alone.why_not_here("a") or "")
