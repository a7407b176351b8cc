"""docs/dbus-api.md, rendered from the contract: ``python -m llmux.service.dbus.apidoc``.

The D-Bus API is declared once, as data, in the contract (interfaces, methods, signals,
properties, records, typed options, error names); the D-Bus face builds its objects from
it and routes each method to the one handler marked ``@exports(contract.X)``. This module
renders the same declarations, and which handler serves each method, as markdown, so the
reference cannot drift from the code (tests/service/test_dbus_apidoc.py compares).

    python -m llmux.service.dbus.apidoc                       # the markdown on stdout
    python -m llmux.service.dbus.apidoc --write docs/dbus-api.md
    python -m llmux.service.dbus.apidoc --check docs/dbus-api.md   # exit 1 when it differs

The field and constant docstrings (a string right after an assignment) are not kept by
Python at run time; they are read from the contract's source with ``ast``.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import enum
import inspect
import itertools
import sys
from collections.abc import Iterator
from pathlib import Path

# -- every import of the contract's data is in this block: the contract (and its errors)
# -- (the shared llmux.common): a move changes these lines and CONTRACT_FILE, nothing else --
from llmux.common import contract
from llmux.common import errors as contract_errors
from llmux.service.dbus import exports as exports_module
from llmux.service.dbus.server import HostServer

# --------------------------------------------------------------------------------------

CONTRACT_FILE = "common/contract.py"
"""The contract's path in the repository, as the document names it."""
COMMAND = "python -m llmux.service.dbus.apidoc --write docs/dbus-api.md"
"""How to regenerate the document (from the repository root, in the project's venv)."""

_TYPES = {
    "s": "string", "o": "object path", "u": "uint32", "t": "uint64", "b": "boolean",
    "d": "double", "a{sv}": "dict of variants", "au": "array of uint32",
    "a(so)": "array of (string, object path)",
}


# ---------------------------------------------------------------------------- the source


def _docstrings() -> dict[str, str]:
    """``NAME`` and ``Class.field`` to the string literal that follows its assignment."""
    tree = ast.parse(inspect.getsource(contract))
    found: dict[str, str] = {}

    def scan(body: list[ast.stmt], prefix: str) -> None:
        for stmt, nxt in itertools.pairwise(body):
            if not (isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant)
                    and isinstance(nxt.value.value, str)):
                continue
            target: ast.expr | None = None
            if isinstance(stmt, ast.Assign) and len(stmt.targets) == 1:
                target = stmt.targets[0]
            elif isinstance(stmt, ast.AnnAssign):
                target = stmt.target
            if isinstance(target, ast.Name):
                found[prefix + target.id] = inspect.cleandoc(nxt.value.value)

    scan(tree.body, "")
    for node in tree.body:
        if isinstance(node, ast.ClassDef):
            scan(node.body, node.name + ".")
    return found


def _handlers() -> dict[contract.Method, str]:
    """Each contract method to the ``@exports`` handler of the D-Bus face that serves it."""
    found: dict[contract.Method, str] = {}
    for name, value in vars(HostServer).items():
        method = getattr(value, exports_module._MARK, None)
        if isinstance(method, contract.Method):
            found[method] = f"{HostServer.__name__}.{name}"
    return found


def _constant_names() -> dict[int, str]:
    """id() of each declaration to its name in the contract (CHECKPOINT, JOB_NEW, ...)."""
    return {
        id(value): name for name, value in vars(contract).items()
        if isinstance(value, contract.Method | contract.Signal | contract.Interface)
    }


# ---------------------------------------------------------------------------- rendering


def _code(text: str) -> str:
    return f"`{text}`" if text else ""


def _cell(text: str) -> str:
    return " ".join(text.split()).replace("|", "\\|")


def _type(signature: str) -> str:
    meaning = _TYPES.get(signature)
    return f"`{signature}` ({meaning})" if meaning else f"`{signature}`"


def _args(args: tuple[contract.Arg, ...]) -> str:
    return ", ".join(f"{a.signature} {a.name}" for a in args)


def _method_line(m: contract.Method) -> str:
    out = f" → ({_args(m.returns)})" if m.returns else ""
    return f"{m.name}({_args(m.args)}){out}"


