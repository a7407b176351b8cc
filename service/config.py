"""llmuxd's configuration: /etc/llmux/llmuxd.toml, flat keys; command-line flags win.

    bus = "system"                 # "system", "session" or a D-Bus address
    state_dir = "/var/lib/llmux/checkpoints"
    criu = "criu"                  # path of the criu binary
    cuda_mode = "api"              # api | binary | plugin | off
    cuda_checkpoint = "cuda-checkpoint"
    cuda_plugin_dir = "/usr/lib/criu/"
    ghost_limit_bytes = 536870912
    network_lock = "auto"          # CRIU's lock of TCP connections: auto | nftables |
                                   # iptables | skip (a checkpoint restores with its own)
    memory_tier_dir = "/dev/shm/llmux-checkpoints"  # a tmpfs folder for images, kept
    memory_tier_limit_bytes = -1       # up to this many bytes (-1: half the memory available
                                       # without the tier; 0: no memory tier)
    criu_timeout_secs = 120.0          # a stuck CRIU is killed after this long (the tree
    criu_timeout_secs_per_gib = 60.0   # thawed), plus this per GiB of images
    log_level = "info"

    [remote]                       # optional: checkpoints also in an object store
    url = "s3://bucket/prefix"     # or "file:///shared/path"
    endpoint_url = ""              # an S3-compatible endpoint (MinIO, Ceph); "" for AWS
    credentials_file = ""          # a root-only AWS credentials file; "" for the AWS chain
    region = ""
    keep_local = true              # a host that downloaded a checkpoint keeps its copy

The schema is DaemonConfig with the core's EngineConfig (service/core/config.py): each
default is written there once. The reader lists every problem with its key.
"""

from __future__ import annotations

import tomllib
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from llmux.common.configschema import Problem, checked, default_of, file_keys, internal, setting
from llmux.service.core.config import EngineConfig, RemoteConfig, one_of

DEFAULT_CONFIG = Path("/etc/llmux/llmuxd.toml")
LOG_LEVELS = ("debug", "info", "warning", "error")


class ConfigError(Exception):
    """A configuration llmuxd refuses; ``problems`` lists every (key, message)."""

    def __init__(self, source: str, problems: list[Problem]) -> None:
        super().__init__(f"{source}: " + "; ".join(message for _key, message in problems))
        self.source = source
        self.problems = problems


@dataclass(frozen=True)
class DaemonConfig:
    bus: str = setting("system")
    """"system", "session" or a D-Bus address."""
    log_level: str = setting("info", check=lambda v: one_of(LOG_LEVELS)(v.lower()))
    engine: EngineConfig = internal(EngineConfig())
    """The core's keys (flat in the file)."""

    @property
    def state_dir(self) -> Path:
        return self.engine.state_dir

    def problems(self) -> list[Problem]:
        return checked(self) + self.engine.problems()


def _convert(name: str, tp: Any, value: Any) -> tuple[Any, Problem | None]:
    """``value`` as the field type wants it (an int is a float too), or why not."""
    if typing.get_origin(tp) is types.UnionType:
        (tp,) = [a for a in typing.get_args(tp) if a is not type(None)]
    want = str if tp is Path else tp
    if want is float and type(value) is int:
        value = float(value)
    if type(value) is not want:
        return None, (name, f"{name} must be a {want.__name__}, not {type(value).__name__}")
    return (Path(value) if tp is Path else value), None


def _section(cls: type, raw: Mapping[str, Any], problems: list[Problem]) -> Any:
    """An instance of the schema ``cls`` from the flat ``raw`` (its keys only); a value
    refused keeps its default, and the problem is listed."""
    hints = typing.get_type_hints(cls)
    values: dict[str, Any] = {}
    for name, f in file_keys(cls).items():
        values[f.name] = default_of(f)
        if name in raw:
            value, problem = _convert(name, hints[f.name], raw[name])
            if problem is None:
                values[f.name] = value
            else:
                problems.append(problem)
    return cls(**values)


def _remote(raw: Any, problems: list[Problem]) -> RemoteConfig | None:
    """The ``[remote]`` table; its problems keyed ``remote.KEY``."""
    if not isinstance(raw, Mapping):
        problems.append(("remote", "remote must be a table ([remote])"))
        return None
    found: list[Problem] = [(f"remote.{k}", f"unknown key 'remote.{k}'")
                            for k in raw if k not in file_keys(RemoteConfig)]
    for key, f in file_keys(RemoteConfig).items():
        if f.metadata.get("required") and key not in raw:
            found.append((f"remote.{key}", f"remote.{key} is missing "
                                           f"({f.metadata['required']})"))
    section: list[Problem] = []
    remote: RemoteConfig = _section(RemoteConfig, raw, section)
    found += [(f"remote.{key}", f"remote.{why}") for key, why in section]
    problems += found
    return remote if not found else None


def read_config(raw: Mapping[str, Any], source: str) -> DaemonConfig:
    """The configuration in ``raw`` (a parsed llmuxd.toml, the flags merged in); raises
    ConfigError listing every problem found."""
    known = file_keys(DaemonConfig).keys() | file_keys(EngineConfig).keys() | {"remote"}
    problems: list[Problem] = [(k, f"unknown key {k!r}") for k in raw if k not in known]
    engine: EngineConfig = _section(EngineConfig, raw, problems)
    if "remote" in raw:
        engine = replace(engine, remote=_remote(raw["remote"], problems))
    config: DaemonConfig = replace(_section(DaemonConfig, raw, problems), engine=engine)
    problems += config.problems()
    if problems:
        raise ConfigError(source, problems)
    return config


def load_config(path: Path | None, flags: Mapping[str, Any] | None = None) -> DaemonConfig:
    """Built-in defaults < the file at ``path`` (DEFAULT_CONFIG if None and present) <
    ``flags`` (file keys: the command line's, None for not given)."""
    values: dict[str, Any] = {}
    if path is None and DEFAULT_CONFIG.exists():
        path = DEFAULT_CONFIG
    if path is not None:
        try:
            values = tomllib.loads(path.read_text())
        except OSError as exc:
            raise ConfigError(str(path), [("", f"cannot read: {exc.strerror}")]) from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(str(path), [("", f"not valid TOML: {exc}")]) from None
    values.update({k: v for k, v in (flags or {}).items() if v is not None})
    return read_config(values, str(path) if path is not None else "the command line")
