"""The ``pop3`` source: its options and the SourceSession mapped onto POP3 commands."""

from __future__ import annotations

import asyncio
import contextlib
import os
import tempfile
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path
from typing import Any, ClassVar, Literal

import structlog
from pydantic import BaseModel, ConfigDict, Field, field_validator

from mailpipe.credentials import (
    Credentials,
    check_auth_has_credentials,
    check_token_when_needed,
)
from mailpipe.errors import (
    OversizeError,
    SourceConnectionError,
    SourceError,
    SourcePermanentError,
    SourceTimeoutError,
)
from mailpipe.message import Message, MessageRef, distinct_uids
from mailpipe.oauth.table import OAuthOptions
from mailpipe.secrets import Secret
from mailpipe.source import Ack, AckKind, SessionFacts, SourceContext, Unretrievable
from mailpipe.tls import ConnectionSecurity
from mailpipe.units import ByteSize, Duration

from . import auth as sasl
from .client import CommandRefused, Pop3Client, Timeouts
from .completeness import END_SLACK, OctetCount, shortfall
from .events import (
    BodyChunk,
    BodyEnd,
    BodyStart,
    Capabilities,
    Dele,
    Err,
    Event,
    List,
    MultiLine,
    Retr,
    Top,
    Uidl,
    Utf8,
    parse_list,
    parse_uidl,
)
from .flight import Flight
from .protocol import RemoteProtocolError

log = structlog.get_logger()

#: The listing (RFC 1939 §7 UIDL, §5 LIST): pipelined when possible (T-30).
_LISTING: tuple[Uidl, List] = (Uidl(), List())

#: The longest ``TOP n 0`` reply kept for header rules (S-12); longer ones are read
#: to their end, dropped, and the message is retrieved instead.
MAX_HEADER_OCTETS = 1 << 20


class Pop3Options(ConnectionSecurity):
    """Options of a ``source = "pop3"`` mailbox (the mailbox table's other keys).

    The connection-security keys (``security``, ``ca_file``, ``cert_sha256``,
    ``tls_verify``, ``allow_plaintext_password``) come from
    :class:`mailpipe.tls.ConnectionSecurity`, shared with the IMAP source.
    """

    model_config = ConfigDict(extra="forbid", defer_build=True)

    host: str = Field(description="POP3 server host name; also the TLS name verified.")
    port: int | None = Field(
        strict=True,
        default=None,
        ge=1,
        le=65535,
        description="TCP port; default 995 for security = 'tls', 110 otherwise.",
    )
    username: str = Field(description="Login name (also the OAuth user).")
    password: Secret | None = Field(
        default=None,
        description="Password: a string, {env=...}, {file=...} or {command=[...]}.",
    )
    auth: Literal[
        "auto", "user", "apop", "plain", "login", "cram-md5", "scram-sha-1",
        "scram-sha-256", "xoauth2", "oauthbearer",
    ] = Field(
        default="auto",
        description="Authentication method; 'auto' picks from CAPA after TLS "
        "(OAuth when a token is set, else SCRAM-SHA-256, PLAIN, USER/PASS, LOGIN). "
        "APOP, CRAM-MD5 and SCRAM-SHA-1 are used only when named here.",
    )
    oauth: OAuthOptions | None = Field(
        default=None,
        description="Built-in OAuth 2 (XOAUTH2/OAUTHBEARER): { provider = "
        "'microsoft' | 'google' | 'oidc', ... }; tokens come from the shared cache "
        "and are refreshed before they expire (see mailpipe.oauth).",
    )
    oauth_token: Secret | None = Field(
        default=None,
        validate_default=True,
        description="OAuth 2 access token for XOAUTH2/OAUTHBEARER; a {command=[...]} "
        "secret runs again for every session (fresh token). Not with oauth.",
    )
    connect_timeout: Duration = Field(
        default=30.0, gt=0, description="TCP connect timeout."
    )
    tls_timeout: Duration = Field(
        default=30.0, gt=0, description="TLS handshake timeout."
    )
    greeting_timeout: Duration = Field(
        default=60.0, gt=0, description="Time allowed for the server greeting."
    )
    read_timeout: Duration = Field(
        default=120.0, gt=0, description="Inactivity timeout for each read of a reply."
    )
    retr_timeout: Duration = Field(
        default=600.0,
        gt=0,
        description="Overall deadline of one RETR reply, at least this long; more "
        "for big messages (see retr_min_rate). Stops a server that trickles bytes.",
    )
    retr_min_rate: ByteSize = Field(
        default=50_000,
        ge=1,
        description="Slowest RETR transfer allowed, in octets per second: the "
        "deadline is the larger of retr_timeout and the LIST size over this rate.",
    )
    pipelining: Literal["auto", "off"] = Field(
        default="auto",
        description="'auto': pipeline commands when CAPA lists PIPELINING; 'off': "
        "one command at a time.",
    )
    pipeline_window: int = Field(
        strict=True,
        default=128, ge=1, le=1000, description="Most commands in flight when pipelining "
        "(DELEs, answered by one line each, are bounded by 4 KiB of command bytes alone)."
    )
    max_line: int = Field(
        strict=True,
        default=8192, ge=512, le=1 << 20,
        description="Longest status line accepted from the server, in octets.",
    )
    max_message: ByteSize = Field(
        default=256 * 2**20,
        ge=1,
        description="Hard cap on one message, in octets, whatever LIST says: the "
        "transfer stops there and the message is left on the server (or deleted "
        "unread under on_oversize = 'delete').",
    )
    chunk_size: ByteSize = Field(
        default=256 * 1024, ge=4096, description="Read size; bounds memory per message."
    )
    verify_size: Literal["strict", "confirm", "off"] = Field(
        default="strict",
        description="A message received shorter than its LIST size allows (beyond "
        "line-end and dot-stuffing slack) is cut short: 'strict' never commits it (it "
        "stays on the server and is retried); 'confirm' commits it once the same "
        "octets arrived in two sessions with sound framing and no TOP before them (for "
        "servers that list estimated sizes, such as Exchange with "
        "EnableExactRFC822Size off); 'off' commits what arrives.",
    )
    utf8: bool = Field(
        default=True,
        strict=True,
        description="Send UTF8 (RFC 6856) when CAPA lists it, so that a server such "
        "as Courier serves messages with 8-bit headers as they are instead of a "
        "notice.",
    )

    # Cross-field checks are field validators on a later field, so an error names a
    # key and never echoes the whole table (which holds the password) as its input.
    _auth_has_credentials = field_validator("auth")(check_auth_has_credentials)
    _token_when_needed = field_validator("oauth_token")(check_token_when_needed)

    @property
    def effective_port(self) -> int:
        """The configured port, or 995 for implicit TLS and 110 otherwise."""
        if self.port is not None:
            return self.port
        return 995 if self.security == "tls" else 110


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


