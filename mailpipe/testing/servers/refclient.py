"""An independent POP3 reference client: what a server really holds, byte for byte.

It shares no code with mailpipe's client, so a test can compare what mailpipe stored
with what a plain RFC 1939 reading returns, and can look at a mailbox (or empty it)
between mailpipe runs. Only USER/PASS, one command at a time, dot-unstuffing per
RFC 1939 §3 (only CRLF ends a line).
"""

from __future__ import annotations

import contextlib
import socket
import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Self

__all__ = ["RefClientError", "ReferenceClient", "ServerMessage"]

Security = Literal["none", "starttls", "tls"]


class RefClientError(RuntimeError):
    """The server refused a command or closed the connection."""


@dataclass(frozen=True, slots=True)
class ServerMessage:
    """One message as listed and retrieved by the reference client."""

    number: int
    uid: str | None
    size: int
    raw: bytes


class ReferenceClient:
    """A blocking POP3 session; ``with ReferenceClient(...) as c:`` logs in and QUITs."""

    def __init__(
        self,
        host: str,
        port: int,
        user: str,
        password: str,
        *,
        security: Security = "none",
        ca_file: Path | None = None,
        timeout: float = 60.0,
    ) -> None:
        self.host, self.port, self.user, self.password = host, port, user, password
        self.security = security
        self.ctx = ssl.create_default_context(cafile=str(ca_file) if ca_file else None)
        self.timeout = timeout
        self.greeting = b""
        self.capa_before: list[str] = []
        self.capa_after: list[str] = []
        self._sock: socket.socket | ssl.SSLSocket | None = None
        self._buf = b""

    # -- wire ------------------------------------------------------------------

    def _fill(self) -> None:
        assert self._sock is not None
        data = self._sock.recv(1 << 20)
        # ACK at once: servers that write a reply in pieces without TCP_NODELAY
        # would otherwise wait for the delayed ACK (about 40 ms a reply).
        with contextlib.suppress(OSError):
            self._sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_QUICKACK, 1)
        if not data:
            raise RefClientError(f"{self.host}:{self.port} closed the connection")
        self._buf += data

    def _line(self) -> bytes:
        for _ in range(1 << 20):
            i = self._buf.find(b"\n")
            if i >= 0:
                line, self._buf = self._buf[: i + 1], self._buf[i + 1 :]
                return line
            self._fill()
        raise RefClientError("status line too long")

    def _multi(self) -> bytes:
        # The body runs to CRLF.CRLF; the status line's CRLF counts as a line start.
        self._buf = b"\r\n" + self._buf
        for _ in range(1 << 30):
            i = self._buf.find(b"\r\n.\r\n")
            if i >= 0:
                body, self._buf = self._buf[2 : i + 2], self._buf[i + 5 :]
                return body
            self._fill()
        raise RefClientError("unterminated multi-line reply")

    def command(self, text: str, *, ok: bool = True) -> bytes:
        """Send one command and return its status line (``+OK`` required if ``ok``)."""
        assert self._sock is not None
        self._sock.sendall(text.encode() + b"\r\n")
        line = self._line()
        if ok and not line.startswith(b"+OK"):
            shown = "PASS ****" if text.startswith("PASS ") else text
            raise RefClientError(f"{shown!r} refused: {line!r}")
        return line

    def _capa(self) -> list[str]:
        if not self.command("CAPA", ok=False).startswith(b"+OK"):
            return []
        return self._multi().decode("latin-1").split("\r\n")[:-1]

    # -- session ---------------------------------------------------------------

    def __enter__(self) -> Self:
        sock: socket.socket | ssl.SSLSocket = socket.create_connection(
            (self.host, self.port), timeout=self.timeout
        )
        if self.security == "tls":
            sock = self.ctx.wrap_socket(sock, server_hostname="localhost")
        self._sock = sock
        self.greeting = self._line()
        if not self.greeting.startswith(b"+OK"):
            raise RefClientError(f"greeting {self.greeting!r}")
        self.capa_before = self._capa()
        if self.security == "starttls":
            self.command("STLS")
            self._sock = self.ctx.wrap_socket(sock, server_hostname="localhost")
            self.capa_before = self._capa()
        self.command(f"USER {self.user}")
        self.command(f"PASS {self.password}")
        self.capa_after = self._capa()
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            if exc[0] is None:
                self.command("QUIT")
        finally:
            if self._sock is not None:
                self._sock.close()
                self._sock = None

    def listing(self) -> dict[int, tuple[int, str | None]]:
        """Message number -> (LIST size, UIDL or None)."""
        self.command("LIST")
        sizes = {
            int(n): int(s)
            for n, s, *_ in (ln.split() for ln in self._multi().splitlines() if ln)
        }
        uids: dict[int, str] = {}
        if self.command("UIDL", ok=False).startswith(b"+OK"):
            for ln in self._multi().decode("latin-1").splitlines():
                if ln.strip():
                    n, uid = ln.split(" ", 1)
                    uids[int(n)] = uid.strip()
        return {n: (size, uids.get(n)) for n, size in sizes.items()}

    def retr(self, number: int) -> bytes:
        """The unstuffed body of ``RETR number``."""
        self.command(f"RETR {number}")
        return unstuff(self._multi())

    def top(self, number: int, lines: int = 0) -> bytes:
        """The unstuffed body of ``TOP number lines``."""
        self.command(f"TOP {number} {lines}")
        return unstuff(self._multi())

    def messages(self) -> list[ServerMessage]:
        """Every message, retrieved in number order."""
        return [
            ServerMessage(number=n, uid=uid, size=size, raw=self.retr(n))
            for n, (size, uid) in sorted(self.listing().items())
        ]

    def delete_all(self) -> int:
        """DELE every message (gone at QUIT); returns how many."""
        numbers = list(self.listing())
        for n in numbers:
            self.command(f"DELE {n}")
        return len(numbers)


def unstuff(body: bytes) -> bytes:
    """RFC 1939 §3: drop the leading ``.`` of every line that has one."""
    if not body:
        return b""
    lines = body[:-2].split(b"\r\n") if body.endswith(b"\r\n") else body.split(b"\r\n")
    return b"".join((ln[1:] if ln.startswith(b".") else ln) + b"\r\n" for ln in lines)
