"""Hostile requests on every route: forged, expired and revoked tokens, forged cookies, CSRF,
foreign Host headers, WebSockets from foreign pages, oversized bodies, smuggled request
targets, login tricks. Each gets a clear 4xx (JSON where the service answers) and changes
nothing: one service and one running session serve the whole table, and the session must
still be running, alone, at the end.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

import httpx
import pytest
from websockets.exceptions import InvalidStatus
from websockets.sync.client import connect
from websockets.typing import Origin

from codestation import SessionInfo, Status
from tests.e2e.conftest import Service, free_range, launch

pytestmark = pytest.mark.runtimes("bwrap")  # the door is the same whatever runs behind it

ID = "cs-aaaaaaaaaaaaaaaa"  # well-formed, unknown


@dataclass
class World:
    service: Service
    session: SessionInfo
    expired: str
    revoked: str
    cookie: str  # a real browser login of the admin's
    csrf: str
    session_cookie: str  # a real login on the session's host name

    @property
    def port(self) -> int:
        return self.service.port


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    tmp = tmp_path_factory.mktemp("hostile")
    service = launch(tmp, free_range(4), {}, runtime="bwrap")
    project = tmp / "project"
    project.mkdir()
    session = service.client.wait(service.client.start(str(project), wait=False).id, timeout=120)
    assert session.status is Status.RUNNING, session.error
    expired = service.make_token("eve", expires="0.00002")  # under two seconds
    revoked = service.make_token("eve")
    listed = service.cli("token", "list", "--json").stdout
    revoked_id = revoked.split("_")[1]
    assert revoked_id in listed
    assert service.cli("token", "revoke", revoked_id).returncode == 0
    with httpx.Client(base_url=service.url) as browser:
        login = browser.post("/login", json={"token": service.token})
        cookie = login.cookies["codestation"]
        csrf = browser.get("/api/v1/code/me").json()["csrf_token"]
        session_cookie = service.browser_login(browser, session.id)
    time.sleep(2)  # the short token has expired
    yield World(service, session, expired, revoked, cookie, csrf, session_cookie)
    after = service.client.sessions()
    assert [(s.id, s.status) for s in after] == [(session.id, Status.RUNNING)]
    service.client.stop_all(everyone=True)
    service.stop_process()
    assert service.leftovers() == []


@dataclass
class Case:
    method: str
    path: str
    status: int
    code: str | None = None
    headers: Callable[[World], dict[str, str]] = lambda w: {}
    body: bytes | None = None
    says: str = ""


def bearer(token: Callable[[World], str]) -> Callable[[World], dict[str, str]]:
    return lambda w: {"Authorization": f"Bearer {token(w)}".strip()}


def host(name: str) -> Callable[[World], dict[str, str]]:
    return lambda w: {"Host": name.format(port=w.port, id=w.session.id), **bearer(admin)(w)}


def admin(w: World) -> str:
    return w.service.token


def cookie(
    extra: Callable[[World], dict[str, str]] = lambda w: {},
) -> Callable[[World], dict[str, str]]:
    return lambda w: {"Cookie": f"codestation={w.cookie}", **extra(w)}


def tweak(raw: str) -> str:
    return raw[:-1] + ("A" if raw[-1] != "A" else "B")


S = f"/api/v1/code/session/{ID}"
START = b'{"workspace": "/tmp"}'
# fmt: off
CASES: dict[str, Case] = {
    # No credentials at all, on every route but /healthz and the login page.
    **{
        f"anonymous {m} {p}": Case(m, p, 401, "unauthorized", says="codestation token create")
        for m, p in [
            ("GET", "/api/v1/code/sessions"),
            ("POST", "/api/v1/code/start"),
            ("GET", S),
            ("GET", f"{S}/logs"),
            ("GET", f"{S}/logs?follow=true"),
            ("POST", f"{S}/stop"),
            ("DELETE", S),
            ("POST", "/api/v1/code/stop"),
            ("GET", "/api/v1/code/events"),
            ("GET", "/api/v1/code/environments"),
            ("GET", "/api/v1/code/me"),
            ("GET", "/openapi.json"),
            ("POST", "/logout"),
            ("GET", "/static/app.js"),
        ]
    },
    **{
        f"anonymous page {p}": Case(
            "GET", p, 303, headers=lambda w: {"Accept": "text/html"}, says=""
        )
        for p in ["/", f"/terminal/{ID}", "/docs", f"/open/{ID}"]
    },
    "healthz answers anyone": Case("GET", "/healthz", 200),
    "a token in the query string is no credential": Case(
        "GET", "/api/v1/code/sessions?token={token}", 401, "unauthorized"
    ),
    # Forged, expired and revoked tokens.
    **{
        f"forged token {name}": Case(
            "GET", "/api/v1/code/sessions", 401, "unauthorized", bearer(forge), says="not valid"
        )
        for name, forge in {
            "empty": lambda w: "",  # sent as a bare "Authorization: Bearer"
            "prefix only": lambda w: "cst_",
            "no secret": lambda w: "cst_abcdefghij_",
            "made up": lambda w: "cst_abcdefghij_" + "x" * 43,
            "one character off": lambda w: tweak(w.service.token),
            "another id, same secret": lambda w: (
                "cst_aaaaaaaaaa_" + w.service.token.split("_", 2)[2]
            ),
            "a session password": lambda w: w.session.auth.password,
            "with trailing junk": lambda w: w.service.token + "x",
        }.items()
    },
    "expired token": Case(
        "GET", "/api/v1/code/sessions", 401, "unauthorized", bearer(lambda w: w.expired)
    ),
    "revoked token": Case(
        "GET", "/api/v1/code/sessions", 401, "unauthorized", bearer(lambda w: w.revoked)
    ),
    "Basic is not a codestation credential": Case(
        "GET",
        "/api/v1/code/sessions",
        401,
        "unauthorized",
        lambda w: {"Authorization": "Basic b3BlbmNvZGU6eA=="},
    ),
    # Forged cookies.
    **{
        f"forged cookie {name}": Case("GET", "/api/v1/code/sessions", 401, "unauthorized", jar)
        for name, jar in {
            "junk": lambda w: {"Cookie": "codestation=junk"},
            "shaped": lambda w: {"Cookie": "codestation=abcdefghij.xyz"},
            "one character off": lambda w: {"Cookie": f"codestation={tweak(w.cookie)}"},
            "a session host's, on the service": lambda w: {
                "Cookie": f"codestation={w.session_cookie}"
            },
            "unparseable": lambda w: {"Cookie": 'codestation="\\x00;;'},
        }.items()
    },
    # A cookie alone changes nothing: the CSRF token must come too.
    **{
        f"csrf missing {m} {p}": Case(m, p, 403, "csrf_failed", cookie(), START, "X-CSRF-Token")
        for m, p in [
            ("POST", "/api/v1/code/start"),
            ("POST", f"{S}/stop"),
            ("DELETE", S),
            ("POST", "/api/v1/code/stop"),
            ("POST", "/logout"),
        ]
    },
    "csrf wrong": Case(
        "POST",
        "/api/v1/code/stop",
        403,
        "csrf_failed",
        cookie(lambda w: {"X-CSRF-Token": tweak(w.csrf)}),
    ),
    "csrf from a foreign page": Case(
        "POST",
        "/api/v1/code/stop",
        403,
        "csrf_failed",
        cookie(lambda w: {"Origin": "https://evil.example"}),
    ),
    "cookie reads are fine": Case("GET", "/api/v1/code/sessions", 200, headers=cookie()),
    # A cookie another site set in an odd shape, or a second one of our name, hides nothing.
    "odd cookies beside ours": Case("GET", "/api/v1/code/me", 200, headers=lambda w: {
        "Cookie": f'prefs={{"theme":"dark"}}; tz=Europe Paris; codestation={w.cookie}'}),
    "a tossed cookie of our name": Case("GET", "/api/v1/code/me", 200, headers=lambda w: {
        "Cookie": f"codestation={w.cookie}; codestation=abcdefgh.tossed"}),
    "a workspace that is not text": Case(
        "POST", "/api/v1/code/start", 400, "workspace_rejected",
        lambda w: {"Content-Type": "application/json", **bearer(admin)(w)},
        b'{"workspace": "/tmp/\\ud800"}', "not valid text",
    ),
    "cookie and the token change things": Case(
        "POST",
        f"{S}/stop",
        404,
        "session_not_found",
        cookie(lambda w: {"X-CSRF-Token": w.csrf}),
    ),
    # Host names the service was not configured for (DNS rebinding), even with a good token.
    **{
        f"foreign host {name}": Case(
            "GET", "/api/v1/code/sessions", 400, "unknown_host", host(name)
        )
        for name in [
            "evil.example",
            "evil.example:{port}",
            "127.0.0.1.evil.example:{port}",
            "localhost.evil.example",
            "{id}.evil.example:{port}",
            "a.{id}.localhost:{port}",
            "a@127.0.0.1:{port}",
            "[::2]:{port}",
            "127.0.0.2:{port}",
        ]
    },
    "foreign host on healthz": Case("GET", "/healthz", 400, "unknown_host", host("evil.example")),
    # Bodies over max_body_size.
    "oversized start": Case(
        "POST",
        "/api/v1/code/start",
        413,
        "payload_too_large",
        bearer(admin),
        b'{"workspace": "' + b"x" * (2 << 20) + b'"}',
    ),
    "oversized login": Case(
        "POST", "/login", 413, "payload_too_large", body=b"{" + b" " * (2 << 20) + b"}"
    ),
    # Login tricks.
    "login with a bad token": Case(
        "POST",
        "/login",
        401,
        "unauthorized",
        body=b'{"token": "cst_x_y"}',
        headers=lambda w: {"Content-Type": "application/json"},
    ),
    "login posted by a foreign page": Case(
        "POST",
        "/login",
        403,
        "forbidden",
        lambda w: {"Origin": "https://evil.example", "Content-Type": "application/json"},
        b'{"token": "x"}',
    ),
    "login link sent by another site": Case(
        "GET",
        "/login?token={token}",
        303,
        headers=lambda w: {"Sec-Fetch-Site": "cross-site"},
        says="",
    ),
    "login link with a bad token": Case("GET", "/login?token=cst_x_y", 303),
}
# fmt: on


@pytest.mark.parametrize("name", list(CASES))
def test_hostile_request(world: World, name: str) -> None:
    case = CASES[name]
    path = case.path.replace("{token}", world.service.token)
    with httpx.Client(base_url=world.service.url, timeout=30) as http:
        answer = http.request(
            case.method,
            path,
            headers=case.headers(world),
            content=case.body,
            follow_redirects=False,
        )
    assert answer.status_code == case.status, answer.text[:500]
    if case.code is not None:
        assert answer.json()["code"] == case.code, answer.text[:500]
        assert case.says in answer.json()["error"]
    if case.status == 303:
        location = answer.headers["location"]
        assert world.service.token not in location
        assert "codestation=" not in answer.headers.get("set-cookie", "")
        assert location.startswith(("/login", f"{world.service.url}/"))
    assert world.service.token not in answer.text


def test_a_login_link_goes_only_to_this_origin_and_works_once(world: World) -> None:
    for target in ("//evil.example/x", "https://evil.example", "/\\evil.example", "javascript:x"):
        link = world.service.login_link()
        answer = httpx.get(f"{link}&next={quote(target, safe='')}", follow_redirects=False)
        assert answer.status_code == 303
        assert answer.headers["location"] == "/", target
        assert "codestation=" in answer.headers["set-cookie"]
        again = httpx.get(link, follow_redirects=False)  # used up
        assert again.headers["location"].endswith("error=invalid")
    # A token itself is never taken from a URL.
    answer = httpx.get(
        f"{world.service.url}/login", params={"token": world.service.token}, follow_redirects=False
    )
    assert answer.headers["location"].endswith("error=token_in_url")
    assert "set-cookie" not in answer.headers


def test_a_ticket_made_for_one_browser_logs_no_other_in(world: World) -> None:
    """Login CSRF on a session's host name: bob makes a ticket (with his own browser's state)
    and sends the victim to the door. Without bob's state cookie the door is shut."""
    host = f"{world.session.id}.localhost:{world.port}"
    with httpx.Client(base_url=world.service.url, cookies={"codestation": world.cookie}) as bob:
        to_service = bob.get("/", headers={"Accept": "text/html", "Host": host})
        assert to_service.status_code == 303
        back = bob.get(to_service.headers["location"])
        assert back.status_code == 303
    door = back.headers["location"].replace(f"http://{host}", world.service.url)
    for victim_cookies in ({}, {"Cookie": "codestation_state=the-victims-own"}):
        answer = httpx.get(door, headers={"Host": host, **victim_cookies})
        assert answer.status_code == 403, answer.text
        assert "codestation_session" not in answer.headers.get("set-cookie", "")


