"""One connection of the fake POP3 server: the RFC 1939 state machine and its faults.

AUTHORIZATION (CAPA, USER/PASS, APOP, AUTH through :mod:`.sasl`, STLS, UTF8), then
TRANSACTION (STAT, LIST, UIDL, RETR, TOP, DELE, NOOP, RSET) and UPDATE at QUIT, where
the marked messages leave the :class:`~.maildrop.Maildrop` (RFC 1939 §6). Every line
goes to the server's :class:`~.transcript.Transcript`; the :class:`~.faults.Faults`
of the session bend the protocol where a test asks.
"""

from __future__ import annotations

import asyncio
import binascii
import contextlib
import hashlib
import hmac
import os
import re
import ssl
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal, Protocol

from .faults import Faults
from .maildrop import Maildrop, StoredMessage
from .sasl import Granted, Refused, SaslServer, password_matches
from .tls import server_context
from .transcript import MASK, Transcript, mask_command

TlsMode = Literal["implicit", "starttls"]

#: The longest command line a session reads (the server's stream limit).
MAX_LINE = 1 << 20
_AUTH_CMDS = frozenset(
    {"CAPA", "USER", "PASS", "APOP", "AUTH", "STLS", "UTF8", "QUIT"}
)
_TRANS_CMDS = frozenset(
    {"CAPA", "STAT", "LIST", "RETR", "DELE", "NOOP", "RSET", "TOP", "UIDL", "QUIT"}
)


def wire_form(data: bytes) -> bytes:
    """The octets RETR sends for stored ``data`` (before dot-stuffing); LIST reports
    their count. Bare LF becomes CRLF and a final CRLF is ensured, as Dovecot does
    (RFC 1939 §3: responses are CRLF-terminated lines)."""
    out = re.sub(rb"(?<!\r)\n", b"\r\n", data)
    return out if out.endswith(b"\r\n") else out + b"\r\n"


def dot_stuff(body: bytes) -> bytes:
    """RFC 1939 §3: a line starting with "." gets one more "." before it is sent."""
    return re.sub(rb"(?m)^\.", b"..", body)


@dataclass
class SessionRecord:
    """What one session did, for assertions.

    ``outcome`` is ``open`` while it runs, then one of ``quit`` (QUIT in
    AUTHORIZATION), ``committed`` (QUIT in TRANSACTION, deletions done),
    ``quit_err`` (the ``quit_err`` fault), ``client_closed``, ``dropped`` (a fault),
    ``greeting_err``, ``line_too_long`` or ``stopped`` (the server stopped).
    """

    number: int
    user: str | None = None
    tls: bool = False
    retrieved: list[int] = field(default_factory=list)
    marked: set[int] = field(default_factory=set)
    deleted_uids: list[str] = field(default_factory=list)
    outcome: str = "open"


class ServerOptions(Protocol):
    """What a session reads of its server's options (see :class:`~.server.Pop3Server`)."""

    users: dict[str, str]
    oauth_tokens: dict[str, str]
    mechanisms: tuple[str, ...]
    tls: TlsMode | None
    greeting: str
    apop: bool
    pipelining: bool
    login_delay: int | None
    expire: int | str | None
    lock: bool
    capa: bool
    user_command: bool
    top: bool
    utf8: bool
    extra_capabilities: tuple[str, ...]


class _Dropped(Exception):
    """A fault closed the connection."""


