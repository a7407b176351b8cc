"""The operator page's checkpoint panel and switch history against a real llmuxd: a
request for B checkpoints A, the panel lists A's checkpoint (restorable here), and A's
restore is told as one. Real dbus-daemon, llmuxd with CRIU 4.2 and `llmux serve`.
"""

from __future__ import annotations

import json
import os
from typing import Any

import pytest

pytestmark = [pytest.mark.criu, pytest.mark.dbus]

Llmuxd = Any
A, B = "alpha", "beta"


def test_checkpoint_panel_lists_the_host_checkpoint(llmuxd: Llmuxd, start_shim: Any) -> None:
    shim = start_shim(llmuxd.bus.address, {A: "discard+checkpoint", B: "retain+stop"})
    shim.text(A)
    shim.text(B)
    assert shim.model_status(A)["state"] == "checkpointed", shim.log()[-4000:]

    panel = shim.client.get(f"{shim.url}/ui/api/checkpoints").json()
    assert panel["available"] is True and panel["reason"] is None, panel
    host = panel["host"]
    assert host["criu_version"].startswith("4.") and host["kernel_release"] == os.uname().release
    (cp,) = panel["checkpoints"]
    assert cp["model"] == A and cp["size_bytes"] > 0 and cp["created"] > 0, cp
    assert cp["kernel_release"] == os.uname().release and cp["cuda"] is False
    assert cp["restorable"] is True and cp["why_not"] is None, cp

    shim.text(A)
    state = shim.client.get(f"{shim.url}/ui/api/state").json()
    last = state["switches"][-1]
    assert last["from"] == B and last["to"] == A and last["wake"] == "restore", last
    assert state["came_back"][A]["how"] == "restore"
    first = state["switches"][1]
    assert first["from"] == A and first["strategy"] == "discard+checkpoint", state["switches"]
    assert first["sleep_secs"] > 0


def test_a_checkpoint_missing_a_file_is_not_restorable_with_llmuxds_reason(
        llmuxd: Llmuxd, start_shim: Any) -> None:
    """The panel asks llmuxd (CheckRestore) rather than copying its rules: a checkpoint whose
    manifest matches this host but one of whose images is gone is not restorable here, for
    the very reason llmuxd's Restore refuses it."""
    shim = start_shim(llmuxd.bus.address, {A: "discard+checkpoint", B: "retain+stop"})
    shim.text(A)
    shim.text(B)
    assert shim.model_status(A)["state"] == "checkpointed", shim.log()[-4000:]
    manifest = json.loads((llmuxd.state_dir / A / "manifest.json").read_text())
    image = sorted(manifest["image_sizes"])[0]
    (llmuxd.state_dir / A / "images" / image).unlink()

    panel = shim.client.get(f"{shim.url}/ui/api/checkpoints").json()
    assert panel["available"] is True, panel
    (cp,) = panel["checkpoints"]
    assert cp["model"] == A and cp["restorable"] is False, cp
    assert image in cp["why_not"] and "missing" in cp["why_not"], cp
    refused = llmuxd.expect_error("org.llmux.Error.ManifestMismatch", "Restore", "sa{sv}", A, 0)
    assert cp["why_not"] == refused
