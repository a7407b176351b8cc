"""``llmux checkpoints --explain NAME`` against a real llmuxd (ExplainCheckpoint on the
private system-style bus, the project's policy) and a real CRIU checkpoint.

The operator's command reads what only root may read (the images) through llmuxd: the
answer must account for every byte of the pages images, name the target's 32 MiB
ballast as a large anonymous block, and refuse what the other commands refuse.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from xml.etree import ElementTree

import pytest

from tests.client.test_opscli import NOBODY, error_of, llmux
from tests.support.llmuxd_harness import BUS_NAME, OBJECT_PATH, Llmuxd, Target

pytestmark = [pytest.mark.dbus, pytest.mark.criu]

LARGE = "anonymous >= 1 MiB (large allocations: tensors, arrays)"


def test_explain_is_introspectable(llmuxd: Llmuxd) -> None:
    xml = llmuxd.busctl("--xml-interface", "introspect", BUS_NAME, OBJECT_PATH)
    assert xml.rc == 0, xml.stderr
    (method,) = [m for i in ElementTree.fromstring(xml.stdout).iter("interface")
                 if i.get("name") == BUS_NAME for m in i.iter("method")
                 if m.get("name") == "ExplainCheckpoint"]
    args = [(a.get("type"), a.get("direction", "in")) for a in method.iter("arg")]
    assert args == [("s", "in"), ("s", "out")]


def test_checkpoints_explain(llmuxd: Llmuxd, spawn_counter: Callable[..., Target]) -> None:
    address = llmuxd.bus.address
    target = spawn_counter(megabytes=32)
    proc = llmux("checkpoint", "explained", "--pid", str(target.pid), "--leave-running",
                 "--bus", address)
    assert proc.returncode == 0, proc.stderr

    proc = llmux("checkpoints", "--explain", "explained", "--bus", address, "--json")
    assert proc.returncode == 0, proc.stderr
    b = json.loads(proc.stdout)
    assert b["model"] == "explained"
    [p] = b["processes"]
    assert p["pid"] == target.pid
    images = llmuxd.state_dir / "explained" / "images"
    pages = sum(f.stat().st_size for f in images.glob("pages-*.img"))
    assert sum(q["stored_bytes"] for q in p["parts"]) == pages
    [large] = [q for q in p["parts"] if q["kind"] == LARGE]
    assert large["stored_bytes"] >= 32 << 20
    assert large["zero_bytes"] < 1 << 20, "the ballast is 0xa5, not zeros"
    assert large["duplicate_bytes"] >= 31 << 20, "one page, repeated (the ends differ)"

    text = llmux("checkpoints", "--explain", "explained", "--bus", address)
    assert text.returncode == 0, text.stderr
    print(text.stdout)
    assert "All processes:" in text.stdout and f"PID {target.pid} (python" in text.stdout
    assert re.search(r"^anonymous >= 1 MiB .*\s+3\d\.\d MiB\s", text.stdout, re.M), text.stdout
    assert "Duplicate pages:" in text.stdout
    # the same answer over busctl, as root on the host
    [answer] = llmuxd.ok("ExplainCheckpoint", "s", "explained")
    assert json.loads(answer) == b

    # refusals: a usage error before any call, the service's named errors
    assert llmux("checkpoints", "--explain", "../etc", "--bus", address).returncode == 2
    missing = llmux("checkpoints", "--explain", "nothing-here", "--bus", address)
    assert missing.returncode == 1 and error_of(missing) == "org.llmux.Error.NotFound"
    denied = llmux("checkpoints", "--explain", "explained", "--bus", address, user=NOBODY)
    assert denied.returncode == 1 and "AccessDenied" in error_of(denied)
    bare = llmux("checkpoints", "--bus", address)
    assert bare.returncode == 2 and "--explain NAME" in bare.stderr
