"""Accounts: tokens made and revoked, requests' credentials checked, browsers logged in.

Used by the service (every request passes `by_token` or `by_login`) and by the CLI's `token`
and `user` commands, which open the same store directly, so they work whether the service runs
or not; a token revoked there is refused by the service at its next request.

Tickets carry a browser from the service's own origin to one session's host name, OAuth's
way: the session's host gives the browser a random *state* (in a cookie of its own) and sends
it to the service's `/open`, which mints a ticket for the logged-in caller bound to that state;
the session's host redeems it once, within a minute, only from the browser holding the state,
for a login cookie of its own. The token never appears in that host's URLs, and a ticket
someone else minted cannot log a browser into their session.
"""

from __future__ import annotations

import hmac
import time
from datetime import timedelta

from pydantic import SecretStr

from codestation.config import USER_NAME, Settings
from codestation.errors import BadRequest
from codestation.identity import (
    CODE_PREFIX,
    TOKEN_PREFIX,
    Caller,
    Login,
    Token,
    User,
    digest,
    matches,
    new_id,
    new_secret,
    split_login,
    split_token,
)
from codestation.sessions import now
from codestation.store import Store

TICKET_SECONDS = 60.0
CODE_MINUTES = 60.0  # a login link's life
USED_EVERY = 60.0  # seconds between writes of a token's last use


class Accounts:
    def __init__(self, store: Store, settings: Settings) -> None:
        self.store = store
        self.settings = settings
        self._tickets: dict[str, tuple[Caller, str, str, float]] = {}
        self._used: dict[str, float] = {}

    # -- tokens and users (the CLI) ---------------------------------------------------------

    def create_token(
        self, user: str, *, admin: bool = False, expires_days: float | None = None, note: str = ""
    ) -> tuple[Token, SecretStr]:
        """A new token for `user` (made if new); the secret is shown once and never stored."""
        if not USER_NAME.match(user):
            raise BadRequest(
                f"user name {user!r} is not allowed; use a lowercase Unix-style name "
                "(letters, digits, _ . -; starting with a letter or _; at most 32 characters)."
            )
        if expires_days is not None and expires_days <= 0:
            raise BadRequest("--expires must be a positive number of days.")
        created = now()
        token_id, secret = new_id(), new_secret()
        raw = f"{TOKEN_PREFIX}{token_id}_{secret}"
        token = Token(
            id=token_id,
            user=user,
            digest=digest(raw),
            admin=admin,
            created_at=created,
            expires_at=created + timedelta(days=expires_days) if expires_days else None,
            note=note,
        )
        self.store.add_token(token)
        return token, SecretStr(raw)

    def tokens(self) -> list[Token]:
        return self.store.tokens()

    def revoke(self, token_id: str) -> bool:
        """Revoke a token and end every browser login made with it; whether it existed."""
        return self.store.delete_token(token_id)

    def users(self) -> list[User]:
        return self.store.users()

    def has_admin(self) -> bool:
        at = now()
        return any(t.admin and not t.expired(at) for t in self.store.tokens())

    # -- requests ---------------------------------------------------------------------------

    def by_token(self, raw: str) -> Caller | None:
        """The caller a Bearer token stands for, or None (unknown, wrong, revoked, expired)."""
        parts = split_token(raw)
        if parts is None:
            return None
        token = self.store.token(parts[0])
        if token is None or not matches(raw, token.digest) or token.expired(now()):
            return None
        self._note_use(token.id)
        return Caller(token.user, token.admin, token.id)

    def login_code(self, token_id: str, minutes: float = CODE_MINUTES) -> SecretStr:
        """A one-time login code for a token (the login link carries it, never the token)."""
        if self.store.token(token_id) is None:
            raise BadRequest(
                f"there is no token {token_id!r}; `codestation token list` shows them."
            )
        code_id, secret = new_id(), new_secret()
        raw = f"{CODE_PREFIX}{code_id}_{secret}"
        self.store.add_login_code(
            code_id, digest(raw), token_id, now() + timedelta(minutes=minutes)
        )
        return SecretStr(raw)

    def by_code(self, raw: str) -> Caller | None:
        """The caller a login code stands for, used up by asking; None if it is not valid."""
        parts = split_token(raw, CODE_PREFIX)
        if parts is None:
            return None
        found = self.store.take_login_code(parts[0])
        if found is None or not matches(raw, found[0]) or now() >= found[2]:
            return None
        token = self.store.token(found[1])
        if token is None or token.expired(now()):
            return None
        return Caller(token.user, token.admin, token.id)

    def by_login(self, raw: str, scope: str) -> Caller | None:
        """The caller a login cookie stands for on `scope` ("" the service, else a session)."""
        parts = split_login(raw)
        if parts is None:
            return None
        login = self.store.login(parts[0])
        if login is None or login.scope != scope or not matches(parts[1], login.digest):
            return None
        at = now()
        token = self.store.token(login.token_id)
        if token is None or token.expired(at) or at >= login.expires_at:
            return None
        self._note_use(token.id)
        return Caller(token.user, token.admin, token.id, login)

    def login(self, caller: Caller, scope: str = "") -> tuple[str, int]:
        """A new browser login for `caller` on `scope`: the cookie's value and its lifetime in
        seconds. A session host's login lasts no longer than the login it came from, and ends
        with it."""
        token = self.store.token(caller.token_id)
        if token is None:
            raise BadRequest("the token was revoked meanwhile; log in again.")
        created = now()
        expires = created + timedelta(days=self.settings.login_days)
        if token.expires_at is not None:
            expires = min(expires, token.expires_at)
        if caller.login is not None:
            expires = min(expires, caller.login.expires_at)
        login_id, secret = new_id(), new_secret()
        self.store.add_login(
            Login(
                id=login_id,
                digest=digest(secret),
                token_id=token.id,
                scope=scope,
                csrf=SecretStr(new_secret()),
                created_at=created,
                expires_at=expires,
                parent=caller.login.id if caller.login is not None and scope else None,
            )
        )
        self.store.delete_expired_logins(created)
        return f"{login_id}.{secret}", max(0, int((expires - created).total_seconds()))

    def logout(self, caller: Caller) -> None:
        if caller.login is not None:
            self.store.delete_login(caller.login.id)

    def ticket(self, caller: Caller, session_id: str, state: str) -> str:
        """A single-use ticket that logs `caller` in on `session_id`'s host within a minute,
        in the browser that holds `state`."""
        clock = time.monotonic()
        self._tickets = {k: v for k, v in self._tickets.items() if v[3] > clock}
        ticket = new_secret()
        self._tickets[ticket] = (caller, session_id, state, clock + TICKET_SECONDS)
        return ticket

    def redeem(self, ticket: str, session_id: str, state: str) -> Caller | None:
        """The caller a ticket was minted for, if it is for this session and this browser, is
        fresh, and its token (and login) are still good; the ticket is used up either way."""
        caller, for_session, bound, until = self._tickets.pop(ticket, (None, "", "", 0.0))
        if caller is None or for_session != session_id or time.monotonic() > until:
            return None
        if not state or not hmac.compare_digest(state, bound):
            return None
        token = self.store.token(caller.token_id)
        if token is None or token.expired(now()):
            return None  # revoked or expired since the ticket was minted
        if caller.login is not None and self.store.login(caller.login.id) is None:
            return None  # logged out since
        return caller

    def _note_use(self, token_id: str) -> None:
        clock = time.monotonic()
        if clock - self._used.get(token_id, -USED_EVERY) >= USED_EVERY:
            self._used[token_id] = clock
            self.store.token_used(token_id, now())
