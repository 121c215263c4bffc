"""Headless Chromium for the console's tests (Debian's `chromium`, driven by Playwright), and screenshots of
each page at a desktop and a phone size, saved under artifacts/console/ (git-ignored; $THINKGATE_ARTIFACTS
moves it)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
needs_chromium = pytest.mark.skipif(
    CHROMIUM is None, reason="no chromium on PATH (Debian: apt-get install chromium; .ci/run installs it)")
ARTIFACTS = Path(os.environ.get("THINKGATE_ARTIFACTS", Path(__file__).parents[2] / "artifacts")) / "console"
SIZES = ((1280, 800), (390, 844))


class PageErrors:
    """JavaScript errors and console errors (a CSP violation is one) of a page: a test fails on any."""

    def __init__(self, page):
        self.errors: list[str] = []
        page.on("pageerror", lambda e: self.errors.append(f"page error: {e}"))
        page.on("console", lambda m: self.errors.append(f"console {m.type}: {m.text}") if m.type == "error" else None)

    def expect_none(self, allowed: tuple[str, ...] = ()) -> None:
        """`allowed`: substrings of errors the test caused on purpose (a 4xx it asked for)."""
        left = [e for e in self.errors if not any(a in e for a in allowed)]
        assert not left, left
        self.errors.clear()


def shoot(page, name: str) -> None:
    """A full-page screenshot at each size; at phone width the page must not scroll sideways."""
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    for w, h in SIZES:
        page.set_viewport_size({"width": w, "height": h})
        page.wait_for_timeout(150)  # the chart redraws on resize
        overflow = page.evaluate("document.documentElement.scrollWidth - window.innerWidth")
        assert overflow <= 0, f"the {name} page is {overflow}px wider than a {w}px screen"
        page.screenshot(path=str(ARTIFACTS / f"{name}-{w}x{h}.png"), full_page=True)
    page.set_viewport_size({"width": SIZES[0][0], "height": SIZES[0][1]})


def keyed_server(checkpoint, db_dir, model: str, admin_token: str, max_model_len: int):
    """A real keyed `thinkgate serve` on a tiny model for the console's tests: priced (1 / 2 CNY per 1000
    tokens), an admin token, SQLite in `db_dir`, a short context so each sample run ends in a second or two."""
    from tests.conftest import ServerProcess

    return ServerProcess(str(checkpoint), name=model, extra=[
        "--kv-cache-memory", str(64 * 2**20), "--max-model-len", str(max_model_len), "--auth", "--price-input",
        "1", "--price-output", "2", "--admin-token", admin_token, "--db", f"sqlite:///{db_dir / 'console.db'}"])
