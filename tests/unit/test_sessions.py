import re
from dataclasses import replace

import pytest

from codestation.sessions import TRANSITIONS, InvalidTransition, Session, Status, new_session_id
from tests.unit.factories import make_session

DNS_LABEL = re.compile(r"^[a-z]([a-z0-9-]{0,61}[a-z0-9])?$")


def make(status: Status = Status.STARTING) -> Session:
    return make_session(status=status)


def test_the_happy_path_stamps_start_and_stop_times() -> None:
    s = make()
    running = s.advance(Status.RUNNING)
    assert running.started_at is not None
    assert running.stopped_at is None
    stopping = running.advance(Status.STOPPING)
    stopped = stopping.advance(Status.STOPPED)
    assert stopped.status is Status.STOPPED
    assert stopped.stopped_at is not None
    assert stopped.started_at == running.started_at


@pytest.mark.parametrize("status", [Status.STARTING, Status.RUNNING, Status.STOPPING])
def test_every_live_state_can_fail_with_a_reason(status: Status) -> None:
    failed = replace(make(), status=status).advance(Status.FAILED, error="boom")
    assert failed.status is Status.FAILED
    assert failed.error == "boom"
    assert failed.stopped_at is not None


def test_a_stop_can_interrupt_a_start() -> None:
    assert make().advance(Status.STOPPING).status is Status.STOPPING


@pytest.mark.parametrize(
    ("old", "new"),
    [(old, new) for old in Status for new in Status if new not in TRANSITIONS[old]],
)
def test_edges_the_machine_lacks_are_refused(old: Status, new: Status) -> None:
    with pytest.raises(InvalidTransition):
        replace(make(), status=old).advance(new)


def test_final_states_are_final_and_not_live() -> None:
    for status in (Status.STOPPED, Status.FAILED):
        assert not TRANSITIONS[status]
        assert not status.live
    assert all(s.live for s in (Status.STARTING, Status.RUNNING, Status.STOPPING))


def test_with_changes_cannot_move_a_session() -> None:
    s = make()
    assert s.with_changes(step="x").step == "x"
    with pytest.raises(InvalidTransition):
        s.with_changes(status=Status.RUNNING)


def test_session_ids_are_unique_dns_labels() -> None:
    ids = {new_session_id() for _ in range(20000)}
    assert len(ids) == 20000
    for session_id in list(ids)[:500]:
        assert DNS_LABEL.match(session_id), session_id
        assert len(session_id) <= 63


def test_due_says_max_age_before_idle_and_only_for_running_sessions() -> None:
    from datetime import timedelta

    start = make().created_at
    s = make().with_changes(created_at=start, idle_timeout=60, max_age=3600)
    assert s.due(start + timedelta(hours=2)) is None  # not running
    r = s.advance(Status.RUNNING).with_changes(started_at=start, last_activity=start)
    assert r.due(start + timedelta(seconds=59)) is None
    assert r.due(start + timedelta(seconds=61)) == "idle"
    assert (
        r.with_changes(last_activity=start + timedelta(seconds=30)).due(
            start + timedelta(seconds=61)
        )
        is None
    )
    assert r.due(start + timedelta(hours=1)) == "max_age"
    never = r.with_changes(idle_timeout=0, max_age=0)
    assert never.due(start + timedelta(days=365)) is None
