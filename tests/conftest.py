"""Suite-wide rules: a required tier may not be skipped.

LLMUX_REQUIRE_TIERS (set by packaging/test.sh, e.g. "criu,dbus") names the
markers whose tests must run on this machine. In CI a skip of such a test is
turned into a failure, and a required tier with no test run at all fails the
session, so a missing install step can never pass as green.
"""

from __future__ import annotations

import os
from collections.abc import Generator

import pytest

TIERS = ("criu", "dbus", "podman", "systemd", "vllm", "gpu", "browser")


def _required() -> set[str]:
    raw = os.environ.get("LLMUX_REQUIRE_TIERS", "")
    return {t.strip() for t in raw.split(",") if t.strip()}


def _enforce() -> bool:
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")


_ran: dict[str, int] = {}


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
    """Real vLLM and its two test models (tests/vllmbed.py); skips where not installed."""
    from vllmbed import find_bed

    return find_bed()
