"""forward.smtp: resend the original message through an SMTP relay with Resent-* fields."""

from __future__ import annotations

import asyncio
import email.policy
import email.utils
import hashlib
import re
import ssl
from email.message import EmailMessage
from pathlib import Path
from typing import Any, ClassVar, Literal, Self

import aiosmtplib
import structlog
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from mailpipe.errors import PermanentFailure, TemporaryFailure
from mailpipe.message import Message
from mailpipe.processor import ProcessorContext
from mailpipe.secrets import Secret, redact
from mailpipe.units import Duration

from ._retry import Backoff, cert_error, client_tls_context

log = structlog.get_logger()

DEFAULT_PORTS: dict[str, int] = {"tls": 465, "starttls": 587, "none": 25}
# RFC 5321 §4.1.2 mailbox, loosely: no controls, no spaces, no angle brackets.
_ADDRESS = re.compile(r"^[^\s<>\x00-\x1f\x7f]+@[^\s<>@\x00-\x1f\x7f]+$")
_HEADER_END = re.compile(rb"\r?\n\r?\n")
_EXTENSION: dict[str, str] = {"BODY=8BITMIME": "8bitmime", "SMTPUTF8": "smtputf8"}


def _check_address(value: str) -> str:
    if not _ADDRESS.match(value):
        raise ValueError(f"not a plain mailbox address: {value!r}")
    return value


class SmtpForwardOptions(BaseModel):
    """Options of ``forward.smtp``."""

    model_config = ConfigDict(extra="forbid", defer_build=True)

    host: str = Field(description="SMTP relay host name or address.")
    port: int | None = Field(
        strict=True,
        default=None,
        ge=1,
        le=65535,
        description="Relay port; defaults to 465 (tls), 587 (starttls) or 25 (none).",
    )
    security: Literal["tls", "starttls", "none"] = Field(
        default="starttls",
        description="'tls' (implicit TLS), 'starttls' (required, never downgraded) or "
        "'none' (plain text).",
    )
    tls_verify: bool = Field(
        strict=True,
        default=True,
        description="Verify the relay's certificate and host name; false is an explicit "
        "opt-out for test relays.",
    )
    ca_file: Path | None = Field(
        default=None, description="PEM file of CA certificates to trust instead of the "
        "system store."
    )
    username: str | None = Field(default=None, description="AUTH user name.")
    password: Secret | None = Field(default=None, description="AUTH password (a secret).")
    envelope_from: str = Field(
        description="Envelope sender (MAIL FROM); bounces go here."
    )
    to: list[str] = Field(min_length=1, description="Envelope recipients (RCPT TO).")
    resent_from: str | None = Field(
        default=None,
        description="Resent-From header value; defaults to envelope_from.",
    )
    timeout: Duration = Field(
        default=60.0, gt=0, description="Timeout of each SMTP step."
    )
    local_hostname: str | None = Field(
        default=None, description="Name sent in EHLO; defaults to this host's FQDN."
    )
    retries: int = Field(
        strict=True,
        default=0,
        ge=0,
        le=10,
        description="Reconnect attempts within one delivery after a connection error "
        "or a 4xx reply.",
    )
    backoff: Duration = Field(default=1.0, description="First delay between retries.")
    reuse_connection: bool = Field(
        strict=True,
        default=True,
        description="Keep the relay connection open across the messages of a session "
        "(checked with NOOP before reuse).",
    )
    messages_per_connection: int = Field(
        strict=True,
        default=100, ge=1, description="Reconnect after this many messages."
    )
    on_partial: Literal["fail", "commit"] = Field(
        default="fail",
        description="When some recipients are refused and others accepted: 'fail' "
        "(retry/fail per the refusal codes; accepted recipients may get a copy again, "
        "with the same Resent-Message-ID) or 'commit' (log and carry on).",
    )

    @field_validator("envelope_from")
    @classmethod
    def _envelope_from(cls, value: str) -> str:
        return _check_address(value)

    @field_validator("to")
    @classmethod
    def _to(cls, value: list[str]) -> list[str]:
        return [_check_address(v) for v in value]

    @field_validator("resent_from")
    @classmethod
    def _resent_from(cls, value: str | None) -> str | None:
        if value is not None and not email.utils.parseaddr(value)[1]:
            raise ValueError(f"not an address: {value!r}")
        if value is not None and re.search(r"[\x00-\x1f\x7f]", value):
            raise ValueError("control characters are not allowed")
        return value

    @model_validator(mode="after")
    def _auth_pair(self) -> Self:
        if (self.username is None) != (self.password is None):
            raise ValueError("username and password go together")
        return self


