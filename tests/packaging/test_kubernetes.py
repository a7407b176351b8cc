"""The Kubernetes manifests (packaging/kubernetes/) validated offline: every object against
the Kubernetes API's JSON schemas (strict: an unknown field is an error) bundled in
kubernetes-validate (PyPI), for the oldest and newest Kubernetes releases they target;
the configurations they carry read by llmuxd's and the shim's own readers; and what the
deployment depends on (llmuxd: hostPID, privileged, the state directory and the system
bus socket from the host; the shim: unprivileged, the same socket, host PID/network/IPC)
checked by name, so that an edit cannot drop it silently.
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from llmux.service.config import read_config
from llmux.shim.config import load_config

REPO = Path(__file__).resolve().parents[2]
MANIFESTS = REPO / "packaging" / "kubernetes"
VERSIONS = ("1.29.0", "1.37.0")


def documents() -> list[tuple[str, dict[str, Any]]]:
    found = []
    for path in sorted(MANIFESTS.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc is not None:
                found.append((f"{path.name}:{doc['kind']}/{doc['metadata']['name']}", doc))
    return found


def by_kind(kind: str, name: str) -> dict[str, Any]:
    [doc] = [d for _, d in documents() if d["kind"] == kind and d["metadata"]["name"] == name]
    return doc


def test_the_manifests_are_there() -> None:
    kinds = sorted(f"{d['kind']}/{d['metadata']['name']}" for _, d in documents())
    assert kinds == ["ConfigMap/llmux-shim-config", "ConfigMap/llmuxd-config",
                     "DaemonSet/llmux-shim", "DaemonSet/llmuxd", "Namespace/llmux",
                     "Secret/llmux-store-credentials", "Service/llmux"]


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("name,doc", documents(), ids=[n for n, _ in documents()])
def test_each_object_validates_against_the_kubernetes_schema(
    name: str, doc: dict[str, Any], version: str
) -> None:
    try:
        kubernetes_validate.validate(doc, version, strict=True)
    except kubernetes_validate.ValidationError as exc:
        pytest.fail(f"{name} is not a valid {doc['kind']} for Kubernetes {version}: "
                    f"{'.'.join(str(p) for p in exc.path)}: {exc.message}")


def test_the_validator_refuses_what_kubernetes_would() -> None:
    """The check can fail: a misspelt field and a wrong type are refused."""
    daemonset = by_kind("DaemonSet", "llmuxd")
    bad = yaml.safe_load(yaml.safe_dump(daemonset))
    bad["spec"]["template"]["spec"]["hostPid"] = True
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, VERSIONS[-1], strict=True)
    bad = yaml.safe_load(yaml.safe_dump(daemonset))
    bad["spec"]["template"]["spec"]["hostPID"] = "yes"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, VERSIONS[-1], strict=True)


def pod(kind: str, name: str) -> dict[str, Any]:
    spec: dict[str, Any] = by_kind(kind, name)["spec"]["template"]["spec"]
    return spec


def mounts(spec: dict[str, Any], container: str) -> dict[str, str]:
    """Each mount path of ``container`` to the host path (or other source) behind it."""
    volumes = {v["name"]: v for v in spec["volumes"]}
    [c] = [c for c in spec["containers"] if c["name"] == container]
    out = {}
    for m in c["volumeMounts"]:
        v = volumes[m["name"]]
        out[m["mountPath"]] = v["hostPath"]["path"] if "hostPath" in v else m["name"]
    return out


def test_llmuxd_is_a_privileged_host_pid_daemonset_with_the_hosts_state_and_bus() -> None:
    spec = pod("DaemonSet", "llmuxd")
    assert spec["hostPID"] is True
    [c] = spec["containers"]
    assert c["securityContext"]["privileged"] is True
    seen = mounts(spec, "llmuxd")
    assert seen["/var/lib/llmux"] == "/var/lib/llmux", "the state directory is the host's"
    assert seen["/run/dbus"] == "/run/dbus", "the host's system bus socket"
    assert seen["/sys/fs/cgroup"] == "/sys/fs/cgroup"
    config = by_kind("ConfigMap", "llmuxd-config")["data"]["llmuxd.toml"]
    parsed = read_config(tomllib.loads(config), "llmuxd-config")
    assert parsed.state_dir == Path("/var/lib/llmux/checkpoints")
    remote = parsed.engine.remote
    assert remote is not None and remote.url.startswith("s3://")
    assert Path(remote.credentials_file).parent.as_posix() in seen
    secret_volume = next(v for v in spec["volumes"] if v["name"] == "store-credentials")
    assert secret_volume["secret"]["defaultMode"] == 0o400, "credentials must be root-only"


def test_the_shim_is_unprivileged_and_reaches_llmuxd_over_the_same_socket(
    tmp_path: Path,
) -> None:
    spec = pod("DaemonSet", "llmux-shim")
    assert spec["hostPID"] and spec["hostNetwork"] and spec["hostIPC"]
    [c] = spec["containers"]
    assert c["securityContext"]["privileged"] is False
    assert c["securityContext"]["allowPrivilegeEscalation"] is False
    assert "capabilities" not in c["securityContext"]
    assert mounts(spec, "shim")["/run/dbus/system_bus_socket"] == "/run/dbus/system_bus_socket"
    text = by_kind("ConfigMap", "llmux-shim-config")["data"]["config.toml"]
    (tmp_path / "config.toml").write_text(text)
    config = load_config(tmp_path / "config.toml")
    assert config.checkpoint is not None and config.checkpoint.bus == "system"
    port = c["ports"][0]["containerPort"]
    assert config.port == port == c["readinessProbe"]["httpGet"]["port"]
    service = by_kind("Service", "llmux")
    assert service["spec"]["selector"] == by_kind("DaemonSet", "llmux-shim")["spec"][
        "selector"]["matchLabels"]
