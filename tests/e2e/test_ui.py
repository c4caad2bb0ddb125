"""The web UI in a real browser (Debian's Chromium, driven by Playwright).

Screenshots of the main screens land in test-artifacts/screenshots; the README shows copies.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from pathlib import Path

import docker
import pytest
from playwright.sync_api import Browser, ConsoleMessage, Page, expect, sync_playwright

from codestation import Status
from tests.e2e.conftest import Service, ServiceFactory

pytestmark = pytest.mark.runtimes("docker")  # the UI does not depend on the runtime

SHOTS = Path(__file__).resolve().parents[2] / "test-artifacts" / "screenshots"
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


@pytest.fixture
def page(browser: Browser) -> Iterator[Page]:
    context = browser.new_context(viewport={"width": 1280, "height": 800})
    page = context.new_page()
    errors: list[str] = []

    def on_console(message: ConsoleMessage) -> None:
        # Chromium logs every 4xx answer; a 400 the page shows the person is not a fault.
        if message.type == "error" and "status of 400" not in message.text:
            errors.append(message.text)

    page.on("console", on_console)
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    yield page
    context.close()
    assert errors == [], f"console errors: {errors}"


def shot(page: Page, name: str) -> None:
    SHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=SHOTS / f"{name}.png")


def test_start_watch_open_and_stop_from_the_ui(
    service: Service, workspace: Path, page: Page, browser: Browser
) -> None:
    page.goto(service.url + "/")
    expect(page).to_have_title("codestation")
    expect(page.locator("#empty")).to_be_visible()
    page.click("#code")
    page.fill("#workspace", str(workspace))
    shot(page, "start-dialog")
    # Record each step the dialog shows as current, as a person would see them go by.
    page.evaluate(
        """() => { window.stepsSeen = [];
           new MutationObserver(() => document.querySelectorAll("#progress li.now")
             .forEach(li => window.stepsSeen.includes(li.textContent)
                            || window.stepsSeen.push(li.textContent)))
           .observe(document.getElementById("progress"), {childList: true, subtree: true}); }"""
    )
    page.click("#start-go")
    # Progress step by step, then running, all without a reload.
    expect(page.locator("#progress li.done")).to_have_count(5, timeout=120_000)
    assert "waiting for OpenCode" in page.evaluate("window.stepsSeen")
    shot(page, "start-progress")
    page.click("#start-cancel")
    row = page.locator("#sessions tbody tr").first
    expect(row.locator(".status")).to_have_text("running")
    session_id = row.get_attribute("id").removeprefix("row-")  # type: ignore[union-attr]
    shot(page, "sessions")

    # "Open": OpenCode's own UI on the session's host name, no password prompt.
    with page.expect_popup() as popup:
        row.get_by_role("link", name="Open", exact=True).click()
    opencode = popup.value
    answered: list[int] = []
    opencode.on(
        "response",
        lambda r: answered.append(r.status) if "/global/health" in r.url or "/session" in r.url
        or "/path" in r.url or "/config" in r.url else None,
    )  # fmt: skip
    opencode.wait_for_load_state("load")
    expect(opencode).to_have_title(re.compile("OpenCode", re.IGNORECASE))
    assert opencode.url.startswith(f"http://{session_id}.localhost:")
    deadline = time.monotonic() + 20
    while 200 not in answered and time.monotonic() < deadline:
        opencode.wait_for_timeout(200)
    assert 200 in answered, answered
    assert 401 not in answered
    SHOTS.mkdir(parents=True, exist_ok=True)
    opencode.screenshot(path=SHOTS / "opencode-ui.png")
    # From that page (another origin), the terminal's WebSocket is refused.
    refused = opencode.evaluate(
        """url => new Promise(done => {
            const ws = new WebSocket(url);
            ws.onopen = () => done("opened");
            ws.onerror = ws.onclose = () => done("refused");
        })""",
        f"{service.url.replace('http', 'ws')}/api/v1/code/session/{session_id}/terminal?mode=shell",
    )
    assert refused == "refused"
    opencode.close()

    # Logs, then Stop.
    row.get_by_role("button", name="Logs").click()
    expect(page.locator("#logs-text")).to_contain_text("opencode server listening")
    page.click("#logs-close")
    row.get_by_role("button", name="Stop").click()
    expect(row.locator(".status")).to_have_text("stopped", timeout=60_000)
    engine = docker.from_env()
    assert not engine.containers.list(all=True, filters={"name": f"codestation-{session_id}"})
    engine.close()


def test_the_terminal_types_resizes_and_replays(
    service: Service, workspace: Path, page: Page
) -> None:
    (workspace / "made-on-host.txt").write_text("hello\n")
    session = service.client.wait(service.client.start(str(workspace)).id)
    assert session.status is Status.RUNNING, session.error
    page.goto(f"{service.url}/terminal/{session.id}?mode=shell")
    expect(page.locator("#state")).to_have_text("connected")

    def screen() -> str:
        return str(
            page.evaluate(
                """() => { const b = window.codestationTerminal.buffer.active; const out = [];
                   for (let i = 0; i < b.length; i++)
                     out.push(b.getLine(i).translateToString(true));
                   return out.join("\\n"); }"""
            )
        )

    def wait_for(pattern: str) -> re.Match[str]:
        deadline = time.monotonic() + 20
        while not (found := re.search(pattern, screen())):
            assert time.monotonic() < deadline, f"no {pattern!r} on screen:\n{screen()}"
            page.wait_for_timeout(200)
        return found

    page.locator("#terminal").click()
    page.keyboard.type("ls /workspace\n")
    wait_for("made-on-host.txt")
    page.keyboard.type("stty size\n")
    before = wait_for(r"\n(\d+) (\d+)\s*\n")
    shot(page, "terminal")
    page.set_viewport_size({"width": 700, "height": 420})
    page.wait_for_timeout(500)
    page.keyboard.type("clear; stty size\n")
    deadline = time.monotonic() + 20
    while True:
        sizes = re.findall(r"^(\d+) (\d+)\s*$", screen(), re.M)
        if sizes and sizes[-1] != before.groups():
            break
        assert time.monotonic() < deadline, f"stty size did not change: {sizes}"
        page.wait_for_timeout(200)
    rows, cols = map(int, sizes[-1])
    assert cols < int(before.group(2))
    # Reload: the same PTY, its recent output replayed.
    page.reload()
    expect(page.locator("#state")).to_have_text("connected")
    wait_for(rf"{rows} {cols}")
    service.client.stop(session.id)


def test_phone_width_and_dark_mode(service: Service, workspace: Path, browser: Browser) -> None:
    session = service.client.wait(service.client.start(str(workspace)).id)
    context = browser.new_context(viewport={"width": 390, "height": 800}, color_scheme="dark")
    page = context.new_page()
    page.goto(service.url + "/")
    expect(page.locator("#sessions tbody tr")).to_have_count(1)
    expect(page.locator(".status")).to_have_text("running")
    width = page.evaluate("document.documentElement.scrollWidth")
    assert width <= 390, f"the page scrolls sideways at phone width ({width}px)"
    shot(page, "sessions-phone-dark")
    context.close()
    service.client.stop(session.id)


def test_the_dialog_shows_why_a_start_was_refused_or_failed(
    start_service: ServiceFactory, workspace: Path, page: Page
) -> None:
    service = start_service(start_timeout="0.5")  # OpenCode never answers that fast
    page.goto(service.url + "/")
    page.click("#code")
    page.fill("#workspace", "/etc")
    page.click("#start-go")
    expect(page.locator("#start-error")).to_contain_text("outside the allowed roots")
    page.fill("#workspace", str(workspace))
    page.click("#start-go")
    expect(page.locator("#start-error")).to_contain_text("did not answer", timeout=60_000)
    shot(page, "start-failed")
    expect(page.locator("#sessions .status")).to_have_text("failed")
