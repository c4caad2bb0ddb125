from dataclasses import replace
from pathlib import Path

import pytest

from codestation.sessions import Session, Status
from codestation.store import PortTaken, Store
from tests.unit.factories import make_session


def make(port: int) -> Session:
    return make_session(port, runtime_state={"container_id": "abc"})


@pytest.fixture
def store(tmp_path: Path) -> Store:
    return Store(tmp_path / "data" / "codestation.db")


def test_a_session_round_trips(store: Store) -> None:
    s = make(30000)
    store.create(s)
    assert store.get(s.id) == s
    assert store.leased_ports() == {30000: s.id}


def test_the_store_refuses_a_second_live_session_on_a_port(store: Store) -> None:
    first = make(30000)
    store.create(first)
    second = make(30000)
    with pytest.raises(PortTaken):
        store.create(second)
    assert store.get(second.id) is None  # nothing half-made
    assert [s.id for s in store.list()] == [first.id]


def test_sessions_running_elsewhere_hold_no_port(store: Store) -> None:
    first, second = make(0), make(0)  # Kubernetes: the cluster's Pods, no port of this host
    store.create(first)
    store.create(second)
    assert {s.id for s in store.list()} == {first.id, second.id}
    assert store.leased_ports() == {}


def test_a_final_status_gives_the_port_back(store: Store) -> None:
    s = make(30001)
    store.create(s)
    store.save(s.advance(Status.RUNNING))
    assert 30001 in store.leased_ports()
    store.save(store.get(s.id).advance(Status.FAILED, error="x"))  # type: ignore[union-attr]
    assert store.leased_ports() == {}
    again = make(30001)
    store.create(again)
    assert store.leased_ports() == {30001: again.id}


def test_live_only_lists_live_sessions(store: Store) -> None:
    live, done = make(30000), make(30001)
    store.create(live)
    store.create(done)
    store.save(done.advance(Status.STOPPING))
    store.save(store.get(done.id).advance(Status.STOPPED))  # type: ignore[union-attr]
    assert [s.id for s in store.list(live_only=True)] == [live.id]
    assert len(store.list()) == 2


def test_the_census_counts_sessions_by_status_and_runtime(store: Store) -> None:
    live, done, elsewhere = make(30000), make(30001), replace(make(0), runtime="kubernetes")
    for s in (live, done, elsewhere):
        store.create(s)
    store.save(done.advance(Status.STOPPING))
    store.save(store.get(done.id).advance(Status.STOPPED))  # type: ignore[union-attr]
    assert store.census() == {
        (live.status.value, live.runtime): 1,
        ("stopped", done.runtime): 1,
        (elsewhere.status.value, "kubernetes"): 1,
    }


def test_sessions_survive_reopening(tmp_path: Path) -> None:
    path = tmp_path / "codestation.db"
    first = Store(path)
    s = make(30005)
    first.create(s)
    first.close()
    second = Store(path)
    assert second.get(s.id) == s
    assert second.leased_ports() == {30005: s.id}


def test_delete_forgets_session_and_lease(store: Store) -> None:
    s = make(30000)
    store.create(s)
    store.delete(s.id)
    assert store.get(s.id) is None
    assert store.leased_ports() == {}


def test_the_database_is_private(store: Store) -> None:
    assert store.path.stat().st_mode & 0o077 == 0
    assert store.path.parent.stat().st_mode & 0o077 == 0
    assert replace(make(1), port=2).port == 2


def test_a_store_from_an_older_version_gains_new_columns(tmp_path: Path) -> None:
    import sqlite3

    path = tmp_path / "codestation.db"
    old = sqlite3.connect(path)
    old.execute(
        "CREATE TABLE sessions (id TEXT PRIMARY KEY, status TEXT, runtime TEXT, workspace TEXT,"
        " environment TEXT, port INTEGER, username TEXT, password TEXT, created_at TEXT,"
        " started_at TEXT, stopped_at TEXT, error TEXT, step TEXT, runtime_state TEXT,"
        " log_tail TEXT)"
    )
    old.execute(
        "INSERT INTO sessions VALUES ('cs-old', 'running', 'docker', '/tmp/w', 'default', 30000,"
        " 'opencode', 'pw', '2026-01-01T00:00:00+00:00', NULL, NULL, NULL, NULL, '{}', NULL)"
    )
    old.commit()
    old.close()
    session = Store(path).get("cs-old")
    assert session is not None
    assert session.status is Status.RUNNING
    assert (session.idle_timeout, session.max_age, session.limits, session.reason) == (
        0,
        0,
        {},
        None,
    )


def test_the_live_limit_per_owner_holds_under_concurrent_starts(tmp_path: Path) -> None:
    import threading

    from codestation.store import LimitReached, Quota

    path = tmp_path / "codestation.db"
    Store(path).close()
    results: list[str] = []

    def start(port: int) -> None:
        store = Store(path)  # a connection each, as separate processes would have
        try:
            store.create(make_session(port, owner="alice"), Quota(per_owner=3))
            results.append("created")
        except LimitReached:
            results.append("refused")
        finally:
            store.close()

    threads = [threading.Thread(target=start, args=(31000 + i,)) for i in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results.count("created") == 3
    store = Store(path)
    assert len(store.list(live_only=True)) == 3
    store.create(make_session(31100, owner="bob"), Quota(per_owner=3))  # others are not counted


def test_a_session_never_prints_its_password() -> None:
    s = make(30000)
    assert "secret" not in repr(s)
    assert "secret" not in str(s)


def test_the_quota_of_everyone_counts_sessions_and_memory(tmp_path: Path) -> None:
    from codestation.store import Full, Quota

    store = Store(tmp_path / "db.sqlite")
    quota = Quota(sessions=3, memory=10)
    store.create(replace(make_session(31000, owner="a"), memory=4), quota)
    store.create(replace(make_session(31001, owner="b"), memory=4), quota)
    with pytest.raises(Full) as too_much:
        store.create(replace(make_session(31002, owner="c"), memory=4), quota)
    assert (too_much.value.what, too_much.value.used, too_much.value.most) == ("memory", 8, 10)
    store.create(replace(make_session(31003, owner="c"), memory=2), quota)
    with pytest.raises(Full) as too_many:
        store.create(replace(make_session(31004, owner="d"), memory=0), quota)
    assert too_many.value.what == "sessions"
    assert store.usage() == (3, 10)
    assert len(store.list()) == 3  # nothing half-made
