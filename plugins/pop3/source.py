"""The ``pop3`` source: its options and the SourceSession mapped onto POP3 commands."""

import contextlib
import os
import tempfile
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any, ClassVar, Literal

import structlog
from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator

from mailpipe.errors import SourceConnectionError, SourcePermanentError
from mailpipe.message import Message, MessageRef, distinct_uids
from mailpipe.processor import ProcessorContext
from mailpipe.secrets import Secret
from mailpipe.units import ByteSize, Duration

from . import auth as sasl
from .client import CommandRefused, Pop3Client, Timeouts, make_ssl_context
from .events import (
    BodyChunk,
    BodyEnd,
    BodyStart,
    Capabilities,
    Dele,
    Err,
    List,
    MultiLine,
    Retr,
    Top,
    Uidl,
    parse_list,
    parse_uidl,
)
from .protocol import RemoteProtocolError

log = structlog.get_logger()


class Pop3Options(BaseModel):
    """Options of a ``source = "pop3"`` mailbox (the mailbox table's other keys)."""

    model_config = ConfigDict(extra="forbid", defer_build=True)

    host: str = Field(description="POP3 server host name; also the TLS name verified.")
    port: int | None = Field(
        default=None,
        ge=1,
        le=65535,
        description="TCP port; default 995 for security = 'tls', 110 otherwise.",
    )
    security: Literal["tls", "starttls", "none"] = Field(
        default="tls",
        description="'tls': implicit TLS (RFC 8314); 'starttls': STLS required; "
        "'none': plaintext (needs allow_plaintext_password to send a password).",
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
    oauth_token: Secret | None = Field(
        default=None,
        validate_default=True,
        description="OAuth 2 access token for XOAUTH2/OAUTHBEARER; a {command=[...]} "
        "secret runs again for every session (fresh token).",
    )
    ca_file: Path | None = Field(
        default=None, description="PEM file of CA certificates to trust instead of the "
        "system store."
    )
    cert_sha256: str | None = Field(
        default=None,
        pattern=r"^([0-9A-Fa-f]{2}:?){31}[0-9A-Fa-f]{2}$",
        description="Pin: SHA-256 of the server certificate (hex, colons allowed); "
        "checked in addition to normal verification.",
    )
    tls_verify: bool = Field(
        default=True,
        description="Verify the certificate and host name; false only for tests or "
        "with a cert_sha256 pin.",
    )
    allow_plaintext_password: bool = Field(
        default=False,
        validate_default=True,
        description="Allow credentials over a connection without TLS "
        "(security = 'none'); off by default (RFC 2595 §2.3).",
    )
    connect_timeout: Duration = Field(default=30.0, description="TCP connect timeout.")
    tls_timeout: Duration = Field(default=30.0, description="TLS handshake timeout.")
    greeting_timeout: Duration = Field(
        default=60.0, description="Time allowed for the server greeting."
    )
    read_timeout: Duration = Field(
        default=120.0, description="Inactivity timeout for each read of a reply."
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
        default=128, ge=1, le=1000, description="Most commands in flight when pipelining."
    )
    max_line: int = Field(
        default=8192, ge=512, le=1 << 20,
        description="Longest status line accepted from the server, in octets.",
    )
    max_message: ByteSize = Field(
        default=2 * 2**30, description="Largest message body accepted, in octets."
    )
    chunk_size: ByteSize = Field(
        default=256 * 1024, ge=4096, description="Read size; bounds memory per message."
    )

    # Cross-field checks are field validators on a later field, so an error names a
    # key and never echoes the whole table (which holds the password) as its input.
    @field_validator("auth")
    @classmethod
    def _auth_has_credentials(cls, auth: str, info: ValidationInfo) -> str:
        # A password that failed its own validation is absent from info.data: do not
        # report it twice.
        if auth not in sasl.OAUTH and auth != "auto" and _unset(info, "password"):
            raise ValueError(f"auth = {auth!r} needs password")
        return auth

    @field_validator("oauth_token")
    @classmethod
    def _token_when_needed(
        cls, token: Secret | None, info: ValidationInfo
    ) -> Secret | None:
        if token is None:
            if info.data.get("auth") in sasl.OAUTH:
                raise ValueError(f"auth = {info.data['auth']!r} needs oauth_token")
            if _unset(info, "password"):
                raise ValueError("set password or oauth_token")
        return token

    @field_validator("allow_plaintext_password")
    @classmethod
    def _plaintext_needs_consent(cls, allow: bool, info: ValidationInfo) -> bool:
        # RFC 2595 §2.3 / conformance S-01: no password in clear without explicit consent.
        if info.data.get("security") == "none" and not allow:
            raise ValueError(
                "security = 'none' would send the password in clear text; use "
                "'tls' or 'starttls', or set allow_plaintext_password = true"
            )
        return allow

    @property
    def effective_port(self) -> int:
        """The configured port, or 995 for implicit TLS and 110 otherwise."""
        if self.port is not None:
            return self.port
        return 995 if self.security == "tls" else 110


def _unset(info: ValidationInfo, key: str) -> bool:
    """True when ``key`` validated to None (not when it failed validation)."""
    return key in info.data and info.data[key] is None


class Pop3Source:
    """A POP3 mailbox: ``session()`` connects, secures and authenticates."""

    name: ClassVar[str] = "pop3"
    Options: ClassVar[type[BaseModel]] = Pop3Options

    def __init__(
        self, options: Pop3Options, context: ProcessorContext | None = None, *,
        mailbox: str = "",
    ) -> None:
        if context is not None and options.ca_file is not None:
            # A relative ca_file is relative to the config file, like every path.
            options = options.model_copy(
                update={"ca_file": context.resolve(options.ca_file)}
            )
        self.options = options
        self.context = context
        self.mailbox = mailbox

    @contextlib.asynccontextmanager
    async def session(self) -> AsyncIterator["Pop3Session"]:
        """Open a session; on exit it aborts (no QUIT) unless committed."""
        session = Pop3Session(self.options, self.mailbox)
        try:
            await session.open()
            yield session
        finally:
            await session.abort()


class Pop3Session:
    """One POP3 session implementing :class:`mailpipe.source.SourceSession`."""

    def __init__(self, options: Pop3Options, mailbox: str) -> None:
        self.options = options
        self.mailbox = mailbox
        self.supports_uidl = True
        self.client = self._new_client()
        self._committed = False
        self._marked: set[int] = set()
        self._log = log.bind(mailbox=mailbox, host=options.host)

    @property
    def capabilities(self) -> Capabilities:
        """The latest CAPA (names and arguments); empty when the server has no CAPA."""
        return self.client.capabilities or Capabilities()

    def _new_client(self) -> Pop3Client:
        o = self.options
        ctx = None
        if o.security != "none":
            ctx = make_ssl_context(
                str(o.ca_file) if o.ca_file else None, verify=o.tls_verify
            )
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
        await self._authenticate()
        if use_capa:
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

    async def _authenticate(self) -> None:
        o, client = self.options, self.client
        token = o.oauth_token.refresh() if o.oauth_token is not None else ""
        password = o.password.get() if o.password is not None else ""
        method = sasl.choose(
            o.auth,
            client.capabilities,
            has_password=bool(password),
            has_token=bool(token),
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
            elif method == "xoauth2":
                mechanism = sasl.XOAuth2(user=user, token=token)
            else:
                mechanism = sasl.OAuthBearer(
                    user=user, token=token, host=o.host, port=o.effective_port
                )
            await client.login_sasl(mechanism)
        self._log.info("pop3_authenticated", method=method)

    # --- SourceSession --------------------------------------------------------------

    async def list(self) -> list[MessageRef]:
        """UIDL + LIST (pipelined when possible); without UIDL, uids are ``""``.

        A uid listed for several messages is made distinct per occurrence
        (:func:`mailpipe.message.distinct_uids`, T-23), with one warning per session.
        """
        uids: dict[int, str] | None = None
        sizes: list[tuple[int, int]] = []
        async for event in self.client.stream([Uidl(), List()]):
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

    async def headers(self, ref: MessageRef) -> bytes:
        """``TOP n 0``: the header section (never used to build a stored message, T-29)."""
        parts: list[bytes] = []
        async for event in self.client.stream([Top(number=ref.number, lines=0)]):
            if isinstance(event, BodyChunk):
                parts.append(event.data)
            elif isinstance(event, Err):
                raise CommandRefused(
                    f"{self.client.where}: TOP {ref.number} refused: {event.text[:200]}",
                    event,
                )
        return b"".join(parts)

    async def retrieve(
        self, refs: Sequence[MessageRef], *, spool_dir: Path, spool_threshold: int
    ) -> AsyncIterator[Message]:
        """RETR each ref (pipelined window) and yield complete messages in order.

        Bodies over ``spool_threshold`` go to a file in ``spool_dir`` as they arrive, so
        memory is bounded by the chunk size. A ``-ERR`` skips that message (T-25).
        """
        by_number = {ref.number: ref for ref in refs}
        sink: _Sink | None = None
        try:
            async for event in self.client.stream(
                [Retr(number=ref.number) for ref in refs],
                sizes={ref.number: ref.size for ref in refs},  # T-45 deadlines
            ):
                if isinstance(event, BodyChunk):
                    assert sink is not None
                    sink.write(event.data)
                elif isinstance(event, BodyStart):
                    ref = by_number[event.command.number]  # type: ignore[attr-defined]
                    sink = _Sink(ref, spool_dir, spool_threshold)
                elif isinstance(event, BodyEnd):
                    assert sink is not None
                    message = sink.finish(event.octets)
                    sink = None
                    if message.meta["octets_received"] != message.ref.size:
                        # C-50 / T-21: LIST sizes are hints, never framing.
                        self._log.info(
                            "pop3_size_mismatch",
                            uid=message.ref.uid,
                            listed=message.ref.size,
                            received=message.meta["octets_received"],
                        )
                    yield message
                elif isinstance(event, Err):
                    self._log.warning(
                        "pop3_retr_refused",
                        number=getattr(event.command, "number", None),
                        text=event.text[:200],
                    )
        finally:
            if sink is not None:
                sink.discard()

    async def mark_deleted(self, refs: Sequence[MessageRef]) -> None:
        """DELE each ref (pipelined); nothing is removed before QUIT (RFC 1939 §6)."""
        # C-54: never DELE a number twice in a session, so a refusal is never "already".
        todo = [ref for ref in refs if ref.number not in self._marked]
        async for event in self.client.stream([Dele(number=r.number) for r in todo]):
            number = getattr(getattr(event, "command", None), "number", None)
            if isinstance(event, Err):
                # T-25: the message vanished; the journal retries the DELE next time.
                self._log.warning("pop3_dele_refused", number=number, text=event.text[:200])
            elif isinstance(number, int):
                self._marked.add(number)

    async def commit(self) -> None:
        """QUIT; raises :class:`mailpipe.CommitError` when not confirmed (C-57)."""
        self._committed = True
        await self.client.quit()
        self._log.info("pop3_committed", deleted=len(self._marked))

    async def abort(self) -> None:
        """Close without QUIT; never raises."""
        try:
            await self.client.abort()
        except Exception as exc:  # the contract: never raises
            self._log.debug("pop3_abort_failed", error=type(exc).__name__)


class _Sink:
    """Collects one body in memory, spilling to a spool file past the threshold."""

    def __init__(self, ref: MessageRef, spool_dir: Path, threshold: int) -> None:
        self.ref = ref
        self.spool_dir = spool_dir
        self.threshold = threshold
        self.parts: list[bytes] = []
        self.size = 0
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
        self.size += len(data)
        if self.file is not None:
            self.file.write(data)
            return
        self.parts.append(data)
        if self.size > self.threshold:
            self._spill()

    def finish(self, octets: int) -> Message:
        meta = {"octets_listed": self.ref.size, "octets_received": self.size}
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


__all__ = ["Pop3Options", "Pop3Session", "Pop3Source"]
