"""Config schemas as typed dataclasses: each key's default written once, as the field's
default, with what the type alone does not say in the field's metadata.

Shared by llmuxd's config (service/config.py) and the shim's (shim/config.py); it imports
nothing of either, so the shim does not pull in llmuxd's core. Readers collect every
problem as (key path, why) instead of stopping at the first.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

Check = Callable[[Any], str | None]
"""A value's check: None when it is fine, else why not."""
Problem = tuple[str, str]
"""(key path, why): one thing wrong in a config."""


def setting(default: Any = dataclasses.MISSING, *, check: Check | None = None,
            required: str | None = None, key: str | None = None,
            factory: Callable[[], Any] | None = None) -> Any:
    """A config key: its default, and what the type alone does not say (a check, that it
    must be given, the name it has in the file when that is not the field's)."""
    meta = {"check": check, "required": required, "key": key}
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def internal(default: Any = dataclasses.MISSING) -> Any:
    """A field that is not a key of the file."""
    return dataclasses.field(default=default, metadata={"internal": True})


def file_keys(cls: type) -> dict[str, dataclasses.Field[Any]]:
    """The schema's keys as written in a file, and their fields."""
    return {str(f.metadata.get("key") or f.name): f for f in dataclasses.fields(cls)
            if not f.metadata.get("internal")}


def default_of(f: dataclasses.Field[Any]) -> Any:
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return f.default


def checked(obj: object) -> list[Problem]:
    """The field checks of a schema instance: (file key, "<key> <why>") for each value
    refused."""
    problems = []
    for name, f in file_keys(type(obj)).items():
        check: Check | None = f.metadata.get("check")
        why = check(getattr(obj, f.name)) if check is not None else None
        if why is not None:
            problems.append((name, f"{name} {why}"))
    return problems
