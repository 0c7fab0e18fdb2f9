"""A fault-injecting in-process IMAP server on 127.0.0.1 for tests (plaintext only).

Just enough IMAP4rev1 for the ``imap`` source: CAPABILITY, LOGIN, SELECT/EXAMINE,
``UID FETCH`` of ``UID``/``RFC822.SIZE``/``FLAGS``/``BODY.PEEK[]``/``BODY.PEEK[HEADER]``,
``UID SEARCH`` with ``UID set``, ``UNSEEN``, ``SINCE d-Mon-yyyy`` and ``ALL``,
``UID STORE``, ``UID EXPUNGE``, ``UID COPY``/``UID MOVE`` (``[TRYCREATE]`` for a missing
folder), CREATE, EXPUNGE, NOOP, ``STATUS (UIDNEXT MESSAGES)``, LOGOUT, folders made by
:meth:`ImapServer.add_message`. A UID set ending in ``*`` holds the folder's largest UID
even when it is below the range's start (RFC 9051 §6.4.9), as real servers do.
``extensions`` chooses what CAPABILITY lists beyond
IMAP4rev1 (UIDPLUS and MOVE by default), so a test can play a server without UIDPLUS
(IC-38) or MOVE (IC-41), with LOGINDISABLED (IC-17) or with ``AUTH=PLAIN`` (AUTHENTICATE
PLAIN is then answered); with ``IDLE`` listed, IDLE (RFC 2177) is answered: ``* n EXISTS``
when a message is added to the selected folder while it runs, then DONE.
Every client line goes to :attr:`ImapServer.transcript`, so tests assert what was (and
was not) sent. ``gmail=True`` plays Gmail: ``X-GM-EXT-1`` and each message's
``X-GM-MSGID`` (one message may sit in several folders, its labels).

Faults (:class:`ImapFaults`): close the connection part-way through a body literal,
announce a body literal with a wrong size, answer a command with ``* BYE``, refuse
LOGIN or another command with ``NO`` and a response code (Gmail's ``[ALERT]``,
``[THROTTLED]``, ``[UNAVAILABLE]``, ``[AUTHENTICATIONFAILED]``), send an untagged
``* OK [ALERT]`` after login, send each body twice, greet late or never answer a command,
expunge messages as another client would between the
listing and the body fetch (IT-16), close the connection when IDLE is sent, refuse IDLE
with ``NO``; :meth:`ImapServer.drop_connections` closes every connection.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import re
import threading
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from typing import Any

__all__ = ["ImapFaults", "ImapServer"]


@dataclass
class ImapFaults:
    """What the server does wrong. ``drop_in_literal``: close after this many octets
    of the first body literal; ``literal_size_delta``: add this to every announced body
    size (the octets sent stay the real ones); ``bye_on``: answer the first command
    with this keyword (``"UID FETCH"``) with ``* BYE`` and close."""

    drop_in_literal: int | None = None
    literal_size_delta: int = 0
    bye_on: str | None = None
    #: ``NO`` + this text (``"[ALERT] Please log in via your web browser"``) to LOGIN.
    login_refusal: str | None = None
    #: (command, text): a command (``"UID FETCH"``) gets ``NO`` + text, once, after
    #: ``refuse_skip`` such commands went through.
    refuse: tuple[str, str] | None = None
    refuse_skip: int = 0
    #: An untagged ``* OK [ALERT] <text>`` right after a successful LOGIN.
    alert: str | None = None
    #: UIDs that another client expunges when the first ``BODY.PEEK[]`` fetch arrives
    #: (after the listing saw them): the fetch then returns no body for them (IT-16).
    expunged_by_other: frozenset[int] = frozenset()
    #: Send every body twice (two ``FETCH`` responses for one UID), as Gmail may (IT-05).
    repeat_body: bool = False
    #: Seconds to wait before the greeting (the client's greeting timeout, IS-11).
    greeting_delay: float = 0.0
    #: A command keyword (``"UID FETCH"``) that is read and never answered (IS-11).
    stall_on: str | None = None
    #: Close the connection (no answer) whenever IDLE is sent.
    drop_on_idle: bool = False
    #: Answer IDLE with ``NO`` (a server that refuses it although it lists it).
    refuse_idle: bool = False


@dataclass
class _Message:
    uid: int
    data: bytes
    flags: set[str] = field(default_factory=set)
    gm_msgid: int = 0
    internal: date = field(default_factory=lambda: datetime.now(UTC).date())


class ImapServer:
    """Run in a background thread; use as a context manager (``with ImapServer() as s``).

    User ``user``, password ``pass``; ``add_message(bytes)``; ``messages`` lists what
    is left; ``transcript`` holds every line the client sent (LOGIN's and AUTHENTICATE's arguments masked).
    """

    def __init__(
        self,
        faults: ImapFaults | None = None,
        *,
        gmail: bool = False,
        extensions: tuple[str, ...] = ("UIDPLUS", "MOVE"),
    ) -> None:
        self.faults = faults or ImapFaults()
        self.gmail = gmail
        self.extensions = extensions
        #: How many connections were accepted (every one greets; tests count logins).
        self.connections = 0
        self.host = "127.0.0.1"
        self.port = 0
        self.transcript: list[str] = []
        self.uidvalidity = 1234
        self._folders: dict[str, list[_Message]] = {"INBOX": []}
        self._next_uid: dict[str, int] = {"INBOX": 1}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._server: asyncio.Server | None = None
        self._ready = threading.Event()
        self._tasks: set[asyncio.Task[None]] = set()
        self._writers: set[asyncio.StreamWriter] = set()

    def add_message(
        self, data: bytes, folder: str = "INBOX", *, gm_msgid: int = 0,
        flags: tuple[str, ...] = (), received: date | None = None,
    ) -> None:
        """Append a message to ``folder`` (made if new; it gets the folder's next UID);
        ``gm_msgid`` is its Gmail id (give the same one to put a message under two
        labels); ``flags`` it carries; ``received`` its INTERNALDATE (default today)."""
        uid = self._next_uid.setdefault(folder, 1)
        message = _Message(uid, data, set(flags), gm_msgid=gm_msgid)
        if received is not None:
            message.internal = received
        self._folders.setdefault(folder, []).append(message)
        self._next_uid[folder] = uid + 1

    def flags(self, folder: str = "INBOX") -> list[set[str]]:
        """The flags of every message still in ``folder``, in UID order."""
        return [set(m.flags) for m in self._folders.get(folder, [])]

    @property
    def messages(self) -> list[bytes]:
        """The messages still in INBOX, in UID order."""
        return self.folder("INBOX")

    def folder(self, name: str) -> list[bytes]:
        """The messages still in folder ``name``, in UID order."""
        return [m.data for m in self._folders.get(name, [])]

    @property
    def capabilities(self) -> str:
        """What CAPABILITY lists."""
        return " ".join(
            ("IMAP4rev1", *self.extensions, *(("X-GM-EXT-1",) if self.gmail else ()))
        )

    def __enter__(self) -> ImapServer:
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("the fake IMAP server did not start")
        return self

    def __exit__(self, *exc: Any) -> None:
        loop = self._loop
        if loop is not None:
            loop.call_soon_threadsafe(loop.stop)
        if self._thread is not None:
            self._thread.join(10)

    def _run(self) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        try:
            self._server = loop.run_until_complete(
                asyncio.start_server(self._accept, self.host, 0)
            )
            self.port = self._server.sockets[0].getsockname()[1]
            self._ready.set()
            loop.run_forever()
            loop.run_until_complete(self._stop())
        finally:
            loop.close()

    async def _stop(self) -> None:
        assert self._server is not None
        self._server.close()
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _accept(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self._writers.add(writer)
        try:
            await self._handle(reader, writer)
        except (asyncio.CancelledError, ConnectionError):
            writer.transport.abort()
        finally:
            self._tasks.discard(task)
            self._writers.discard(writer)

    def drop_connections(self) -> None:
        """Close every open connection at once (a server restart, an idle timeout)."""
        loop = self._loop
        assert loop is not None
        done = threading.Event()

        def drop() -> None:
            for writer in list(self._writers):
                writer.transport.abort()
            done.set()

        loop.call_soon_threadsafe(drop)
        done.wait(10)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        faults = self.faults
        dropped = False
        selected = "INBOX"
        known = 0  # the UIDNEXT this connection was told of (SELECT, EXISTS in IDLE)

        def send(line: str) -> None:
            writer.write(line.encode() + b"\r\n")

        self.connections += 1
        if faults.greeting_delay:
            await asyncio.sleep(faults.greeting_delay)
        send(f"* OK [CAPABILITY {self.capabilities}] fake ready")
        try:
            while not dropped:
                raw = await reader.readline()
                if not raw:
                    break
                line = raw.decode("utf-8", "replace").rstrip("\r\n")
                tag, _, rest = line.partition(" ")
                word = rest.split(" ", 1)[0].upper()
                command = " ".join(rest.split(" ", 2)[:2]).upper() if word == "UID" else word
                masked = word in ("LOGIN", "AUTHENTICATE")
                self.transcript.append(f"{tag} {word} ***" if masked else line)
                if faults.stall_on is not None and command == faults.stall_on.upper():
                    await asyncio.sleep(3600)  # ended by the client's timeout
                if faults.bye_on is not None and command == faults.bye_on.upper():
                    faults.bye_on = None
                    send("* BYE fault injected")
                    break
                refused = faults.refuse is not None and command == faults.refuse[0].upper()
                if refused and faults.refuse_skip > 0:
                    faults.refuse_skip -= 1
                    refused = False
                if refused and faults.refuse is not None:
                    send(f"{tag} NO {faults.refuse[1]}")
                    faults.refuse = None
                elif word == "CAPABILITY":
                    send(f"* CAPABILITY {self.capabilities}")
                    send(f"{tag} OK done")
                elif word == "LOGIN":
                    ok = rest == 'LOGIN "user" "pass"'
                    if faults.login_refusal is not None:
                        send(f"{tag} NO {faults.login_refusal}")
                    elif ok:
                        if faults.alert is not None:
                            send(f"* OK [ALERT] {faults.alert}")
                        send(f"{tag} OK [CAPABILITY {self.capabilities}] in")
                    else:
                        send(f"{tag} NO [AUTHENTICATIONFAILED] bad")
                elif word == "AUTHENTICATE" and "AUTH=PLAIN" in self.extensions:
                    # SASL PLAIN (RFC 4616), with an initial response or after "+ ".
                    args = rest.split(" ")
                    if len(args) > 2:
                        answer = args[2]
                    else:
                        send("+ ")
                        await writer.drain()
                        answer = (await reader.readline()).decode("ascii", "replace").strip()
                    try:
                        fields = base64.b64decode(answer, validate=True).split(b"\0")
                    except ValueError:
                        fields = []
                    if faults.login_refusal is not None:
                        send(f"{tag} NO {faults.login_refusal}")
                    elif fields[1:] == [b"user", b"pass"]:
                        send(f"{tag} OK [CAPABILITY {self.capabilities}] in")
                    else:
                        send(f"{tag} NO [AUTHENTICATIONFAILED] bad")
                elif word in ("SELECT", "EXAMINE"):
                    name = rest.split(" ", 1)[1].strip('"')
                    if name not in self._folders:
                        send(f"{tag} NO [NONEXISTENT] no such folder")
                        continue
                    selected = name
                    known = self._next_uid[name]
                    send(f"* {len(self._folders[name])} EXISTS")
                    send(f"* OK [UIDVALIDITY {self.uidvalidity}] ok")
                    send(f"* OK [UIDNEXT {self._next_uid[name]}] ok")
                    send("* OK [PERMANENTFLAGS (\\Deleted \\Seen \\*)] ok")
                    mode = "READ-ONLY" if word == "EXAMINE" else "READ-WRITE"
                    send(f"{tag} OK [{mode}] done")
                elif command == "UID FETCH":
                    dropped = await self._fetch(selected, rest, send, writer)
                    if not dropped:
                        send(f"{tag} OK done")
                elif command == "UID SEARCH":
                    try:
                        found = self._search(selected, rest.split(" ", 2)[2])
                    except (ValueError, IndexError) as exc:  # a key the fake lacks
                        send(f"{tag} BAD {exc}")
                    else:
                        send("* SEARCH" + "".join(f" {uid}" for uid in found))
                        send(f"{tag} OK done")
                elif command == "UID STORE":
                    uids = _uids(rest.split(" ")[2])
                    flag = re.search(r"\((.*)\)", rest)
                    for m in self._folders[selected]:
                        if m.uid in uids and flag:
                            m.flags.update(flag[1].split())
                    send(f"{tag} OK done")
                elif command == "UID EXPUNGE" and self._has(command):
                    self._expunge(selected, _uids(rest.split(" ")[2]), send)
                    send(f"{tag} OK done")
                elif command in ("UID COPY", "UID MOVE") and self._has(command):
                    uids = _uids(rest.split(" ")[2])
                    target = rest.split(" ", 3)[3].strip('"')
                    if target not in self._folders:
                        send(f"{tag} NO [TRYCREATE] no such folder")
                        continue
                    moved = [m for m in self._folders[selected] if m.uid in uids]
                    for m in moved:
                        self.add_message(m.data, target, gm_msgid=m.gm_msgid)
                    if command == "UID MOVE":
                        self._expunge(selected, {m.uid for m in moved}, send, flagged=False)
                    send(f"{tag} OK done")
                elif word == "CREATE":
                    name = rest.split(" ", 1)[1].strip('"')
                    self._folders.setdefault(name, [])
                    self._next_uid.setdefault(name, 1)
                    send(f"{tag} OK done")
                elif word == "EXPUNGE":
                    self._expunge(selected, None, send)
                    send(f"{tag} OK done")
                elif word == "NOOP":
                    send(f"{tag} OK done")
                elif word == "STATUS":
                    name = rest.split(" ", 2)[1].strip('"')
                    if name not in self._folders:
                        send(f"{tag} NO [NONEXISTENT] no such folder")
                        continue
                    send(f'* STATUS "{name}" (MESSAGES {len(self._folders[name])} '
                         f"UIDNEXT {self._next_uid[name]})")
                    send(f"{tag} OK done")
                elif word == "IDLE" and "IDLE" in self.extensions:
                    if faults.drop_on_idle:
                        break
                    if faults.refuse_idle:
                        send(f"{tag} NO IDLE refused")
                        await writer.drain()
                        continue
                    alive, known = await self._idle(selected, known, tag, reader, send, writer)
                    if not alive:
                        break
                elif word == "LOGOUT":
                    send("* BYE bye")
                    send(f"{tag} OK done")
                    break
                else:
                    send(f"{tag} BAD unknown command")
                await writer.drain()
        finally:
            with contextlib.suppress(ConnectionError):
                await writer.drain()
            writer.transport.abort()

    async def _idle(
        self, folder: str, known: int, tag: str, reader: asyncio.StreamReader, send: Any,
        writer: asyncio.StreamWriter,
    ) -> tuple[bool, int]:
        """Run one IDLE (RFC 2177) until DONE: ``* n EXISTS`` once a message was added
        to the folder since the client's ``known`` UIDNEXT. (False when the client went
        away, the UIDNEXT the client now knows.)"""
        send("+ idling")
        await writer.drain()
        for _ in range(1 << 30):  # bounded: a check every 20 ms until DONE
            try:
                raw = await asyncio.wait_for(reader.readline(), 0.02)
            except TimeoutError:
                uidnext = self._next_uid.get(folder, 1)
                if uidnext > known:
                    known = uidnext
                    send(f"* {len(self._folders.get(folder, []))} EXISTS")
                    send("* 1 RECENT")
                    await writer.drain()
                continue
            if not raw:
                return False, known
            line = raw.decode("utf-8", "replace").rstrip("\r\n")
            self.transcript.append(line)
            if line.upper() == "DONE":
                send(f"{tag} OK idle done")
                return True, known
            send(f"{tag} BAD expected DONE")
            return True, known
        return True, known

    def _has(self, command: str) -> bool:
        """Whether ``command`` is offered: ``UID EXPUNGE`` needs UIDPLUS, ``UID MOVE``
        needs MOVE."""
        need = {"UID EXPUNGE": "UIDPLUS", "UID MOVE": "MOVE"}.get(command)
        return need is None or need in self.extensions

    def _expunge(
        self, folder: str, uids: set[int] | None, send: Any, *, flagged: bool = True
    ) -> None:
        """Remove ``uids`` (every one when None) of ``folder`` that carry ``\\Deleted``
        (any, when not ``flagged``), announcing each ``* n EXPUNGE``."""
        keep: list[_Message] = []
        for m in self._folders[folder]:
            if (uids is None or m.uid in uids) and (not flagged or "\\Deleted" in m.flags):
                # The sequence number as the list shrinks (RFC 3501 §7.4.1).
                send(f"* {len(keep) + 1} EXPUNGE")
            else:
                keep.append(m)
        self._folders[folder] = keep

    async def _fetch(
        self, folder: str, rest: str, send: Any, writer: asyncio.StreamWriter
    ) -> bool:
        """Answer ``UID FETCH``; True when a fault dropped the connection."""
        faults = self.faults
        parts = rest.split(" ", 3)
        wanted = _uids(parts[2], last=self._largest(folder))
        items = parts[3].upper()
        if faults.expunged_by_other and "BODY.PEEK[]" in items:
            # IT-16: another client's expunge; this session is not told (Dovecot too
            # answers a UID FETCH of a vanished UID with OK and no data).
            gone, faults.expunged_by_other = faults.expunged_by_other, frozenset()
            self._folders[folder] = [m for m in self._folders[folder] if m.uid not in gone]
        for seq, m in enumerate(self._folders[folder], 1):
            if m.uid not in wanted:
                continue
            head = f"* {seq} FETCH (UID {m.uid}"
            if "RFC822.SIZE" in items:
                head += f" RFC822.SIZE {len(m.data)}"
            if "X-GM-MSGID" in items and self.gmail:
                head += f" X-GM-MSGID {m.gm_msgid}"
            if "FLAGS" in items and "+FLAGS" not in items:
                head += f" FLAGS ({' '.join(sorted(m.flags))})"
            body: bytes | None = None
            if "BODY.PEEK[HEADER]" in items:
                body = m.data.split(b"\r\n\r\n", 1)[0] + b"\r\n\r\n"
                head += " BODY[HEADER]"
            elif "BODY.PEEK[]" in items:
                body = m.data
                head += " BODY[]"
            if body is None:
                send(head + ")")
                continue
            size = len(body) + faults.literal_size_delta
            writer.write(f"{head} {{{size}}}\r\n".encode())
            if faults.drop_in_literal is not None:
                writer.write(body[: faults.drop_in_literal])
                await writer.drain()
                return True
            writer.write(body + b")\r\n")
            if faults.repeat_body:
                writer.write(f"{head} {{{size}}}\r\n".encode() + body + b")\r\n")
        return False


    def _largest(self, folder: str) -> int:
        """What ``*`` stands for: the largest UID in the folder (RFC 9051 §6.4.9)."""
        return max((m.uid for m in self._folders[folder]), default=0)

    def _search(self, folder: str, criteria: str) -> list[int]:
        """The UIDs of ``folder`` matching every key of ``criteria`` (UID set,
        UNSEEN, SINCE, ALL)."""
        words = criteria.split(" ")
        matches = list(self._folders[folder])
        while words:
            key = words.pop(0).upper()
            if key == "UID":
                uids = _uids(words.pop(0), last=self._largest(folder))
                matches = [m for m in matches if m.uid in uids]
            elif key == "UNSEEN":
                matches = [m for m in matches if "\\Seen" not in m.flags]
            elif key == "SINCE":
                day = datetime.strptime(words.pop(0), "%d-%b-%Y").date()
                matches = [m for m in matches if m.internal >= day]
            elif key != "ALL":
                raise ValueError(f"search key {key!r} not played by the fake")
        return [m.uid for m in matches]


def _uids(text: str, last: int = 2**32 - 1) -> set[int]:
    out: set[int] = set()
    for part in text.split(","):
        lo, _, hi = part.partition(":")
        a = last if lo == "*" else int(lo)
        b = a if not hi else (last if hi == "*" else int(hi))
        out.update(range(min(a, b), max(a, b) + 1))
    return out
