"""A TCP proxy that cuts chosen connections after a given number of octets.

It sits in front of a real server (Dovecot, the interop lab) to inject connection drops
at exact points of a session: :class:`Cut` says which connection, after how many octets
and how (FIN or RST); :class:`CuttingProxy` runs the proxy on 127.0.0.1 as a
:class:`~mailpipe.testing.lifecycle.Service` and records each connection
(:class:`ConnectionRecord`). Moved here from :mod:`mailpipe.testing.e2e`, which
re-exports it.
"""

from __future__ import annotations

import socket
import struct
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Literal

from mailpipe.testing.lifecycle import Service

__all__ = ["ConnectionRecord", "Cut", "CuttingProxy"]


@dataclass(frozen=True, slots=True)
class Cut:
    """Cut one proxied connection after ``offset`` octets went ``direction``.

    ``direction='down'`` counts server-to-client octets, ``'up'`` client-to-server.
    Exactly ``offset`` octets are forwarded that way, then both sockets close; with
    ``reset`` the client gets a TCP RST instead of a FIN.
    """

    offset: int
    direction: Literal["down", "up"] = "down"
    reset: bool = False


@dataclass(slots=True)
class ConnectionRecord:
    """What happened to one proxied connection."""

    number: int
    cut: Cut | None
    down: int = 0
    up: int = 0
    was_cut: bool = False


@dataclass(slots=True)
class _Pair:
    client: socket.socket
    server: socket.socket
    record: ConnectionRecord
    lock: threading.Lock = field(default_factory=threading.Lock)
    closed: bool = False


class CuttingProxy(Service):
    """A TCP proxy on 127.0.0.1 that cuts connections per a plan of :class:`Cut`.

    Connection ``k`` (0-based, in accept order) follows ``plan[k]`` (or ``plan(k)``
    when ``plan`` is a callable, asked as each connection is accepted); ``None`` and
    every connection past a list plan are passed through untouched. A cut whose offset
    the connection never reaches does not happen. ``records`` tells, per
    connection, how many octets went each way and whether it was cut. Threads only
    (one acceptor, two pumps per connection); use it as a context manager.
    """

    def __init__(
        self,
        target_host: str,
        target_port: int,
        plan: Iterable[Cut | None] | Callable[[int], Cut | None] = (),
    ) -> None:
        self.target = (target_host, target_port)
        self._plan: Callable[[int], Cut | None]
        if callable(plan):
            self._plan = plan
        else:
            planned = list(plan)
            self._plan = lambda n: planned[n] if n < len(planned) else None
        self.records: list[ConnectionRecord] = []
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(0.2)
        self.host = "127.0.0.1"
        self.port = int(self._listener.getsockname()[1])
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._pairs: list[_Pair] = []
        self._lock = threading.Lock()
        self._acceptor = threading.Thread(
            target=self._accept_loop, name="mailpipe-cutting-proxy", daemon=True
        )

    @property
    def cuts_done(self) -> int:
        """How many connections were cut so far."""
        with self._lock:
            return sum(r.was_cut for r in self.records)

    @property
    def open_connections(self) -> int:
        """How many proxied connections are still open."""
        with self._lock:
            return sum(not p.closed for p in self._pairs)

    def start(self) -> None:
        """Start accepting connections."""
        self._acceptor.start()

    def stop(self) -> None:
        """Stop accepting, close every connection and join the threads."""
        self._stop.set()
        self._acceptor.join(10)
        with self._lock:
            pairs = list(self._pairs)
        for pair in pairs:
            self._close(pair, reset=False)
        for t in self._threads:
            t.join(10)
        self._listener.close()

    def _accept_loop(self) -> None:
        while not self._stop.is_set():
            try:
                client, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            try:
                server = socket.create_connection(self.target, timeout=10)
            except OSError:
                client.close()
                continue
            server.settimeout(None)
            client.settimeout(None)
            n = len(self.records)  # only this thread appends
            cut = self._plan(n)  # outside the lock: the plan may read cuts_done
            with self._lock:
                record = ConnectionRecord(number=n, cut=cut)
                self.records.append(record)
                pair = _Pair(client=client, server=server, record=record)
                self._pairs.append(pair)
            for direction in ("down", "up"):
                t = threading.Thread(
                    target=self._pump,
                    args=(pair, direction),
                    name=f"mailpipe-proxy-{n}-{direction}",
                    daemon=True,
                )
                self._threads.append(t)
                t.start()

    def _pump(self, pair: _Pair, direction: Literal["down", "up"]) -> None:
        src, dst = (
            (pair.server, pair.client)
            if direction == "down"
            else (pair.client, pair.server)
        )
        cut = pair.record.cut
        budget = cut.offset if cut is not None and cut.direction == direction else None
        for _ in range(1 << 40):  # bounded by the connection's end
            if budget is not None and budget <= 0:
                pair.record.was_cut = True
                self._close(pair, reset=cut.reset if cut else False)
                return
            try:
                data = src.recv(65536)
            except OSError:
                data = b""
            if not data:
                self._close(pair, reset=False)
                return
            if budget is not None:
                data = data[:budget]
                budget -= len(data)
            try:
                dst.sendall(data)
            except OSError:
                self._close(pair, reset=False)
                return
            with pair.lock:
                if direction == "down":
                    pair.record.down += len(data)
                else:
                    pair.record.up += len(data)

    def _close(self, pair: _Pair, *, reset: bool) -> None:
        with pair.lock:
            if pair.closed:
                return
            pair.closed = True
        for s in (pair.client, pair.server):
            rst = reset and s is pair.client
            try:
                if rst:
                    # SO_LINGER with a zero timeout: close() sends RST, not FIN.
                    s.setsockopt(
                        socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0)
                    )
                # Wakes the other pump's recv(); SHUT_RD sends nothing to the peer.
                s.shutdown(socket.SHUT_RD if rst else socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()
