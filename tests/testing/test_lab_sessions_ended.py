"""The interop lab waits for a dropped connection's server session to end before the
next session whose result a test asserts (LabServer.wait_sessions_ended)."""

from __future__ import annotations

import pytest

from mailpipe.testing.servers import base
from mailpipe.testing.servers.base import LabServer


class _Lab(LabServer):
    name = "fake"
    session_process = "fake-pop3d"
    session_ends_with_connection = True

    def __init__(self, pids: list[list[int]]) -> None:  # no sandbox, no server
        self.readings = list(pids)
        self.asked = 0

    def session_pids(self) -> list[int]:
        self.asked += 1
        return self.readings.pop(0) if len(self.readings) > 1 else self.readings[0]


@pytest.fixture(autouse=True)
def _no_sleep(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(base.time, "sleep", lambda _s: None)


def test_it_waits_until_the_session_process_is_gone() -> None:
    lab = _Lab([[41], [41], [41], []])
    lab.wait_sessions_ended()
    assert lab.asked == 4


def test_a_session_that_never_ends_is_an_error_after_the_bound() -> None:
    lab = _Lab([[41]])
    with pytest.raises(TimeoutError, match=r"fake: session processes still running.*\[41\]"):
        lab.wait_sessions_ended(seconds=1.0)
    assert lab.asked == 1.0 / 0.05 + 1  # every reading of the bound, and the message's


def test_servers_that_keep_their_session_processes_are_not_waited_for() -> None:
    lab = _Lab([[41]])
    lab.session_ends_with_connection = False  # type: ignore[misc]
    lab.wait_sessions_ended()
    assert lab.asked == 0


def test_clear_waits_first(monkeypatch: pytest.MonkeyPatch) -> None:
    lab = _Lab([[41], []])
    order: list[str] = []

    class _Ref:
        def __enter__(self) -> _Ref:
            order.append(f"session after {lab.asked} readings")
            return self

        def __exit__(self, *exc: object) -> None:
            pass

        def delete_all(self) -> None:
            order.append("delete_all")

    monkeypatch.setattr(lab, "reference", lambda security="none": _Ref())
    lab.clear()
    assert order == ["session after 2 readings", "delete_all"]


def test_courier_is_waited_for() -> None:
    from mailpipe.testing.servers.courier import Courier

    assert Courier.session_ends_with_connection and Courier.session_process
