"""docs/dbus-api.md is what the contract renders (llmux.service.dbus.apidoc); no bus needed."""

from __future__ import annotations

from pathlib import Path

from llmux.common import contract
from llmux.service.dbus import apidoc

DOC = Path(__file__).resolve().parents[2] / "docs" / "dbus-api.md"


def test_the_document_is_what_the_contract_renders() -> None:
    current = DOC.read_text() if DOC.exists() else ""
    assert current == apidoc.render(), (
        f"{DOC} differs from the contract's declarations; regenerate it from the repository "
        f"root: .venv/bin/{apidoc.COMMAND}"
    )


def test_every_name_of_the_contract_is_in_the_document() -> None:
    text = apidoc.render()
    for interface in contract.INTERFACES:
        assert f"`{interface.name}`" in text
        for method in interface.methods:
            assert f"##### `{method.name}`" in text
            assert method.in_signature in text
        for signal in interface.signals:
            assert f"| `{signal.name}` |" in text
        for prop in interface.properties:
            assert f"| `{prop.name}` |" in text
    for error in contract.ErrorName:
        assert f"`{error.value}`" in text
    for record in (contract.HostInfo, contract.JobProgress, contract.CheckpointInfo):
        assert f"### `{record.__name__}`" in text
    assert "(no handler)" not in text, "every method has an @exports handler"


def test_check_mode_fails_on_a_stale_copy(tmp_path: Path) -> None:
    stale = tmp_path / "dbus-api.md"
    stale.write_text("# stale\n")
    assert apidoc.main(["--check", str(stale)]) == 1
    assert apidoc.main(["--write", str(stale)]) == 0
    assert apidoc.main(["--check", str(stale)]) == 0