def _options_lines(options: type[contract.Options], docs: dict[str, str]) -> Iterator[str]:
    rows = [f for f in dataclasses.fields(options)]  # type: ignore[arg-type]
    if not rows:
        yield "Options: none (pass an empty `a{sv}`; an unknown option is `InvalidArgument`)."
        return
    yield (f"Options (`{options.__name__}`; an unknown name or a wrong type is "
           "`InvalidArgument`):")
    yield ""
    yield "| option | type | default | meaning |"
    yield "|---|---|---|---|"
    for f in rows:
        doc = docs.get(f"{options.__name__}.{f.name}", "")
        default = (f.default if f.default_factory is dataclasses.MISSING
                   else f.default_factory())
        yield (f"| `{f.name}` | {_type(f.metadata['dbus'][1])} | `{default!r}` "
               f"| {_cell(doc)} |")


def _interface(spec: contract.Interface, docs: dict[str, str],
               names: dict[int, str], handlers: dict[contract.Method, str]) -> Iterator[str]:
    where = (f"objects under `{spec.path}/`" if spec.under else f"object `{spec.path}`")
    yield f"### `{spec.name}`"
    yield ""
    yield f"On {where} (contract: `{names.get(id(spec), '?')}`)."
    yield ""
    if spec.methods:
        yield "#### Methods"
        yield ""
        for m in spec.methods:
            const = names.get(id(m), "?")
            yield f"##### `{m.name}`"
            yield ""
            yield "```"
            yield _method_line(m)
            yield "```"
            yield ""
            yield (f"In signature {_code(m.in_signature) or '(none)'}, out signature "
                   f"{_code(m.out_signature) or '(none)'}; declared as `contract.{const}`, "
                   f"served by `{handlers.get(m, '(no handler)')}` "
                   "(`service/dbus/server.py`).")
            if const in docs:
                yield ""
                yield docs[const]
            if m.options is not None:
                yield ""
                yield from _options_lines(m.options, docs)
            yield ""
    if spec.signals:
        yield "#### Signals"
        yield ""
        yield "| signal | arguments | contract | notes |"
        yield "|---|---|---|---|"
        for s in spec.signals:
            const = names.get(id(s), "?")
            yield (f"| `{s.name}` | `{_args(s.args)}` | `{const}` "
                   f"| {_cell(docs.get(const, ''))} |")
        yield ""
    if spec.properties:
        yield "#### Properties (read-only)"
        yield ""
        yield "| property | type | field | meaning |"
        yield "|---|---|---|---|"
        for p in spec.properties:
            field = _record_of(spec, p)
            doc = docs.get(field, "")
            yield f"| `{p.name}` | {_type(p.signature)} | `{field}` | {_cell(doc)} |"
        yield ""


def _records() -> list[type[contract.Record]]:
    return [v for v in vars(contract).values()
            if isinstance(v, type) and issubclass(v, contract.Record) and v is not contract.Record]


def _record_of(spec: contract.Interface, p: contract.Property) -> str:
    """``Record.field`` behind a property of ``spec``: the record whose properties it shows."""
    for record in _records():
        props = record.properties()
        if p in props and all(q in spec.properties for q in props):
            return f"{record.__name__}.{p.attr}"
    if p in contract.JOB_OBJECT_PROPERTIES:
        return f"JOB_OBJECT_PROPERTIES: {p.attr}"
    return p.attr


def _record(record: type[contract.Record], docs: dict[str, str]) -> Iterator[str]:
    yield f"### `{record.__name__}`"
    yield ""
    if record.__doc__:
        yield inspect.cleandoc(record.__doc__)
        yield ""
    yield "| field | property | type | default | meaning |"
    yield "|---|---|---|---|---|"
    for f in dataclasses.fields(record):  # type: ignore[arg-type]
        if "dbus" in f.metadata:
            prop, sig = f.metadata["dbus"]
            prop, sig = f"`{prop}`", _type(sig)
        else:
            prop, sig = "(off the bus)", ""
        if f.default is not dataclasses.MISSING:
            default = f"`{f.default!r}`"
        elif f.default_factory is not dataclasses.MISSING:
            default = f"`{f.default_factory()!r}`"
        else:
            default = ""
        doc = docs.get(f"{record.__name__}.{f.name}", "")
        yield f"| `{f.name}` | {prop} | {sig} | {default} | {_cell(doc)} |"
    yield ""


def _enum(kind: type[enum.Enum]) -> str:
    return ", ".join(f"`{member.value}`" for member in kind)


def _errors() -> Iterator[str]:
    by_name = contract_errors.BY_NAME
    yield "| error name | raised as | meaning |"
    yield "|---|---|---|"
    for name in contract.ErrorName:
        cls = by_name[name]
        doc = inspect.cleandoc(cls.__doc__) if cls.__doc__ else ""
        if doc == inspect.cleandoc(contract_errors.HostError.__doc__ or ""):
            doc = ""
        yield f"| `{name.value}` | `{cls.__name__}` | {_cell(doc)} |"
    yield ""


