"""The ``imap`` source: the SourceSession mapped onto IMAP commands.

Options are in :mod:`.options`, the naming of messages and cursors in :mod:`.identity`.

Identity (IC-25, design §0.3): each message's uid is ``"<folder>;UIDVALIDITY=<v>;UID=<u>"``
with the folder in its wire form (modified UTF-7), so the journal keys by mailbox,
folder, epoch and UID. Reading never changes the server (IC-30: ``BODY.PEEK`` only).
Acknowledgement happens at :meth:`ImapSession.commit`, or at
:meth:`ImapSession.checkpoint` between two commit windows of one session (MP-06),
after the engine made every marked message durable: ``delete`` (``UID STORE +FLAGS.SILENT (\\Deleted)`` then
``UID EXPUNGE``, IC-37), ``move`` (``UID MOVE``, or ``UID COPY`` + the delete pair,
IC-40/IC-41) or ``flag`` (``UID STORE +FLAGS.SILENT (flag)``, IC-42). Without UIDPLUS
no EXPUNGE of any kind is sent (IC-38): the messages are marked ``\\Deleted`` and the
expunge is left to the mailbox owner, logged as ``imap_expunge_deferred``. ``CLOSE``
is never sent (IC-39). ``abort`` closes the connection without acknowledging anything.

Listing (IC-26, MP-05): the session is a :class:`mailpipe.source.CursorSession` whose
scope is the folder under its UIDVALIDITY; with a cursor W a folder is listed with
``UID FETCH W+1:*`` and UIDs up to W are dropped (``n:*`` holds the last message).
``select = "unseen"``, ``since`` and ``since_days`` search first (``UID SEARCH``) and
fetch the sizes of what was found: they choose among new mail, so a message the
watermark has passed is not looked at again (one marked unseen later included). The
criteria are part of the scope (:func:`cursor_scope`): a changed selection starts
from no cursor. The journal's owed messages (acknowledgement due) are always listed
too, by ``UID FETCH <their UIDs>`` whatever the cursor and criteria, so an owed
acknowledgement is sent even after the message left the search and one not listed is
gone from the server; PENDING ones are listed while the criteria select them
(``UID SEARCH UID <set> <criteria>``), and one the criteria leave out but the server
still has holds the cursor below it (``Coverage.held``), so it is retried once
selected again. Gmail ids carry no UID: while one is unfinished each folder's
``UID FETCH 1:* (UID X-GM-MSGID)`` finds their UIDs. Without UIDPLUS every folder is
listed whole and the session reports no coverage, so no cursor is stored (MP-05).
"""

import contextlib
import os
import re
import tempfile
from collections.abc import AsyncIterator, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import structlog
from pydantic import BaseModel

from mailpipe import sasl
from mailpipe.credentials import (
    Credentials,
)
from mailpipe.errors import (
    CommitError,
    OversizeError,
    SourceError,
    SourcePermanentError,
)
from mailpipe.message import Message, MessageRef
from mailpipe.source import (
    Ack,
    AckKind,
    Coverage,
    SessionFacts,
    SourceContext,
    Unretrievable,
)

from . import events as cmd
from . import mutf7
from .client import CommandFailed, ImapClient, Timeouts
from .events import (
    Data,
    Done,
    Event,
    LiteralChunk,
    LiteralStart,
    Status,
    esearch_all,
    fetch_items,
    flag_list,
    parse_number,
    search_uids,
)
from .identity import cursor_scope, gmail_uid, message_uid, parse_message_uid
from .options import SASL_NAMES, ImapOptions, imap_date
from .push import MAX_IDLE_CONNECTIONS, PushPool

log = structlog.get_logger()

