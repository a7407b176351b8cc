"""Typed shim configuration, loaded and validated once at start-up.

TOML is the native format; the original (Rust) llmux JSON config is accepted
unchanged. The dataclasses below are the schema: each key's default is written
once, as the field's default, and validation is derived from the field's type
(plus a check where the type says too little); the plumbing of such schemas
(setting, internal, file_keys) is llmux.common.configschema, shared with
llmuxd. Every problem is collected with its key path instead of stopping at the
first, so an operator fixes a file in one pass. Keys of the original that mean
nothing here are accepted with one log line each (:data:`RETIRED`).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import stat
import tomllib
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from functools import cache
from pathlib import Path
from typing import Any

from llmux.common.configschema import Check, default_of, file_keys, internal, setting
from llmux.common.contract import valid_model_name
from llmux.shim.errors import ConfigError

log = logging.getLogger(__name__)


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


#: what a value of each enumeration is called in messages
_ENUM_WORDS: dict[type, str] = {WeightStrategy: "weights strategy",
                                ProcessStrategy: "process strategy", EngineKind: "engine"}

#: Process strategies that are carried out by the host service (llmuxd).
HOST_STRATEGIES = frozenset({ProcessStrategy.CUDA_SUSPEND, ProcessStrategy.CHECKPOINT})


def _names(enum: type[StrEnum]) -> str:
    return ", ".join(e.value for e in enum)


class PolicyError(ValueError):
    """A bad eviction policy: ``key`` is "" (the policy itself), "weights", "process" or
    an unknown key of the table form."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(message)
        self.key = key
        self.message = message


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
    def read(cls, raw: Any, default: EvictionPolicy | None = None
             ) -> tuple[EvictionPolicy, list[tuple[str, str]]]:
        """A policy written as "WEIGHTS+PROCESS" or as {weights, process} (a missing half
        is ``default``'s), and every problem found as (key, why); the one parser of
        policies, for the config file, the control API and --policies alike."""
        base = default or cls()
        if isinstance(raw, str):
            weights, sep, process = raw.partition("+")
            try:
                if not sep:
                    raise ValueError(raw)
                return cls(WeightStrategy(weights.strip()),
                           ProcessStrategy(process.strip())), []
            except ValueError:
                return base, [("", f"unknown strategy {raw!r}: expected WEIGHTS+PROCESS like "
                                   f"'offload+keep_running', WEIGHTS one of: "
                                   f"{_names(WeightStrategy)}; PROCESS one of: "
                                   f"{_names(ProcessStrategy)}")]
        if not isinstance(raw, dict):
            return base, [("", "expected 'WEIGHTS+PROCESS' or "
                               "{weights = ..., process = ...}")]
        problems = [(str(k), "unknown key (allowed: process, weights)")
                    for k in raw if k not in ("weights", "process")]
        parts: dict[str, Any] = {"weights": base.weights, "process": base.process}
        for key, enum in (("weights", WeightStrategy), ("process", ProcessStrategy)):
            if key in raw:
                value, why = _convert(enum, raw[key])
                if why is None:
                    parts[key] = value
                else:
                    problems.append((key, why))
        return cls(**parts), problems

    @classmethod
    def parse(cls, raw: Any, default: EvictionPolicy | None = None) -> EvictionPolicy:
        """:meth:`read`, raising PolicyError for the first problem."""
        policy, problems = cls.read(raw, default)
        if problems:
            raise PolicyError(*problems[0])
        return policy


# ---------------------------------------------------------------------------- checks


def _port(v: int) -> str | None:
    return None if 1 <= v <= 65535 else f"{v} is not a port (1-65535)"


def _port_or_zero(v: int) -> str | None:
    return None if 0 <= v <= 65535 else f"{v} is not a port (0 disables, else 1-65535)"


def _positive(v: float) -> str | None:
    if not math.isfinite(v):
        return f"must be a finite number, got {v}"
    return None if v > 0 else f"must be greater than 0, got {v}"


