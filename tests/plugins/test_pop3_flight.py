"""P-14: the commands of one retrieval flight (plugins/pop3/flight.py), pure."""

from __future__ import annotations

from mailpipe.plugins.pop3.events import Dele, Noop, Retr
from mailpipe.plugins.pop3.flight import Flight

from mailpipe.message import MessageRef


def ref(number: int, size: int) -> MessageRef:
    return MessageRef(mailbox="box", number=number, uid=f"u{number}", size=size)


def take(flight: Flight) -> list[str]:
    """What the client's refill would send now (it stops at the first None)."""
    return [c.describe() for c in iter(lambda: next(flight, None), None)]


def test_p14_deles_first_then_retrs_within_the_declared_bound_then_one_noop() -> None:
    a, b, c = ref(1, 10), ref(2, 10), ref(3, 30)
    flight = Flight([Dele(number=9)], [a, b, c], max_declared=25)
    assert take(flight) == ["DELE 9", "RETR 1", "RETR 2"]  # 10 + 10 + 30 > 25
    flight.answered(a)
    assert take(flight) == []  # 10 + 30 still over the bound: asked again later
    flight.add([Dele(number=1)])
    assert flight.dele_next  # P-06: the client may send it with the window full
    assert take(flight) == ["DELE 1"]  # added while it runs: sent at the next refill
    assert not flight.dele_next
    flight.answered(b)
    assert take(flight) == ["RETR 3", "NOOP"]  # one RETR always goes, whatever its size
    assert take(flight) == []
    flight.add([Dele(number=2), Dele(number=3)])
    assert take(flight) == ["DELE 2", "DELE 3"]  # after the NOOP, still the same flight


def test_p14_stop_ends_the_retrs_and_the_noop_but_not_the_deles() -> None:
    flight = Flight([], [ref(1, 5), ref(2, 5), ref(3, 5)])
    assert isinstance(next(flight), Retr)
    flight.stop()
    flight.add([Dele(number=1)])
    assert take(flight) == ["DELE 1"]


def test_p14_a_flight_without_retrs_has_no_noop() -> None:
    assert take(Flight([Dele(number=4)], [])) == ["DELE 4"]
    assert not any(isinstance(c, Noop) for c in Flight([], []))
