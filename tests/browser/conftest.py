"""A real headless browser for the operator page (tier ``browser``).

Debian's chromium (``apt install chromium``; browser downloads do not work here), driven
by Playwright's Python API through ``executable_path``: Playwright's own browser builds
are never fetched. LLMUX_CHROMIUM names another binary. A page's console errors and
uncaught exceptions are collected, so that a test can assert there were none.
"""

from __future__ import annotations

import os
import secrets
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.support.procs import free_ports
from tests.support.shimproc import Shim, shims_for_test

# the private bus and llmuxd (for the checkpoint panel's test) are the root conftest's


def chromium_path() -> str | None:
    wanted = os.environ.get("LLMUX_CHROMIUM")
    if wanted:
        return wanted if os.access(wanted, os.X_OK) else None
    for name in ("chromium", "chromium-browser", "google-chrome"):
        found = shutil.which(name)
        if found:
            return found
    return None


@dataclass
class PageLog:
    """What a page said on its console, and its uncaught errors."""

    errors: list[str] = field(default_factory=list)

    def watch(self, page: Any) -> Any:
        page.on("console", lambda m: self.errors.append(f"console.{m.type}: {m.text}")
                if m.type in ("error", "assert") else None)
        page.on("pageerror", lambda e: self.errors.append(f"uncaught: {e}"))
        return page


@pytest.fixture
def browser() -> Iterator[Any]:
    """A headless chromium (Playwright, the system's binary), one per test: Playwright's
    sync API keeps an event loop set as running in this thread while it is open, and the
    suite's async tests (pytest-asyncio) cannot start a loop of their own meanwhile."""
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip("playwright is not installed (packaging/setup-dev.sh installs it)")
    exe = chromium_path()
    if exe is None:
        pytest.skip("no chromium binary (apt install chromium; or set LLMUX_CHROMIUM)")
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=exe, headless=True,
                              args=["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"])
        try:
            yield b
        finally:
            b.close()


@pytest.fixture
def open_page(browser: Any) -> Iterator[Callable[..., tuple[Any, PageLog]]]:
    """open_page(url, width, height) -> (page, its console log); closed after the test."""
    contexts: list[Any] = []

    def open_(url: str, width: int = 1280, height: int = 800) -> tuple[Any, PageLog]:
        ctx = browser.new_context(viewport={"width": width, "height": height})
        contexts.append(ctx)
        page = ctx.new_page()
        page.set_default_timeout(60_000)
        log = PageLog()
        log.watch(page)
        page.goto(url)
        return page, log

    yield open_
    for ctx in contexts:
        ctx.close()


def builtin_model(port: int, tag: str, workdir: Path,
                  spec: str | dict[str, Any]) -> dict[str, Any]:
    """A built-in engine model: ``spec`` is its eviction, or a table of its own keys."""
    return {
        "model_path": f"llmux-ui/{port}", "port": port, "engine": "builtin",
        "weights_mb": 4, "startup_timeout_secs": 120,
        "env": {"LLMUX_TEST_TAG": tag, "HF_HOME": str(workdir / "hf"),
                "XDG_CACHE_HOME": str(workdir / "cache"), "LLMUX_BUILTIN_BACKEND": "pure"},
        **({"eviction": spec} if isinstance(spec, str) else spec),
    }


@pytest.fixture
def start_page_shim(tmp_path: Path) -> Iterator[Callable[..., Shim]]:
    """start_page_shim({name: eviction}, **top) -> a running `llmux serve`; all of it ends after."""
    tag = secrets.token_hex(8)
    with shims_for_test(tmp_path, tag) as launch:

        def start(models: dict[str, str | dict[str, Any]], **top: Any) -> Shim:
            port, *ports = free_ports(len(models) + 1)
            config: dict[str, Any] = {
                "host": "127.0.0.1", "port": port, "metrics_port": 0,
                "log_dir": str(tmp_path / "engine-logs"), **top,
                "policy": {"min_active_secs": 0, "request_timeout_secs": 120},
                "models": {name: builtin_model(p, tag, tmp_path, eviction)
                           for p, (name, eviction) in zip(ports, models.items(), strict=True)},
            }
            return launch(config)

        yield start