class SmtpForwardProcessor:
    """Resend the original message to ``to`` through a relay; commits on the final 250.

    The original bytes are kept untouched; a Resent-* block (RFC 5322 §3.6.6) and an
    ``X-Mailpipe-Key`` header are prepended. Resent-Message-ID is derived from the message
    key and the recipients, so a re-send after a crash carries the same ID and downstream
    can deduplicate. 4xx replies and connection errors raise TemporaryFailure; 5xx raise
    PermanentFailure.
    """

    name: ClassVar[str] = "forward.smtp"
    Options: ClassVar[type[BaseModel]] = SmtpForwardOptions
    commits: ClassVar[bool] = True

    def __init__(self, options: SmtpForwardOptions, context: ProcessorContext) -> None:
        self.options = options
        self.context = context
        self.port = options.port or DEFAULT_PORTS[options.security]
        ca_file = context.resolve(options.ca_file) if options.ca_file else None
        self._tls: ssl.SSLContext | None = (
            client_tls_context(ca_file, verify=options.tls_verify)
            if options.security != "none"
            else None
        )
        domain = options.envelope_from.rpartition("@")[2]
        self._domain = domain if domain.isascii() else "mailpipe.invalid"
        self._client: aiosmtplib.SMTP | None = None
        self._sent = 0
        self._rcpt_tag = hashlib.sha256(",".join(sorted(options.to)).encode()).hexdigest()

    def resent_headers(self, message: Message) -> bytes:
        """The header block prepended to the original: X-Mailpipe-Key then Resent-*."""
        o = self.options
        # RFC 6532: UTF-8 addresses are written raw (and sent with SMTPUTF8).
        utf8 = not all(a.isascii() for a in [*o.to, o.resent_from or o.envelope_from])
        block = EmailMessage(policy=email.policy.SMTPUTF8 if utf8 else email.policy.SMTP)
        block["X-Mailpipe-Key"] = message.key
        # RFC 5322 §3.6.6: Resent-Date and Resent-From MUST be present, Resent-Message-ID
        # SHOULD; the block is prepended as a group, above the original fields.
        block["Resent-Date"] = email.utils.format_datetime(
            email.utils.localtime()
        )
        block["Resent-From"] = o.resent_from or o.envelope_from
        block["Resent-To"] = ", ".join(o.to)
        rendered = block.as_bytes()
        rendered = rendered[:-2] if rendered.endswith(b"\r\n\r\n") else rendered
        # A msg-id has no folding white space (RFC 5322 §3.6.4): written unfolded.
        msg_id = f"<{message.key}.{self._rcpt_tag[:12]}@{self._domain}>"
        return rendered + f"Resent-Message-ID: {msg_id}\r\n".encode("ascii")

    def _mail_options(self, data: bytes) -> tuple[list[str], bool]:
        """Return (MAIL options, SMTPUTF8 required) for ``data`` and the envelope."""
        options: list[str] = []
        envelope = [self.options.envelope_from, *self.options.to]
        utf8_required = not all(a.isascii() for a in envelope)
        if not data.isascii():
            options.append("BODY=8BITMIME")  # RFC 6152: 8-bit octets in the content
            head = _HEADER_END.split(data, maxsplit=1)[0]
            if not head.isascii():
                options.append("SMTPUTF8")  # RFC 6531: raw UTF-8 in header fields
        if utf8_required and "SMTPUTF8" not in options:
            options.append("SMTPUTF8")
        return options, utf8_required

    async def process(self, message: Message) -> None:
        """Send one copy; return once the relay accepted it (250 after DATA)."""
        o = self.options
        bound = log.bind(processor=self.name, key=message.key, uid=message.ref.uid)
        if self.context.dry_run:
            bound.info("forward_skipped", reason="dry_run", recipients=len(o.to))
            return
        raw = message.raw
        data = self.resent_headers(message) + raw
        wanted, utf8_required = self._mail_options(data)
        delays = Backoff(retries=o.retries, base=o.backoff, cap=60.0).delays()
        attempt = 0
        while True:
            attempt += 1
            try:
                reply = await self._send(data, wanted, utf8_required)
                break
            except TemporaryFailure as exc:
                delay = next(delays, None)
                if delay is None:
                    bound.warning("forward_deferred", error=str(exc), attempts=attempt)
                    raise
                bound.info("forward_retrying", error=str(exc), delay=round(delay, 3))
                await asyncio.sleep(delay)
            except PermanentFailure as exc:
                bound.warning("forward_failed", error=str(exc), attempts=attempt)
                raise
        bound.info(
            "forward_sent",
            host=o.host,
            port=self.port,
            recipients=len(o.to),
            size=len(data),
            reply=redact(reply)[:200],
        )

    async def open(self) -> None:
        """Nothing to do up front: the connection opens with the first message."""

    async def close(self) -> None:
        """QUIT and close the session's relay connection, if one is open."""
        await self._drop(polite=True)

    async def _drop(self, *, polite: bool = False) -> None:
        client, self._client = self._client, None
        if client is None:
            return
        try:
            if polite and client.is_connected:
                await client.quit()
        except (aiosmtplib.SMTPException, OSError, TimeoutError):
            pass  # the relay has what it accepted; QUIT is a courtesy here
        finally:
            client.close()

    async def _connect(self) -> aiosmtplib.SMTP:
        """The session's open connection if NOOP still answers, else a new one."""
        o = self.options
        client = self._client
        if client is not None:
            if client.is_connected and self._sent < o.messages_per_connection:
                try:
                    await client.noop()
                    return client
                except (aiosmtplib.SMTPException, OSError, TimeoutError):
                    pass  # idle timeout on the relay's side: reconnect
            await self._drop(polite=True)
        client = aiosmtplib.SMTP(
            hostname=o.host,
            port=self.port,
            use_tls=o.security == "tls",
            # False, not None: "none" must not try opportunistic TLS; "starttls" fails
            # when the relay does not offer it (no silent downgrade).
            start_tls=o.security == "starttls",
            tls_context=self._tls,
            timeout=o.timeout,
            local_hostname=o.local_hostname,
            username=o.username,
            password=o.password.get() if o.password is not None else None,
        )
        self._client = client  # before connect(), so a failure closes it
        self._sent = 0
        await client.connect()
        return client

    async def _send(self, data: bytes, wanted: list[str], utf8_required: bool) -> str:
        o = self.options
        try:
            refused, reply = await self._transaction(data, wanted, utf8_required)
        except BaseException:
            await self._drop()  # state unknown after any error: start afresh next time
            raise
        self._sent += 1
        if not o.reuse_connection:
            await self._drop(polite=True)
        where = f"{o.host}:{self.port}"
        if refused:
            detail = ", ".join(f"{a} ({r.code})" for a, r in refused.items())
            if o.on_partial == "commit":
                log.warning("forward_recipients_refused", processor=self.name,
                            refused=detail, accepted=len(o.to) - len(refused))
                return reply
            code = min(r.code for r in refused.values())
            raise _classify(code, f"relay {where} refused {detail}; the others "
                            "accepted the message")
        return reply

    async def _transaction(
        self, data: bytes, wanted: list[str], utf8_required: bool
    ) -> tuple[dict[str, aiosmtplib.SMTPResponse], str]:
        """Connect (or reuse), then MAIL/RCPT/DATA; SMTP errors become our failures."""
        o = self.options
        where = f"{o.host}:{self.port}"
        try:
            client = await self._connect()
            if wanted and client.is_ehlo_or_helo_needed:
                await client.ehlo()
            options = [
                opt for opt in wanted if client.supports_extension(_EXTENSION[opt])
            ]
            if utf8_required and "SMTPUTF8" not in options:
                raise PermanentFailure(
                    f"relay {where} lacks SMTPUTF8, needed for the envelope addresses"
                )
            if "BODY=8BITMIME" in wanted and "BODY=8BITMIME" not in options:
                # RFC 6152 §3: 8-bit data only to servers that advertise 8BITMIME.
                raise PermanentFailure(
                    f"relay {where} lacks 8BITMIME, needed for this message"
                )
            return await client.sendmail(
                o.envelope_from, o.to, data, mail_options=options
            )
        except aiosmtplib.SMTPRecipientsRefused as exc:
            codes = [r.code for r in exc.recipients]
            raise _classify(min(codes), f"relay {where} refused every recipient: "
                            + _codes(exc.recipients)) from None
        except aiosmtplib.SMTPResponseException as exc:
            raise _classify(
                exc.code, f"relay {where} replied {exc.code} {_clean(exc.message)}"
            ) from None
        except aiosmtplib.SMTPNotSupported as exc:
            raise TemporaryFailure(f"relay {where}: {_clean(str(exc))}") from None
        except (aiosmtplib.SMTPException, OSError, TimeoutError) as exc:
            bad_cert = cert_error(exc)
            if bad_cert is not None:
                raise TemporaryFailure(
                    f"relay {where}: certificate verification failed "
                    f"({_clean(bad_cert.verify_message or str(bad_cert))})"
                ) from None
            raise TemporaryFailure(
                f"relay {where}: {type(exc).__name__}: {_clean(str(exc))}"
            ) from None


def _classify(code: int, text: str) -> TemporaryFailure | PermanentFailure:
    # RFC 5321 §4.2.1: 4yz transient negative completion, 5yz permanent.
    if 400 <= code < 500:
        return TemporaryFailure(text)
    return PermanentFailure(text)


def _codes(recipients: list[Any]) -> str:
    return ", ".join(f"{r.recipient} ({r.code})" for r in recipients)


def _clean(text: str) -> str:
    """One line, bounded, with any known secret masked."""
    return redact(" ".join(str(text).split()))[:300]


PROCESSORS = [SmtpForwardProcessor]
