"""An in-process asyncio POP3 server (RFC 1939, RFC 2449, RFC 5034) with fault injection."""

from __future__ import annotations

import asyncio
import atexit
import base64
import binascii
import contextlib
import functools
import hashlib
import hmac
import itertools
import json
import os
import re
import secrets
import shutil
import ssl
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, Literal

from mailpipe.testing.lifecycle import Service

from .faults import Faults
from .transcript import MASK, Transcript, mask_command

__all__ = [
    "DEFAULT_USERS",
    "SUPPORTED_MECHANISMS",
    "Pop3Server",
    "SessionRecord",
    "dot_stuff",
    "wire_form",
]

TlsMode = Literal["implicit", "starttls"]
DEFAULT_USERS: Mapping[str, str] = {"user": "pass"}
SUPPORTED_MECHANISMS = frozenset(
    {
        "PLAIN",
        "LOGIN",
        "CRAM-MD5",
        "SCRAM-SHA-1",
        "SCRAM-SHA-256",
        "XOAUTH2",
        "OAUTHBEARER",
    }
)
_MAX_LINE = 1 << 20
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


_TLS_LOCK = threading.Lock()


def _tls_material() -> tuple[Path, Any]:
    """One test CA and localhost certificate per process (trustme), removed at exit."""
    with _TLS_LOCK:  # the server thread and the test may ask first at the same time
        return _make_tls_material()


@functools.lru_cache(maxsize=1)
def _make_tls_material() -> tuple[Path, Any]:
    import trustme

    directory = tempfile.mkdtemp(prefix="mailpipe-pop3-ca-")
    atexit.register(shutil.rmtree, directory, ignore_errors=True)
    ca = trustme.CA(organization_name="mailpipe fake POP3 CA")
    cert = ca.issue_cert("localhost", "127.0.0.1")
    ca_file = Path(directory) / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    return ca_file, cert


def _server_context() -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    _tls_material()[1].configure_cert(ctx)
    return ctx


@dataclass(eq=False)
class _Stored:
    uid: str
    data: bytes
    path: Path | None = None


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


class _Dropped(Exception):
    """A fault closed the connection."""


class _Mailbox:
    """The maildrop shared by all sessions and users, optionally backed by a Maildir."""

    def __init__(self, messages: Iterable[bytes], maildir: Path | None) -> None:
        self.lock = threading.Lock()
        self.items: list[_Stored] = []
        self.maildir = maildir
        self.locked_by: int | None = None
        self._serial = itertools.count(1)
        for data in messages:
            self.add(data)
        self.sync()

    def add(self, data: bytes, uid: str | None = None) -> str:
        if not isinstance(data, bytes | bytearray):
            raise TypeError("messages are bytes")
        with self.lock:
            n = next(self._serial)
            uid = uid if uid is not None else f"mp{n:08d}"
            self.items.append(_Stored(uid, bytes(data)))
            return uid

    def sync(self) -> None:
        """Pick up Maildir files added or removed since the last look."""
        if self.maildir is None:
            return
        files = sorted(
            (p for sub in ("new", "cur") for p in (self.maildir / sub).glob("*")),
            key=lambda p: p.name,
        )
        with self.lock:
            known = {s.path for s in self.items if s.path is not None}
            self.items = [s for s in self.items if s.path is None or s.path.exists()]
            for p in files:
                if p not in known:
                    uid = p.name.split(":", 1)[0]
                    self.items.append(_Stored(uid, p.read_bytes(), p))

    def remove(self, gone: list[_Stored]) -> None:
        with self.lock:
            ids = {id(s) for s in gone}
            self.items = [s for s in self.items if id(s) not in ids]
        for s in gone:
            if s.path is not None:
                s.path.unlink(missing_ok=True)