def render() -> str:
    """The whole document."""
    docs = _docstrings()
    names = _constant_names()
    handlers = _handlers()
    lines: list[str] = [
        "# D-Bus API of llmuxd",
        "",
        "<!-- Generated from the contract by `python -m llmux.service.dbus.apidoc`: do not",
        f"     edit by hand. Regenerate with `{COMMAND}`. -->",
        "",
        f"Generated from `{CONTRACT_FILE}` (the declarations both the service's D-Bus face "
        "and the client are built from) and the `@exports` handlers of "
        "`service/dbus/server.py`. How the service behaves behind these calls is in "
        "[architecture.md](architecture.md).",
        "",
        "| | |",
        "|---|---|",
        f"| bus name | `{contract.BUS_NAME}` (system bus) |",
        f"| manager object | `{contract.OBJECT_PATH}` (also "
        "`org.freedesktop.DBus.ObjectManager`) |",
        f"| job objects | `{contract.JOB_PATH_PREFIX}/<id>` (e.g. `{contract.job_path(7)}`) |",
        f"| checkpoint objects | `{contract.CHECKPOINT_PATH_PREFIX}/<model>`, the model name "
        f"escaped systemd-style (`qwen3-0.6b` → `{contract.checkpoint_path('qwen3-0.6b')}`) |",
        f"| error names | `{contract.ERROR_PREFIX}.*` (below) |",
        f"| who may call | root and the group `{contract.POLICY_GROUP}` (bus policy); the "
        "service then acts only on trees in the caller's own container |",
        "",
        "Long operations (`Checkpoint`, `Restore`, `Suspend`, `Resume`) first check the "
        "request (model name, the caller's rights on the PIDs, the manifest, free space, a "
        "busy model): a refusal fails the call itself with its named error and no job "
        "exists. Otherwise the call answers `(job_id, job_path)` at once and the work runs "
        "as a job object; what fails later ends the job, reported by the job's `Completed` "
        "signal, then the manager's `JobRemoved`, and by `WaitJob`.",
        "",
        "Model names: 1 to 128 characters of `A-Za-z0-9._-`, starting with a letter or a "
        "digit, without `..`.",
        "",
        "```bash",
        f"busctl introspect {contract.BUS_NAME} {contract.OBJECT_PATH}",
        f"busctl call {contract.BUS_NAME} {contract.OBJECT_PATH} {contract.MANAGER_INTERFACE} "
        f"{contract.LIST_CHECKPOINTS.name}",
        f"busctl call {contract.BUS_NAME} {contract.OBJECT_PATH} {contract.MANAGER_INTERFACE} "
        f"{contract.CHECKPOINT.name} '{contract.CHECKPOINT.in_signature}' qwen3-0.6b 4242 0",
        f"busctl get-property {contract.BUS_NAME} {contract.job_path(1)} "
        f"{contract.JOB_INTERFACE} Progress",
        "```",
        "",
        "## Interfaces",
        "",
    ]
    for spec in contract.INTERFACES:
        lines += _interface(spec, docs, names, handlers)
    lines += ["## Records", "",
              "The typed records behind the properties (`from_properties()` / "
              "`to_properties()`, used by the service and the client alike).", ""]
    for record in _records():
        lines += _record(record, docs)
    lines += [
        "## Values",
        "",
        f"- `Operation` (job property `Operation`): {_enum(contract.Operation)}.",
        f"- `JobState` (job property `State`): {_enum(contract.JobState)}; a job's "
        "`JobRemoved` result and `WaitJob`'s `result` are one of "
        f"{', '.join(f'`{s.value}`' for s in contract.JOB_RESULTS)}.",
        "",
        "## Errors",
        "",
        f"Every failure is answered with one of these names (`{contract.ERROR_PREFIX}.*`); "
        "the message is for humans. The client raises the same class again from the name "
        "(`llmux.common.errors.BY_NAME`).",
        "",
    ]
    lines += _errors()
    return "\n".join(lines).rstrip("\n") + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m llmux.service.dbus.apidoc",
                                     description=__doc__.splitlines()[0] if __doc__ else None)
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--write", metavar="PATH", type=Path, help="write the document there")
    group.add_argument("--check", metavar="PATH", type=Path,
                       help="exit 1 when the document there differs from the contract's")
    args = parser.parse_args(argv)
    text = render()
    if args.write:
        args.write.write_text(text)
    elif args.check:
        current = args.check.read_text() if args.check.exists() else ""
        if current != text:
            print(f"{args.check} is not what the contract renders; run: {COMMAND}",
                  file=sys.stderr)
            return 1
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
