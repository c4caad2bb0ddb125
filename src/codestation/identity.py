"""Who is asking: the records behind accounts, and the secrets that prove them.

A *token* (`cst_<id>_<secret>`) is what a program sends (`Authorization: Bearer ...`); a
*login* (`<id>.<secret>`, in a cookie) is what a browser holds after it showed a token once,
pasted into the login page or as a *login code* (`csl_<id>_<secret>`): a one-time, short-lived
stand-in for a token, the only kind of secret a URL (the login link) may carry.
Both are at least 256 random bits, stored only as a SHA-256 digest (random secrets need no
salt or rounds, as JupyterHub found) and compared in constant time; the id part finds the row.
A login belongs to a token: revoking the token ends every login made with it.

The `Caller` is resolved once per request at the edge (`api/access.py`) and handed to every
lookup of a session, so another user's session is simply "not found".
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
from dataclasses import dataclass
from datetime import datetime

from pydantic import SecretStr

TOKEN_PREFIX = "cst_"
CODE_PREFIX = "csl_"


def new_id() -> str:
    """40 random bits as 8 lowercase base32 characters: a public handle, not a secret."""
    return base64.b32encode(secrets.token_bytes(5)).decode("ascii").lower()


def new_secret() -> str:
    return secrets.token_urlsafe(32)  # 256 bits


def digest(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def matches(secret: str, stored_digest: str) -> bool:
    return hmac.compare_digest(digest(secret), stored_digest)


def split_token(raw: str, prefix: str = TOKEN_PREFIX) -> tuple[str, str] | None:
    """(id, secret) of a token (or login code) as sent, or None if it is not shaped like one."""
    if not raw.startswith(prefix):
        return None
    token_id, sep, secret = raw.removeprefix(prefix).partition("_")
    return (token_id, secret) if sep and token_id and secret else None


def split_login(raw: str) -> tuple[str, str] | None:
    login_id, sep, secret = raw.partition(".")
    return (login_id, secret) if sep and login_id and secret else None


@dataclass(frozen=True)
class Token:
    id: str
    user: str
    digest: str
    admin: bool
    created_at: datetime
    expires_at: datetime | None = None
    last_used_at: datetime | None = None
    note: str = ""

    def expired(self, at: datetime) -> bool:
        return self.expires_at is not None and at >= self.expires_at


@dataclass(frozen=True)
class Login:
    """A browser's cookie: for the service's own pages (`scope` ""), or for one session's host
    name (`scope` its id, `parent` the login it was made from)."""

    id: str
    digest: str
    token_id: str
    scope: str
    csrf: SecretStr
    created_at: datetime
    expires_at: datetime
    parent: str | None = None


@dataclass(frozen=True)
class User:
    name: str
    created_at: datetime
    tokens: int = 0
    admin: bool = False


@dataclass(frozen=True)
class Caller:
    """The authenticated user of one request."""

    user: str
    admin: bool
    token_id: str
    login: Login | None = None  # set when a browser cookie authenticated the request

    def sees(self, owner: str) -> bool:
        """Whether this caller may see (and act on) what `owner` owns."""
        return self.admin or owner == self.user