def _non_negative(v: float) -> str | None:
    if not math.isfinite(v):
        return f"must be a finite number, got {v}"
    return None if v >= 0 else f"must not be negative, got {v}"


def _at_least(n: int) -> Check:
    return lambda v: None if v >= n else f"must be at least {n}, got {v}"


def _nonempty(v: str | tuple[str, ...]) -> str | None:
    empty = not v.strip() if isinstance(v, str) else not v
    return "must not be empty" if empty else None


_POLICY_TYPES = ("fifo",)
_ORIGINAL_POLICY_TYPES = ("cost_aware", "time_slice")


def _gpu_indices(v: tuple[int, ...]) -> str | None:
    if any(i < 0 for i in v):
        return f"GPU indices must not be negative, got {list(v)}"
    if len(set(v)) != len(v):
        return f"a GPU is listed twice: {list(v)}"
    return None


def _policy_type(v: str) -> str | None:
    if v in _ORIGINAL_POLICY_TYPES:
        return f"{v!r} is not implemented here; use 'fifo'"
    if v not in _POLICY_TYPES:
        return f"unknown policy {v!r} (one of: {', '.join(_POLICY_TYPES)})"
    return None


# ---------------------------------------------------------------------------- the schema


@dataclass(frozen=True)
class ModelConfig:
    name: str = internal()
    model_path: str = setting("", check=_nonempty, required="a Hugging Face id or a local path")
    port: int = setting(0, check=_port, required="the port this model's engine listens on")
    engine: EngineKind = setting(EngineKind.VLLM)
    weights_mb: int = setting(64, check=_non_negative)
    #: argv appended to the engine's (never run through a shell)
    extra_args: tuple[str, ...] = setting(())
    #: default: [policy] eviction
    eviction: EvictionPolicy = setting(EvictionPolicy())
    checkpoint_path: Path | None = setting(None)
    #: argv prefix replacing the engine's default command (never run through a shell)
    command: tuple[str, ...] | None = setting(None, check=_nonempty)
    env: Mapping[str, str] = setting(factory=dict)
    #: default: the top-level startup_timeout_secs
    startup_timeout_secs: float = setting(1800.0, check=_positive)
    #: run the engine with vLLM's sleep mode; None: exactly when the eviction uses it
    sleep_mode_override: bool | None = setting(None, key="sleep_mode")
    #: bound on the one-token completion that proves an engine ready after each start
    probe_timeout_secs: float = setting(60.0, check=_positive)
    #: the memory (MiB) the model is expected to use before it was ever measured; 0: unknown
    memory_mb: int = setting(0, check=_non_negative)
    #: among models past [policy] max_wait_secs, the higher priority is switched to first
    priority: int = setting(0)
    #: an idle model is evicted after this long; 0: never
    ttl_secs: float = setting(0.0, check=_non_negative)
    #: never evicted by a switch, the memory budget or ttl_secs (only by /control/sleep)
    pinned: bool = setting(False)
    #: GPUs (host indices) the model may be placed on; empty: any. As many as it needs:
    #: pinned to exactly those
    gpus: tuple[int, ...] = setting((), check=_gpu_indices)
    #: GPUs the engine is given; 0: its --tensor-parallel-size (1 without it)
    gpu_count: int = setting(0, check=_non_negative)
    #: a wake may restore the model's checkpoint while a tree another container restored
    #: from it runs (a replica); false: llmuxd refuses such a restore (Busy) and the model
    #: starts cold
    replicas_from_checkpoint: bool = setting(False)

    @property
    def tensor_parallel_size(self) -> int:
        return _tensor_parallel_size(self.extra_args)

    @property
    def gpus_needed(self) -> int:
        """GPUs the engine is placed on: gpu_count, else its tensor parallel size; 0 for an
        engine told to run on the CPU."""
        if self.on_cpu:
            return 0
        return self.gpu_count or _tensor_parallel_size(self.extra_args)

    @property
    def sleep_mode(self) -> bool:
        """Pass --enable-sleep-mode? vLLM refuses it where the platform has none (CPU), so
        only engines whose eviction sleeps (offload, discard) get it, unless overridden."""
        if self.sleep_mode_override is not None:
            return self.sleep_mode_override
        return self.eviction.weights is not WeightStrategy.RETAIN

    @property
    def max_concurrency(self) -> int | None:
        """Requests the engine runs at once (vLLM's --max-num-seqs in extra_args); None: no
        bound known, every request for the serving model is admitted."""
        return _int_flag(self.extra_args, "--max-num-seqs")

    @property
    def on_cpu(self) -> bool:
        """The engine is told to run on the CPU (--device cpu): its memory is host memory."""
        args = self.extra_args
        return any(a == "--device=cpu" or (a == "--device" and args[i + 1:i + 2] == ("cpu",))
                   for i, a in enumerate(args))