class Pop3Server(Service):
    """A fake POP3 server on 127.0.0.1 for tests, correct to RFC 1939/2449 by default.

    Messages come from ``messages`` (bytes) and/or a ``maildir`` (re-read at each
    login, files unlinked on commit); ``add_message`` adds more while it runs. All
    ``users`` (``{name: password}``) share the one maildrop. As in a real server,
    DELE only marks; deletion happens at QUIT (RFC 1939 §6), and a session that ends
    any other way deletes nothing. With ``lock`` (default) a second concurrent session
    gets ``-ERR [IN-USE]`` after authenticating (RFC 1939 §4, RFC 2449 §8.1.2).

    Run it in a background thread (``with Pop3Server(...) as srv``), usable from sync
    and async tests, or on the running loop (``async with Pop3Server(...) as srv``).

    :param tls: ``"implicit"`` (TLS from the first byte) or ``"starttls"`` (STLS,
        RFC 2595); the certificate is for ``localhost``/``127.0.0.1``, signed by a
        trustme CA whose PEM is :attr:`ca_file`.
    :param mechanisms: SASL mechanisms for AUTH (RFC 5034), any of PLAIN, LOGIN,
        CRAM-MD5, SCRAM-SHA-1, SCRAM-SHA-256 (RFC 5802/7677, no channel binding; the
        server signature goes in a final challenge answered by an empty line, RFC 4422
        §5), XOAUTH2, OAUTHBEARER; the bearer ones check ``oauth_tokens``
        (``{user: token}``) and on failure send the error challenge and wait for the
        client's empty reply before ``-ERR`` (RFC 7628 §3.2.3).
    :param apop: put an RFC 1939 §7 timestamp in the greeting and accept APOP.
    :param pipelining: advertise PIPELINING (RFC 2449 §6.6); commands are always
        processed in order. ``login_delay``/``expire``: advertise LOGIN-DELAY and
        EXPIRE (RFC 2449 §6.5, §6.7). ``capa=False`` answers CAPA with ``-ERR``;
        ``user_command=False`` drops USER/PASS; ``top=False`` drops TOP;
        ``utf8=True`` advertises and accepts UTF8 (RFC 6856 §2).
    :param faults: a :class:`Faults` for every session, or a list for sessions
        1, 2, ...; may be reassigned while the server runs.
    """

    def __init__(
        self,
        messages: Iterable[bytes] = (),
        *,
        maildir: str | os.PathLike[str] | None = None,
        users: Mapping[str, str] | None = None,
        host: str = "127.0.0.1",
        port: int = 0,
        tls: TlsMode | None = None,
        mechanisms: Sequence[str] = ("PLAIN", "LOGIN"),
        oauth_tokens: Mapping[str, str] | None = None,
        apop: bool = False,
        pipelining: bool = True,
        login_delay: int | None = None,
        expire: int | str | None = None,
        lock: bool = True,
        capa: bool = True,
        user_command: bool = True,
        top: bool = True,
        utf8: bool = False,
        faults: Faults | Sequence[Faults] | None = None,
        greeting: str = "mailpipe fake POP3 server ready",
    ) -> None:
        if tls not in (None, "implicit", "starttls"):
            raise ValueError(f"tls must be None, 'implicit' or 'starttls', not {tls!r}")
        mechs = tuple(m.upper() for m in mechanisms)
        unknown = set(mechs) - SUPPORTED_MECHANISMS
        if unknown:
            raise ValueError(f"unsupported SASL mechanisms: {sorted(unknown)}")
        self.host = host
        self.port = port
        self.tls: TlsMode | None = tls
        self.users = dict(DEFAULT_USERS if users is None else users)
        self.mechanisms = mechs
        self.oauth_tokens = dict(oauth_tokens or {})
        self.apop = apop
        self.pipelining = pipelining
        self.login_delay = login_delay
        self.expire = expire
        self.lock = lock
        self.capa = capa
        self.user_command = user_command
        self.top = top
        self.utf8 = utf8
        self.greeting = greeting
        self.faults = faults
        self.transcript = Transcript()
        self.sessions: list[SessionRecord] = []
        self._mailbox = _Mailbox(
            messages, Path(maildir) if maildir is not None else None
        )
        self._server: asyncio.Server | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._counter_lock = threading.Lock()

    # -- public state ----------------------------------------------------------

    @property
    def ca_file(self) -> Path:
        """PEM of the CA that signed the server certificate (pass as ``cafile=``)."""
        return _tls_material()[0]

    def ssl_context(self) -> ssl.SSLContext:
        """A verifying client context that trusts :attr:`ca_file` only."""
        return ssl.create_default_context(cafile=str(self.ca_file))

    @property
    def messages(self) -> list[bytes]:
        """The messages still in the maildrop, as given (not in wire form)."""
        with self._mailbox.lock:
            return [s.data for s in self._mailbox.items]

    @property
    def uids(self) -> list[str]:
        """The unique ids of the messages still in the maildrop."""
        with self._mailbox.lock:
            return [s.uid for s in self._mailbox.items]

    def add_message(self, data: bytes, uid: str | None = None) -> str:
        """Add a message (seen by sessions that log in afterwards); returns its uid.

        ``uid`` may be anything, duplicates and over-long ones included.
        """
        return self._mailbox.add(data, uid)

    def rename_uids(self, rename: Callable[[str], str]) -> None:
        """Give every message the uid ``rename(old)``, as a server whose uid format or
        UIDVALIDITY changed does (conformance C-60); later UIDL listings show it."""
        with self._mailbox.lock:
            for stored in self._mailbox.items:
                stored.uid = rename(stored.uid)

    @property
    def active_sessions(self) -> int:
        """Sessions currently connected."""
        return sum(1 for r in self.sessions if r.outcome == "open")

    def _faults_for(self, number: int) -> Faults:
        f = self.faults
        if f is None:
            return Faults()
        if isinstance(f, Faults):
            return f
        return f[number - 1] if number <= len(f) else Faults()

    # -- lifecycle -------------------------------------------------------------

    async def astart(self) -> None:
        """Start listening on the running event loop; :attr:`port` is then set."""
        self._loop = asyncio.get_running_loop()
        if self.tls is not None:
            _tls_material()  # make the CA before any client asks for ca_file
        ctx = _server_context() if self.tls == "implicit" else None
        self._server = await asyncio.start_server(
            self._accept, self.host, self.port, ssl=ctx, limit=_MAX_LINE
        )
        self.port = int(self._server.sockets[0].getsockname()[1])

    async def astop(self) -> None:
        """Stop listening and end every session (no UPDATE for them: nothing deleted)."""
        if self._server is None:
            return
        self._server.close()
        tasks = list(self._tasks)
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._server.wait_closed(), 5)
        self._server = None

    async def __aenter__(self) -> Pop3Server:
        await self.astart()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.astop()

    def start(self) -> None:
        """Start the server on its own event loop in a daemon thread."""
        started = threading.Event()
        failure: list[BaseException] = []

        def main() -> None:
            loop = asyncio.new_event_loop()
            try:
                try:
                    loop.run_until_complete(self.astart())
                except BaseException as exc:
                    failure.append(exc)
                    return
                finally:
                    started.set()
                loop.run_forever()
                loop.run_until_complete(self.astop())
            finally:
                loop.close()

        self._thread = threading.Thread(
            target=main, name="mailpipe-pop3-server", daemon=True
        )
        self._thread.start()
        started.wait(30)
        if failure:
            self._thread.join(10)
            raise failure[0]

    def stop(self) -> None:
        """Stop a server started with :meth:`start` and join its thread."""
        if self._thread is None or self._loop is None:
            return
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(30)
        self._thread = None

    def wait_idle(self, timeout: float = 10.0) -> None:
        """Block until no session is open (server in a thread); TimeoutError otherwise."""
        deadline = time.monotonic() + timeout
        while self.active_sessions:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.active_sessions} POP3 session(s) still open")
            time.sleep(0.005)

    async def await_idle(self, timeout: float = 10.0) -> None:
        """Wait until no session is open, without blocking the event loop."""
        async with asyncio.timeout(timeout):
            while self.active_sessions:
                await asyncio.sleep(0.005)

    # -- sessions --------------------------------------------------------------

    async def _accept(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        with self._counter_lock:
            record = SessionRecord(
                number=len(self.sessions) + 1, tls=self.tls == "implicit"
            )
            self.sessions.append(record)
        try:
            await _Session(self, reader, writer, record).run()
        except asyncio.CancelledError:
            pass  # astop() cancelled the session; it has recorded that already
        finally:
            self._tasks.discard(task)


class _Session:
    """One connection: the RFC 1939 state machine plus the configured faults."""

    def __init__(
        self,
        server: Pop3Server,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        record: SessionRecord,
    ) -> None:
        self.srv = server
        self.reader = reader
        self.writer = writer
        self.rec = record
        self.n = record.number
        self.faults = server._faults_for(record.number)
        self.eol = b"\n" if self.faults.bare_lf else b"\r\n"
        self.state = "AUTHORIZATION"
        self.sent = 0
        self.pending_user: str | None = None
        self.items: list[_Stored] = []
        self.topped: set[int] = set()
        self.utf8_mode = False
        self.holds_lock = False
        self.timestamp = f"<{os.getpid()}.{self.n}.{time.time_ns()}@mailpipe.test>"

    def log(self, kind: Literal["C", "S", "*"], text: str) -> None:
        self.srv.transcript.add(self.n, kind, text)

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
            greeting = self.srv.greeting
            if self.srv.apop:
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
            with self.srv._mailbox.lock:
                self.srv._mailbox.locked_by = None
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
        srv = self.srv
        if not srv.capa:
            await self.err("unknown command")  # RFC 2449 §5: a pre-CAPA server
            return True
        caps = ["CAPA"]
        if srv.top:
            caps.append("TOP")
        if not self.faults.uidl_unsupported:
            caps.append("UIDL")
        caps += ["RESP-CODES", "AUTH-RESP-CODE"]
        if srv.pipelining:
            caps.append("PIPELINING")
        if self.state == "AUTHORIZATION":
            if srv.user_command:
                caps.append("USER")
            if srv.mechanisms:
                caps.append("SASL " + " ".join(srv.mechanisms))
            if srv.tls == "starttls" and not self.rec.tls:
                caps.append("STLS")
        if srv.login_delay is not None:
            caps.append(f"LOGIN-DELAY {srv.login_delay}")
        if srv.expire is not None:
            caps.append(f"EXPIRE {srv.expire}")
        if srv.utf8:
            caps.append("UTF8")
        caps.append("IMPLEMENTATION mailpipe-testing")
        await self.multiline("Capability list follows", caps)
        return True

    async def cmd_utf8(self, arg: str) -> bool:
        if not self.srv.utf8:
            await self.err("unknown command")
            return True
        self.utf8_mode = True
        await self.ok("UTF8 enabled")
        return True

    async def cmd_user(self, arg: str) -> bool:
        if not self.srv.user_command:
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
        if user is None or not self.srv.user_command:
            await self.err("USER first")  # RFC 1939 §7: PASS only after USER
            return True
        # RFC 1939 §7: the whole rest of the line is the password, spaces included.
        await self.check_password(user, arg, "PASS")
        return True

    async def check_password(self, user: str, password: str, method: str) -> None:
        expected = self.srv.users.get(user)
        if expected is not None and hmac.compare_digest(expected, password):
            await self.login(user, method)
        else:
            await self.err("[AUTH] invalid user name or password")

    async def login(self, user: str, method: str) -> None:
        box = self.srv._mailbox
        if self.srv.lock:
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
        if not self.srv.apop or len(parts) != 2:
            await self.err(
                "APOP not available" if not self.srv.apop else "APOP name digest"
            )
            return True
        name, digest = parts
        password = self.srv.users.get(name)
        # RFC 1939 §7: digest = MD5(timestamp + shared secret), lower-case hex.
        expected = hashlib.md5((self.timestamp + (password or "")).encode()).hexdigest()
        if password is not None and hmac.compare_digest(expected, digest.lower()):
            await self.login(name, "APOP")
        else:
            await self.err("[AUTH] authentication failed")
        return True

    async def cmd_stls(self, arg: str) -> bool:
        if self.srv.tls != "starttls" or self.rec.tls:
            await self.err("STLS not available")
            return True
        await self.ok("Begin TLS negotiation")
        # RFC 2595 §3.1 / RFC 8314 §4.1: plaintext sent after STLS (command injection)
        # must not be executed after the handshake; discard it, and say so.
        buffered: bytearray | None = getattr(self.reader, "_buffer", None)
        if buffered:
            self.log("*", f"discarded {len(buffered)} octets sent before TLS")
            buffered.clear()
        await self.writer.start_tls(_server_context())
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
            await self.multiline("SASL mechanisms follow", list(self.srv.mechanisms))
            return True
        mech, _, initial = arg.partition(" ")
        mech = mech.upper()
        if mech not in self.srv.mechanisms:
            await self.err(f"unsupported mechanism {mech}")
            return True
        # RFC 5034 §4: "=" is an empty initial response.
        ir = None if initial == "" else ("" if initial == "=" else initial)
        try:
            await getattr(self, "auth_" + mech.lower().replace("-", "_"))(ir)
        except (binascii.Error, UnicodeDecodeError, ValueError, KeyError):
            await self.err("[AUTH] malformed SASL response")
        return True

    async def _response(self, ir: str | None, prompt: str = "") -> bytes | None:
        line = ir if ir is not None else await self.challenge(prompt)
        return None if line is None else base64.b64decode(line, validate=True)

    async def auth_plain(self, ir: str | None) -> None:
        raw = await self._response(ir)
        if raw is None:
            return
        authzid, authcid, password = raw.decode().split("\0")  # RFC 4616 §2
        if authzid and authzid != authcid:
            await self.err("[AUTH] authorization identity not allowed")
            return
        await self.check_password(authcid, password, "PLAIN")

    async def auth_login(self, ir: str | None) -> None:
        name = await self._response(ir, "VXNlcm5hbWU6")
        if name is None:
            return
        password = await self._response(None, "UGFzc3dvcmQ6")
        if password is None:
            return
        await self.check_password(name.decode(), password.decode(), "LOGIN")

    async def auth_cram_md5(self, ir: str | None) -> None:
        if ir is not None:
            await self.err("[AUTH] CRAM-MD5 takes no initial response")
            return
        raw = await self._response(
            None, base64.b64encode(self.timestamp.encode()).decode()
        )
        if raw is None:
            return
        name, digest = raw.decode().rsplit(" ", 1)
        password = self.srv.users.get(name)
        expected = hmac.new(
            (password or "").encode(), self.timestamp.encode(), hashlib.md5
        ).hexdigest()
        if password is not None and hmac.compare_digest(expected, digest):
            await self.login(name, "CRAM-MD5")
        else:
            await self.err("[AUTH] authentication failed")

    async def auth_scram_sha_1(self, ir: str | None) -> None:
        await self._scram(ir, "SCRAM-SHA-1", "sha1")

    async def auth_scram_sha_256(self, ir: str | None) -> None:
        await self._scram(ir, "SCRAM-SHA-256", "sha256")

    async def _scram(self, ir: str | None, method: str, digest: str) -> None:
        # RFC 5802 §3, §5, written apart from the client's code so each checks the other.
        raw = await self._response(ir)
        if raw is None:
            return
        cbflag, authzid, bare = raw.decode().split(",", 2)
        if cbflag != "n" or authzid:
            await self.err("[AUTH] only gs2 header 'n,,' is supported")
            return
        fields = dict(kv.split("=", 1) for kv in bare.split(","))
        user = fields["n"].replace("=2C", ",").replace("=3D", "=")
        nonce = fields["r"] + secrets.token_urlsafe(12)
        salt, iterations = os.urandom(16), 4096
        first = f"r={nonce},s={base64.b64encode(salt).decode()},i={iterations}"
        final = await self._response(None, base64.b64encode(first.encode()).decode())
        if final is None:
            return
        without_proof, _, proof = final.decode().rpartition(",p=")
        password = self.srv.users.get(user)
        salted = hashlib.pbkdf2_hmac(
            digest, (password or "").encode(), salt, iterations
        )
        client_key = hmac.new(salted, b"Client Key", digest).digest()
        stored_key = hashlib.new(digest, client_key).digest()
        message = f"{bare},{first},{without_proof}".encode()
        signature = hmac.new(stored_key, message, digest).digest()
        sent_key = bytes(
            a ^ b for a, b in zip(base64.b64decode(proof), signature, strict=False)
        )
        if (
            password is None
            or without_proof != f"c=biws,r={nonce}"
            or not hmac.compare_digest(
                hashlib.new(digest, sent_key).digest(), stored_key
            )
        ):
            await self.err("[AUTH] authentication failed")
            return
        server_key = hmac.new(salted, b"Server Key", digest).digest()
        verifier = hmac.new(server_key, message, digest).digest()
        if self.faults.scram_bad_signature:
            verifier = bytes(b ^ 0xFF for b in verifier)
        final_data = b"v=" + base64.b64encode(verifier)
        if await self._response(None, base64.b64encode(final_data).decode()) is None:
            return  # the client cancelled: it did not trust the signature
        await self.login(user, method)

    async def _bearer(
        self, user: str, token: str, method: str, error: dict[str, str]
    ) -> None:
        expected = self.srv.oauth_tokens.get(user)
        if expected is not None and hmac.compare_digest(expected, token):
            await self.login(user, method)
            return
        # RFC 7628 §3.2.3: failure is an error challenge; the client must answer it
        # (empty line for XOAUTH2, base64 of %x01 for OAUTHBEARER) before -ERR.
        answer = await self.challenge(
            base64.b64encode(json.dumps(error).encode()).decode()
        )
        if answer is not None:
            await self.err("[AUTH] invalid token")

    async def auth_xoauth2(self, ir: str | None) -> None:
        raw = await self._response(ir)
        if raw is None:
            return
        fields = dict(
            kv.split("=", 1) for kv in raw.decode().split("\x01") if "=" in kv
        )
        token = fields.get("auth", "").removeprefix("Bearer ")
        error = {
            "status": "401",
            "schemes": "bearer",
            "scope": "https://mail.google.com/",
        }
        await self._bearer(fields.get("user", ""), token, "XOAUTH2", error)

    async def auth_oauthbearer(self, ir: str | None) -> None:
        raw = await self._response(ir)
        if raw is None:
            return
        gs2, _, rest = raw.decode().partition("\x01")
        user = ""
        for part in gs2.split(","):
            if part.startswith("a="):
                user = part[2:].replace("=2C", ",").replace("=3D", "=")
        fields = dict(kv.split("=", 1) for kv in rest.split("\x01") if "=" in kv)
        token = fields.get("auth", "").removeprefix("Bearer ")
        error = {"status": "invalid_token", "scope": "mail"}
        await self._bearer(user, token, "OAUTHBEARER", error)

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
            self.srv._mailbox.remove(gone)
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
        if not self.srv.top or len(parts) != 2 or not parts[1].isdigit():
            await self.err("TOP msg n" if self.srv.top else "TOP not supported")
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
