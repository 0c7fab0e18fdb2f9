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

    def __init__(self, pids: list[list[int]], reading_takes: float = 0.0) -> None:
        self.readings = list(pids)  # no sandbox, no server
        self.asked = 0
        self.reading_takes = reading_takes  # a /proc walk on a busy machine

    def session_pids(self) -> list[int]:
        self.asked += 1
        _clock[0] += self.reading_takes
        return self.readings.pop(0) if len(self.readings) > 1 else self.readings[0]


#: The fake clock (seconds) that sleeping and reading /proc advance.
_clock = [0.0]


@pytest.fixture(autouse=True)
def _fake_clock(monkeypatch: pytest.MonkeyPatch) -> None:
    _clock[0] = 0.0

    def sleep(seconds: float) -> None:
        _clock[0] += seconds

    monkeypatch.setattr(base.time, "sleep", sleep)
    monkeypatch.setattr(base.time, "monotonic", lambda: _clock[0])


def test_it_waits_until_the_session_process_is_gone() -> None:
    lab = _Lab([[41], [41], [41], []])
    lab.wait_sessions_ended()
    assert lab.asked == 4


def test_a_session_that_never_ends_is_an_error_after_the_bound() -> None:
    lab = _Lab([[41]])
    with pytest.raises(TimeoutError, match=r"fake: session processes still running.*\[41\]"):
        lab.wait_sessions_ended(seconds=1.0)
    assert 1.0 <= _clock[0] <= 1.05
    assert lab.asked >= 20  # a reading every 0.05 s


def test_the_bound_is_in_seconds_however_long_a_reading_takes() -> None:
    # Each reading walks /proc: on a busy machine (where the race it waits out
    # happens) that is tens of ms, which a bound counted in readings multiplied.
    lab = _Lab([[41]], reading_takes=0.1)
    with pytest.raises(TimeoutError):
        lab.wait_sessions_ended(seconds=1.0)
    assert _clock[0] <= 1.0 + 0.05 + 0.1  # the last sleep and reading may overrun


def test_a_bound_not_a_multiple_of_the_poll_interval_is_waited_in_full() -> None:
    lab = _Lab([[41]])
    with pytest.raises(TimeoutError):
        lab.wait_sessions_ended(seconds=0.15)  # int(0.15 / 0.05) == 2
    assert _clock[0] >= 0.15


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