class Session:
    """One connection: the RFC 1939 state machine plus the configured faults.

    :param options: the server's options (a :class:`ServerOptions`).
    :param maildrop: the messages, shared with every other session.
    :param transcript: where each line sent and received is recorded (secrets masked).
    :param faults: the faults of this session.
    :param record: what this session did, kept up to date for assertions.
    """

    def __init__(
        self,
        options: ServerOptions,
        maildrop: Maildrop,
        transcript: Transcript,
        faults: Faults,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        record: SessionRecord,
    ) -> None:
        self.options = options
        self.maildrop = maildrop
        self.transcript = transcript
        self.reader = reader
        self.writer = writer
        self.rec = record
        self.n = record.number
        self.faults = faults
        self.eol = b"\n" if self.faults.bare_lf else b"\r\n"
        self.state = "AUTHORIZATION"
        self.sent = 0
        self.pending_user: str | None = None
        self.items: list[StoredMessage] = []
        self.topped: set[int] = set()
        self.utf8_mode = False
        self.holds_lock = False
        self.timestamp = f"<{os.getpid()}.{self.n}.{time.time_ns()}@mailpipe.test>"

    def log(self, kind: Literal["C", "S", "*"], text: str) -> None:
        self.transcript.add(self.n, kind, text)

    # -- output ----------------------------------------------------------------

    async def send(self, data: bytes) -> None:
        limit = self.faults.drop_after_bytes
        if limit is not None and self.sent + len(data) >= limit:
            part = data[: max(0, limit - self.sent)]
            self.writer.write(part)
            self.sent += len(part)
            await self.writer.drain()
            await self.drop(f"dropped after {self.sent} octets")
        self.writer.write(data)
        self.sent += len(data)
        await self.writer.drain()

    async def drop(self, reason: str) -> None:
        self.log("*", reason)
        transport = self.writer.transport
        for _ in range(400):  # let what was written reach the socket, then cut it
            if transport.get_write_buffer_size() == 0:
                break
            await asyncio.sleep(0.005)
        transport.abort()
        raise _Dropped(reason)

    async def reply(self, text: str) -> None:
        if self.faults.status_padding and not text.startswith("+ "):
            text = f"{text} {'x' * self.faults.status_padding}"
        self.log(
            "S", text if len(text) <= 200 else f"{text[:200]}... ({len(text)} chars)"
        )
        await self.send(text.encode("utf-8", "surrogateescape") + self.eol)

    async def ok(self, text: str = "") -> None:
        await self.reply(f"+OK {text}" if text else "+OK")

    async def err(self, text: str) -> None:
        await self.reply(f"-ERR {text}")

    def _payload(self, body: bytes) -> bytes:
        payload = body if self.faults.no_dot_stuffing else dot_stuff(body)
        if self.faults.bare_lf:
            payload = payload.replace(b"\r\n", b"\n")
        return payload + b"." + self.eol

    async def multiline(self, status: str, lines: Sequence[str]) -> None:
        """A listing reply (CAPA, LIST, UIDL); the lines are recorded too."""
        await self.ok(status)
        for line in lines:
            self.log("S", line)
        body = b"".join(line.encode() + b"\r\n" for line in lines)
        await self.send(self._payload(body))

    # -- main loop -------------------------------------------------------------

    async def run(self) -> None:
        self.log("*", "connected" + (" tls" if self.rec.tls else ""))
        try:
            if self.faults.matches(self.faults.stall_on, "GREETING"):
                self.log("*", f"stalling {self.faults.stall_seconds}s")
                await asyncio.sleep(self.faults.stall_seconds)
            if self.faults.greeting_err is not None:
                self.rec.outcome = "greeting_err"
                await self.err(self.faults.greeting_err)
                return
            greeting = self.options.greeting
            if self.options.apop:
                greeting = f"{greeting} {self.timestamp}"
            await self.ok(greeting)
            while await self.step():
                pass
        except _Dropped:
            self.rec.outcome = "dropped"
        except (ConnectionError, ssl.SSLError, asyncio.IncompleteReadError) as exc:
            self.rec.outcome = "client_closed"
            self.log("*", f"connection error: {type(exc).__name__}")
        except asyncio.CancelledError:
            self.rec.outcome = "stopped"
            self.log("*", "server stopped")
            self.writer.transport.abort()
            raise
        finally:
            self.release()
            if self.rec.outcome == "open":
                self.rec.outcome = "client_closed"
            self.log("*", f"closed ({self.rec.outcome})")
            await self.close()

    async def close(self) -> None:
        if self.writer.transport.is_closing():
            return
        self.writer.close()
        # A TLS peer may never answer close_notify (poplib does not): do not wait long.
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.writer.wait_closed(), 1)
        self.writer.transport.abort()

    def release(self) -> None:
        if self.holds_lock:
            with self.maildrop.lock:
                self.maildrop.locked_by = None
            self.holds_lock = False

    async def read_line(self) -> str | None:
        try:
            raw = await self.reader.readline()
        except ValueError:  # asyncio.LimitOverrunError surfaces as ValueError
            self.rec.outcome = "line_too_long"
            await self.err("line too long")
            return None
        if not raw.endswith(b"\n"):
            self.log("*", "client closed")
            self.rec.outcome = "client_closed"
            return None
        return raw.rstrip(b"\r\n").decode("utf-8", "surrogateescape")

    async def step(self) -> bool:
        """Handle one command; False ends the session."""
        line = await self.read_line()
        if line is None:
            return False
        self.log("C", mask_command(line))
        f = self.faults
        if f.matches(f.drop_on, line):
            await self.drop(f"dropped on {line.split(' ', 1)[0].upper()}")
        if f.matches(f.stall_on, line):
            self.log("*", f"stalling {f.stall_seconds}s")
            await asyncio.sleep(f.stall_seconds)
        error = f.err_for(line)
        if error is not None:
            await self.err(error)
            return True
        keyword, _, arg = line.partition(" ")
        keyword = keyword.upper()
        allowed = _AUTH_CMDS if self.state == "AUTHORIZATION" else _TRANS_CMDS
        if keyword not in allowed:
            await self.err(f"unknown command or not valid in {self.state}")
            return True
        handler = getattr(self, f"cmd_{keyword.lower()}")
        return bool(await handler(arg))

    # -- AUTHORIZATION ---------------------------------------------------------

    async def cmd_capa(self, arg: str) -> bool:
        opts = self.options
        if not opts.capa:
            await self.err("unknown command")  # RFC 2449 §5: a pre-CAPA server
            return True
        caps = ["CAPA"]
        if opts.top:
            caps.append("TOP")
        if not self.faults.uidl_unsupported:
            caps.append("UIDL")
        caps += ["RESP-CODES", "AUTH-RESP-CODE"]
        if opts.pipelining:
            caps.append("PIPELINING")
        if self.state == "AUTHORIZATION":
            if opts.user_command:
                caps.append("USER")
            if opts.mechanisms:
                caps.append("SASL " + " ".join(opts.mechanisms))
            if opts.tls == "starttls" and not self.rec.tls:
                caps.append("STLS")
        if opts.login_delay is not None:
            caps.append(f"LOGIN-DELAY {opts.login_delay}")
        if opts.expire is not None:
            caps.append(f"EXPIRE {opts.expire}")
        if opts.utf8:
            caps.append("UTF8")
        caps += opts.extra_capabilities
        caps.append("IMPLEMENTATION mailpipe-testing")
        await self.multiline("Capability list follows", caps)
        return True

    async def cmd_utf8(self, arg: str) -> bool:
        if not self.options.utf8:
            await self.err("unknown command")
            return True
        self.utf8_mode = True
        await self.ok("UTF8 enabled")
        return True

    async def cmd_user(self, arg: str) -> bool:
        if not self.options.user_command:
            await self.err("USER not supported, use AUTH")
            return True
        if not arg:
            await self.err("USER needs a name")
            return True
        self.pending_user = arg
        await self.ok("send PASS")
        return True

    async def cmd_pass(self, arg: str) -> bool:
        user, self.pending_user = self.pending_user, None
        if user is None or not self.options.user_command:
            await self.err("USER first")  # RFC 1939 §7: PASS only after USER
            return True
        # RFC 1939 §7: the whole rest of the line is the password, spaces included.
        await self.check_password(user, arg, "PASS")
        return True

    async def check_password(self, user: str, password: str, method: str) -> None:
        if password_matches(self.options.users, user, password):
            await self.login(user, method)
        else:
            await self.err("[AUTH] invalid user name or password")

    async def login(self, user: str, method: str) -> None:
        box = self.maildrop
        if self.options.lock:
            with box.lock:
                busy = box.locked_by is not None
                if not busy:
                    box.locked_by = self.n
            if busy:
                # RFC 2449 §8.1.2: credentials fine, maildrop busy.
                await self.err("[IN-USE] maildrop already locked")
                return
            self.holds_lock = True
        box.sync()
        with box.lock:
            self.items = list(box.items)
        self.state = "TRANSACTION"
        self.rec.user = user
        self.log("*", f"logged in as {user} via {method}")
        count, size = self.stat()
        await self.ok(f"{user} has {count} messages ({size} octets)")

    async def cmd_apop(self, arg: str) -> bool:
        parts = arg.split()
        if not self.options.apop or len(parts) != 2:
            await self.err(
                "APOP not available" if not self.options.apop else "APOP name digest"
            )
            return True
        name, digest = parts
        password = self.options.users.get(name)
        # RFC 1939 §7: digest = MD5(timestamp + shared secret), lower-case hex.
        expected = hashlib.md5((self.timestamp + (password or "")).encode()).hexdigest()
        if password is not None and hmac.compare_digest(expected, digest.lower()):
            await self.login(name, "APOP")
        else:
            await self.err("[AUTH] authentication failed")
        return True

    async def cmd_stls(self, arg: str) -> bool:
        if self.options.tls != "starttls" or self.rec.tls:
            await self.err("STLS not available")
            return True
        await self.ok("Begin TLS negotiation")
        # RFC 2595 §3.1 / RFC 8314 §4.1: plaintext sent after STLS (command injection)
        # must not be executed after the handshake; discard it, and say so.
        buffered: bytearray | None = getattr(self.reader, "_buffer", None)
        if buffered:
            self.log("*", f"discarded {len(buffered)} octets sent before TLS")
            buffered.clear()
        await self.writer.start_tls(server_context())
        self.rec.tls = True
        self.pending_user = None
        self.log("*", "tls started")
        return True

    async def challenge(self, text: str) -> str | None:
        """Send ``+ text`` and read the client's answer; None if it cancelled with ``*``."""
        await self.reply(f"+ {text}")
        line = await self.read_line()
        if line is None:
            raise ConnectionResetError("client closed during AUTH")
        self.log("C", "*" if line == "*" else MASK)
        if line == "*":
            await self.err("AUTH cancelled")  # RFC 5034 §4
            return None
        return line

    async def cmd_auth(self, arg: str) -> bool:
        if not arg:  # legacy mechanism listing, answered by many servers
            await self.multiline("SASL mechanisms follow", list(self.options.mechanisms))
            return True
        mech, _, initial = arg.partition(" ")
        mech = mech.upper()
        if mech not in self.options.mechanisms:
            await self.err(f"unsupported mechanism {mech}")
            return True
        # RFC 5034 §4: "=" is an empty initial response.
        ir = None if initial == "" else ("" if initial == "=" else initial)
        sasl = SaslServer(
            self.challenge,
            self.options.users,
            self.options.oauth_tokens,
            self.timestamp,
            bad_scram_signature=self.faults.scram_bad_signature,
        )
        try:
            outcome = await sasl.authenticate(mech, ir)
        except (binascii.Error, UnicodeDecodeError, ValueError, KeyError):
            await self.err("[AUTH] malformed SASL response")
            return True
        if isinstance(outcome, Granted):
            await self.login(outcome.user, mech)
        elif isinstance(outcome, Refused):
            await self.err(outcome.reason)
        return True

    async def cmd_quit(self, arg: str) -> bool:
        if self.state == "AUTHORIZATION":
            self.rec.outcome = "quit"
            await self.ok("bye")  # RFC 1939 §4: no UPDATE state from AUTHORIZATION
            return False
        if self.faults.quit_err is not None:
            self.rec.outcome = "quit_err"
            self.log("*", "nothing deleted (quit_err fault)")
            await self.err(self.faults.quit_err)
            return False
        # RFC 1939 §6: UPDATE state, the marked messages are removed now.
        gone = [self.items[i - 1] for i in sorted(self.rec.marked)]
        if self.faults.dele_ignored:
            self.log("*", "nothing deleted (dele_ignored fault)")
        else:
            self.maildrop.remove(gone)
            self.rec.deleted_uids = [s.uid for s in gone]
            self.log("*", f"committed {len(gone)} deletions")
        self.rec.outcome = "committed"
        count = len(self.items) - len(gone)
        await self.ok(f"bye ({count} messages left)")
        return False

    # -- TRANSACTION -----------------------------------------------------------

    def size(self, number: int) -> int:
        return len(wire_form(self.items[number - 1].data)) + self.faults.size_delta(
            number
        )

    def live(self) -> list[int]:
        return [i for i in range(1, len(self.items) + 1) if i not in self.rec.marked]

    def stat(self) -> tuple[int, int]:
        live = self.live()
        return len(live), sum(self.size(i) for i in live)

    async def number(self, arg: str) -> int | None:
        """Parse and check a message number (RFC 1939 §5), answering -ERR if bad."""
        word = arg.split(" ", 1)[0]
        if not word.isdigit() or not 1 <= int(word) <= len(self.items):
            await self.err("no such message")
            return None
        if int(word) in self.rec.marked:
            await self.err(f"message {int(word)} already deleted")
            return None
        return int(word)

    def uid(self, number: int) -> str:
        f = self.faults
        uid = self.items[0 if f.uidl_duplicate else number - 1].uid
        return uid.ljust(f.uidl_length, "x") if f.uidl_length else uid

    async def cmd_stat(self, arg: str) -> bool:
        count, size = self.stat()
        await self.ok(f"{count} {size}")
        return True

    async def cmd_list(self, arg: str) -> bool:
        if arg:
            n = await self.number(arg)
            if n is not None:
                await self.ok(f"{n} {self.size(n)}")
            return True
        count, size = self.stat()
        lines = [f"{i} {self.size(i)}" for i in self.live()]
        await self.multiline(f"{count} messages ({size} octets)", lines)
        return True

    async def cmd_uidl(self, arg: str) -> bool:
        f = self.faults
        if f.uidl_unsupported:
            await self.err("UIDL not supported")
            return True
        if arg:
            n = await self.number(arg)
            if n is not None and n in f.uidl_missing:
                await self.err(f"no unique id for message {n}")
            elif n is not None:
                await self.ok(f"{n} {self.uid(n)}")
            return True
        lines = [f"{i} {self.uid(i)}" for i in self.live() if i not in f.uidl_missing]
        await self.multiline("unique-id listing follows", lines)
        return True

    async def send_body(
        self, status: str, body: bytes, number: int, drop: bool
    ) -> None:
        await self.ok(status)
        payload = self._payload(body)
        if drop:
            await self.send(
                payload[: max(1, int(len(payload) * self.faults.drop_in_retr_fraction))]
            )
            await self.drop(f"dropped in RETR {number}")
        self.log("*", f"body {len(body)} octets")
        await self.send(payload)

    def _served(self, n: int) -> bytes:
        """Message ``n`` as this session serves it (wire form), after faults."""
        wire = wire_form(self.items[n - 1].data)
        head = wire.partition(b"\r\n\r\n")[0]
        if self.faults.utf8_notice and not self.utf8_mode and not head.isascii():
            # Courier without UTF8 (RFC 6856 §3): a notice replaces the message.
            return (
                b"From: Mail Delivery Subsystem <postmaster@localhost>\r\n"
                b"Subject: Cannot display Unicode content\r\n\r\n"
                b"This message contains Unicode content that cannot be shown.\r\n"
            )
        return wire

    async def cmd_retr(self, arg: str) -> bool:
        n = await self.number(arg)
        if n is None:
            return True
        self.rec.retrieved.append(n)
        body = self._served(n)
        if self.faults.short_retr_after_top and n in self.topped:
            body = body.partition(b"\r\n\r\n")[0] + b"\r\n\r\n"
        await self.send_body(
            f"{self.size(n)} octets", body, n, self.faults.drop_in_retr == n
        )
        return True

    async def cmd_top(self, arg: str) -> bool:
        parts = arg.split()
        if not self.options.top or len(parts) != 2 or not parts[1].isdigit():
            await self.err("TOP msg n" if self.options.top else "TOP not supported")
            return True
        n = await self.number(parts[0])
        if n is None:
            return True
        self.topped.add(n)
        wire = self._served(n)
        head, sep, body = wire.partition(b"\r\n\r\n")
        # RFC 1939 §7: the header, the blank line, then n lines of the body.
        lines = body.split(b"\r\n")[:-1] if sep else []
        text = head + sep + b"".join(x + b"\r\n" for x in lines[: int(parts[1])])
        if not sep:
            text = wire
        await self.send_body("top of message follows", text, n, False)
        return True

    async def cmd_dele(self, arg: str) -> bool:
        n = await self.number(arg)
        if n is not None:
            self.rec.marked.add(n)  # RFC 1939 §5: only marked; removed in UPDATE
            await self.ok(f"message {n} deleted")
        return True

    async def cmd_noop(self, arg: str) -> bool:
        await self.ok()
        return True

    async def cmd_rset(self, arg: str) -> bool:
        self.rec.marked.clear()
        count, size = self.stat()
        await self.ok(f"maildrop has {count} messages ({size} octets)")
        return True
