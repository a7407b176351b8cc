"""The cross-container driver of the demo and of the GPU machine's seed test, on this machine.

packaging/demo/cross_container.py runs the seeds' flow (cold start in A, discard + checkpoint,
A removed, restored in B by /control/wake, again in C by a request alone) in containers made
of namespaces (packaging/demo/nscontainer.py) where podman does not run, as on the GPU
machine. Here it runs with the built-in engine in both kinds, so that the GPU run's
container layer and the demo are exercised in CI; a restore that fell back to a cold start,
or an answer that changed, fails.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

pytestmark = [pytest.mark.criu, pytest.mark.dbus]

REPO = Path(__file__).resolve().parents[2]
DRIVER = REPO / "packaging" / "demo" / "cross_container.py"


@pytest.mark.parametrize("kind", ["ns", pytest.param("podman", marks=pytest.mark.podman)])
def test_checkpoint_restores_in_the_next_container(kind: str, tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("containers and CRIU need root")
    if kind == "podman" and shutil.which("podman") is None:
        pytest.skip("podman is needed (bash packaging/setup-dev.sh)")
    out = tmp_path / "out"
    # a short workdir: the bus socket inside it must stay under dbus-daemon's 99 bytes, which
    # pytest's own tmp_path (/tmp/pytest-of-root/pytest-NN/test_...) may not leave room for
    work = Path(tempfile.mkdtemp(prefix="llmux-e2e-", dir="/var/tmp"))
    try:
        done = subprocess.run(
            [sys.executable, str(DRIVER), "--builtin", "--container", kind, "--out", str(out),
             "--workdir", str(work)],
            capture_output=True, text=True, timeout=600, check=False)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    report = done.stdout + done.stderr
    assert done.returncode == 0, report[-6000:]
    steps = {s["step"]: s for s in json.loads((out / "results.json").read_text())}
    assert all(s["ok"] for s in steps.values()), report[-6000:]
    cold = steps["cold start in A"]["answer"]
    for letter in ("B", "C"):
        assert steps[f"restored in {letter}, not cold-started"]["last_wake"] == "restore"
        assert steps[f"same answer in {letter}"]["answer"] == cold
    assert f"({kind} containers, discard+checkpoint)" in done.stdout
    # nothing of the containers is left: their folders are gone, no engine of the run is left
    assert not list(tmp_path.glob("llmux-ctr-*")), list(tmp_path.iterdir())
