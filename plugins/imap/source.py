"""The ``imap`` source: the SourceSession mapped onto IMAP commands.

Options are in :mod:`.options`, the naming of messages and cursors in :mod:`.identity`.

Identity (IC-25, design §0.3): each message's uid is ``"<folder>;UIDVALIDITY=<v>;UID=<u>"``
with the folder in its wire form (modified UTF-7), so the journal keys by mailbox,
folder, epoch and UID. Reading never changes the server (IC-30: ``BODY.PEEK`` only).
The listing (which messages a poll looks at, IC-26, MP-05) is in :mod:`.listing`,
retrieval (IC-30) in :mod:`.retrieval`, acknowledgement at :meth:`ImapSession.commit`
or :meth:`ImapSession.checkpoint` (IC-37..IC-42, MP-06) in :mod:`.acknowledgement`,
what a session knows of each folder in :mod:`.folder`; :class:`ImapSession` is built
on the three. ``abort`` closes the connection without acknowledging anything.
"""

import contextlib
from collections.abc import AsyncIterator, Collection, Mapping, Sequence
from typing import ClassVar

import structlog
from pydantic import BaseModel

from mailpipe import sasl
from mailpipe.credentials import (
    Credentials,
)
from mailpipe.errors import SourcePermanentError
from mailpipe.message import MessageRef
from mailpipe.source import (
    Ack,
    AckKind,
    Coverage,
    SessionFacts,
    SourceContext,
)

from . import events as cmd
from . import mutf7
from .acknowledgement import ImapAcknowledgement
from .client import CommandFailed, ImapClient, Timeouts
from .events import Data, Status
from .folder import _Folder, _Where
from .identity import cursor_scope, gmail_uid, message_uid, parse_message_uid
from .listing import ImapListing
from .options import SASL_NAMES, ImapOptions, imap_date
from .push import MAX_IDLE_CONNECTIONS, PushPool
from .retrieval import MAX_HEADER_OCTETS as MAX_HEADER_OCTETS  # its former home
from .retrieval import ImapRetrieval

log = structlog.get_logger()


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


class ImapSession(ImapListing, ImapRetrieval, ImapAcknowledgement):
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