@dataclass(frozen=True)
class PolicyConfig:
    policy_type: str = setting("fifo", check=_policy_type)
    request_timeout_secs: float = setting(300.0, check=_positive)
    drain_before_switch: bool = setting(True)
    eviction: EvictionPolicy = setting(EvictionPolicy())
    min_active_secs: float = setting(5.0, check=_non_negative)
    #: the longest a request waits while another model keeps serving (its starvation
    #: bound); 0: strict arrival order across models
    max_wait_secs: float = setting(30.0, check=_non_negative)
    #: the memory (MiB) resident models may use together; 0: off (max_active decides)
    memory_budget_mb: int = setting(0, check=_non_negative)


@dataclass(frozen=True)
class CheckpointConfig:
    #: where the host service listens: "system", "session" or a D-Bus address
    bus: str = setting("system", check=_nonempty)
    keep_images: bool = setting(True)
    #: seconds a host job (dump/restore) may take before the shim gives up waiting
    job_timeout_secs: float = setting(1800.0, check=_positive)


def _api_keys(v: tuple[str, ...]) -> str | None:
    for i, key in enumerate(v):
        why = _key_problem(key)
        if why:
            return f"item {i}: {why}"  # the key itself is never repeated
    return None


def _key_problem(key: str) -> str | None:
    if not key:
        return "an empty key"
    if any(c.isspace() for c in key) or not key.isprintable():
        return "a key must not contain whitespace or control characters"
    return None


@dataclass(frozen=True)
class AuthConfig:
    """Bearer keys of the shim's HTTP API: api keys for /v1/*, admin keys for /control/*.

    The ``*_file`` keys name files of one key a line (blank lines and ``#`` comments
    ignored), read once at start-up; the effective sets are ``api_key_set`` and
    ``admin_key_set``. Keys are never written into messages or logs.
    """

    api_keys: tuple[str, ...] = setting((), check=_api_keys)
    api_keys_file: Path | None = setting(None)
    admin_keys: tuple[str, ...] = setting((), check=_api_keys)
    admin_keys_file: Path | None = setting(None)
    #: /metrics needs a key too (any api or admin key)
    metrics_auth: bool = setting(False)
    api_key_set: frozenset[str] = internal(frozenset())
    admin_key_set: frozenset[str] = internal(frozenset())

    @property
    def enabled(self) -> bool:
        return bool(self.api_key_set or self.admin_key_set)

    def __repr__(self) -> str:
        """Counts, never the keys (a Config may end up in a log or a traceback)."""
        return (f"AuthConfig(api_keys=<{len(self.api_key_set)}>, "
                f"admin_keys=<{len(self.admin_key_set)}>, api_keys_file={self.api_keys_file!r}, "
                f"admin_keys_file={self.admin_keys_file!r}, metrics_auth={self.metrics_auth})")


#: a keys file larger than this is refused (it is a list of keys, not a data file)
MAX_KEYS_FILE_BYTES = 1 << 20


