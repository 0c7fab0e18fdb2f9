"""An in-process asyncio POP3 server (RFC 1939, RFC 2449, RFC 5034) with fault injection.

:class:`Pop3Server` holds the options, the :class:`~.maildrop.Maildrop` and the
lifecycle (on the running loop or in a thread of its own); each connection is a
:class:`~.session.Session`, whose AUTH mechanisms are :mod:`.sasl` and whose
certificate comes from :mod:`.tls`. The names tests use are importable from here.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import ssl
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from types import TracebackType

from mailpipe.testing.lifecycle import Service

from .faults import Faults
from .maildrop import Maildrop
from .sasl import SUPPORTED_MECHANISMS
from .session import (
    MAX_LINE,
    Session,
    SessionRecord,
    TlsMode,
    dot_stuff,
    wire_form,
)
from .tls import client_context, server_context, tls_material
from .transcript import Transcript

__all__ = [
    "DEFAULT_USERS",
    "SUPPORTED_MECHANISMS",
    "Pop3Server",
    "SessionRecord",
    "TlsMode",
    "dot_stuff",
    "wire_form",
]

DEFAULT_USERS: Mapping[str, str] = {"user": "pass"}


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
        ``extra_capabilities``: more CAPA lines, as they are (Gmail's
        ``X-GOOGLE-RICO``; with ``greeting="Gpop ready ..."`` the fake presents
        Gmail's signature, which the pop3 source takes to page its listing, T-44).
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
        extra_capabilities: Sequence[str] = (),
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
        self.extra_capabilities = tuple(extra_capabilities)
        self.faults = faults
        self.transcript = Transcript()
        self.sessions: list[SessionRecord] = []
        # Named as before the split: tests reach in to act as another client.
        self._mailbox = Maildrop(
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
        return tls_material()[0]

    def ssl_context(self) -> ssl.SSLContext:
        """A verifying client context that trusts :attr:`ca_file` only."""
        return client_context()

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
            tls_material()  # make the CA before any client asks for ca_file
        ctx = server_context() if self.tls == "implicit" else None
        self._server = await asyncio.start_server(
            self._accept, self.host, self.port, ssl=ctx, limit=MAX_LINE
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
            session = Session(
                self,
                self._mailbox,
                self.transcript,
                self._faults_for(record.number),
                reader,
                writer,
                record,
            )
            await session.run()
        except asyncio.CancelledError:
            pass  # astop() cancelled the session; it has recorded that already
        finally:
            self._tasks.discard(task)
