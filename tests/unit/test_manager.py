"""The session manager's bookkeeping that needs no sandbox: subscribers and stream places."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from codestation.config import Settings
from codestation.errors import TooManyStreams
from codestation.identity import Caller
from codestation.manager import EVENTS_BUFFERED, SessionManager
from codestation.runtimes import make_runtimes
from codestation.store import Store
from tests.unit.factories import make_session

ALICE = Caller(user="alice", admin=False, token_id="a")
BOB = Caller(user="bob", admin=False, token_id="b")


def manager(tmp_path: Path, **settings: int) -> SessionManager:
    made = Settings(data_dir=tmp_path).model_copy(update=settings)
    return SessionManager(made, Store(tmp_path / "db.sqlite"), {})


def test_a_subscriber_that_falls_behind_is_dropped_and_told(tmp_path: Path) -> None:
    async def run() -> None:
        m = manager(tmp_path)
        slow, other = m.subscribe(ALICE), m.subscribe(ALICE)
        for _ in range(EVENTS_BUFFERED):
            m._publish("session", make_session(owner="alice"))
            other.get_nowait()  # this one keeps up
        m._publish("session", make_session(owner="alice"))  # one more than slow can hold
        assert slow.qsize() == 1
        assert slow.get_nowait() == ("dropped", None)
        m._publish("session", make_session(owner="alice"))
        assert slow.empty()  # no longer subscribed
        assert other.qsize() == 2
        # Only what a subscriber may see reaches it.
        bobs = m.subscribe(BOB)
        m._publish("session", make_session(owner="alice"))
        assert bobs.empty()

    asyncio.run(run())


def test_stream_places_per_user_and_overall(tmp_path: Path) -> None:
    m = manager(tmp_path, max_streams_per_user=2, max_streams=3)
    a1, a2 = m.open_stream(ALICE), m.open_stream(ALICE)
    with pytest.raises(TooManyStreams, match="max_streams_per_user"):
        m.open_stream(ALICE)
    b1 = m.open_stream(BOB)
    with pytest.raises(TooManyStreams, match=r"max_streams\)"):
        m.open_stream(BOB)
    a1()
    a1()  # twice is harmless
    m.open_stream(BOB)
    with pytest.raises(TooManyStreams):
        m.open_stream(ALICE)
    a2()
    b1()
    m.open_stream(ALICE)


def test_the_agent_is_reached_at_a_bracketed_ipv6_address_once(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path, publish_address="::")  # local_host is [::1]
    m = SessionManager(settings, Store(tmp_path / "db.sqlite"), make_runtimes(settings))
    assert m.agent_url(make_session(30000, runtime="docker")) == "http://[::1]:30000"
    settings = Settings(data_dir=tmp_path, publish_address="::1")
    m = SessionManager(settings, Store(tmp_path / "db2.sqlite"), make_runtimes(settings))
    assert m.agent_url(make_session(30000, runtime="bwrap")) == "http://[::1]:30000"