def read_keys_file(path: Path) -> tuple[list[str], list[str]]:
    """The keys in ``path`` and the problems found (never quoting a key).

    Only a regular file is read (a FIFO or a device would block or never end), at most
    MAX_KEYS_FILE_BYTES of it.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as e:
        return [], [f"cannot read {path}: {e.strerror}"]
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            return [], [f"{path} is not a regular file"]
        if st.st_size > MAX_KEYS_FILE_BYTES:
            return [], [f"{path} is larger than {MAX_KEYS_FILE_BYTES} bytes"]
        with os.fdopen(os.dup(fd), "rb") as f:
            data = f.read(MAX_KEYS_FILE_BYTES + 1)
    except OSError as e:
        return [], [f"cannot read {path}: {e.strerror}"]
    finally:
        os.close(fd)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        return [], [f"{path} is not UTF-8 text"]
    keys: list[str] = []
    problems: list[str] = []
    for n, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        why = _key_problem(line)
        if why:
            problems.append(f"{path} line {n}: {why}")
        else:
            keys.append(line)
    if not keys and not problems:
        problems.append(f"{path} holds no key (one key a line; remove the setting to turn "
                        "keys off)")
    return keys, problems


@dataclass(frozen=True)
class Config:
    models: Mapping[str, ModelConfig] = internal()
    policy: PolicyConfig = setting(PolicyConfig())
    host: str = setting("0.0.0.0", check=_nonempty)
    port: int = setting(3000, check=_port)
    #: a separate Prometheus port; 0 disables it (/metrics on the proxy port stays)
    metrics_port: int = setting(9090, check=_port_or_zero)
    vllm_command: str = setting("vllm", check=_nonempty)
    #: present: the host service (llmuxd) is used, also to restore earlier checkpoints
    checkpoint: CheckpointConfig | None = setting(None)
    startup_timeout_secs: float = setting(1800.0, check=_positive)
    #: models allowed on the GPU at once
    max_active: int = setting(1, check=_at_least(1))
    #: request bodies above this are refused with 413 before any engine sees them
    max_body_bytes: int = setting(16 << 20, check=_at_least(1024))
    #: a client must send a request's headers within this (slow-loris bound); 408 after
    header_timeout_secs: float = setting(10.0, check=_positive)
    #: ... and its whole body within this, from the end of its headers; 408 after
    body_timeout_secs: float = setting(60.0, check=_positive)
    #: open connections above this are answered 503 (each holds a file descriptor)
    max_connections: int = setting(4096, check=_at_least(16))
    auth: AuthConfig = setting(AuthConfig())
    #: GPU slots (0..N-1) where NVML finds no GPU: the built-in engine's placement on a
    #: host without one (tests, the demo); 0: the GPUs NVML finds, none without it
    gpus: int = setting(0, check=_non_negative)
    #: per-model engine logs (stdout/stderr) are written here
    log_dir: Path = setting(Path("/tmp/llmux-logs"))
    source: str = internal("<memory>")

    @property
    def needs_host(self) -> bool:
        return any(m.eviction.needs_host for m in self.models.values())


_LLMUXD = "llmuxd's config (/etc/llmux/llmuxd.toml)"

#: keys the original llmux had that mean nothing here, per section: accepted, and each
#: one found is logged with where the setting lives now or why it is gone
RETIRED: dict[type, dict[str, str]] = {
    Config: {
        "admin_port": "deprecated and ignored: the control API is served on `port`",
        "warmup": "deprecated and ignored: an engine starts on its model's first request",
    },
    PolicyConfig: {key: "deprecated and ignored: a tuning knob of the original's other "
                        "policies; only fifo is implemented"
                   for key in ("coalesce_window_ms", "amortization_factor", "tick_interval_ms",
                               "min_quantum_ms")},
    CheckpointConfig: {
        "criu_path": f"ignored: CRIU runs in llmuxd now; set `criu` in {_LLMUXD}",
        "cuda_plugin_dir": f"ignored: CRIU runs in llmuxd now; set `cuda_plugin_dir` in "
                           f"{_LLMUXD}",
        "images_dir": f"ignored: llmuxd keeps the checkpoints; set `state_dir` in {_LLMUXD}",
        "cuda_checkpoint_path": f"ignored: llmuxd checkpoints CUDA now; set "
                                f"`cuda_checkpoint` in {_LLMUXD}",
        "object_store": "deprecated and ignored: checkpoints stay on the host (llmuxd)",
    },
}


# --------------------------------------------------------------------------- loading


def load_config(path: str | os.PathLike[str]) -> Config:
    """Read a TOML or JSON config file; raise ConfigError listing every problem."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigError([("", f"cannot read {p}: {e.strerror}")], source=str(p)) from e
    except UnicodeDecodeError as e:
        raise ConfigError([("", f"{p} is not UTF-8 text ({e.reason} at byte {e.start})")],
                          source=str(p)) from None
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
    r = _Reader()
    cfg = r.config(raw, source)
    if r.problems or cfg is None:
        raise ConfigError(r.problems, source=source)
    for note in r.notices:
        log.warning("%s: %s", source, note)
    return cfg


