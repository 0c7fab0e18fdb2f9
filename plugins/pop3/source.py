"""The ``pop3`` source: the SourceSession mapped onto POP3 commands.

Options are in :mod:`.options`. :class:`Pop3Session` opens the session (CAPA, STLS,
UTF8, authentication; C-25) and lists the maildrop (UIDL and LIST, ``TOP n 0`` for
header rules); retrieval (the RETR flights and their completeness checks, P-14,
MP-01) is in :mod:`.retrieval`, acknowledgement (DELE, and QUIT as the commit, MP-04)
and ``abort`` (close without QUIT) in :mod:`.acknowledgement`: the session is built
on the two.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Callable
from typing import ClassVar

import structlog
from pydantic import BaseModel

from mailpipe.credentials import Credentials
from mailpipe.errors import (
    OversizeError,
    SourceConnectionError,
    SourcePermanentError,
    SourceTimeoutError,
)
from mailpipe.message import MessageRef, distinct_uids
from mailpipe.source import AckKind, SessionFacts, SourceContext

from . import auth as sasl
from .acknowledgement import Pop3Acknowledgement
from .client import CommandRefused, Pop3Client, Timeouts
from .completeness import OctetCount
from .events import (
    BodyChunk,
    Capabilities,
    Dele,
    Err,
    Event,
    List,
    MultiLine,
    Top,
    Uidl,
    Utf8,
    parse_list,
    parse_uidl,
)
from .flight import Flight
from .options import Pop3Options
from .protocol import RemoteProtocolError
from .retrieval import Pop3Retrieval
from .retrieval import _discard as _discard  # its former home
from .retrieval import _Sink as _Sink  # its former home

log = structlog.get_logger()

#: The listing (RFC 1939 §7 UIDL, §5 LIST): pipelined when possible (T-30).
_LISTING: tuple[Uidl, List] = (Uidl(), List())

#: The longest ``TOP n 0`` reply kept for header rules (S-12); longer ones are read
#: to their end, dropped, and the message is retrieved instead.
MAX_HEADER_OCTETS = 1 << 20


class Pop3Source:
    """A POP3 mailbox: ``session()`` connects, secures and authenticates."""

    name: ClassVar[str] = "pop3"
    Options: ClassVar[type[BaseModel]] = Pop3Options
    #: MP-04: POP3 can only delete (DELE + QUIT) or leave a message alone.
    acknowledgements: ClassVar[frozenset[AckKind]] = frozenset(
        {AckKind.DELETE, AckKind.KEEP}
    )

    def __init__(
        self, options: Pop3Options, context: SourceContext | None = None, *,
        mailbox: str = "",
    ) -> None:
        if context is not None and options.ca_file is not None:
            # A relative ca_file is relative to the config file, like every path.
            options = options.model_copy(
                update={"ca_file": context.resolve(options.ca_file)}
            )
        self.options = options
        self.context = context
        self.mailbox = mailbox or (context.mailbox if context is not None else "")

        # False once a server dropped PIPELINING after login (C-25): this source's
        # later sessions send the post-login CAPA alone.
        self._listing_behind_capa = True

    @contextlib.asynccontextmanager
    async def session(self) -> AsyncIterator[Pop3Session]:
        """Open a session; on exit it aborts (no QUIT) unless committed.

        C-25: a server that lists PIPELINING before login but not after it breaks
        RFC 2449 §5, and may never answer the UIDL and LIST sent behind the post-login
        CAPA; when the session fails waiting for them, one new session is opened with
        the CAPA alone, as are all later ones of this source.
        """
        session = self._new_session()
        try:
            try:
                await session.open()
            except (SourceConnectionError, SourceTimeoutError, RemoteProtocolError):
                if not session.pipelining_dropped:
                    raise
                await session.abort()
                session = self._new_session()
                await session.open()
            yield session
        finally:
            await session.abort()

    def _new_session(self) -> Pop3Session:
        session = Pop3Session(
            self.options, self.mailbox, listing_behind_capa=self._listing_behind_capa
        )
        session.on_pipelining_dropped = self._pipelining_dropped
        return session

    def _pipelining_dropped(self) -> None:
        self._listing_behind_capa = False


class Pop3Session(Pop3Retrieval, Pop3Acknowledgement):
    """One POP3 session implementing :class:`mailpipe.source.SourceSession`.

    P-14: one :meth:`retrieve` may span a whole commit window
    (``retrieves_across_commits``): the engine commits groups while the stream runs,
    an acknowledgement made meanwhile joins the running flight, and a stream its
    consumer left early (a stop request) is read to its end before the session's next
    command, so :meth:`commit` sends QUIT only once every reply arrived (P-09).
    """

    #: P-14: see the class docstring and :func:`mailpipe.source.retrieves_across_commits`.
    retrieves_across_commits: ClassVar[bool] = True

    def __init__(
        self, options: Pop3Options, mailbox: str, *, listing_behind_capa: bool = True
    ) -> None:
        self.options = options
        self.mailbox = mailbox
        # C-25: UIDL and LIST may go behind the post-login CAPA (P-05); a server
        # that then drops PIPELINING sets ``pipelining_dropped`` and calls
        # ``on_pipelining_dropped`` (the source's later sessions send CAPA alone).
        self.listing_behind_capa = listing_behind_capa
        self.pipelining_dropped = False
        self.on_pipelining_dropped: Callable[[], None] | None = None
        self.supports_uidl = True
        self.client = self._new_client()
        self._committed = False
        self._marked: set[int] = set()
        # C-54: numbers marked, or whose DELE is queued or awaits its reply.
        self._asked: set[int] = set()
        # P-13: DELEs an acknowledgement queued, sent with the session's next commands.
        self._queued: list[Dele] = []
        # P-14: the flight of the retrieve() running now (acknowledgements join it),
        # and the stream of one its consumer left early, read to its end before any
        # other command.
        self._flight: Flight | None = None
        self._unread: AsyncIterator[Event] | None = None
        self._topped: set[int] = set()  # numbers whose headers this session fetched
        # The replies to UIDL and LIST sent with the post-login CAPA (open()), for the
        # session's first list().
        self._prelisted: list[Event] | None = None
        self._log = log.bind(mailbox=mailbox, host=options.host)

    @property
    def facts(self) -> SessionFacts:
        """The session's facts from UIDL and the latest CAPA (RFC 2449 §6.5, §6.7),
        and whether the server is Gmail's, which lists a page per session (T-44)."""
        caps = self.capabilities
        greeting = self.client.greeting
        return SessionFacts(
            stable_ids=self.supports_uidl,
            login_delay=float(max(0, caps.login_delay or 0)),
            deletes_on_commit=caps.expire == 0,
            pages_listing=pages_listing(greeting.text if greeting else "", caps),
        )

    @property
    def capabilities(self) -> Capabilities:
        """The latest CAPA (names and arguments); empty when the server has no CAPA."""
        return self.client.capabilities or Capabilities()

    def _new_client(self) -> Pop3Client:
        o = self.options
        ctx = None
        if o.security != "none":
            ctx = o.ssl_context(o.host, o.effective_port)  # shared: TLS resumption
        return Pop3Client(
            o.host,
            o.effective_port,
            security=o.security,
            ssl_context=ctx,
            cert_sha256=o.cert_sha256,
            timeouts=Timeouts(
                o.connect_timeout,
                o.tls_timeout,
                o.greeting_timeout,
                o.read_timeout,
                retr=o.retr_timeout,
                retr_rate=o.retr_min_rate,
            ),
            allow_plaintext_password=o.allow_plaintext_password,
            pipelining=o.pipelining,
            window=o.pipeline_window,
            max_line=o.max_line,
            max_message=o.max_message,
            chunk_size=o.chunk_size,
        )

    async def open(self) -> None:
        """Connect, CAPA, STLS when configured, authenticate, CAPA again (C-25)."""
        client = self.client
        await client.connect()
        use_capa = True
        try:
            await client.capa()
        except SourceConnectionError:
            # C-24 / T-32: some servers hang up after CAPA; reconnect once, without CAPA.
            await client.abort()
            self.client = client = self._new_client()
            await client.connect()
            use_capa = False
        if self.options.security == "starttls":
            await client.starttls()
            if use_capa:
                await client.capa()  # C-25 / S-04: only post-TLS capabilities count
        await self._utf8()
        await self._authenticate()
        if use_capa and client.pipelining_active and self.listing_behind_capa:
            # C-25 with the listing queued behind it (P-05): the CAPA before login
            # listed PIPELINING, which then holds after login too (RFC 2449 §5), so
            # UIDL and LIST go in the same write and list() takes their replies: one
            # turnaround fewer. The capabilities are still the post-login ones.
            try:
                self._prelisted = await client.capa_with(_LISTING)
            finally:
                if not client.pipelining_active:
                    # The post-login CAPA (-ERR, or no PIPELINING) breaks RFC 2449 §5
                    # (a proxy in front of a server without it, say): the listing
                    # may be lost (Pop3Source.session then opens anew).
                    self._log.warning("pop3_pipelining_dropped_after_login")
                    self.pipelining_dropped = True
                    if self.on_pipelining_dropped is not None:
                        self.on_pipelining_dropped()
        elif use_capa:
            # C-25, RFC 2449 §6.5/§6.7: TRANSACTION-state values (PIPELINING, UIDL,
            # per-user LOGIN-DELAY); some servers list more only after login (GNU
            # pop3d: IMPLEMENTATION).
            await client.capa()
        self._log.info(
            "pop3_session_opened",
            tls=client.tls_active,
            pipelining=client.pipelining_active,
            capabilities=sorted(self.capabilities.names),
            # C-27: IMPLEMENTATION is logged only; no behaviour depends on it.
            implementation=" ".join(self.capabilities.args.get("IMPLEMENTATION", ())),
        )

    async def _utf8(self) -> None:
        """MP-02, RFC 6856 §2: enter UTF-8 mode (AUTHORIZATION state) when CAPA lists
        UTF8. Courier otherwise serves each message with 8-bit headers as a notice
        ("Cannot display Unicode content") in place of the original; a refusal is
        logged and the session goes on as before."""
        caps = self.client.capabilities
        if not self.options.utf8 or caps is None or "UTF8" not in caps:
            return
        try:
            await self.client.command(Utf8())
        except CommandRefused as exc:
            self._log.warning("pop3_utf8_refused", text=exc.reply.text[:200])
        else:
            self._log.debug("pop3_utf8_mode")

    async def _authenticate(self) -> None:
        o, client = self.options, self.client
        secrets = await Credentials.load(o, protocol="pop3", mailbox=self.mailbox)
        password = secrets.password
        method = sasl.choose(
            o.auth,
            client.capabilities,
            has_password=bool(password),
            has_token=bool(secrets.token),
            apop_timestamp=client.greeting.apop_timestamp if client.greeting else None,
        )
        if method == "apop" and o.security != "tls":
            # S-08 / S-04: APOP only over implicit TLS.
            raise SourcePermanentError("auth = 'apop' is only used with security = 'tls'")
        user = o.username
        if method == "user":
            await client.login_user(user, password)
        elif method == "apop":
            await client.login_apop(user, password)
        else:
            mechanism: sasl.Mechanism
            if method == "plain":
                mechanism = sasl.Plain(user=user, password=password)
            elif method == "login":
                mechanism = sasl.Login(user=user, password=password)
            elif method == "cram-md5":
                mechanism = sasl.CramMd5(user=user, password=password)
            elif method in ("scram-sha-1", "scram-sha-256"):
                mechanism = sasl.Scram(
                    user=user, password=password, name=sasl.SASL_NAMES[method]
                )
            else:
                mechanism = secrets.oauth_mechanism(
                    method, user=user, host=o.host, port=o.effective_port
                )
            await secrets.login(method, mechanism, client.login_sasl)
        self._log.info("pop3_authenticated", method=method)

    # --- SourceSession --------------------------------------------------------------

    async def list(self) -> list[MessageRef]:
        """UIDL + LIST (pipelined when possible); without UIDL, uids are ``""``.

        A uid listed for several messages is made distinct per occurrence
        (:func:`mailpipe.message.distinct_uids`, T-23), with one warning per session.
        """
        uids: dict[int, str] | None = None
        sizes: list[tuple[int, int]] = []
        # The session's first listing was sent behind the post-login CAPA (open()),
        # and holds unless a command of the session came in between (a DELE hides
        # its message from a later listing, RFC 1939 §5).
        events, self._prelisted = self._prelisted, None
        if events is None or self._queued or self._unread is not None or self._asked:
            await self._settle()
            events = [event async for event in self.client.stream(_LISTING)]
        for event in events:
            try:
                if isinstance(event, MultiLine) and isinstance(event.command, Uidl):
                    uids = dict(parse_uidl(event.body, event.newline))
                elif isinstance(event, MultiLine):
                    sizes = parse_list(event.body, event.newline)
            except ValueError as exc:
                raise RemoteProtocolError(f"{self.client.where}: {exc}") from None
            if isinstance(event, Err) and isinstance(event.command, List):
                raise SourcePermanentError(f"{self.client.where}: LIST refused")
        self.supports_uidl = uids is not None
        if uids is None:
            self._log.warning("pop3_no_uidl")
        refs = [
            MessageRef(
                mailbox=self.mailbox,
                number=number,
                uid=(uids.get(number, "") if uids is not None else ""),
                size=size,
            )
            for number, size in sizes
        ]
        refs, renamed = distinct_uids(refs)  # T-23: fetch every copy, each keyed apart
        if renamed:
            self._log.warning("pop3_uidl_duplicates", count=renamed)
        return refs

    async def headers(self, ref: MessageRef) -> bytes | None:
        """``TOP n 0``: the header section (never used to build a stored message, T-29).

        ``None`` when the server refuses TOP, or sends a header section without its
        closing blank line that is shorter than the whole message (cut short, so no
        rule may judge it): the engine then retrieves the message instead.
        """
        parts: list[bytes] = []
        size = 0
        refused: Err | None = None
        await self._settle()
        try:
            async for event in self.client.stream([Top(number=ref.number, lines=0)]):
                if isinstance(event, BodyChunk):
                    size += len(event.data)
                    if size <= MAX_HEADER_OCTETS:  # past it: read on, keep nothing
                        parts.append(event.data)
                elif isinstance(event, Err):
                    refused = event
        except OversizeError as exc:
            exc.ref = ref  # a TOP past the max_message cap: journaled like a RETR
            raise
        self._topped.add(ref.number)
        if size > MAX_HEADER_OCTETS:
            # S-12: a header section this long is hostile or a server that ignores
            # the line count; the message is retrieved (and size-checked) instead.
            self._log.warning("pop3_top_too_long", number=ref.number, octets=size)
            return None
        if refused is not None:
            self._log.warning(
                "pop3_top_refused", number=ref.number, text=refused.text[:200]
            )
            return None
        data = b"".join(parts)
        count = OctetCount()
        count.feed(data)
        whole = not count.shortfall(ref.size)  # a message of headers only, all of it
        if not (whole or data.endswith(b"\n\n") or data.endswith(b"\n\r\n")):
            self._log.warning(
                "pop3_top_incomplete", number=ref.number, octets=len(data)
            )
            return None
        return data


def pages_listing(greeting: str, caps: Capabilities) -> bool:
    """T-44: True for Gmail's POP3, which lists only a page of the oldest messages
    per session and shows the next page after QUIT: its greeting ``+OK Gpop ready
    ...`` or a ``X-GOOGLE-`` CAPA tag (``X-GOOGLE-RICO``, ``X-GOOGLE-VERHOEVEN``).
    Every other server lists its whole maildrop (RFC 1939 §5)."""
    return greeting.startswith("Gpop") or any(
        name.startswith("X-GOOGLE-") for name in caps.names
    )


__all__ = ["Pop3Options", "Pop3Session", "Pop3Source", "pages_listing"]