class Pop3Session:
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

    async def retrieve(
        self,
        refs: Sequence[MessageRef],
        *,
        spool_dir: Path,
        spool_threshold: int,
        max_size: int | None = None,
    ) -> AsyncIterator[Message | Unretrievable]:
        """RETR each ref (pipelined window) and yield complete messages in order.

        Bodies over ``spool_threshold`` go to a file in ``spool_dir`` as they arrive, so
        memory is bounded by the chunk size. A ``-ERR`` (T-25), or a body received
        shorter than its LIST size allows (MP-01, see :mod:`.completeness`), is yielded
        as an :class:`~mailpipe.source.Unretrievable`, never as a message. A body
        passing ``max_size`` (or the ``max_message`` cap) raises
        :class:`mailpipe.OversizeError` naming its ref, with the connection closed.

        P-14: the RETRs go out as the window drains (:class:`.flight.Flight`), so
        ``refs`` may be a whole commit window: replies wait in the transport (TCP flow
        control) while the consumer is busy, never in memory. DELEs acknowledged while
        the stream runs join it. A consumer that stops early ends the RETRs not yet
        sent; what is in flight is read (and dropped) before the next command.
        """
        # A stream left early is read first; the queued DELEs are not sent on their
        # own here: they lead this flight (P-13).
        await self._read_unread()
        by_number = {ref.number: ref for ref in refs}
        sink: _Sink | None = None
        # MP-01: a body is yielded only once the next reply's status line has parsed
        # (the next RETR's, a DELE's, or the closing NOOP's): a server that failed to
        # dot-stuff a lone "." line ends the body early and sends the rest as stray
        # data, which then fails to parse as a reply, so the cut body is never
        # delivered.
        held: Message | Unretrievable | None = None
        limits = None if max_size is None else dict.fromkeys(by_number, max_size)
        # P-13: the DELEs queued since the last flight lead this one.
        queued, self._queued = self._queued, []
        flight = Flight(queued, refs)
        stream = self.client.stream(
            flight,
            sizes={ref.number: ref.size for ref in refs},  # T-45 deadlines
            limits=limits,
        )
        self._flight = flight
        ended = False
        try:
            async for event in stream:
                if isinstance(event, BodyChunk):
                    assert sink is not None
                    sink.write(event.data)
                    continue
                if held is not None:  # a reply's status line parsed: its end is sound
                    out, held = held, None
                    yield out
                if isinstance(getattr(event, "command", None), Dele):
                    self._deleted(event)
                elif isinstance(event, BodyStart):
                    ref = by_number[event.command.number]  # type: ignore[attr-defined]
                    sink = _Sink(ref, spool_dir, spool_threshold)
                elif isinstance(event, BodyEnd):
                    assert sink is not None
                    done, sink = sink, None
                    flight.answered(done.ref)
                    held = await self._finished(done)
                elif isinstance(event, Err) and isinstance(event.command, Retr):
                    number = event.command.number
                    text = event.text[:200]
                    self._log.warning("pop3_retr_refused", number=number, text=text)
                    if number in by_number:
                        flight.answered(by_number[number])
                        yield Unretrievable(
                            by_number[number], f"RETR {number} refused: {text}"
                        )
            ended = True
        except RemoteProtocolError as exc:
            if held is not None:
                out, held = held, None
                yield self._unsound(out, exc) if isinstance(out, Message) else out
            raise
        except OversizeError as exc:
            exc.ref = by_number.get(exc.number)
            raise
        except SourceError:
            # A dropped connection or a timeout after a body's terminator: that body
            # ended with its ".", so it is delivered before the error goes on.
            if held is not None:
                out, held = held, None
                yield out
            raise
        finally:
            self._flight = None
            if not ended:
                # P-14: left early (a stop request, or an error before an abort): no
                # further RETR; the DELEs the flight holds still go, and what is in
                # flight is read to its end before the next command (see _settle).
                flight.stop()
                self._unread = stream
            if sink is not None:
                sink.discard()
            if held is not None:  # never delivered (the consumer stopped early)
                _discard(held)

    def _unsound(self, message: Message, exc: RemoteProtocolError) -> Unretrievable:
        """The message whose body was followed by data that is no reply (MP-01)."""
        ref = message.ref
        self._log.error(
            "pop3_message_unsound", uid=ref.uid, number=ref.number, error=str(exc)[:200]
        )
        return Unretrievable(
            ref,
            f"RETR {ref.number} was followed by data that is not a reply, so where "
            f"the message ends cannot be trusted (a server that does not dot-stuff?): "
            f"{str(exc)[:160]}",
            evidence=message,
            after_headers=False,
        )

    async def _finished(self, sink: _Sink) -> Message | Unretrievable:
        """The message a finished body makes, or an Unretrievable when it is short.

        A spooled body that may be short is read back on a worker thread (MP-01):
        the event loop is not held for the whole file at once."""
        message = sink.finish()
        ref, octets = message.ref, sink.octets
        if octets != ref.size:
            # C-50 / T-21: LIST sizes are hints, never framing.
            self._log.info(
                "pop3_size_mismatch", uid=ref.uid, listed=ref.size, received=octets
            )
        if self.options.verify_size == "off":
            return message
        try:
            if message.spool_path is None or octets + END_SLACK >= ref.size:
                missing = shortfall(octets, ref.size, message.open)
            else:
                missing = await asyncio.to_thread(
                    shortfall, octets, ref.size, message.open
                )
        except BaseException:
            # Read back from its spool file, a body may meet an error (EMFILE, EIO)
            # or a cancellation: it goes on, and the spool file with the raw mail in
            # it goes (MP-01).
            _discard(message)
            raise
        if not missing:
            return message
        # MP-01: a copy shorter than any way of counting its LIST size is cut short
        # (a missing dot-stuffing, a header-only RETR after TOP): never committed.
        after_top = ref.number in self._topped
        reason = (
            f"RETR {ref.number} incomplete: received {octets} octets, LIST "
            f"said {ref.size} ({missing} missing beyond line-end slack)"
            + (" after TOP in the same session" if after_top else "")
        )
        self._log.error(
            "pop3_message_incomplete",
            uid=ref.uid,
            listed=ref.size,
            received=octets,
            after_top=after_top,
        )
        return Unretrievable(
            ref,
            reason,
            evidence=message,
            after_headers=after_top,
            confirmable=self.options.verify_size == "confirm" and not after_top,
        )

    async def acknowledge(self, refs: Sequence[MessageRef], ack: Ack) -> None:
        """``delete``: DELE; ``keep``: nothing (MP-04).

        While a :meth:`retrieve` stream runs, the DELEs join its flight (P-14). Else,
        with pipelining, they are queued and go out with the session's next commands
        (P-13): the next flight of RETRs, the next listing or TOP, or just before QUIT;
        an abort drops them unsent (nothing deleted, the journal still owes them).
        Without pipelining they are sent now (:meth:`mark_deleted`).
        """
        if ack.kind is AckKind.DELETE:
            todo = self._unasked(refs)
            if self._flight is not None:
                self._flight.add(todo)
            elif self.client.pipelining_active:
                self._queued.extend(todo)
            else:
                await self._settle()
                await self._send(todo)
        elif ack.kind is not AckKind.KEEP:
            raise ValueError(f"POP3 cannot acknowledge with {ack}")

    async def mark_deleted(self, refs: Sequence[MessageRef]) -> None:
        """DELE each ref now (pipelined); nothing is removed before QUIT (RFC 1939 §6)."""
        await self._settle()
        await self._send(self._unasked(refs))

    def _unasked(self, refs: Sequence[MessageRef]) -> Sequence[Dele]:
        """The DELEs of ``refs`` neither marked nor queued nor awaiting a reply (C-54:
        never DELE a marked number again, so a refusal is never "already deleted")."""
        todo: list[Dele] = []
        for ref in refs:
            if ref.number not in self._asked:
                self._asked.add(ref.number)
                todo.append(Dele(number=ref.number))
        return todo

    async def _send(self, deles: Sequence[Dele]) -> None:
        if deles:
            async for event in self.client.stream(deles):
                self._deleted(event)

    async def _settle(self) -> None:
        """Before a command of its own: read a stream left early to its end (P-14: the
        DELEs of its flight included; the rest is dropped, nothing is delivered), then
        send the queued DELEs (P-13)."""
        await self._read_unread()
        queued, self._queued = self._queued, []
        await self._send(queued)

    async def _read_unread(self) -> None:
        """Read a stream left early to its end (P-14): the DELEs of its flight are
        noted, the rest is dropped, nothing is delivered."""
        unread, self._unread = self._unread, None
        if unread is not None:
            async for event in unread:
                if isinstance(getattr(event, "command", None), Dele):
                    self._deleted(event)

    def _deleted(self, event: Event) -> None:
        """Note a DELE reply: marked, or refused (T-25)."""
        number = getattr(getattr(event, "command", None), "number", None)
        if isinstance(event, Err):
            # T-25: the message vanished; the journal retries the DELE next time.
            self._log.warning("pop3_dele_refused", number=number, text=event.text[:200])
            self._asked.discard(number)  # may be asked again
        elif isinstance(number, int):
            self._marked.add(number)

    async def commit(self) -> None:
        """QUIT once every reply arrived (P-09, P-14); raises
        :class:`mailpipe.CommitError` when not confirmed (C-57)."""
        await self._settle()
        self._committed = True
        await self.client.quit()
        self._log.info("pop3_committed", deleted=len(self._marked))

    async def abort(self) -> None:
        """Close without QUIT; never raises."""
        try:
            await self.client.abort()
        except Exception as exc:  # the contract: never raises
            self._log.debug("pop3_abort_failed", error=type(exc).__name__)


