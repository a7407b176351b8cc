"""The shim and the client share only llmux.common's two leaves with llmuxd.

The shim's image is built from common/, client/ and shim/ (packaging/Containerfile): an
import of llmux.service anywhere on their side would fail there, not here, where the
editable install has every folder. So these tests hold the sources to the rule: once by
importing the entry points with llmux.service made unimportable, as in that image, and
once by reading every import statement (those inside functions too, which an import of
the module does not run).
"""

from __future__ import annotations

import ast
import subprocess
import sys
import textwrap
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

ENTRY_POINTS = ("llmux.shim.app", "llmux.shim.cli", "llmux.client.hostclient",
                "llmux.client.opscli")

LEAVES = {
    "the contract": {"llmux.common.contract", "llmux.common.errors"},
    "the /proc reading": {"llmux.common.proctree", "llmux.common.resources",
                          "llmux.common.gpumem"},
    "the config schema": {"llmux.common.configschema"},
}
"""Each leaf of llmux.common and its modules: a leaf imports nothing of llmux outside it."""


def _imports(path: Path, package: str) -> set[str]:
    """Every module an import statement of the file names, relative ones made absolute."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)
    return names


def _llmux_imports(folder: str) -> dict[str, set[str]]:
    """For each module of llmux.<folder>, the llmux modules (or names in them) it imports."""
    out: dict[str, set[str]] = {}
    for path in sorted((REPO / folder).rglob("*.py")):
        parts = ["llmux", folder, *path.relative_to(REPO / folder).with_suffix("").parts]
        if parts[-1] == "__init__":
            parts.pop()
        module = ".".join(parts)
        package = module if path.name == "__init__.py" else module.rpartition(".")[0]
        out[module] = {n for n in _imports(path, package) if n.split(".")[0] == "llmux"}
    return out


def test_the_entry_points_import_without_llmuxd(tmp_path: Path) -> None:
    """The shim's and the client's entry points import with no llmux.service to be found,
    and none of it ends up in sys.modules."""
    script = textwrap.dedent(f"""
        import importlib, sys
        from importlib.abc import MetaPathFinder

        class NoService(MetaPathFinder):
            # what the shim's image lacks: service/ is not in its wheel
            def find_spec(self, name, path=None, target=None):
                if name == "llmux.service" or name.startswith("llmux.service."):
                    raise ModuleNotFoundError(f"no module named {{name!r}}", name=name)
                return None

        sys.meta_path.insert(0, NoService())
        for name in {ENTRY_POINTS!r}:
            importlib.import_module(name)
        print(sorted(m for m in sys.modules
                     if m == "llmux.service" or m.startswith("llmux.service.")))
    """)
    out = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip() == "[]", out.stdout


def test_no_import_statement_of_the_shim_or_the_client_names_llmuxd() -> None:
    found = {module: sorted(n for n in names if n.startswith("llmux.service"))
             for folder in ("shim", "client")
             for module, names in _llmux_imports(folder).items()}
    assert {m: n for m, n in found.items() if n} == {}


def test_each_leaf_of_common_imports_only_itself() -> None:
    modules = _llmux_imports("common")
    assert set(modules) - {"llmux.common"} == set().union(*LEAVES.values()), \
        "a new module of llmux.common belongs to one leaf (LEAVES)"
    for leaf, members in LEAVES.items():
        for module in sorted(members):
            outside = sorted(n for n in modules[module]
                             if not any(n == m or n.startswith(m + ".") for m in members)
                             and n != "llmux.common")
            assert outside == [], f"{module} ({leaf}) imports {outside}"
