"""The manifest: what a checkpoint holds and the conditions it was taken under.

Written last into a checkpoint directory (its presence marks a complete checkpoint), read
at start-up, and compared against the host before a restore so that a mismatch gives a
precise error instead of CRIU's.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, fields
from typing import Any

from llmux.common.contract import CheckpointInfo
from llmux.common.errors import ManifestMismatch
from llmux.service.core.criu import NETWORK_LOCKS
from llmux.service.core.upperfiles import SavedFile

FORMAT = 1


@dataclass(frozen=True)
class ExternalMountRecord:
    key: str
    mount_point: str


@dataclass(frozen=True)
class Manifest:
    model: str
    owner: str
    """The owner's user name (or uid as text when it has none)."""
    owner_uid: int
    root_pid: int
    pids: list[int]
    """Every process of the tree, root first."""
    cuda_pids: list[int]
    criu_version: str
    kernel_release: str
    driver_version: str
    created: float
    """Unix time at the end of the dump."""
    tids: list[int] = field(default_factory=list)
    """Every thread ID of the tree: all must be free for a restore."""
    rootfs: dict[str, Any] = field(default_factory=lambda: {"kind": "host"})
    """Identity of the source container's filesystem (kind, lower layers)."""
    foreign_mntns: bool = False
    shell_job: bool = False
    external_mounts: list[ExternalMountRecord] = field(default_factory=list)
    source_cgroups: str = ""
    images_bytes: int = 0
    files_bytes: int = 0
    """What the saved files take: their holes (most of vLLM's /dev/shm rings) take nothing."""
    expected_bytes: int = 0
    zero_bytes_dropped: int = 0
    """All-zero pages taken out of the images after the dump (a restore leaves them zero)."""
    dump_seconds: float = 0.0
    """CRIU's dump alone."""
    cuda_seconds: float = 0.0
    total_seconds: float = 0.0
    leave_running: bool = False
    listen_ports: list[int] = field(default_factory=list)
    """TCP ports the tree listened on: each must be free for a restore."""
    external_files: list[str] = field(default_factory=list)
    """Regular files the tree had open or mapped that the checkpoint does not carry."""
    files: list[SavedFile] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    """What went wrong after the dump without losing it (e.g. a file not saved)."""
    image_sizes: dict[str, int] = field(default_factory=dict)
    """CRIU's image files and their sizes at commit: a truncated, missing or replaced image
    is refused before CRIU reads it (empty in checkpoints of older versions)."""
    compat: dict[str, str] = field(default_factory=dict)
    """What the restoring host must match (compat.py: kernel, CPU features, CRIU, GPU model
    and driver, the container image), checked before a remote checkpoint is downloaded."""
    pid_namespace: bool = False
    """The root is the init of a PID namespace of the tree's own: CRIU restores it into a
    fresh one, so any PIDs do (the PIDs above are the dump's host PIDs)."""
    inner_pids: list[int] = field(default_factory=list)
    """With pid_namespace: each process's PID inside it, in the order of ``pids``."""
    net_namespace: bool = False
    """The tree has a network namespace of its own (owned by its user namespace): its
    listening ports are its own, free wherever it restores, and its TCP connections
    restore by TCP repair."""
    network_lock: str = ""
    """CRIU's --network-lock at the dump (criu.NETWORK_LOCKS): CRIU unlocks the restore by
    the same method, which the restoring host must have; "" in checkpoints of older
    versions (iptables where the dumping host had iptables-restore, else skip)."""
    gpus: list[int] = field(default_factory=list)
    """The GPUs the tree's CUDA state is on, in the caller's numbering, as the caller said
    at the dump (the shim's placement): where its restore comes back unless moved."""
    format: int = FORMAT

    @property
    def size_bytes(self) -> int:
        return self.images_bytes + self.files_bytes

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name == "files":
                value = [s.to_dict() for s in value]
            elif f.name == "external_mounts":
                value = [{"key": e.key, "mount_point": e.mount_point} for e in value]
            out[f.name] = value
        out["size_bytes"] = self.size_bytes
        return out

    def info(self, location: str = "local") -> CheckpointInfo:
        """What the checkpoint's D-Bus object shows (contract.CheckpointInfo)."""
        return CheckpointInfo(
            model=self.model,
            owner=self.owner,
            root_pid=self.root_pid,
            pids=list(self.pids),
            created=self.created,
            size_bytes=self.size_bytes,
            dump_seconds=self.dump_seconds,
            criu_version=self.criu_version,
            kernel_release=self.kernel_release,
            driver_version=self.driver_version,
            cuda_pids=list(self.cuda_pids),
            gpus=list(self.gpus),
            manifest=self.to_json(),
            listen_ports=list(self.listen_ports),
            location=location,
        )

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Manifest:
        if not isinstance(data, dict):
            raise ManifestMismatch("manifest is not a JSON object")
        fmt = data.get("format", FORMAT)
        if fmt != FORMAT:
            raise ManifestMismatch(
                f"manifest format {fmt} is not supported (this service: {FORMAT})"
            )
        known = {f.name for f in fields(cls)}
        kwargs = {k: v for k, v in data.items() if k in known}
        try:
            kwargs["files"] = [SavedFile.from_dict(d) for d in data.get("files", [])]
            kwargs["external_mounts"] = [
                ExternalMountRecord(key=str(d["key"]), mount_point=str(d["mount_point"]))
                for d in data.get("external_mounts", [])
            ]
            manifest = cls(**kwargs)
        except (TypeError, KeyError, ValueError) as exc:
            raise ManifestMismatch(f"manifest is malformed: {exc}") from exc
        manifest._validate()
        return manifest

    @classmethod
    def from_json(cls, text: str) -> Manifest:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ManifestMismatch(f"manifest is not valid JSON: {exc}") from exc
        return cls.from_dict(data)

    def _validate(self) -> None:
        ints = [self.root_pid, *self.pids, *self.tids, *self.cuda_pids]
        if not all(isinstance(p, int) and not isinstance(p, bool) and p > 0 for p in ints):
            raise ManifestMismatch("manifest has invalid PIDs")
        if not self.pids or self.pids[0] != self.root_pid:
            raise ManifestMismatch("manifest's PID list does not start with its root PID")
        if not all(isinstance(g, int) and not isinstance(g, bool) and g >= 0
                   for g in self.gpus):
            raise ManifestMismatch("manifest has invalid GPU indices")
        if not all(isinstance(k, str) and "/" not in k and isinstance(v, int)
                   for k, v in self.image_sizes.items()):
            raise ManifestMismatch("manifest has invalid image sizes")
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in self.compat.items()):
            raise ManifestMismatch("manifest has invalid compatibility fields")
        if self.network_lock not in ("", *NETWORK_LOCKS):
            raise ManifestMismatch(
                f"manifest has an unknown network_lock {str(self.network_lock)[:40]!r}")
