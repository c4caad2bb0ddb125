import threading
import time
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

import pytest

from codestation.accounts import TICKET_SECONDS, Accounts
from codestation.config import Settings
from codestation.errors import BadRequest
from codestation.identity import Caller, digest
from codestation.sessions import now
from codestation.store import Store


@pytest.fixture
def store(tmp_path: Path) -> Store:
    return Store(tmp_path / "data" / "codestation.db")


@pytest.fixture
def accounts(store: Store, tmp_path: Path) -> Accounts:
    return Accounts(store, Settings(data_dir=tmp_path / "data"))


def test_a_token_is_random_stored_hashed_and_shown_once(accounts: Accounts, store: Store) -> None:
    token, secret = accounts.create_token("alice")
    raw = secret.get_secret_value()
    assert raw.startswith(f"cst_{token.id}_")
    assert len(raw.split("_", 2)[2]) >= 43  # 256 bits, url-safe base64
    assert raw not in repr(secret)
    assert raw not in str(secret)
    stored = store.token(token.id)
    assert stored is not None
    assert stored.digest == digest(raw)
    assert raw not in Path(store.path).read_bytes().decode(errors="replace")
    assert accounts.by_token(raw) == Caller("alice", False, token.id)


@pytest.mark.parametrize(
    "forge",
    [
        lambda raw: raw[:-1] + ("A" if raw[-1] != "A" else "B"),  # one character off
        lambda raw: raw.replace("cst_", "cs_"),
        lambda raw: "cst_" + "a" * 10 + "_" + raw.split("_", 2)[2],  # another id
        lambda raw: "",
        lambda raw: "cst_",
        lambda raw: "cst__x",
        lambda raw: raw.split("_", 2)[0] + "_" + raw.split("_", 2)[1],  # no secret
    ],
)
def test_forged_tokens_are_refused(accounts: Accounts, forge: Callable[[str], str]) -> None:
    _, secret = accounts.create_token("alice")
    assert accounts.by_token(forge(secret.get_secret_value())) is None


def test_revoked_and_expired_tokens_are_refused(accounts: Accounts, store: Store) -> None:
    token, secret = accounts.create_token("alice", expires_days=1)
    raw = secret.get_secret_value()
    assert accounts.by_token(raw) is not None
    assert accounts.revoke(token.id)
    assert accounts.by_token(raw) is None
    assert not accounts.revoke(token.id)
    old, old_secret = accounts.create_token("bob", expires_days=1)
    with store._transaction() as db:  # a day later
        db.execute(
            "UPDATE tokens SET expires_at = ? WHERE id = ?",
            ((now() - timedelta(seconds=1)).isoformat(), old.id),
        )
    assert accounts.by_token(old_secret.get_secret_value()) is None


@pytest.mark.parametrize("name", ["Alice", "../x", "a/b", "", "x" * 40, "1abc", "a b"])
def test_user_names_are_unix_names(accounts: Accounts, name: str) -> None:
    with pytest.raises(BadRequest, match="not allowed"):
        accounts.create_token(name)


def test_users_exist_once_they_have_a_token(accounts: Accounts) -> None:
    assert accounts.users() == []
    assert not accounts.has_admin()
    accounts.create_token("alice")
    accounts.create_token("alice")
    accounts.create_token("root", admin=True)
    users = {u.name: u for u in accounts.users()}
    assert users["alice"].tokens == 2
    assert not users["alice"].admin
    assert users["root"].admin
    assert accounts.has_admin()


def test_a_login_is_scoped_ends_with_its_token_and_its_parent(accounts: Accounts) -> None:
    token, secret = accounts.create_token("alice", expires_days=2)
    who = accounts.by_token(secret.get_secret_value())
    assert who is not None
    cookie, max_age = accounts.login(who)
    assert max_age <= 2 * 86400  # never beyond its token's life
    on_service = accounts.by_login(cookie, "")
    assert on_service is not None
    assert on_service.login is not None
    assert on_service.user == "alice"
    assert accounts.by_login(cookie, "cs-other") is None  # the service's cookie is not a session's
    session_cookie, _ = accounts.login(on_service, scope="cs-abc")
    assert accounts.by_login(session_cookie, "cs-abc") is not None
    assert accounts.by_login(session_cookie, "") is None
    assert accounts.by_login(cookie[:-1] + "x", "") is None
    assert accounts.by_login("junk", "") is None
    accounts.logout(on_service)  # ends the session host's login made from it too
    assert accounts.by_login(cookie, "") is None
    assert accounts.by_login(session_cookie, "cs-abc") is None
    again, _ = accounts.login(who)
    accounts.revoke(token.id)
    assert accounts.by_login(again, "") is None


def test_tickets_are_single_use_per_session_per_browser_and_short_lived(
    accounts: Accounts, monkeypatch: pytest.MonkeyPatch
) -> None:
    token, _ = accounts.create_token("alice")
    who = Caller("alice", False, token.id)
    ticket = accounts.ticket(who, "cs-abc", "state-1")
    assert accounts.redeem(ticket, "cs-other", "state-1") is None  # and it is spent
    ticket = accounts.ticket(who, "cs-abc", "state-1")
    assert accounts.redeem(ticket, "cs-abc", "another browser's") is None
    ticket = accounts.ticket(who, "cs-abc", "state-1")
    assert accounts.redeem(ticket, "cs-abc", "") is None
    ticket = accounts.ticket(who, "cs-abc", "state-1")
    assert accounts.redeem(ticket, "cs-abc", "state-1") == who
    assert accounts.redeem(ticket, "cs-abc", "state-1") is None
    late = accounts.ticket(who, "cs-abc", "s")
    clock = time.monotonic() + TICKET_SECONDS + 1
    monkeypatch.setattr("codestation.accounts.time.monotonic", lambda: clock)
    assert accounts.redeem(late, "cs-abc", "s") is None


def test_a_ticket_dies_with_its_token_or_its_login(accounts: Accounts) -> None:
    token, secret = accounts.create_token("alice")
    who = accounts.by_token(secret.get_secret_value())
    assert who is not None
    cookie, _ = accounts.login(who)
    browser = accounts.by_login(cookie, "")
    assert browser is not None
    after_logout = accounts.ticket(browser, "cs-abc", "s")
    accounts.logout(browser)
    assert accounts.redeem(after_logout, "cs-abc", "s") is None
    after_revoke = accounts.ticket(who, "cs-abc", "s")
    accounts.revoke(token.id)
    assert accounts.redeem(after_revoke, "cs-abc", "s") is None


def test_a_login_code_is_used_once_and_expires(accounts: Accounts, store: Store) -> None:
    token, _ = accounts.create_token("alice")
    code = accounts.login_code(token.id).get_secret_value()
    assert code.startswith("csl_")
    assert accounts.by_token(code) is None  # not a token
    assert accounts.by_code(code) == Caller("alice", False, token.id)
    assert accounts.by_code(code) is None  # used up
    stale = accounts.login_code(token.id, minutes=-1).get_secret_value()
    assert accounts.by_code(stale) is None
    revoked = accounts.login_code(token.id).get_secret_value()
    accounts.revoke(token.id)
    assert accounts.by_code(revoked) is None
    with pytest.raises(BadRequest, match="no token"):
        accounts.login_code("nope")


def test_concurrent_token_creation_is_safe(accounts: Accounts) -> None:
    made: list[str] = []

    def make() -> None:
        made.append(accounts.create_token("alice")[0].id)

    threads = [threading.Thread(target=make) for _ in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(made)) == 20
    assert len(accounts.tokens()) == 20
