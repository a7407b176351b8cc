"""The core's part of llmuxd's configuration: the schema of its keys, defaults written
once (as the fields' defaults), and the rules on their values.

service/config.py reads llmuxd.toml into it (the keys are flat there, some named
otherwise: ``criu``, ``cuda_checkpoint``); CheckpointEngine.open checks it again, for a
config built in code.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from llmux.common.configschema import Check, Problem, checked, internal, setting
from llmux.common.contract import DEFAULT_STATE_DIR
from llmux.service.core.criu import AUTO as AUTO_LOCK
from llmux.service.core.criu import NETWORK_LOCKS
from llmux.service.core.cuda import DEFAULT_BINARY, MODES
from llmux.service.core.memtier import AUTO

DEFAULT_MEMORY_TIER_DIR = Path("/dev/shm/llmux-checkpoints")


def _positive(v: float) -> str | None:
    return None if math.isfinite(v) and v > 0 else f"must be positive: {v}"


def _limit(v: int) -> str | None:
    return None if v >= AUTO else f"must be >= 0, or {AUTO} for the automatic ceiling: {v}"


def _not_negative(v: float) -> str | None:
    return None if math.isfinite(v) and v >= 0 else f"must be >= 0: {v}"


def one_of(choices: tuple[str, ...]) -> Check:
    return lambda v: None if v in choices else f"must be one of {', '.join(choices)}"


def _store_url(v: str) -> str | None:
    if v.startswith("s3://") and len(v) > 5 and not v[5:].startswith("/"):
        return None
    if v.startswith("file:///"):
        return None
    return f"must be s3://BUCKET[/PREFIX] or file:///PATH, not {v!r}"


@dataclass(frozen=True)
class RemoteConfig:
    """``[remote]`` of llmuxd.toml: checkpoints also kept in an object store (remote.py)."""

    url: str = setting("", required="the store's URL (s3://BUCKET/PREFIX or file:///PATH)",
                       check=_store_url)
    endpoint_url: str = setting("")
    """An S3-compatible endpoint (MinIO, Ceph, ...); "" for AWS's own."""
    credentials_file: str = setting("")
    """A root-only AWS shared-credentials file; "" for the standard chain (environment,
    ~/.aws, the instance role)."""
    keep_local: bool = setting(True)
    """Whether a host that downloaded a checkpoint to restore it keeps the local copy."""
    region: str = setting("")


@dataclass(frozen=True)
class EngineConfig:
    state_dir: Path = setting(Path(DEFAULT_STATE_DIR))
    criu_path: str = setting("criu", key="criu")
    """The criu binary: a path, or a name looked up on PATH."""
    cuda_mode: str = setting("api", check=one_of(MODES))
    """"api" | "binary" | "plugin" | "off"."""
    cuda_checkpoint_path: str = setting(DEFAULT_BINARY, key="cuda_checkpoint")
    cuda_plugin_dir: str = setting("/usr/lib/criu/")
    ghost_limit_bytes: int = setting(512 << 20, check=_positive)
    network_lock: str = setting(AUTO_LOCK, check=one_of((AUTO_LOCK, *NETWORK_LOCKS)))
    """How CRIU keeps packets away from the tree's TCP connections while it dumps or
    restores them: "auto" (nftables where this host's CRIU and kernel can, else iptables
    where iptables-restore is installed, else skip), or one of them by name. A checkpoint
    records its method; its restore uses the same one."""
    memory_tier_dir: Path | None = setting(DEFAULT_MEMORY_TIER_DIR)
    """A tmpfs folder for checkpoint images (the memory tier); see memory_tier_limit_bytes.
    None: no folder (then the limit must be 0)."""
    memory_tier_limit_bytes: int = setting(AUTO, check=_limit)
    """Most bytes of images in the memory tier; -1 (the default): half of the memory that
    would be available without the tier, and never below the reserve (memtier.py); 0: no
    memory tier. A dump that fits goes there and stays for the restores to come, a durable
    copy written to disk behind it; the oldest memory copies are dropped when memory is
    needed."""
    drop_zero_pages: bool = setting(True)
    """Behind each dump, take the all-zero pages of private anonymous memory out of the
    images (zeropages.py): a restore leaves them zero without reading them. The pass runs
    after the dump's job has answered and gives way to restores, so the eviction does not
    wait for it; a restore that comes first reads the whole image. False: images as CRIU
    wrote them."""
    prefetch_threads: int = internal(0)
    """Readers that bring a checkpoint's page images into the page cache during a restore;
    0: only ask the kernel to read ahead (POSIX_FADV_WILLNEED). Measured on the H200
    machine, 8 readers made an 8 GB restore slower (13.0 s against 10.7 s), so 0 it is."""
    criu_timeout_secs: float = setting(120.0, check=_positive)
    """A CRIU run is killed after this long, plus criu_timeout_secs_per_gib for each GiB
    of images it writes or reads: a stuck CRIU holds the tree frozen."""
    criu_timeout_secs_per_gib: float = setting(60.0, check=_not_negative)
    remote: RemoteConfig | None = internal(None)
    """The remote store (``[remote]``), None: checkpoints stay on this host."""

    def criu_bound_secs(self, nbytes: int) -> float:
        return self.criu_timeout_secs + self.criu_timeout_secs_per_gib * nbytes / (1 << 30)

    def problems(self) -> list[Problem]:
        """Every value refused, as (key, message): the rules, written once."""
        found = checked(self)
        if self.remote is not None:
            found += [(f"remote.{key}", f"remote.{why}") for key, why in checked(self.remote)]
        if self.memory_tier_limit_bytes > 0 and self.memory_tier_dir is None:
            found.append(("memory_tier_dir", "memory_tier_limit_bytes needs memory_tier_dir"))
        return found
