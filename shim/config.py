"""Typed shim configuration, loaded and validated once at start-up.

TOML is the native format; the original (Rust) llmux JSON config is accepted
unchanged. Validation collects every problem with its key path instead of
stopping at the first, so an operator fixes a file in one pass.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any, TypeVar

from llmux.service.contract import valid_model_name
from llmux.shim.errors import ConfigError

if sys.version_info >= (3, 11):  # noqa: UP036  (tomli is the fallback the card names)
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


class WeightStrategy(StrEnum):
    RETAIN = "retain"
    OFFLOAD = "offload"
    DISCARD = "discard"


class ProcessStrategy(StrEnum):
    KEEP_RUNNING = "keep_running"
    CUDA_SUSPEND = "cuda_suspend"
    CHECKPOINT = "checkpoint"
    STOP = "stop"


class EngineKind(StrEnum):
    VLLM = "vllm"
    BUILTIN = "builtin"


#: Process strategies that are carried out by the host service (llmuxd).
HOST_STRATEGIES = frozenset({ProcessStrategy.CUDA_SUSPEND, ProcessStrategy.CHECKPOINT})


@dataclass(frozen=True)
class EvictionPolicy:
    weights: WeightStrategy = WeightStrategy.RETAIN
    process: ProcessStrategy = ProcessStrategy.STOP

    def __str__(self) -> str:
        return f"{self.weights}+{self.process}"

    @property
    def needs_host(self) -> bool:
        return self.process in HOST_STRATEGIES

    @classmethod
    def parse(cls, text: str) -> EvictionPolicy:
        """``"offload+keep_running"`` form, as the original's --eviction flag."""
        weights, sep, process = text.partition("+")
        if not sep:
            raise ValueError(f"expected WEIGHTS+PROCESS, got {text!r}")
        return cls(WeightStrategy(weights.strip()), ProcessStrategy(process.strip()))


@dataclass(frozen=True)
class ModelConfig:
    name: str
    model_path: str
    port: int
    engine: EngineKind = EngineKind.VLLM
    weights_mb: int = 64
    extra_args: tuple[str, ...] = ()
    eviction: EvictionPolicy = EvictionPolicy()
    checkpoint_path: Path | None = None
    #: argv prefix replacing the engine's default command (never run through a shell)
    command: tuple[str, ...] | None = None
    env: Mapping[str, str] = field(default_factory=dict)
    startup_timeout_secs: float = 1800.0
    #: run the engine with vLLM's sleep mode; None: exactly when the eviction uses it
    sleep_mode_override: bool | None = None
    #: bound on the one-token completion that proves an engine ready after each start
    probe_timeout_secs: float = 60.0

    @property
    def tensor_parallel_size(self) -> int:
        return _tensor_parallel_size(self.extra_args)

    @property
    def sleep_mode(self) -> bool:
        """Pass --enable-sleep-mode? vLLM refuses it where the platform has none (CPU), so
        only engines whose eviction sleeps (offload, discard) get it, unless overridden."""
        if self.sleep_mode_override is not None:
            return self.sleep_mode_override
        return self.eviction.weights is not WeightStrategy.RETAIN


@dataclass(frozen=True)
class PolicyConfig:
    policy_type: str = "fifo"
    request_timeout_secs: float = 300.0
    drain_before_switch: bool = True
    eviction: EvictionPolicy = EvictionPolicy()
    min_active_secs: float = 5.0
    #: the original's tuning knobs for its other policies; kept, not used by fifo
    extras: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class CheckpointConfig:
    #: where the host service listens: "system", "session" or a D-Bus address
    bus: str = "system"
    keep_images: bool = True
    # The original ran CRIU itself; these are accepted for compatibility and
    # passed on as hints. The host service owns its own CRIU configuration.
    criu_path: str = "criu"
    cuda_plugin_dir: str = "/usr/lib/criu/"
    images_dir: Path = Path("/tmp/llmux-checkpoints")
    cuda_checkpoint_path: str = "cuda-checkpoint"
    #: seconds a host job (dump/restore) may take before the shim gives up waiting
    job_timeout_secs: float = 1800.0