@pytest.mark.parametrize(
    ("url", "origin"),
    [
        (
            "ws://127.0.0.1:{port}/api/v1/code/session/{id}/terminal?mode=shell",
            "http://evil.example",
        ),
        (
            "ws://127.0.0.1:{port}/api/v1/code/session/{id}/terminal?mode=shell",
            "http://{id}.localhost:{port}",
        ),
        (
            "ws://127.0.0.1:{port}/api/v1/code/session/{id}/terminal?mode=shell",
            "http://127.0.0.1:1",
        ),
        ("ws://127.0.0.1:{port}/api/v1/code/session/{id}/terminal?mode=shell", "null"),
        ("ws://{id}.localhost:{port}/pty/x/connect", "http://127.0.0.1:{port}"),
        ("ws://{id}.localhost:{port}/pty/x/connect", "http://evil.example"),
    ],
)
def test_websockets_from_a_foreign_page_are_refused(world: World, url: str, origin: str) -> None:
    fill = {"port": world.port, "id": world.session.id}
    sock = socket.create_connection(("127.0.0.1", world.port))
    with pytest.raises(InvalidStatus) as refused:
        connect(
            url.format(**fill),
            sock=sock,
            origin=Origin(origin.format(**fill)),
            additional_headers={"Cookie": f"codestation={world.cookie}"}
            if "terminal" in url
            else {"Cookie": f"codestation_session={world.session_cookie}"},
        )
    assert refused.value.response.status_code == 403