_TP_SAFE_FLAGS = ("--enforce-eager", "--disable-custom-all-reduce")


@cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _kind_name(tp: Any) -> str:
    names = {int: "an integer", float: "a number", str: "a string", bool: "true or false",
             Path: "a string", tuple: "a list", Mapping: "a table/object"}
    return names.get(typing.get_origin(tp) or tp, "a string")


def _expected(tp: Any, value: Any) -> str:
    got = "a boolean" if isinstance(value, bool) else type(value).__name__
    return f"expected {_kind_name(tp)}, got {got}"


def _convert(tp: Any, value: Any) -> tuple[Any, str | None]:
    """``value`` as the field type ``tp`` wants it, or why it cannot be."""
    origin = typing.get_origin(tp)
    if origin is types.UnionType or origin is typing.Union:
        (tp,) = [a for a in typing.get_args(tp) if a is not type(None)]
        origin = typing.get_origin(tp)
    if isinstance(tp, type) and issubclass(tp, StrEnum):
        if not isinstance(value, str):
            return None, _expected(str, value)
        try:
            return tp(value), None
        except ValueError:
            return None, f"unknown {_ENUM_WORDS[tp]} {value!r} (one of: {_names(tp)})"
    if origin is tuple:
        if not isinstance(value, list):
            return None, _expected(tp, value)
        item = typing.get_args(tp)[0]
        bad = [x for x in value if isinstance(x, bool) or not isinstance(x, item)]
        if bad:
            return None, f"every item must be {_kind_name(item)}, got {bad[0]!r}"
        return tuple(value), None
    if origin is Mapping:
        if not isinstance(value, dict):
            return None, _expected(tp, value)
        bad = [k for k, x in value.items() if not isinstance(x, str)]
        if bad:
            return None, f"value of {bad[0]!r} must be a string"
        return dict(value), None
    ok = isinstance(value, bool) if tp is bool else (
        not isinstance(value, bool) and isinstance(value, (int, float) if tp is float
                                                   else str if tp is Path else tp))
    if not ok:
        return None, _expected(tp, value)
    if tp is Path:
        return (None, "must not be empty") if not value.strip() else (Path(value), None)
    return (float(value) if tp is float else value), None


