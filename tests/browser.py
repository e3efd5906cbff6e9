"""A real browser for the tests of the HTML pages: Debian's chromium driven by Playwright.

Use the ``browser_page`` fixture (import it into a test module): ``open_page(path)`` loads a page
and returns ``(page, console_errors)``.  Without chromium or Playwright the tests fail with the
install command; set ``LXT_SKIP_BROWSER_TESTS=1`` to skip them on purpose.

Playwright's own browser download is not used: the tests run the system's ``/usr/bin/chromium``
(``apt-get install -y chromium``; ``CHROMIUM`` names another executable).
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import pytest

SKIP_VARIABLE = "LXT_SKIP_BROWSER_TESTS"
INSTALL = "apt-get install -y chromium && pip install playwright"


def chromium_path() -> str:
    """The chromium executable (``$CHROMIUM``, else /usr/bin/chromium, else ``chromium`` on the PATH)."""
    configured = os.environ.get("CHROMIUM")
    if configured:
        return configured
    return "/usr/bin/chromium" if Path("/usr/bin/chromium").exists() else (shutil.which("chromium") or "")


def _unavailable(reason: str):
    if os.environ.get(SKIP_VARIABLE):
        pytest.skip(f"{reason} ({SKIP_VARIABLE} is set)")
    pytest.fail(f"the HTML pages are tested in a real browser, and {reason}: {INSTALL} "
                f"(or set {SKIP_VARIABLE}=1 to skip these tests)", pytrace=False)


@pytest.fixture(scope="module")
def browser():
    """A headless chromium, started once per test module."""
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        _unavailable("Playwright is not installed")
    executable = chromium_path()
    if not executable or not Path(executable).exists():
        _unavailable("chromium is not installed")
    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=executable, args=["--no-sandbox"])
        try:
            yield launched
        finally:
            launched.close()


@pytest.fixture
def browser_page(browser):
    """``open_page(path) -> (page, console_errors)``: a page loaded from a file, its console errors collected."""
    contexts = []

    def open_page(path):
        context = browser.new_context(viewport={"width": 1200, "height": 900})
        contexts.append(context)
        page = context.new_page()
        errors = []
        page.on("console", lambda message: errors.append(message.text) if message.type == "error" else None)
        page.on("pageerror", lambda error: errors.append(str(error)))
        page.goto(Path(path).resolve().as_uri())
        page.wait_for_load_state("load")
        return page, errors

    yield open_page
    for context in contexts:
        context.close()


def background(page, selector: str) -> tuple[int, int, int]:
    """The computed background colour of the element ``selector`` as ``(r, g, b)``."""
    text = page.eval_on_selector(selector, "element => getComputedStyle(element).backgroundColor")
    return tuple(int(c) for c in re.findall(r"\d+", text)[:3])


def hover_value(page, selector: str) -> str:
    """Hover the element ``selector`` and return the text of the page's ``#hover-value`` box."""
    page.hover(selector)
    return page.inner_text("#hover-value")
