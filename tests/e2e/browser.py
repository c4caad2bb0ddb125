"""A real browser for the tests (Debian's Chromium, driven by Playwright): its fixtures, which
tests/e2e/conftest.py offers every test, and logging in to a service through its first
start's login link."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import pytest
from playwright.sync_api import (
    Browser,
    BrowserContext,
    ConsoleMessage,
    Page,
    Response,
    expect,
    sync_playwright,
)
from playwright.sync_api import Error as PlaywrightError

if TYPE_CHECKING:
    from tests.e2e.conftest import Service

# Chromium abandons a navigation under way when this host's network changes, as it does each
# time another test's sandbox gets an interface (a Docker container's veth): a known Chromium
# trait in containers (crbug 41465264), not codestation's. It says so, or, where a page's
# script had begun the next navigation, shows its error page (which reloads by itself; the
# service's log shows the page served in the end). Such a navigation is made again.
ERROR_PAGE = "chrome-error://"  # Chromium's own page for a navigation that failed
ABANDONED = ("net::ERR_NETWORK_CHANGED", f'interrupted by another navigation to "{ERROR_PAGE}')
CHROMIUM_ARGS = [
    "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
    "--disable-component-update", "--disable-sync",
]  # fmt: skip


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with sync_playwright() as p:
        chromium = p.chromium.launch(executable_path="/usr/bin/chromium", args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


class Console:
    """Every console error and uncaught exception of every page a test opens (popups too)."""

    def __init__(self) -> None:
        self.errors: list[str] = []
        self.excused: list[str] = []  # what a test makes fail on purpose

    def watch(self, context: BrowserContext) -> BrowserContext:
        context.on("page", self._watch_page)
        return context

    def excuse(self, url: str) -> None:
        """Errors on pages under `url`, or about requests to it, are the test's intent."""
        self.excused.append(url)

    def _watch_page(self, page: Page) -> None:
        def on_console(message: ConsoleMessage) -> None:
            # Chromium logs every 4xx answer; a 400 the page shows the person is not a fault,
            # nor a 401 for a wrong token typed into the login page.
            on_login = "/login" in message.location.get("url", "")
            expected = "status of 400" in message.text or (
                on_login and "status of 401" in message.text
            )
            if message.type == "error" and not expected:
                self._add(page, f"{message.text} ({message.location.get('url')})")

        page.on("console", on_console)
        page.on("pageerror", lambda exc: self._add(page, f"uncaught {exc}"))
        _steady_navigation(page)

    def _add(self, page: Page, error: str) -> None:
        # Chromium's error page is no page of ours: a navigation that failed raised already.
        if page.url.startswith(ERROR_PAGE):
            return
        if not any(page.url.startswith(url) or url in error for url in self.excused):
            self.errors.append(f"{error} on page {page.url}")


def _steady_navigation(page: Page, attempts: int = 3) -> None:
    """`page.goto` made again when Chromium abandoned it for a change of the host's network."""
    goto = page.goto

    def steady(url: str, **options: Any) -> Response | None:
        for attempt in range(attempts):
            try:
                return goto(url, **options)
            except PlaywrightError as exc:
                if not any(s in str(exc) for s in ABANDONED) or attempt == attempts - 1:
                    raise
        return None  # not reached: the last attempt returns or raises

    page.goto = steady  # type: ignore[method-assign]


@pytest.fixture
def console() -> Iterator[Console]:
    """Fails the test if any page it opened logged an error."""
    watched = Console()
    yield watched
    assert watched.errors == [], f"console errors: {watched.errors}"


@pytest.fixture
def new_context(browser: Browser, console: Console) -> Iterator[Callable[..., BrowserContext]]:
    """Browser contexts whose every page the console fixture watches; closed at the end."""
    made: list[BrowserContext] = []

    def factory(**options: Any) -> BrowserContext:
        made.append(console.watch(browser.new_context(**options)))
        return made[-1]

    yield factory
    for context in made:
        context.close()


@pytest.fixture
def page(new_context: Callable[..., BrowserContext]) -> Page:
    return new_context(viewport={"width": 1280, "height": 800}).new_page()


def login_link(service: Service) -> str:
    """The link `codestation serve` printed at its first start."""
    found = re.search(r"(http://\S+/login\?token=csl_\S+)", service.log.read_text())
    assert found, service.log.read_text()
    return found.group(1)


def log_in(page: Page, service: Service) -> None:
    page.goto(login_link(service))
    expect(page).to_have_url(service.url + "/")  # the token is gone from the address bar
    expect(page.locator("#who")).to_have_text("admin (admin)")