@dataclass(frozen=True)
class Config:
    models: Mapping[str, ModelConfig]
    policy: PolicyConfig = PolicyConfig()
    host: str = "0.0.0.0"
    port: int = 3000
    #: a separate Prometheus port; 0 disables it (/metrics on the proxy port stays)
    metrics_port: int = 9090
    admin_port: int | None = None
    vllm_command: str = "vllm"
    checkpoint: CheckpointConfig | None = None
    startup_timeout_secs: float = 1800.0
    warmup: bool = False
    #: models allowed on the GPU at once
    max_active: int = 1
    #: request bodies above this are refused with 413 before any engine sees them
    max_body_bytes: int = 16 << 20
    #: per-model engine logs (stdout/stderr) are written here
    log_dir: Path = Path("/tmp/llmux-logs")
    source: str = "<memory>"

    @property
    def needs_host(self) -> bool:
        return any(m.eviction.needs_host for m in self.models.values())


# --------------------------------------------------------------------------- loading


def load_config(path: str | os.PathLike[str]) -> Config:
    """Read a TOML or JSON config file; raise ConfigError listing every problem."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigError([("", f"cannot read {p}: {e.strerror}")], source=str(p)) from e
    return parse_config(text, source=str(p), fmt=_format_of(p, text))


def _format_of(path: Path, text: str) -> str:
    if path.suffix.lower() == ".json":
        return "json"
    if path.suffix.lower() == ".toml":
        return "toml"
    return "json" if text.lstrip().startswith("{") else "toml"


def parse_config(text: str, *, source: str = "<string>", fmt: str = "toml") -> Config:
    try:
        raw: Any = json.loads(text) if fmt == "json" else tomllib.loads(text)
    except (json.JSONDecodeError, tomllib.TOMLDecodeError) as e:
        raise ConfigError([("", f"not valid {fmt.upper()}: {e}")], source=source) from e
    return config_from_dict(raw, source=source)


def config_from_dict(raw: Any, *, source: str = "<dict>") -> Config:
    v = _Validator()
    cfg = v.config(raw, source)
    if v.problems or cfg is None:
        raise ConfigError(v.problems, source=source)
    return cfg


T = TypeVar("T")

_TOP_KEYS = {
    "models", "policy", "host", "port", "metrics_port", "admin_port", "vllm_command",
    "checkpoint", "startup_timeout_secs", "warmup", "max_active", "max_body_bytes", "log_dir",
}
_MODEL_KEYS = {
    "model_path", "port", "engine", "weights_mb", "extra_args", "eviction", "checkpoint_path",
    "command", "env", "startup_timeout_secs", "sleep_mode", "probe_timeout_secs",
}
_POLICY_KEYS = {"policy_type", "request_timeout_secs", "drain_before_switch", "eviction",
                "min_active_secs"}
_POLICY_EXTRA_KEYS = {"coalesce_window_ms", "amortization_factor", "max_wait_secs",
                      "tick_interval_ms", "min_quantum_ms"}
_CHECKPOINT_KEYS = {"bus", "keep_images", "criu_path", "cuda_plugin_dir", "images_dir",
                    "cuda_checkpoint_path", "job_timeout_secs", "object_store"}
_POLICY_TYPES = {"fifo"}
_ORIGINAL_POLICY_TYPES = {"cost_aware", "time_slice"}
_TP_SAFE_FLAGS = ("--enforce-eager", "--disable-custom-all-reduce")


class _Validator:
    def __init__(self) -> None:
        self.problems: list[tuple[str, str]] = []

    def bad(self, path: str, why: str) -> None:
        self.problems.append((path, why))

    # -- typed getters: record a problem and return the default on a bad value

    def get(self, d: Mapping[str, Any], key: str, path: str, kind: type[T] | tuple[type, ...],
            default: T, check: Callable[[Any], str | None] | None = None) -> T:
        if key not in d:
            return default
        value = d[key]
        kinds = kind if isinstance(kind, tuple) else (kind,)
        if isinstance(value, bool) and bool not in kinds:
            self.bad(f"{path}{key}", f"expected {_kind_name(kinds)}, got a boolean")
            return default
        if float in kinds and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if not isinstance(value, kinds):
            self.bad(f"{path}{key}", f"expected {_kind_name(kinds)}, got {type(value).__name__}")
            return default
        if check is not None and (why := check(value)) is not None:
            self.bad(f"{path}{key}", why)
            return default
        return value  # type: ignore[return-value]

    def unknown(self, d: Mapping[str, Any], allowed: set[str], path: str) -> None:
        for key in d:
            if key not in allowed:
                self.bad(f"{path}{key}", f"unknown key (allowed: {', '.join(sorted(allowed))})")

    # -- sections

    def config(self, raw: Any, source: str) -> Config | None:
        if not isinstance(raw, dict):
            self.bad("", "the top level must be a table/object")
            return None
        self.unknown(raw, _TOP_KEYS, "")
        policy = self.policy(raw.get("policy", {}))
        checkpoint = self.checkpoint(raw["checkpoint"]) if "checkpoint" in raw else None
        port = self.get(raw, "port", "", int, 3000, _port)
        metrics_port = self.get(raw, "metrics_port", "", int, 9090, _port_or_zero)
        admin_port = self.get(raw, "admin_port", "", int, 0, _port_or_zero) or None
        startup = self.get(raw, "startup_timeout_secs", "", float, 1800.0, _positive)
        vllm_command = self.get(raw, "vllm_command", "", str, "vllm", _nonempty)

        models: dict[str, ModelConfig] = {}
        all_models: dict[str, ModelConfig] = {}
        raw_models = raw.get("models")
        if raw_models is None:
            self.bad("models", "missing: at least one model is needed")
        elif not isinstance(raw_models, dict) or not raw_models:
            self.bad("models", "must be a non-empty table of NAME = {model_path, port, ...}")
        else:
            for name, m in raw_models.items():
                n_before = len(self.problems)
                mc = self.model(str(name), m, policy, startup)
                if mc is not None:
                    all_models[mc.name] = mc
                    if len(self.problems) == n_before:
                        models[mc.name] = mc
        self.ports(all_models, port, metrics_port, admin_port)
        cfg = Config(
            models=models,
            policy=policy,
            host=self.get(raw, "host", "", str, "0.0.0.0", _nonempty),
            port=port,
            metrics_port=metrics_port,
            admin_port=admin_port,
            vllm_command=vllm_command,
            checkpoint=checkpoint,
            startup_timeout_secs=startup,
            warmup=self.get(raw, "warmup", "", bool, False),
            max_active=self.get(raw, "max_active", "", int, 1, _at_least(1)),
            max_body_bytes=self.get(raw, "max_body_bytes", "", int, 16 << 20, _at_least(1024)),
            log_dir=Path(self.get(raw, "log_dir", "", str, "/tmp/llmux-logs", _nonempty)),
            source=source,
        )
        return cfg

    def eviction(self, raw: Any, path: str, default: EvictionPolicy) -> EvictionPolicy:
        if isinstance(raw, str):
            try:
                return EvictionPolicy.parse(raw)
            except ValueError:
                self.bad(path, f"expected WEIGHTS+PROCESS like 'offload+keep_running', got {raw!r}")
                return default
        if not isinstance(raw, dict):
            self.bad(path, "expected {weights = ..., process = ...}")
            return default
        self.unknown(raw, {"weights", "process"}, f"{path}.")
        weights, process = default.weights, default.process
        if "weights" in raw:
            try:
                weights = WeightStrategy(raw["weights"])
            except ValueError:
                self.bad(f"{path}.weights", f"unknown weight strategy {raw['weights']!r} "
                         f"(one of: {', '.join(s.value for s in WeightStrategy)})")
        if "process" in raw:
            try:
                process = ProcessStrategy(raw["process"])
            except ValueError:
                self.bad(f"{path}.process", f"unknown process strategy {raw['process']!r} "
                         f"(one of: {', '.join(s.value for s in ProcessStrategy)})")
        return EvictionPolicy(weights, process)

    def policy(self, raw: Any) -> PolicyConfig:
        if not isinstance(raw, dict):
            self.bad("policy", "expected a table/object")
            return PolicyConfig()
        self.unknown(raw, _POLICY_KEYS | _POLICY_EXTRA_KEYS, "policy.")
        ptype = self.get(raw, "policy_type", "policy.", str, "fifo")
        if ptype in _ORIGINAL_POLICY_TYPES:
            self.bad("policy.policy_type", f"{ptype!r} is not implemented here; use 'fifo'")
        elif ptype not in _POLICY_TYPES:
            self.bad("policy.policy_type", f"unknown policy {ptype!r} (one of: fifo)")
        eviction = (self.eviction(raw["eviction"], "policy.eviction", EvictionPolicy())
                    if "eviction" in raw else EvictionPolicy())
        return PolicyConfig(
            policy_type=ptype,
            request_timeout_secs=self.get(raw, "request_timeout_secs", "policy.", float, 300.0,
                                          _positive),
            drain_before_switch=self.get(raw, "drain_before_switch", "policy.", bool, True),
            eviction=eviction,
            min_active_secs=self.get(raw, "min_active_secs", "policy.", float, 5.0,
                                     _non_negative),
            extras={k: raw[k] for k in _POLICY_EXTRA_KEYS if k in raw},
        )

    def checkpoint(self, raw: Any) -> CheckpointConfig | None:
        if not isinstance(raw, dict):
            self.bad("checkpoint", "expected a table/object")
            return None
        self.unknown(raw, _CHECKPOINT_KEYS, "checkpoint.")
        p = "checkpoint."
        d = CheckpointConfig()
        return CheckpointConfig(
            bus=self.get(raw, "bus", p, str, d.bus, _nonempty),
            keep_images=self.get(raw, "keep_images", p, bool, d.keep_images),
            criu_path=self.get(raw, "criu_path", p, str, d.criu_path, _nonempty),
            cuda_plugin_dir=self.get(raw, "cuda_plugin_dir", p, str, d.cuda_plugin_dir),
            images_dir=Path(self.get(raw, "images_dir", p, str, str(d.images_dir), _nonempty)),
            cuda_checkpoint_path=self.get(raw, "cuda_checkpoint_path", p, str,
                                          d.cuda_checkpoint_path, _nonempty),
            job_timeout_secs=self.get(raw, "job_timeout_secs", p, float, d.job_timeout_secs,
                                      _positive),
        )

    def model(self, name: str, raw: Any, policy: PolicyConfig,
              startup: float) -> ModelConfig | None:
        path = f"models.{name}"
        if not valid_model_name(name):
            self.bad(path, "invalid model name: use letters, digits, '.', '_' and '-' "
                     "(at most 128, starting with a letter or digit)")
        if not isinstance(raw, dict):
            self.bad(path, "expected a table/object with model_path and port")
            return None
        nested = all(isinstance(v, dict) for v in raw.values())
        if raw and nested and not raw.keys() & _MODEL_KEYS:
            sub = next(iter(raw))
            self.bad(path, f"a table of tables, not a model: in TOML a model name with a dot "
                     f"must be quoted, e.g. [models.\"{name}.{sub}\"]")
            return None
        self.unknown(raw, _MODEL_KEYS, f"{path}.")
        p = f"{path}."
        model_path = self.get(raw, "model_path", p, str, "", _nonempty)
        if "model_path" not in raw:
            self.bad(f"{path}.model_path", "missing (a Hugging Face id or a local path)")
        port = self.get(raw, "port", p, int, 0, _port)
        if "port" not in raw:
            self.bad(f"{path}.port", "missing (the port this model's engine listens on)")
        engine_name = self.get(raw, "engine", p, str, EngineKind.VLLM.value)
        try:
            engine = EngineKind(engine_name)
        except ValueError:
            self.bad(f"{path}.engine", f"unknown engine {engine_name!r} (one of: vllm, builtin)")
            engine = EngineKind.VLLM
        extra_args = self.get(raw, "extra_args", p, list, [], _str_list)
        command = self.get(raw, "command", p, list, [], _str_list_nonempty) or None
        env = self.get(raw, "env", p, dict, {}, _str_dict)
        eviction = (self.eviction(raw["eviction"], f"{path}.eviction", policy.eviction)
                    if "eviction" in raw else policy.eviction)
        cp = self.get(raw, "checkpoint_path", p, str, "", _nonempty)
        mc = ModelConfig(
            name=name,
            model_path=model_path,
            port=port,
            engine=engine,
            weights_mb=self.get(raw, "weights_mb", p, int, 64, _non_negative),
            extra_args=tuple(extra_args),
            eviction=eviction,
            checkpoint_path=Path(cp) if cp else None,
            command=tuple(command) if command else None,
            env=dict(env),
            startup_timeout_secs=self.get(raw, "startup_timeout_secs", p, float, startup,
                                          _positive),
            sleep_mode_override=(self.get(raw, "sleep_mode", p, bool, False)
                                 if "sleep_mode" in raw else None),
            probe_timeout_secs=self.get(raw, "probe_timeout_secs", p, float, 60.0, _positive),
        )
        if mc.sleep_mode_override is False and eviction.weights is not WeightStrategy.RETAIN:
            self.bad(f"{path}.sleep_mode",
                     f"false, but the eviction {eviction} puts the weights to sleep, which "
                     "needs vLLM's sleep mode (use weights = \"retain\" or sleep_mode = true)")
        try:
            tp = mc.tensor_parallel_size
        except ValueError as e:
            self.bad(f"{path}.extra_args", str(e))
            tp = 1
        if tp > 1 and eviction.needs_host:
            missing = [f for f in _TP_SAFE_FLAGS if f not in mc.extra_args]
            if missing:
                self.bad(f"{path}.extra_args",
                         f"tensor parallel size {tp} with process strategy "
                         f"{eviction.process} needs {' and '.join(missing)} "
                         "(CUDA graphs and custom all-reduce buffers do not survive "
                         "a CUDA checkpoint)")
        return mc

    def ports(self, models: Mapping[str, ModelConfig], port: int, metrics_port: int,
              admin_port: int | None) -> None:
        owners: dict[int, str] = {port: "port"}
        for key, value in (("metrics_port", metrics_port), ("admin_port", admin_port or 0)):
            if value:
                if value in owners:
                    self.bad(key, f"port {value} is already used by {owners[value]}")
                owners.setdefault(value, key)
        for m in models.values():
            key = f"models.{m.name}.port"
            if m.port in owners:
                self.bad(key, f"port {m.port} is already used by {owners[m.port]}")
            owners.setdefault(m.port, key)


def _tensor_parallel_size(args: tuple[str, ...]) -> int:
    for i, a in enumerate(args):
        value: str | None = None
        if a in ("--tensor-parallel-size", "-tp"):
            value = args[i + 1] if i + 1 < len(args) else None
            if value is None:
                raise ValueError(f"{a} needs a value")
        elif a.startswith("--tensor-parallel-size="):
            value = a.split("=", 1)[1]
        if value is not None:
            try:
                n = int(value)
            except ValueError:
                raise ValueError(f"{a}: {value!r} is not a whole number") from None
            if n < 1:
                raise ValueError(f"{a}: must be at least 1")
            return n
    return 1


def _kind_name(kinds: tuple[type, ...]) -> str:
    names = {int: "an integer", float: "a number", str: "a string", bool: "true or false",
             list: "a list", dict: "a table/object"}
    return " or ".join(names.get(k, k.__name__) for k in kinds)


def _port(v: int) -> str | None:
    return None if 1 <= v <= 65535 else f"{v} is not a port (1-65535)"


def _port_or_zero(v: int) -> str | None:
    return None if 0 <= v <= 65535 else f"{v} is not a port (0 disables, else 1-65535)"


def _positive(v: float) -> str | None:
    return None if v > 0 else f"must be greater than 0, got {v}"


def _non_negative(v: float) -> str | None:
    return None if v >= 0 else f"must not be negative, got {v}"


def _at_least(n: int) -> Callable[[int], str | None]:
    return lambda v: None if v >= n else f"must be at least {n}, got {v}"


def _nonempty(v: str) -> str | None:
    return None if v.strip() else "must not be empty"


def _str_list(v: list[Any]) -> str | None:
    bad = [x for x in v if not isinstance(x, str)]
    return None if not bad else f"every item must be a string, got {bad[0]!r}"


def _str_list_nonempty(v: list[Any]) -> str | None:
    return _str_list(v) or (None if v else "must not be empty")


def _str_dict(v: dict[str, Any]) -> str | None:
    bad = [k for k, x in v.items() if not isinstance(x, str)]
    return None if not bad else f"value of {bad[0]!r} must be a string"