#: The longest header section kept for header rules; longer ones are dropped and
#: the message is retrieved instead.
MAX_HEADER_OCTETS = 1 << 20
_FLAG = re.compile(r"^\\?[A-Za-z0-9$_.\-]{1,64}$")
_SYSTEM_FLAGS = ("\\Seen", "\\Answered", "\\Flagged", "\\Draft")
class ImapSource:
    """An IMAP mailbox: ``session()`` connects, secures and authenticates."""

    name: ClassVar[str] = "imap"
    Options: ClassVar[type[BaseModel]] = ImapOptions
    #: MP-04: IC-37 delete, IC-40/IC-41 move, IC-42 flag, and keep.
    acknowledgements: ClassVar[frozenset[AckKind]] = frozenset(
        {AckKind.DELETE, AckKind.MOVE, AckKind.FLAG, AckKind.KEEP}
    )

    def __init__(
        self, options: ImapOptions, context: SourceContext | None = None, *,
        mailbox: str = "",
    ) -> None:
        if context is not None and options.ca_file is not None:
            options = options.model_copy(
                update={"ca_file": context.resolve(options.ca_file)}
            )
        self.options = options
        self.context = context or SourceContext()
        self.mailbox = mailbox or self.context.mailbox
        # UIDNEXT per folder as the last listing saw it: mail that arrived between that
        # listing and the IDLE of wait_for_mail wakes at once instead of being missed.
        self.listed_uidnext: dict[bytes, int] = {}
        # UIDVALIDITY per folder as the last listing saw it (IC-25): a session whose
        # listing finds another one, or the first of a process, reports epoch_changed.
        self.listed_uidvalidity: dict[bytes, int] = {}
        folders = [mutf7.encode(name) for name in options.folders]
        self.push = PushPool(
            lambda: ImapSession(self.options, self.mailbox),
            folders,
            self.listed_uidnext,
            idle_connections=(
                min(len(folders), MAX_IDLE_CONNECTIONS)
                if options.idle_connections is None else options.idle_connections
            ),
            idle_renew=options.idle_renew,
            status_interval=options.status_interval,
            mailbox=self.mailbox,
        )

    @contextlib.asynccontextmanager
    async def session(self) -> AsyncIterator["ImapSession"]:
        """Open a session; on exit it aborts (no acknowledgement) unless committed."""
        session = ImapSession(
            self.options, self.mailbox, self.context.ack, self.listed_uidnext,
            self.listed_uidvalidity,
        )
        try:
            await session.open()
            yield session
        finally:
            await session.abort()

    async def wait_for_mail(self, timeout: float) -> bool:
        """Push (IC-43, IC-44): watch every configured folder (an IDLE
        connection each up to ``idle_connections``, STATUS polling for the rest) until
        new mail or ``timeout``; a lost connection returns True so the next poll
        reports it. The connections stay open for the next wait until :meth:`close`
        (see :mod:`mailpipe.plugins.imap.push`)."""
        return await self.push.wait(timeout)

    async def close(self) -> None:
        """LOGOUT the push connections (the scheduler calls it when it stops)."""
        await self.push.close()


@dataclass(slots=True)
class _Folder:
    """What SELECT said about one folder (IC-24)."""

    wire: bytes
    uidvalidity: int | None = None
    uidnext: int | None = None
    exists: int = 0
    permanent_flags: tuple[str, ...] | None = None
    read_write: bool = True


@dataclass(slots=True)
class _Where:
    folder: bytes
    uid: int


@dataclass(slots=True)
class _Sink:
    """One FETCH body: in memory up to the threshold, else straight to a spool file."""

    ref: MessageRef | None
    size: int
    spool_dir: Path
    threshold: int
    parts: list[bytes] = field(default_factory=list)
    received: int = 0
    path: Path | None = None
    file: Any = None

    def __post_init__(self) -> None:
        if self.size > self.threshold:
            self.spool_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
            fd, name = tempfile.mkstemp(dir=self.spool_dir, prefix="imap-", suffix=".eml")
            self.path, self.file = Path(name), os.fdopen(fd, "wb")

    def write(self, data: bytes) -> None:
        self.received += len(data)
        if self.file is not None:
            self.file.write(data)
        else:
            self.parts.append(data)

    def finish(self, ref: MessageRef) -> Message:
        meta = {"octets_listed": ref.size, "octets_received": self.received}
        if self.file is not None:
            self.file.close()
            self.file = None
            return Message(ref=ref, spool_path=self.path, meta=meta)
        return Message(ref=ref, data=b"".join(self.parts), meta=meta)

    def discard(self) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None
        if self.path is not None:
            with contextlib.suppress(OSError):
                self.path.unlink()


