"""The web UI in a real browser (Debian's Chromium, driven by Playwright).

Screenshots of the main screens land in test-artifacts/screenshots; the README shows copies.
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import docker
import pytest
from playwright.sync_api import BrowserContext, Page, expect

from codestation import Status
from tests.e2e.browser import Console, log_in
from tests.e2e.conftest import Service, ServiceFactory

pytestmark = pytest.mark.runtimes("docker")  # the UI does not depend on the runtime

SHOTS = Path(__file__).resolve().parents[2] / "test-artifacts" / "screenshots"


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
    service: Service, workspace: Path, page: Page, console: Console
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
    # How full the host is, as /healthz says: this session's 4g of the tests' 1024g budget.
    expect(page.locator("#capacity")).to_have_text(
        "1 of 100 sessions · 4.0 of 1024.0 GiB reserved", timeout=10_000
    )
    # Whether its agent is working, as the service last saw it.
    expect(row.locator(".detail.agent")).to_contain_text("agent idle", timeout=15_000)
    shot(page, "sessions")

    # "Open": OpenCode's own UI on the session's host name, no password prompt, on the
    # workspace's project and its sessions (not OpenCode's empty home).
    made = service.http().post(
        f"/api/v1/code/session/{session_id}/opencode/session",
        json={"title": "an OpenCode session made before Open"},
        headers={"x-opencode-directory": "/workspace"},
    )
    assert made.status_code == 200, made.text
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
    expect(opencode.get_by_text("workspace", exact=True).first).to_be_visible(timeout=20_000)
    expect(opencode.get_by_text("an OpenCode session made before Open")).to_be_visible()
    # codestation's first page there goes on only to a page of that host, however `next` is
    # written (a tab inside `/\t/evil.example` is dropped by URL parsers: `//evil.example`).
    here = f"http://{session_id}.localhost:{service.port}"
    for sly in (
        "/%09/evil.example/",
        "//evil.example/",
        "https://evil.example/",
        "/\\evil.example",
    ):
        opencode.goto(f"{here}/_codestation/open?next={sly}")
        opencode.wait_for_url(re.compile(rf"^{re.escape(here)}/"))
        assert opencode.url.startswith(f"{here}/"), (sly, opencode.url)
    SHOTS.mkdir(parents=True, exist_ok=True)
    opencode.screenshot(path=SHOTS / "opencode-ui.png")
    # From that page (another origin), the terminal's WebSocket is refused.
    terminal = f"{service.url.replace('http', 'ws')}/api/v1/code/session/{session_id}/terminal"
    console.excuse(terminal)  # the browser logs the refusal
    refused = opencode.evaluate(
        """url => new Promise(done => {
            const ws = new WebSocket(url);
            ws.onopen = () => done("opened");
            ws.onerror = ws.onclose = () => done("refused");
        })""",
        f"{terminal}?mode=shell",
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
    session = service.client.wait(service.client.start(str(workspace), wait=False).id)
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


def luminance(css_colour: str) -> float:
    """Relative luminance (0 black, 1 white) of a computed `rgb(...)` or `rgba(...)` colour."""
    found = re.fullmatch(r"rgba?\((\d+), (\d+), (\d+)(?:, [\d.]+)?\)", css_colour)
    assert found, css_colour
    r, g, b = (int(c) / 255 for c in found.groups())
    return 0.2126 * r + 0.7152 * g + 0.0722 * b


def test_phone_width_and_dark_mode(
    service: Service, workspace: Path, new_context: Callable[..., BrowserContext]
) -> None:
    session = service.client.wait(service.client.start(str(workspace), wait=False).id)
    page = new_context(viewport={"width": 390, "height": 800}).new_page()
    log_in(page, service)
    expect(page.locator("#sessions tbody tr")).to_have_count(1)
    expect(page.locator(".status")).to_have_text("running")

    def colours() -> tuple[float, float]:
        found = page.evaluate(
            """() => { const s = getComputedStyle(document.body);
                       return [s.backgroundColor, s.color]; }"""
        )
        return luminance(found[0]), luminance(found[1])

    page.emulate_media(color_scheme="light")
    light_background, light_text = colours()
    assert light_background > 0.8
    assert light_text < 0.2
    page.emulate_media(color_scheme="dark")
    dark_background, dark_text = colours()
    assert dark_background < 0.2
    assert dark_text > 0.8
    width = page.evaluate("document.documentElement.scrollWidth")
    assert width <= 390, f"the page scrolls sideways at phone width ({width}px)"
    shot(page, "sessions-phone-dark")
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
    service: Service,
    workspace: Path,
    new_context: Callable[..., BrowserContext],
    console: Console,
    evil_origin: str,
) -> None:
    session = service.client.wait(service.client.start(str(workspace), wait=False).id)
    assert session.status is Status.RUNNING, session.error
    console.excuse(evil_origin + "/")  # its page's refused requests log errors, as they should
    context = new_context()
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
    context.close()  # before its session stops under its OpenCode page
    service.client.stop(session.id)