@pytest.mark.parametrize(
    "target", ["@127.0.0.1:{trap}/x", "//127.0.0.1:{trap}/x", "http://127.0.0.1:{trap}/x"]
)
def test_a_smuggled_request_target_never_leaves_for_another_host(world: World, target: str) -> None:
    with socket.socket() as trap:
        trap.bind(("127.0.0.1", 0))
        trap.listen()
        trap.settimeout(0.5)
        line = target.format(trap=trap.getsockname()[1])
        with socket.create_connection(("127.0.0.1", world.port), timeout=10) as sock:
            sock.sendall(
                f"GET {line} HTTP/1.1\r\nHost: {world.session.id}.localhost:{world.port}\r\n"
                f"Authorization: Bearer {world.service.token}\r\nConnection: close\r\n\r\n".encode()
            )
            answer = b""
            while chunk := sock.recv(65536):
                answer += chunk
        assert answer.startswith(b"HTTP/1.1 "), answer[:200]
        with pytest.raises(TimeoutError):
            trap.accept()  # nobody came


def test_a_chunked_oversized_body_is_cut_off(world: World) -> None:
    def chunks() -> Iterator[bytes]:
        yield b'{"workspace": "'
        for _ in range(40):
            yield b"x" * 65536
        yield b'"}'

    with httpx.Client(base_url=world.service.url, timeout=30) as http:
        answer = http.post(
            "/api/v1/code/start",
            content=chunks(),
            headers={**world.service.auth_headers(), "Content-Type": "application/json"},
        )
    assert answer.status_code == 413, answer.text
    assert answer.json()["code"] == "payload_too_large"


def test_the_table_is_big_enough() -> None:
    assert len(CASES) >= 60, len(CASES)


def test_nothing_secret_in_the_log(world: World) -> None:
    log = Path(world.service.log).read_text()
    assert log.count("/login?token=csl_") == 1  # the one-time link the first start printed
    assert "/login?[query hidden]" in log  # the links the table followed, in the access log
    assert "/_codestation/auth?[query hidden]" in log
    rest = log
    secrets = [world.service.token.split("_", 2)[2], world.cookie, world.session_cookie]
    secrets += [world.session.auth.password, world.csrf, world.expired, world.revoked]
    for secret in secrets:
        assert secret not in rest
