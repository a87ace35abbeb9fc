"""The web page in a real headless Chromium for the tests: Debian's ``chromium`` driven by Playwright (never a
downloaded browser), one browser per test module (:func:`chromium`) and one fresh tab per test (:func:`tab`),
which fails the test on any uncaught JavaScript error the page raised."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
WAIT_MS = 180_000  # one bounded wait for a job on a busy 2-core machine (a 64x64 job takes ~1 s when idle)


@contextmanager
def chromium() -> Iterator[Any]:
    """Debian's Chromium, headless, launched by Playwright; closed on exit."""
    from playwright.sync_api import sync_playwright

    assert Path(CHROMIUM).exists(), f"{CHROMIUM} missing: install Debian's chromium package (make sysdeps)"
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, timeout=60_000)
        try:
            yield b
        finally:
            b.close()


def open_page(pg: Any, url: str) -> None:
    pg.goto(url + "/")
    pg.wait_for_selector("body[data-ready=true]")


@contextmanager
def tab(browser: Any, url: str, *, open_it: bool = True) -> Iterator[Any]:
    """A new 1280x1000 tab of ``browser`` on the page at ``url`` (``open_it``: loaded and ready); on exit the tab
    is closed and the test fails if the page raised an uncaught JavaScript error."""
    context = browser.new_context(viewport={"width": 1280, "height": 1000})
    pg = context.new_page()
    errors: list[str] = []
    pg.on("pageerror", lambda e: errors.append(str(e)))
    pg.set_default_timeout(WAIT_MS)
    if open_it:
        open_page(pg, url)
    yield pg
    context.close()
    assert not errors, errors  # no uncaught JavaScript error on the page