def pages_listing(greeting: str, caps: Capabilities) -> bool:
    """T-44: True for Gmail's POP3, which lists only a page of the oldest messages
    per session and shows the next page after QUIT: its greeting ``+OK Gpop ready
    ...`` or a ``X-GOOGLE-`` CAPA tag (``X-GOOGLE-RICO``, ``X-GOOGLE-VERHOEVEN``).
    Every other server lists its whole maildrop (RFC 1939 §5)."""
    return greeting.startswith("Gpop") or any(
        name.startswith("X-GOOGLE-") for name in caps.names
    )


def _discard(item: Message | Unretrievable) -> None:
    """Remove the spool file of a message (or of an Unretrievable's evidence)."""
    message = item.evidence if isinstance(item, Unretrievable) else item
    if message is not None and message.spool_path is not None:
        with contextlib.suppress(OSError):
            Path(message.spool_path).unlink()


class _Sink:
    """Collects one body in memory, spilling to a spool file past the threshold."""

    def __init__(self, ref: MessageRef, spool_dir: Path, threshold: int) -> None:
        self.ref = ref
        self.spool_dir = spool_dir
        self.threshold = threshold
        self.parts: list[bytes] = []
        self.octets = 0  # lines are counted only if the size cannot tell (MP-01)
        self.path: Path | None = None
        self.file: Any = None
        if ref.size > threshold:
            self._spill()

    def _spill(self) -> None:
        self.spool_dir.mkdir(mode=0o700, parents=True, exist_ok=True)  # raw mail
        fd, name = tempfile.mkstemp(dir=self.spool_dir, prefix="pop3-", suffix=".eml")
        self.path = Path(name)
        self.file = os.fdopen(fd, "wb")
        for part in self.parts:
            self.file.write(part)
        self.parts = []

    def write(self, data: bytes) -> None:
        self.octets += len(data)
        if self.file is not None:
            self.file.write(data)
            return
        self.parts.append(data)
        if self.octets > self.threshold:
            self._spill()

    def finish(self) -> Message:
        meta = {"octets_listed": self.ref.size, "octets_received": self.octets}
        if self.file is not None:
            self.file.close()
            self.file = None
            return Message(ref=self.ref, spool_path=self.path, meta=meta)
        return Message(ref=self.ref, data=b"".join(self.parts), meta=meta)

    def discard(self) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None
        if self.path is not None:
            with contextlib.suppress(OSError):
                self.path.unlink()


__all__ = ["Pop3Options", "Pop3Session", "Pop3Source", "pages_listing"]

