"""The web UI in a real browser (Debian's Chromium, driven by Playwright).

Screenshots of the main screens land in test-artifacts/screenshots; the README shows copies.
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
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
        # Chromium logs every 4xx answer; a 400 the page shows the person is not a fault, nor a
        # 401 for a wrong token typed into the login page.
        on_login = "/login" in message.location.get("url", "")
        expected = "status of 400" in message.text or (on_login and "status of 401" in message.text)
        if message.type == "error" and not expected:
            errors.append(f"{message.text} ({message.location.get('url')}, page {page.url})")

    page.on("console", on_console)
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    yield page
    context.close()
    assert errors == [], f"console errors: {errors}"


def login_link(service: Service) -> str:
    """The link `codestation serve` printed at its first start."""
    found = re.search(r"(http://\S+/login\?token=csl_\S+)", service.log.read_text())
    assert found, service.log.read_text()
    return found.group(1)


def log_in(page: Page, service: Service) -> None:
    page.goto(login_link(service))
    expect(page).to_have_url(service.url + "/")  # the token is gone from the address bar
    expect(page.locator("#who")).to_have_text("admin (admin)")


def shot(page: Page, name: str) -> None:
    SHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=SHOTS / f"{name}.png")


def test_the_first_start_s_login_link_logs_in_and_logout_logs_out(
    service: Service, page: Page
) -> None:
    page.goto(service.url + "/")
    expect(page).to_have_url(re.compile(r"/login\?next=%2F$"))  # not logged in yet
    shot(page, "login")
    log_in(page, service)
    cookies = page.context.cookies()
    assert [(c["name"], c["httpOnly"], c["sameSite"]) for c in cookies] == [
        ("codestation", True, "Lax")
    ]
    assert "domain" not in cookies[0] or cookies[0]["domain"] == "127.0.0.1"  # host-only
    assert service.token not in page.content()
    page.click("#logout")
    expect(page).to_have_url(re.compile(r"/login$"))
    page.goto(service.url + "/")
    expect(page).to_have_url(re.compile(r"/login"))
    # Pasting the token works too.
    page.fill("#token", "cst_not_a_token")
    page.click("#login-go")
    expect(page.locator("#login-error")).to_contain_text("not valid")
    page.fill("#token", service.token)
    page.click("#login-go")
    expect(page).to_have_url(service.url + "/")
    expect(page.locator("#who")).to_have_text("admin (admin)")


def test_start_watch_open_and_stop_from_the_ui(
    service: Service, workspace: Path, page: Page, browser: Browser
) -> None:
    log_in(page, service)
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
    assert opencode.url == f"http://{session_id}.localhost:{service.port}/"  # the ticket is spent
    assert service.token not in opencode.url
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
    log_in(page, service)
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
    log_in(page, service)
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
    log_in(page, service)
    page.click("#code")
    page.fill("#workspace", "/etc")
    page.click("#start-go")
    expect(page.locator("#start-error")).to_contain_text("outside the allowed roots")
    page.fill("#workspace", str(workspace))
    page.click("#start-go")
    expect(page.locator("#start-error")).to_contain_text("did not answer", timeout=60_000)
    shot(page, "start-failed")
    expect(page.locator("#sessions .status")).to_have_text("failed")


def test_the_api_docs_come_from_this_origin(service: Service, page: Page) -> None:
    log_in(page, service)
    asked: list[str] = []
    page.on("request", lambda r: asked.append(r.url))
    page.goto(service.url + "/docs")
    expect(page.locator(".swagger-ui .info .title")).to_contain_text("codestation")
    expect(page.locator(".opblock-summary-path").first).to_be_visible()
    assert asked
    assert all(url.startswith((service.url, "data:")) for url in asked), asked


EVIL_PAGE = b"""<!doctype html><title>a page on another origin</title>
<form id="f" method="post" enctype="text/plain" target="sink"></form>
<iframe name="sink"></iframe>"""


@pytest.fixture
def evil_origin() -> Iterator[str]:
    """A small web server on another port of this machine: another origin, the same site."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("Content-Type", "text/html")
            self.end_headers()
            self.wfile.write(EVIL_PAGE)

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_a_page_of_another_origin_can_do_nothing(
    service: Service, workspace: Path, browser: Browser, evil_origin: str
) -> None:
    session = service.client.wait(service.client.start(str(workspace)).id)
    assert session.status is Status.RUNNING, session.error
    context = browser.new_context()
    mine = context.new_page()
    log_in(mine, service)
    mine.goto(f"{service.url}/open/{session.id}")  # logged in on the session's host name too
    expect(mine).to_have_title(re.compile("OpenCode", re.IGNORECASE))
    evil = context.new_page()
    evil.goto(evil_origin)
    api, proxied = service.url, f"http://{session.id}.localhost:{service.port}"
    tries = evil.evaluate(
        """async ([api, proxied, id]) => {
        const attempt = async (f) => { try { return String(await f()); }
                                        catch (e) { return "blocked"; } };
        const result = {};
        result.read = await attempt(async () =>
            (await fetch(api + "/api/v1/code/sessions", {credentials: "include"})).status);
        result.readSession = await attempt(async () =>
            (await fetch(proxied + "/session", {credentials: "include"})).status);
        result.start = await attempt(async () => (await fetch(api + "/api/v1/code/start", {
            method: "POST", credentials: "include", mode: "no-cors",
            headers: {"Content-Type": "text/plain"},
            body: JSON.stringify({workspace: "/tmp"})})).type);
        result.stop = await attempt(async () => (await fetch(api + "/api/v1/code/stop", {
            method: "POST", credentials: "include", mode: "no-cors"})).type);
        result.stopProxied = await attempt(async () => (await fetch(proxied + "/instance/dispose",
            {method: "POST", credentials: "include", mode: "no-cors"})).type);
        const form = document.getElementById("f");
        form.action = api + "/api/v1/code/session/" + id + "/stop";
        form.submit();
        await new Promise(r => setTimeout(r, 1000));
        result.terminal = await new Promise(done => {
            const ws = new WebSocket(api.replace("http", "ws") +
                "/api/v1/code/session/" + id + "/terminal?mode=shell");
            ws.onopen = () => done("opened"); ws.onerror = ws.onclose = () => done("refused");
        });
        result.pty = await new Promise(done => {
            const ws = new WebSocket(proxied.replace("http", "ws") + "/pty/x/connect");
            ws.onopen = () => done("opened"); ws.onerror = ws.onclose = () => done("refused");
        });
        return result;
    }""",
        [api, proxied, session.id],
    )
    assert tries["read"] == "blocked", tries  # no CORS: the answer cannot be read
    assert tries["readSession"] == "blocked", tries
    assert tries["terminal"] == "refused", tries
    assert tries["pty"] == "refused", tries
    # The writes went out (a page may send what it likes) and changed nothing.
    assert [(s.id, s.status) for s in service.client.sessions()] == [(session.id, Status.RUNNING)]
    log = service.log.read_text()
    assert 'POST /api/v1/code/stop HTTP/1.1" 403' in log
    assert f'POST /api/v1/code/session/{session.id}/stop HTTP/1.1" 403' in log
    context.close()
    service.client.stop(session.id)