class _Reader:
    def __init__(self) -> None:
        self.problems: list[tuple[str, str]] = []
        self.notices: list[str] = []

    def bad(self, path: str, why: str) -> None:
        self.problems.append((path, why))

    # -- derived from the schema

    def section(self, cls: type, raw: Any, path: str, *, elsewhere: frozenset[str] = frozenset(),
                **defaults: Any) -> dict[str, Any] | None:
        """The fields of ``cls`` read from the table ``raw`` at ``path``; ``defaults``
        replace the fields' own (a model's inherit the policy's eviction). Keys in
        ``elsewhere`` are read by the caller."""
        if not isinstance(raw, dict):
            self.bad(path, "expected a table/object")
            return None
        prefix = f"{path}." if path else ""
        keys, retired = file_keys(cls), RETIRED.get(cls, {})
        for key in raw:
            if key in retired:
                self.notices.append(f"{prefix}{key} is {retired[key]}")
            elif key not in keys and key not in elsewhere:
                allowed = ", ".join(sorted(keys.keys() | elsewhere))
                self.bad(f"{prefix}{key}", f"unknown key (allowed: {allowed})")
        out: dict[str, Any] = {}
        for key, f in keys.items():
            default = defaults[f.name] if f.name in defaults else default_of(f)
            if key not in raw:
                if f.metadata.get("required"):
                    self.bad(f"{prefix}{key}", f"missing ({f.metadata['required']})")
                out[f.name] = default
            else:
                out[f.name] = self.value(_hints(cls)[f.name], raw[key], f"{prefix}{key}",
                                         default, f.metadata.get("check"))
        return out

    def value(self, tp: Any, raw: Any, path: str, default: Any, check: Check | None) -> Any:
        if typing.get_origin(tp) is types.UnionType:
            (tp,) = [a for a in typing.get_args(tp) if a is not type(None)]
        if tp is EvictionPolicy:
            policy, problems = EvictionPolicy.read(raw, default)
            for key, problem in problems:
                self.bad(f"{path}.{key}" if key else path, problem)
            return policy
        if isinstance(tp, type) and dataclasses.is_dataclass(tp):
            fields = self.section(tp, raw, path)
            return default if fields is None else tp(**fields)
        value, why = _convert(tp, raw)
        if why is None and check is not None:
            why = check(value)
        if why is not None:
            self.bad(path, why)
            return default
        return value

    # -- what a type cannot say: models, and rules across keys

    def config(self, raw: Any, source: str) -> Config | None:
        if not isinstance(raw, dict):
            self.bad("", "the top level must be a table/object")
            return None
        top = self.section(Config, raw, "", elsewhere=frozenset({"models"}))
        assert top is not None
        policy: PolicyConfig = top["policy"]
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
                mc = self.model(str(name), m, policy, top["startup_timeout_secs"])
                if mc is not None:
                    all_models[mc.name] = mc
                    if len(self.problems) == n_before:
                        models[mc.name] = mc
        self.ports(all_models, top["port"], top["metrics_port"])
        self.pinned(all_models, policy.memory_budget_mb)
        self.gpus(all_models, top["gpus"])
        top["auth"] = self.auth(top["auth"])
        return Config(models=models, source=source, **top)

    def auth(self, auth: AuthConfig) -> AuthConfig:
        """The key files read, and the effective key sets."""
        sets: dict[str, set[str]] = {}
        for kind in ("api", "admin"):
            keys = set(getattr(auth, f"{kind}_keys"))
            path: Path | None = getattr(auth, f"{kind}_keys_file")
            if path is not None:
                found, problems = read_keys_file(path)
                for why in problems:
                    self.bad(f"auth.{kind}_keys_file", why)
                keys.update(found)
            sets[kind] = keys
        if auth.metrics_auth and not (sets["api"] or sets["admin"]):
            self.bad("auth.metrics_auth", "true, but no api or admin key is set")
        return dataclasses.replace(auth, api_key_set=frozenset(sets["api"]),
                                   admin_key_set=frozenset(sets["admin"]))

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
        if raw and nested and not raw.keys() & file_keys(ModelConfig).keys():
            sub = next(iter(raw))
            self.bad(path, f"a table of tables, not a model: in TOML a model name with a dot "
                     f"must be quoted, e.g. [models.\"{name}.{sub}\"]")
            return None
        fields = self.section(ModelConfig, raw, path, eviction=policy.eviction,
                              startup_timeout_secs=startup)
        assert fields is not None
        mc = ModelConfig(name=name, **fields)
        eviction = mc.eviction
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
        try:
            _ = mc.max_concurrency
        except ValueError as e:
            self.bad(f"{path}.extra_args", str(e))
        budget = policy.memory_budget_mb
        if budget and mc.memory_mb > budget:
            self.bad(f"{path}.memory_mb",
                     f"the model alone needs {mc.memory_mb} MiB, more than the whole "
                     f"[policy] memory_budget_mb = {budget} MiB: raise the budget or lower "
                     "memory_mb")
        return mc

    def pinned(self, models: Mapping[str, ModelConfig], budget: int) -> None:
        """Pinned models are never evicted: together they must fit the budget."""
        pinned = [m for m in models.values() if m.pinned]
        total = sum(m.memory_mb for m in pinned)
        if budget and len(pinned) > 1 and total > budget:
            names = ", ".join(f"{m.name} ({m.memory_mb} MiB)" for m in pinned)
            self.bad("policy.memory_budget_mb",
                     f"{budget} MiB cannot hold the pinned models together: {names} need "
                     f"{total} MiB, and a pinned model is never evicted")

    def gpus(self, models: Mapping[str, ModelConfig], slots: int) -> None:
        """A model's GPUs: at least as many allowed as it needs, within the declared slots
        (the GPUs NVML finds are checked when the shim starts: llmux.shim.placement)."""
        for m in models.values():
            path = f"models.{m.name}"
            try:
                tp = m.tensor_parallel_size
            except ValueError:
                continue  # said already
            if m.gpu_count and m.gpu_count < tp:
                self.bad(f"{path}.gpu_count",
                         f"{m.gpu_count}, but its --tensor-parallel-size is {tp}: the "
                         "engine needs a GPU for each shard")
            need = m.gpus_needed
            if m.gpus and len(m.gpus) < need:
                self.bad(f"{path}.gpus", f"{list(m.gpus)} allows {len(m.gpus)} GPU(s), but "
                         f"the model needs {need}")
            if slots and m.gpus and max(m.gpus) >= slots:
                self.bad(f"{path}.gpus", f"GPU {max(m.gpus)} does not exist: gpus = {slots} "
                         f"declares GPUs 0-{slots - 1}")
            elif slots and need > slots:
                self.bad(f"{path}.gpu_count" if m.gpu_count else f"{path}.extra_args",
                         f"the model needs {need} GPUs, but gpus = {slots}")

    def ports(self, models: Mapping[str, ModelConfig], port: int, metrics_port: int) -> None:
        owners: dict[int, str] = {port: "port"}
        if metrics_port:
            if metrics_port in owners:
                self.bad("metrics_port", f"port {metrics_port} is already used by port")
            owners.setdefault(metrics_port, "metrics_port")
        for m in models.values():
            if not m.port:
                continue  # missing, said already
            key = f"models.{m.name}.port"
            if m.port in owners:
                self.bad(key, f"port {m.port} is already used by {owners[m.port]}")
            owners.setdefault(m.port, key)


def _int_flag(args: tuple[str, ...], flag: str) -> int | None:
    """The positive integer value of ``flag`` in an argv, None when absent."""
    for i, a in enumerate(args):
        value: str | None = None
        if a == flag:
            value = args[i + 1] if i + 1 < len(args) else None
            if value is None:
                raise ValueError(f"{a} needs a value")
        elif a.startswith(f"{flag}="):
            value = a.split("=", 1)[1]
        if value is not None:
            try:
                n = int(value)
            except ValueError:
                raise ValueError(f"{flag}: {value!r} is not a whole number") from None
            if n < 1:
                raise ValueError(f"{flag}: must be at least 1")
            return n
    return None


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