class ImapSession:
    """One IMAP session implementing :class:`mailpipe.source.SourceSession`."""

    def __init__(
        self,
        options: ImapOptions,
        mailbox: str,
        ack: Ack | None = None,
        listed_uidnext: dict[bytes, int] | None = None,
        listed_uidvalidity: dict[bytes, int] | None = None,
    ) -> None:
        self.options = options
        self.mailbox = mailbox
        self.ack = ack  # the mailbox's acknowledgement: flagged mail is not listed
        self.listed_uidnext = {} if listed_uidnext is None else listed_uidnext
        self.listed_uidvalidity = {} if listed_uidvalidity is None else listed_uidvalidity
        self._epoch_changed = False
        self.client = ImapClient(
            options.host,
            options.effective_port,
            security=options.security,
            ssl_context=options.ssl_context(options.host, options.effective_port),
            cert_sha256=options.cert_sha256,
            timeouts=Timeouts(
                options.connect_timeout, options.tls_timeout,
                options.greeting_timeout, options.read_timeout,
            ),
            allow_plaintext_password=options.allow_plaintext_password,
            window=options.fetch_window,
            chunk_size=options.chunk_size,
            max_literal=options.max_message,
        )
        self.folders = {mutf7.encode(name): _Folder(mutf7.encode(name))
                        for name in options.folders}
        self._selected: bytes | None = None
        self._where: dict[int, _Where] = {}
        self._marked: list[tuple[MessageRef, Ack]] = []
        self._committed = False
        # MP-05: the journal's listing cursors, and what the last list() covered.
        self._cursors: Mapping[str, int] = {}
        self._unfinished: frozenset[str] = frozenset()
        self._owed: frozenset[str] = frozenset()
        self._coverage: dict[str, Coverage] = {}
        self._log = log.bind(mailbox=mailbox, host=options.host)

    @property
    def facts(self) -> SessionFacts:
        """UIDs are stable under UIDVALIDITY, which each id includes, and the session
        names the ids a new UIDVALIDITY superseded (:meth:`superseded`), so the engine
        reconciles by content hash (IC-25) and its POP3 id-reset guard (C-60) stays
        off. Push always (IC-44): with IDLE, or by STATUS polling every
        ``status_interval`` when the server has none. A folder is listed whole past
        its cursor, never a page of it (T-44)."""
        return SessionFacts(
            stable_ids=True, ids_have_epoch=True, can_push=True, pages_listing=False
        )

    @property
    def epoch_changed(self) -> bool:
        """IC-25: the last :meth:`list` found a folder whose UIDVALIDITY the source had
        not seen (another value, or none yet in this process)."""
        return self._epoch_changed

    def superseded(self, uids: Sequence[str]) -> list[str]:
        """IC-25: those of ``uids`` (journal ids) of a folder this session listed
        under another UIDVALIDITY."""
        out = []
        for uid in uids:
            parsed = parse_message_uid(uid)
            if parsed is None:
                continue
            folder = self.folders.get(parsed[0])
            if folder is not None and folder.uidvalidity not in (None, parsed[1]):
                out.append(uid)
        return out

    def resume(
        self,
        cursors: Mapping[str, int],
        unfinished: Collection[str] = (),
        owed: Collection[str] = (),
    ) -> None:
        """MP-05: list each folder only past its cursor (scope
        ``"<folder>;UIDVALIDITY=<v>[;<selection>]"``, see :func:`cursor_scope`), and
        also the ``unfinished`` journal uids of each folder the criteria select and
        the ``owed`` ones whatever the cursor and criteria."""
        self._cursors = dict(cursors)
        self._unfinished = frozenset(unfinished) | frozenset(owed)
        self._owed = frozenset(owed)

    def coverage(self) -> Mapping[str, Coverage]:
        """MP-05: per folder (and UIDVALIDITY) of the last :meth:`list`, the cursor it
        started from and every UID it showed (label copies included, IC-46); nothing
        when the server lacks UIDPLUS (listed whole, no cursor to earn)."""
        return self._coverage

    # --- opening ------------------------------------------------------------------

    async def open(self) -> None:
        """Connect, CAPABILITY, STARTTLS when configured, authenticate, CAPABILITY
        again, ID (IC-11..IC-14)."""
        client = self.client
        await client.connect()
        await client.ensure_capabilities()
        if self.options.security == "starttls":
            await client.starttls()
            await client.ensure_capabilities()  # IC-12: only post-TLS values count
        if client.conn.state.name == "NOT_AUTHENTICATED":
            await self._authenticate()
        caps = await client.ensure_capabilities()
        await client.send_id()
        self._log.info(
            "imap_session_opened", tls=client.tls_active, capabilities=sorted(caps)
        )

    async def _authenticate(self) -> None:
        o, client = self.options, self.client
        secrets = await Credentials.load(o, protocol="imap", mailbox=self.mailbox)
        password = secrets.password
        method = choose(o.auth, client.capabilities, has_token=bool(secrets.token))
        user = o.username
        if method == "login":
            await client.login(user, password)
        else:
            mechanism: sasl.Mechanism
            if method == "plain":
                mechanism = sasl.Plain(user=user, password=password)
            elif method in ("scram-sha-1", "scram-sha-256"):
                mechanism = sasl.Scram(user=user, password=password, name=SASL_NAMES[method])
            else:
                mechanism = secrets.oauth_mechanism(
                    method, user=user, host=o.host, port=o.effective_port
                )
            await secrets.login(method, mechanism, client.authenticate)
        self._log.info("imap_authenticated", method=method)

    # --- selecting ----------------------------------------------------------------

    async def _select(self, wire: bytes) -> _Folder:
        folder = self.folders.setdefault(wire, _Folder(wire))
        if self._selected == wire:
            return folder
        try:
            events, done = await self.client.command(cmd.select(wire))
        except CommandFailed as exc:
            self._selected = None
            raise SourcePermanentError(
                f"{self.client.where}: SELECT {wire.decode('ascii', 'replace')!r} "
                f"failed: {exc.done.text[:200]}"
            ) from None
        self._selected = wire
        folder.uidvalidity = folder.uidnext = None
        folder.permanent_flags = None
        for event in events:
            if isinstance(event, Data) and event.name == "EXISTS":
                folder.exists = event.number or 0
            elif isinstance(event, Status) and event.code is not None:
                code = event.code
                if code.name == "UIDVALIDITY":
                    folder.uidvalidity = code.number()
                elif code.name == "UIDNEXT":
                    folder.uidnext = code.number()
                elif code.name == "PERMANENTFLAGS":
                    folder.permanent_flags = tuple(code.args.strip("()").split())
        folder.read_write = not (done.code is not None and done.code.name == "READ-ONLY")
        return folder

    # --- SourceSession ------------------------------------------------------------

    async def list(self) -> list[MessageRef]:
        """Every message of every configured folder, by UID with its RFC822.SIZE.

        MP-05/IC-26: after :meth:`resume`, a folder is listed only past its cursor;
        ``select``, ``since`` and ``since_days`` narrow it with ``UID SEARCH``.

        IC-46: when the server offers X-GM-EXT-1 (Gmail) the id is the message's
        ``X-GM-MSGID``, the same in every folder (label) it appears in, so a message
        with several labels is listed once, in the first configured folder showing it.
        """
        refs: list[MessageRef] = []
        gmail = "X-GM-EXT-1" in self.client.capabilities
        listed: set[str] = set()
        self._coverage = {}
        self._epoch_changed = False  # IC-25: as of this listing (MP-06: one of several)
        # MP-05: without UIDPLUS a delete leaves the message in the folder, marked
        # \Deleted (IC-38); its entry is pruned once it is DELETED and not listed, so
        # such a folder is always listed whole, never from a cursor.
        caps = self.client.capabilities
        expunges = "UIDPLUS" in caps or "IMAP4REV2" in caps
        for wire in list(self.folders):
            folder = await self._select(wire)
            if folder.uidvalidity is None:
                # IC-24: no persistent UIDs; identity by UID is impossible.
                raise SourcePermanentError(
                    f"{self.client.where}: folder {wire.decode('ascii', 'replace')!r} "
                    "has no UIDVALIDITY; mailpipe cannot key its messages"
                )
            if folder.uidnext is not None:
                self.listed_uidnext[wire] = folder.uidnext
            self._note_epoch(wire, folder.uidvalidity)
            scope = cursor_scope(wire, folder.uidvalidity, self.options.selection())
            cover = Coverage(self._cursors.get(scope, 0) if expunges else 0)
            if expunges:
                self._coverage[scope] = cover
            if not folder.exists:
                continue
            explicit = await self._unfinished_listing(wire, folder.uidvalidity, cover)
            found = await self._list_folder(
                wire, gmail=gmail, after=cover.start, explicit=explicit,
            )
            copies = 0
            for uid in sorted(found):
                size, msgid = found[uid]
                key = (
                    gmail_uid(msgid) if msgid is not None
                    else message_uid(wire, folder.uidvalidity, uid)
                )
                cover.listed[uid] = key
                if key in listed:
                    copies += 1  # IC-46: another label of a message listed already
                    continue
                listed.add(key)
                number = len(self._where) + 1
                self._where[number] = _Where(wire, uid)
                refs.append(MessageRef(
                    mailbox=self.mailbox, number=number, uid=key, size=size
                ))
            if copies:
                self._log.debug("imap_label_copies", folder=_show(wire), count=copies)
            self._log.info(
                "imap_folder_listed", folder=_show(wire), from_uid=cover.start + 1,
                listed=len(cover.listed), search=self.options.search_criteria(cover.start),
            )
        return refs

    def _note_epoch(self, wire: bytes, uidvalidity: int) -> None:
        """IC-25: remember the folder's UIDVALIDITY; another one than the previous
        listing saw (or none seen yet) makes :attr:`epoch_changed` true."""
        if self.listed_uidvalidity.get(wire) == uidvalidity:
            return
        if wire in self.listed_uidvalidity:
            self._log.warning(
                "imap_uidvalidity_changed", folder=_show(wire),
                was=self.listed_uidvalidity[wire], now=uidvalidity,
            )
        self._epoch_changed = True
        self.listed_uidvalidity[wire] = uidvalidity

    def _uids_in(self, uids: frozenset[str], wire: bytes, uidvalidity: int) -> set[int]:
        """The UIDs of this folder (under ``uidvalidity``) among journal ``uids``."""
        out: set[int] = set()
        for uid in uids:
            parsed = parse_message_uid(uid)
            if parsed is not None and parsed[0] == wire and parsed[1] == uidvalidity:
                out.add(parsed[2])
        return out

    async def _unfinished_listing(
        self, wire: bytes, uidvalidity: int, cover: Coverage
    ) -> set[int]:
        """MP-05: the UIDs of the selected folder to list besides the cursor's range:
        every owed one (an acknowledgement is sent whatever the criteria), and the
        PENDING ones the criteria still select (retried). A PENDING one on the
        server the criteria leave out goes to ``cover.held``: no cursor passes it,
        and it is retried once selected again."""
        owed = self._uids_in(self._owed, wire, uidvalidity)
        pending = self._uids_in(self._unfinished - self._owed, wire, uidvalidity) - owed
        if any(u.startswith("X-GM-MSGID=") for u in self._unfinished):
            by_id = await self._gmail_uids()
            owed |= {uid for key, uids in by_id.items() if key in self._owed
                     for uid in uids}
            pending |= {uid for key, uids in by_id.items()
                        if key in self._unfinished and key not in self._owed
                        for uid in uids}
        criteria = self.options.search_criteria(0)
        if not pending or criteria is None:
            return owed | pending
        selected: set[int] = set()
        present: set[int] = set()
        for uidset in cmd.split_uid_sets(pending):
            selected |= await self._search(f"UID {uidset} {criteria}", 0)
            present |= await self._search(f"UID {uidset}", 0)
        cover.held = (present & pending) - selected
        return owed | (selected & pending)

    async def _gmail_uids(self) -> dict[str, set[int]]:
        """IC-46, MP-05: Gmail id → UIDs in the selected folder, by ``UID FETCH 1:*
        (UID X-GM-MSGID)`` (only while the journal holds an unfinished Gmail id,
        which carries no UID)."""
        out: dict[str, set[int]] = {}
        async for event in self.client.stream([cmd.uid_fetch("1:*", "UID X-GM-MSGID")]):
            if isinstance(event, Data) and event.name == "FETCH":
                items = fetch_items(event.values)
                uid_v, msgid_v = items.get("UID"), items.get("X-GM-MSGID")
                if uid_v is not None and msgid_v is not None:
                    key = gmail_uid(parse_number(msgid_v, limit=2**64 - 1))
                    out.setdefault(key, set()).add(parse_number(uid_v))
            elif isinstance(event, Done) and not event.ok:
                raise SourcePermanentError(
                    f"{self.client.where}: UID FETCH refused: {event.text[:200]}"
                )
        return out

    async def _list_folder(
        self, wire: bytes, *, gmail: bool, after: int = 0,
        explicit: set[int] | None = None,
    ) -> dict[int, tuple[int, int | None]]:
        """UID → (RFC822.SIZE, X-GM-MSGID or None) of the selected folder's messages
        past UID ``after`` that ``select``/``since`` want, and those of ``explicit``
        (unfinished journal entries, MP-05) whatever ``after`` and the criteria,
        without the messages that already carry a ``flag`` acknowledgement (IC-42).
        On Gmail an unfinished ``X-GM-MSGID`` id has no UID: while one exists the
        folder's ids are read first (:meth:`_gmail_uids`).

        IC-26: ``n:*`` always includes the folder's last message, even when its UID
        is below ``n`` (RFC 9051 §6.4.9), so every UID up to ``after`` is dropped."""
        found: dict[int, tuple[int, int | None]] = {}
        explicit = set() if explicit is None else explicit
        uidsets = [f"{after + 1}:*"] if after < cmd.MAX_NUMBER else []
        criteria = self.options.search_criteria(after)
        wanted: set[int] | None = None
        if criteria is not None:
            wanted = await self._search(criteria, after)
            uidsets = cmd.split_uid_sets(wanted) if wanted else []
        extra = {u for u in explicit
                 if u <= after or (wanted is not None and u not in wanted)}
        uidsets += cmd.split_uid_sets(extra) if extra else []
        if not uidsets:
            return found
        done_flag = (
            self.ack.target.lower()
            if self.ack is not None and self.ack.kind is AckKind.FLAG and self.ack.target
            else None
        )
        skipped = 0
        items_wanted = (
            "UID RFC822.SIZE"
            + (" X-GM-MSGID" if gmail else "")
            + (" FLAGS" if done_flag else "")
        )
        fetches = [cmd.uid_fetch(uidset, items_wanted) for uidset in uidsets]
        async for event in self.client.stream(fetches):
            if isinstance(event, Data) and event.name == "FETCH":
                items = fetch_items(event.values)
                uid_v, size_v = items.get("UID"), items.get("RFC822.SIZE")
                uid_n = parse_number(uid_v) if uid_v is not None else None
                msgid_v = items.get("X-GM-MSGID") if gmail else None
                if uid_n is not None and (
                    uid_n <= after or (wanted is not None and uid_n not in wanted)
                ) and uid_n not in explicit:
                    continue  # IC-26: below the range (n:*), or not asked for
                flags = {f.lower() for f in flag_list(items.get("FLAGS"))}
                if done_flag is not None and done_flag in flags:
                    # IC-42: the flag is the acknowledgement: already done (also
                    # after a UIDVALIDITY change, IC-25).
                    skipped += 1
                    continue
                if uid_v is None or size_v is None:
                    continue
                found[parse_number(uid_v)] = (
                    parse_number(size_v, limit=2**63 - 1),
                    parse_number(msgid_v, limit=2**64 - 1) if msgid_v is not None else None,
                )
            elif isinstance(event, Done) and not event.ok:
                raise SourcePermanentError(
                    f"{self.client.where}: UID FETCH refused: {event.text[:200]}"
                )
        if skipped:
            self._log.debug("imap_already_flagged", folder=_show(wire), count=skipped)
        return found

    async def _search(self, criteria: str, after: int) -> set[int]:
        """``UID SEARCH criteria`` → the UIDs above ``after`` (IC-26, IC-33): a
        ``* SEARCH`` or an ``* ESEARCH ... ALL set`` answer, in any order."""
        found: set[int] = set()
        async for event in self.client.stream([cmd.uid_search(criteria)]):
            if isinstance(event, Data) and event.name == "SEARCH":
                found.update(search_uids(event.values))
            elif isinstance(event, Data) and event.name == "ESEARCH":
                found.update(esearch_all(event.values))
            elif isinstance(event, Done) and not event.ok:
                raise SourcePermanentError(
                    f"{self.client.where}: UID SEARCH refused: {event.text[:200]}"
                )
        return {uid for uid in found if uid > after}

    async def headers(self, ref: MessageRef) -> bytes | None:
        """``UID FETCH uid (BODY.PEEK[HEADER])``; None when refused or too long."""
        where = self._where[ref.number]
        await self._select(where.folder)
        parts: list[bytes] = []
        size = 0
        async for event in self.client.stream(
            [cmd.uid_fetch(str(where.uid), "UID BODY.PEEK[HEADER]")]
        ):
            if isinstance(event, LiteralChunk):
                size += len(event.data)
                if size <= MAX_HEADER_OCTETS:
                    parts.append(event.data)
            elif isinstance(event, Done) and not event.ok:
                return None
        if size > MAX_HEADER_OCTETS or not parts:
            return None
        return b"".join(parts)

    async def retrieve(
        self,
        refs: Sequence[MessageRef],
        *,
        spool_dir: Path,
        spool_threshold: int,
        max_size: int | None = None,
    ) -> AsyncIterator[Message | Unretrievable]:
        """Pipelined ``UID FETCH uid (UID BODY.PEEK[])`` per ref, in order (IC-30).

        Bodies over ``spool_threshold`` go straight to a file; memory is bounded by
        the chunk size. A UID that is gone (expunged by another client, IT-16) is
        yielded as :class:`Unretrievable`. A literal larger than ``max_size`` raises
        :class:`mailpipe.OversizeError` before any of it is read.
        """
        index = 0
        while index < len(refs):
            folder = self._where[refs[index].number].folder
            batch = []
            while index < len(refs) and self._where[refs[index].number].folder == folder:
                batch.append(refs[index])
                index += 1
            await self._select(folder)
            async for item in self._fetch_batch(batch, spool_dir, spool_threshold, max_size):
                yield item

    async def _fetch_batch(
        self,
        refs: Sequence[MessageRef],
        spool_dir: Path,
        threshold: int,
        max_size: int | None,
    ) -> AsyncIterator[Message | Unretrievable]:
        by_uid = {self._where[r.number].uid: r for r in refs}
        commands = [cmd.uid_fetch(str(uid), "UID BODY.PEEK[]") for uid in by_uid]
        uid_of = {id(c): uid for c, uid in zip(commands, by_uid, strict=True)}
        sink: _Sink | None = None
        ready: dict[int, Message] = {}
        # Completions come in command order, so the oldest unanswered UID is the one
        # whose body is arriving (servers send no unsolicited BODY[]).
        waiting = list(by_uid)
        try:
            async for event in self.client.stream(commands):
                if isinstance(event, LiteralStart):
                    if event.section != "BODY[]":
                        sink = _Sink(None, 0, spool_dir, threshold)  # not ours: dropped
                        continue
                    if max_size is not None and event.size > max_size:
                        raise OversizeError(
                            f"{self.client.where}: message of {event.size} octets "
                            f"exceeds {max_size}",
                            number=event.number, limit=max_size, received=0,
                            ref=by_uid[waiting[0]] if waiting else None,
                        )
                    sink = _Sink(None, event.size, spool_dir, threshold)
                elif isinstance(event, LiteralChunk):
                    assert sink is not None
                    sink.write(event.data)
                elif isinstance(event, Data) and event.name == "FETCH" and sink is not None:
                    done_sink, sink = sink, None
                    fetched = _uid_of(event)
                    ref = by_uid.get(fetched) if fetched is not None else None
                    if fetched is None or ref is None or fetched in ready:
                        done_sink.discard()  # unsolicited or repeated (IT-05)
                        continue
                    ready[fetched] = done_sink.finish(ref)
                elif isinstance(event, Done):
                    uid = uid_of.get(id(event.command))
                    if uid is None:
                        continue
                    if uid in waiting:
                        waiting.remove(uid)
                    message = ready.pop(uid, None)
                    if message is not None:
                        yield message
                    else:
                        # IT-16: expunged by another client, or refused.
                        text = event.text[:200]
                        self._log.warning("imap_fetch_missing", uid=uid, text=text)
                        yield Unretrievable(
                            by_uid[uid], f"UID FETCH {uid} returned no body: {text}"
                        )
        finally:
            if sink is not None:
                sink.discard()
            for left in ready.values():
                if left.spool_path is not None:
                    with contextlib.suppress(OSError):
                        Path(left.spool_path).unlink()

    async def acknowledge(self, refs: Sequence[MessageRef], ack: Ack) -> None:
        """Remember ``refs`` to be acknowledged with ``ack`` at :meth:`commit`
        (nothing changes on the server before); ``keep`` changes nothing."""
        if ack.kind is AckKind.KEEP:
            return
        self._marked.extend((r, ack) for r in refs if r.number in self._where)

    async def mark_deleted(self, refs: Sequence[MessageRef]) -> None:
        """The first contract's call: acknowledge ``refs`` by deleting them."""
        await self.acknowledge(refs, Ack(AckKind.DELETE))

    async def commit(self) -> None:
        """Acknowledge every marked message (per folder, IC-37..IC-42), then LOGOUT.

        Raises:
            CommitError: an acknowledgement was refused or the connection failed.
        """
        self._committed = True
        await self._apply_marked()
        await self.client.logout()  # IC-39: never CLOSE
        self._log.info("imap_committed", acknowledged=len(self._marked))

    async def checkpoint(self) -> None:
        """MP-06: acknowledge every message marked since the last checkpoint, as
        :meth:`commit` does (UID EXPUNGE, MOVE and STORE take effect at once), and
        stay logged in. The next :meth:`list` selects each folder again, so it sees
        the folder as it is now (EXISTS, UIDVALIDITY).

        Raises:
            CommitError: an acknowledgement was refused or the connection failed.
        """
        await self._apply_marked()
        self._log.info("imap_checkpoint", acknowledged=len(self._marked))
        self._marked = []
        self._selected = None

    async def _apply_marked(self) -> None:
        groups: dict[tuple[bytes, Ack], list[int]] = {}
        for ref, ack in self._marked:
            where = self._where[ref.number]
            groups.setdefault((where.folder, ack), []).append(where.uid)
        try:
            for (wire, ack), uids in groups.items():
                folder = await self._select(wire)
                if not folder.read_write:
                    raise CommitError(f"folder {wire!r} is read-only; nothing acknowledged")
                for uidset in cmd.split_uid_sets(uids):
                    await self._acknowledge(folder, uidset, ack)
        except (SourceError, OSError) as exc:
            await self.client.abort()
            if isinstance(exc, CommitError):
                raise
            raise CommitError(f"{self.client.where}: acknowledgement failed: {exc}") from None

    async def _acknowledge(self, folder: _Folder, uidset: str, ack: Ack) -> None:
        caps = self.client.capabilities
        if ack.kind is AckKind.FLAG:
            flag = ack.target or ""
            if not _FLAG.fullmatch(flag) or flag.lower() == "\\deleted" or (
                flag.startswith("\\") and flag not in _SYSTEM_FLAGS
            ):
                raise CommitError(f"{flag!r} is not a flag mailpipe sets (IC-42)")
            flags = folder.permanent_flags
            if (
                not flag.startswith("\\") and flags is not None
                and "\\*" not in flags and flag not in flags
            ):
                # IC-42: a keyword the server would keep for the session only.
                raise CommitError(
                    f"folder {folder.wire!r} does not keep keyword {flag!r} "
                    f"(PERMANENTFLAGS {' '.join(flags)})"
                )
            await self.client.command(cmd.uid_store(uidset, "+FLAGS.SILENT", [flag]))
            return
        if ack.kind is AckKind.MOVE:
            target = mutf7.encode(ack.target or "")
            if "MOVE" in caps:
                await self._with_trycreate(cmd.uid_move(uidset, target), target)
                return
            await self._with_trycreate(cmd.uid_copy(uidset, target), target)  # IC-41
        await self.client.command(cmd.uid_store(uidset, "+FLAGS.SILENT", ["\\Deleted"]))
        if "UIDPLUS" in caps or "IMAP4REV2" in caps:
            await self.client.command(cmd.uid_expunge(uidset))  # IC-37
        else:
            # IC-38: a bare EXPUNGE would also remove other clients' \Deleted mail.
            self._log.warning("imap_expunge_deferred", uids=uidset[:200])

    async def _with_trycreate(self, command: cmd.Command, target: bytes) -> None:
        try:
            await self.client.command(command)
        except CommandFailed as exc:
            code = exc.done.code
            if code is None or code.name != "TRYCREATE":
                raise
            await self.client.command(cmd.create(target))
            self._log.info("imap_folder_created", folder=target.decode("ascii"))
            await self.client.command(command)

    async def wait_for_new(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds for new mail in the first configured folder
        (IDLE, or one NOOP without it; IC-43/IC-44). True when mail arrived.

        One folder on this session's own connection; the source's push
        (:meth:`ImapSource.wait_for_mail`) watches every folder with a pool instead
        (:mod:`mailpipe.plugins.imap.push`).
        """
        wire = next(iter(self.folders))
        folder = await self._select(wire)
        seen = self.listed_uidnext.get(wire)
        if seen is not None and folder.uidnext is not None and folder.uidnext > seen:
            return True  # arrived after the last listing, before this IDLE
        return await self.client.idle(min(timeout, 29 * 60))

    async def abort(self) -> None:
        """Close without acknowledging anything; never raises."""
        try:
            await self.client.abort()
        except Exception as exc:  # the contract: never raises
            self._log.debug("imap_abort_failed", error=type(exc).__name__)


def _show(wire: bytes) -> str:
    """A folder's display name for logs (its wire form when not valid mUTF-7)."""
    try:
        return mutf7.decode(wire)
    except ValueError:
        return wire.decode("ascii", "replace")


def _uid_of(event: Event) -> int | None:
    if not isinstance(event, Data):
        return None
    try:
        value = fetch_items(event.values).get("UID")
        return parse_number(value) if value is not None else None
    except ValueError:
        return None


def choose(auth: str, caps: frozenset[str], *, has_token: bool) -> str:
    """The authentication method (never a silent downgrade, never OAuth → password).

    Raises:
        SourcePermanentError: the configured method is not offered.
    """
    offered = {c[5:] for c in caps if c.startswith("AUTH=")}
    if auth == "auto":
        if has_token:
            for method in ("oauthbearer", "xoauth2"):
                if SASL_NAMES[method] in offered:
                    return method
            raise SourcePermanentError(
                "an OAuth token is configured but the server offers neither "
                "OAUTHBEARER nor XOAUTH2; mailpipe never falls back to a password"
            )
        if "SCRAM-SHA-256" in offered:
            return "scram-sha-256"
        if "PLAIN" in offered:
            return "plain"
        return "login"
    if auth != "login" and SASL_NAMES[auth] not in offered:
        raise SourcePermanentError(
            f"auth = {auth!r} but the server does not offer AUTH={SASL_NAMES[auth]} "
            f"(offered: {' '.join(sorted(offered)) or 'none'}); refusing to downgrade"
        )
    return auth


__all__ = [
    "ImapOptions", "ImapSession", "ImapSource", "cursor_scope", "gmail_uid",
    "imap_date", "message_uid", "parse_message_uid",
]
