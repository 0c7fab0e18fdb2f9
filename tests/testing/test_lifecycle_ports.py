"""mailpipe.testing.lifecycle.free_ports: the ports a test server listens on are
distinct. Probing them one at a time (bind to port 0, close, again) can give the same
port twice, and Dovecot then refused its configuration ("duplicate listener: ...",
seen in CI on bench/imap_push.py --small)."""

from __future__ import annotations

import socket
from typing import Any

import pytest

from mailpipe.testing import lifecycle
from mailpipe.testing.lifecycle import free_port, free_ports


class _LowestFreeKernel:
    """A kernel that gives bind(port 0) the lowest port not bound right now: the
    worst case for probing ports one at a time."""

    def __init__(self) -> None:
        self.bound: set[int] = set()
        kernel = self

        class Sock:
            def __init__(self, *args: Any) -> None:
                self.port: int | None = None

            def bind(self, address: tuple[str, int]) -> None:
                port = 40000
                while port in kernel.bound:
                    port += 1
                self.port = port
                kernel.bound.add(port)

            def getsockname(self) -> tuple[str, int]:
                assert self.port is not None
                return ("127.0.0.1", self.port)

            def close(self) -> None:
                kernel.bound.discard(self.port or 0)

            def __enter__(self) -> Sock:
                return self

            def __exit__(self, *exc: object) -> None:
                self.close()

        self.socket = Sock


def test_free_ports_are_distinct_even_when_the_kernel_reuses_a_port(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    kernel = _LowestFreeKernel()
    monkeypatch.setattr(lifecycle.socket, "socket", kernel.socket)
    assert [free_port() for _ in range(4)] == [40000] * 4  # one at a time: the same
    ports = free_ports("127.0.0.1", 4)
    assert ports == [40000, 40001, 40002, 40003]
    assert kernel.bound == set()  # every probe closed


def test_free_ports_on_the_real_kernel() -> None:
    ports = free_ports("127.0.0.1", 8)
    assert len(set(ports)) == 8
    for port in ports:  # each was released
        with socket.socket() as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind(("127.0.0.1", port))
