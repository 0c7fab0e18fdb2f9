"""A start/stop base class (every test server is a context manager) and port helpers."""

from __future__ import annotations

import socket
import subprocess
import time
from collections.abc import Sequence
from types import TracebackType
from typing import Self


class Service:
    """Something with ``start()`` and ``stop()``; ``with`` starts it and always stops it."""

    def start(self) -> None:
        """Start serving; return when ready."""
        raise NotImplementedError

    def stop(self) -> None:
        """Stop serving; safe to call twice."""
        raise NotImplementedError

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free on ``host`` a moment ago (a race is possible)."""
    return free_ports(host, 1)[0]


def free_ports(host: str = "127.0.0.1", count: int = 1) -> list[int]:
    """``count`` distinct TCP ports that were free on ``host`` a moment ago (a race
    with other processes is possible). All are held bound until every one is chosen:
    probing one at a time can give the same port twice, which a server's
    configuration then refuses (Dovecot: "duplicate listener")."""
    sockets = [socket.socket(socket.AF_INET, socket.SOCK_STREAM) for _ in range(count)]
    try:
        for s in sockets:
            s.bind((host, 0))
        return [int(s.getsockname()[1]) for s in sockets]
    finally:
        for s in sockets:
            s.close()


def accepts(host: str, port: int) -> bool:
    """True when something accepts a TCP connection on ``host:port``."""
    try:
        with socket.create_connection((host, port), timeout=1):
            return True
    except OSError:
        return False


def wait_listening(
    proc: subprocess.Popen[bytes] | None,
    host: str,
    ports: Sequence[int],
    timeout: float,
) -> bool:
    """Poll until every port accepts (True), or ``proc`` ended or ``timeout`` passed."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is None or proc.poll() is not None:
            return False
        if all(accepts(host, p) for p in ports):
            return True
        time.sleep(0.05)
    return False
