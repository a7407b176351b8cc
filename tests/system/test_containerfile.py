"""packaging/Containerfile, built and run with podman on a stand-in for the vLLM image.

No container registry is reachable here, so ``FROM vllm/vllm-openai`` is replaced by a local
image made from the cached Debian 12 tree plus python3-pip (what the Containerfile needs of
its base: python3 with pip). Everything else is the file as shipped, and the container runs
with the README's flags (host PID, network and IPC namespaces; no --privileged, no --init),
serving the built-in engine.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.support.procs import free_ports, wait_until
from tests.support.systemtest import REPO, Overlay, run

pytestmark = [pytest.mark.podman]

HOST_CA_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")


@pytest.fixture(scope="session")
def stand_in_base(debian_rootfs: Path, tmp_path_factory: pytest.TempPathFactory) -> str:
    """localhost/llmux-standin-vllm:<tree key>: the tree plus python3-pip, built once."""
    image = f"localhost/llmux-standin-vllm:{debian_rootfs.parent.name}"
    if run(["podman", "image", "exists", image], check=False).returncode == 0:
        return image
    ov = Overlay(debian_rootfs, tmp_path_factory.mktemp("standin"))
    ov.mount()
    try:
        shutil.copy("/etc/resolv.conf", ov.merged / "etc/resolv.conf")
        ov.chroot("sh", "-c", "apt-get update -qq && apt-get install -y -qq "
                  "--no-install-recommends python3-pip >/dev/null")
        (ov.merged / "etc/resolv.conf").write_text("")
        tar = subprocess.Popen(["tar", "-C", str(ov.merged), "-c", "."],
                               stdout=subprocess.PIPE)
        imported = subprocess.run(["podman", "import", "-", image], stdin=tar.stdout,
                                  capture_output=True, text=True, timeout=600)
        assert tar.stdout is not None
        tar.stdout.close()
        assert tar.wait() == 0 and imported.returncode == 0, imported.stderr
    finally:
        ov.unmount()
    return image


@pytest.fixture(scope="module")
def shim_image(stand_in_base: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The Containerfile as shipped, FROM the stand-in, built from the files it copies."""
    context = tmp_path_factory.mktemp("context")
    for name in ("pyproject.toml", "setup.py", "common", "client", "shim"):
        source = REPO / name
        if source.is_dir():
            shutil.copytree(source, context / name,
                            ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
        else:
            shutil.copy(source, context / name)
    readme = REPO / "README.md"
    (context / "README.md").write_text(readme.read_text() if readme.exists() else "# llmux\n")
    (context / "packaging/examples").mkdir(parents=True)
    shutil.copy(REPO / "packaging/examples/shim.toml", context / "packaging/examples")
    text = (REPO / "packaging/Containerfile").read_text()
    text, replaced = re.subn(r"^FROM docker\.io/vllm/vllm-openai:\$\{VLLM_TAG\}$",
                             f"FROM {stand_in_base}", text, flags=re.M)
    assert replaced == 1, "the Containerfile's FROM line changed; update this test"
    (context / "Containerfile").write_text(text)
    image = f"localhost/llmux-shim-test:{uuid.uuid4().hex[:8]}"
    # The build's pip trusts what the host trusts (a TLS-inspecting egress proxy, say).
    volumes = ["-v", f"{HOST_CA_BUNDLE}:{HOST_CA_BUNDLE}:ro"] if HOST_CA_BUNDLE.exists() else []
    started = time.monotonic()
    run(["podman", "build", "--runtime", "runc", "--network=host", *volumes, "-t", image,
         "-f", str(context / "Containerfile"), str(context)], timeout=900)
    print(f"\n[system] built {image} in {time.monotonic() - started:.1f} s")
    try:
        yield image
    finally:
        run(["podman", "rmi", "-f", image], check=False)


def test_image_validates_its_default_config(shim_image: str) -> None:
    proc = run(["podman", "run", "--rm", "--runtime", "runc", "--entrypoint", "llmux",
                shim_image, "validate-config", "--config", "/etc/llmux/config.toml"])
    assert proc.stdout.startswith("OK: /etc/llmux/config.toml")


def test_image_serves_with_the_readme_flags(shim_image: str, tmp_path: Path) -> None:
    port, engine_port = free_ports(2)
    config = tmp_path / "config.toml"
    config.write_text(
        f'host = "127.0.0.1"\nport = {port}\nmetrics_port = 0\n'
        f'[models.tiny]\nmodel_path = "llmux-test/tiny"\nport = {engine_port}\n'
        'engine = "builtin"\nweights_mb = 4\n'
    )
    name = f"llmux-shim-{uuid.uuid4().hex[:8]}"
    # The README's run command, less the GPU and the bus socket (not needed by this config).
    run(["podman", "run", "-d", "--name", name, "--runtime", "runc",
         "--pid=host", "--network=host", "--ipc=host",
         "-e", "LLMUX_BUILTIN_BACKEND=pure",
         "-v", f"{config}:/etc/llmux/config.toml:ro", shim_image])
    pids: list[int] = []
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(f"{base}/control/status", timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            logs = run(["podman", "logs", name], check=False)
            assert time.monotonic() < deadline, f"the shim never answered:\n{logs.stderr}"
            time.sleep(0.5)
        reply = httpx.post(f"{base}/v1/chat/completions", timeout=120, json={
            "model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3})
        assert reply.status_code == 200, reply.text
        assert reply.json()["model"] == "tiny"
        status = httpx.get(f"{base}/control/status", timeout=10).json()
        assert status["active"] == "tiny"
        pids = status["models"]["tiny"]["pids"]
        # --pid=host: the engine's PIDs are the host's own
        for pid in pids:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ")
            assert b"python" in cmdline, cmdline
        entrypoint = run(["podman", "image", "inspect", "-f", "{{json .Config.Entrypoint}}",
                          shim_image]).stdout
        assert json.loads(entrypoint) == ["llmux", "serve", "--config", "/etc/llmux/config.toml"]
    finally:
        run(["podman", "rm", "-f", "-t", "20", name], check=False, timeout=120)
    for pid in pids:  # the shim stopped its engines when the container stopped
        wait_until(lambda pid=pid: not os.path.exists(f"/proc/{pid}"), 30,
                   f"engine PID {pid} to end with its container", interval=0.2)
        assert not os.path.exists(f"/proc/{pid}"), f"engine PID {pid} outlived its container"
