"""Suite-wide rules: a required tier may not be skipped; a stress mode repeats the CRIU tests.

LLMUX_REPEAT=N runs every test marked criu, podman or vllm, and every test under tests/e2e,
N times (ids ``...-rep3of20``), so a flaky CRIU/e2e path shows up under load.

LLMUX_REQUIRE_TIERS (set by packaging/test.sh, e.g. "criu,dbus") names the
markers whose tests must run on this machine. In CI a skip of such a test is
turned into a failure, and a required tier with no test run at all fails the
session, so a missing install step can never pass as green.

The fixtures that more than one test folder uses are registered here, once, from the
support package (tests/support/): pytest_plugins may only be declared in this conftest.
"""

from __future__ import annotations

import os
from collections.abc import Generator

import pytest

pytest_plugins = [
    # the private system-style bus and llmuxd on it (private_bus, llmuxd, spawn_counter)
    "tests.support.llmuxd_harness",
    # a whole shim in the test's loop (shim_factory, http): tests/shim and tests/client
    "tests.support.proxy_fixtures",
]

TIERS = ("criu", "dbus", "podman", "systemd", "vllm", "gpu", "browser", "s3")


def _required() -> set[str]:
    raw = os.environ.get("LLMUX_REQUIRE_TIERS", "")
    return {t.strip() for t in raw.split(",") if t.strip()}


def _enforce() -> bool:
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")


_ran: dict[str, int] = {}

REPEATED = ("criu", "podman", "vllm")
"""Markers whose tests LLMUX_REPEAT repeats (and everything under tests/e2e)."""


def _repeat() -> int:
    raw = os.environ.get("LLMUX_REPEAT", "").strip()
    if not raw:
        return 1
    if not raw.isdigit() or int(raw) < 1:
        raise pytest.UsageError(f"LLMUX_REPEAT must be a positive integer, not {raw!r}")
    return int(raw)


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    n = _repeat()
    if n < 2:
        return
    marked = any(m.name in REPEATED for m in metafunc.definition.iter_markers())
    if not marked and "e2e" not in metafunc.definition.path.parts:
        return
    metafunc.fixturenames.append("llmux_repeat")
    metafunc.parametrize("llmux_repeat", range(1, n + 1), indirect=True,
                         ids=[f"rep{i}of{n}" for i in range(1, n + 1)])


@pytest.fixture
def llmux_repeat(request: pytest.FixtureRequest) -> int:
    """Which run of LLMUX_REPEAT this is (1-based)."""
    step: int = request.param
    return step


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, None]:
    outcome = yield
    rep: pytest.TestReport = outcome.get_result()  # type: ignore[attr-defined]
    tiers = {m.name for m in item.iter_markers() if m.name in TIERS}
    if rep.when == "call" and not rep.skipped:
        for t in tiers:
            _ran[t] = _ran.get(t, 0) + 1
    required = tiers & _required()
    if rep.skipped and required and _enforce():
        reason = rep.longrepr[2] if isinstance(rep.longrepr, tuple) else str(rep.longrepr)
        rep.outcome = "failed"
        rep.longrepr = (
            f"required tier {', '.join(sorted(required))} was skipped in CI: {reason}"
        )


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if not _enforce() or session.config.option.collectonly:
        return
    if session.config.args and any("::" in a or a.endswith(".py") for a in session.config.args):
        return  # a partial run (one file or test) does not have to cover every tier
    missing = sorted(t for t in _required() if not _ran.get(t))
    if missing:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
        reporter = session.config.pluginmanager.get_plugin("terminalreporter")
        if reporter is not None:
            reporter.write_line(
                f"FAILED: required test tier(s) ran no test: {', '.join(missing)}", red=True
            )


@pytest.fixture(scope="session")
def vllm_bed() -> object:
    """Real vLLM and its two test models (tests/support/vllmbed.py); skips where not
    installed."""
    from tests.support.vllmbed import find_bed

    return find_bed()


@pytest.fixture(autouse=True)
def builtin_backend(monkeypatch: pytest.MonkeyPatch) -> str:
    """The built-in engine's backend for every engine a test starts without naming one in
    the engine's own environment: the pure-Python model, which starts about four times
    faster than the PyTorch one on a 2-core machine. Set for the test alone (and undone
    after it); a test that wants PyTorch names it in the model's env, a parametrised one
    (tests/builtin, the core's checkpoint of the engine) passes its backend explicitly."""
    monkeypatch.setenv("LLMUX_BUILTIN_BACKEND", "pure")
    return "pure"


@pytest.fixture(autouse=True)
def memory_tier_swept(tmp_path_factory: pytest.TempPathFactory) -> Generator[None, None, None]:
    """The memory tier is on by default: what a test's llmuxd kept in the default tier
    folder (/dev/shm) for a state directory under the test session's temporary folder is
    removed after the test, not left in memory for the rest of the run."""
    yield
    from llmux.service.core.config import DEFAULT_MEMORY_TIER_DIR
    from llmux.service.core.store import sweep_orphaned_tiers

    if DEFAULT_MEMORY_TIER_DIR.is_dir():
        sweep_orphaned_tiers(DEFAULT_MEMORY_TIER_DIR, under=tmp_path_factory.getbasetemp())
