"""Connection security shared by every source: the options, the context, the handshake.

One model for the keys ``security``, ``ca_file``, ``cert_sha256``, ``tls_verify`` and
``allow_plaintext_password`` (POP3 conformance S-01/S-02, IMAP IS-01/IS-02): verified
TLS by default (``ssl.create_default_context()``, TLS ≥ 1.2, the configured host name
checked and sent as SNI), a pin that adds to validation and never replaces it, and no
credential in clear text without explicit consent (RFC 2595 §2.3, RFC 8314).

Many mailboxes on one server (issue 18): :func:`server_context` gives every mailbox of
the same (host, port, CA file, verify) one shared :class:`ResumingContext`, so the CA
file is read once and each new connection offers the latest TLS session of that server
(RFC 8446 §2.2 resumption, RFC 5077 tickets): a resumed handshake skips the
certificate exchange and its verification, which were done on the connection that
made the session, for this host name and with this same context. The drivers hand the
session back with :func:`keep_session` when a connection ends; a TLS 1.3 ticket
arrives after the handshake, so the handshake itself is too early to take it.
"""

import asyncio
import hashlib
import os
import ssl
from pathlib import Path
from typing import Any, Literal, cast

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator

from mailpipe.errors import (
    SourceConnectionError,
    SourcePermanentError,
    SourceTimeoutError,
)


def make_ssl_context(ca_file: str | None = None, verify: bool = True) -> ssl.SSLContext:
    """``ssl.create_default_context()`` with TLS ≥ 1.2 (RFC 8314 §5, S-02).

    ``verify=False`` disables certificate and hostname checks; only explicit config may
    ask for it.
    """
    ctx = ssl.create_default_context(cafile=ca_file)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    if not verify:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    return ctx


class ResumingContext(ssl.SSLContext):
    """A client context for one server that offers that server's latest session.

    Made only by :func:`server_context` (one per host, port, CA file and verify
    flag), so a session is never offered to another server nor under other trust
    settings; OpenSSL falls back to a full, verified handshake when the server does
    not resume it.
    """

    _session: ssl.SSLSession | None = None

    def wrap_bio(
        self,
        incoming: ssl.MemoryBIO,
        outgoing: ssl.MemoryBIO,
        server_side: bool = False,
        server_hostname: str | bytes | None = None,
        session: ssl.SSLSession | None = None,
    ) -> ssl.SSLObject:
        """asyncio's ``start_tls`` path: the latest session unless one is given."""
        if session is None and not server_side:
            session = self._session
        return super().wrap_bio(
            incoming, outgoing, server_side, server_hostname, session
        )

    def keep(self, session: ssl.SSLSession | None) -> None:
        """Offer ``session`` from now on, when it can be resumed (a ticket or an id)."""
        if session is not None and (session.has_ticket or session.id):
            self._session = session


#: The shared contexts, by (host, port, CA file, its mtime and size, verify).
_CONTEXTS: dict[tuple[Any, ...], ResumingContext] = {}
_MAX_CONTEXTS = 4096  # distinct servers in one process; the oldest is dropped beyond


def server_context(
    host: str, port: int, ca_file: str | None = None, verify: bool = True
) -> ResumingContext:
    """The shared, resuming :func:`make_ssl_context` of one server (issue 18).

    A CA file that changes on disk (its mtime or size) gives a new context, read anew.
    """
    stamp: tuple[int, int] | None = None
    if ca_file is not None:
        try:
            st = os.stat(ca_file)
            stamp = (st.st_mtime_ns, st.st_size)
        except OSError:
            stamp = None  # make_ssl_context raises the real error below
    key = (host.lower(), port, ca_file, stamp, verify)
    ctx = _CONTEXTS.get(key)
    if ctx is None:
        plain = make_ssl_context(ca_file, verify=verify)
        # The very context ssl.create_default_context() made (same settings, same
        # defaults in every Python version), given the resuming wrap_bio above.
        plain.__class__ = ResumingContext
        ctx = cast(ResumingContext, plain)
        if len(_CONTEXTS) >= _MAX_CONTEXTS:
            del _CONTEXTS[next(iter(_CONTEXTS))]
        _CONTEXTS[key] = ctx
    return ctx


def keep_session(writer: asyncio.StreamWriter | None) -> None:
    """At the end of a TLS connection: let its context offer this session next time.

    Called by the drivers after the last reply (POP3 QUIT, IMAP LOGOUT), when the
    server's TLS 1.3 tickets have been read. Does nothing on a plaintext connection or
    a context not made by :func:`server_context`.
    """
    if writer is None:
        return
    sslobj = writer.get_extra_info("ssl_object")
    ctx = getattr(sslobj, "context", None)
    if isinstance(ctx, ResumingContext) and sslobj is not None:
        ctx.keep(sslobj.session)


async def handshake(
    writer: asyncio.StreamWriter,
    ctx: ssl.SSLContext,
    *,
    host: str,
    where: str,
    timeout: float,
    cert_sha256: str | None = None,
    plaintext_hint: str = "",
) -> None:
    """Upgrade ``writer`` to TLS (implicit TLS or after STARTTLS/STLS).

    Raises:
        TimeoutError: the handshake took longer than ``timeout`` (S-06); the caller
            names the phase in its own timeout error.
        SourceConnectionError: the certificate is not trusted, does not match the
            pin, or the handshake failed (``plaintext_hint`` is added when the peer
            spoke plaintext).
    """
    try:
        async with asyncio.timeout(timeout):
            await writer.start_tls(
                ctx,
                server_hostname=host,  # S-02: the configured name, also SNI
                ssl_handshake_timeout=timeout,
            )
    except TimeoutError:
        raise  # an OSError too: the caller names the phase
    except ssl.SSLCertVerificationError as exc:
        raise SourceConnectionError(
            f"TLS certificate of {where} not trusted: {exc.verify_message}"
        ) from None
    except (ssl.SSLError, OSError) as exc:
        hint = ""
        if "WRONG_VERSION_NUMBER" in str(exc) or "record layer" in str(exc):
            hint = plaintext_hint
        raise SourceConnectionError(f"TLS handshake with {where} failed: {exc}{hint}") from None
    pin = (cert_sha256 or "").replace(":", "").lower()
    if pin:
        sslobj = writer.get_extra_info("ssl_object")
        der = sslobj.getpeercert(binary_form=True) if sslobj else None
        got = hashlib.sha256(der or b"").hexdigest()
        if got != pin:
            raise SourceConnectionError(
                f"TLS certificate of {where} does not match the pinned SHA-256 (got {got})"
            )


def phase_timeout(
    phase: str, seconds: float, where: str, detail: str = ""
) -> SourceTimeoutError:
    """The timeout error of one phase (C-13, IS-11), naming the phase and the host."""
    extra = f" ({detail})" if detail else ""
    return SourceTimeoutError(f"{phase} timed out after {seconds:g}s on {where}{extra}")


async def open_stream(
    host: str, port: int, *, timeout: float, limit: int
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """Open the TCP connection of a session (TLS comes after, see :func:`secure`).

    Raises:
        SourceTimeoutError: connecting took longer than ``timeout``.
        SourceConnectionError: the connection was refused or failed.
    """
    where = f"{host}:{port}"
    try:
        async with asyncio.timeout(timeout):
            return await asyncio.open_connection(host, port, limit=limit)
    except TimeoutError:
        raise phase_timeout("connect", timeout, where) from None
    except OSError as exc:
        raise SourceConnectionError(
            f"connect to {where} failed: {exc.strerror or exc}"
        ) from None


async def secure(
    writer: asyncio.StreamWriter,
    ctx: ssl.SSLContext | None,
    *,
    host: str,
    port: int,
    timeout: float,
    cert_sha256: str | None,
    protocol: str,
) -> None:
    """TLS on an open stream (implicit TLS or after STARTTLS/STLS), see :func:`handshake`.

    Raises:
        SourceTimeoutError: the handshake took longer than ``timeout`` (S-06).
        SourceConnectionError: see :func:`handshake`.
    """
    where = f"{host}:{port}"
    try:
        await handshake(
            writer,
            ctx or make_ssl_context(),
            host=host,
            where=where,
            timeout=timeout,
            cert_sha256=cert_sha256,
            plaintext_hint=f" (the server speaks plaintext {protocol}: "
            "use security = 'starttls')",
        )
    except TimeoutError:
        raise phase_timeout("TLS handshake", timeout, where) from None


def refuse_plaintext_credentials(*, tls_active: bool, allowed: bool, where: str) -> None:
    """S-01/IS-01, RFC 2595 §2.3: no credential over a connection without TLS."""
    if not tls_active and not allowed:
        raise SourcePermanentError(
            f"refusing to send credentials to {where} without TLS "
            "(set allow_plaintext_password = true to allow it)"
        )


class ConnectionSecurity(BaseModel):
    """The connection-security keys of a mailbox table, the same for every source.

    A source's options model inherits it; ``default_port()`` gives the port for the
    chosen security (e.g. 993/143 for IMAP).
    """

    model_config = ConfigDict(extra="forbid", defer_build=True)

    security: Literal["tls", "starttls", "none"] = Field(
        default="tls",
        description="'tls': implicit TLS (RFC 8314); 'starttls': STARTTLS required; "
        "'none': plaintext (needs allow_plaintext_password to send a password).",
    )
    ca_file: Path | None = Field(
        default=None,
        description="PEM file of CA certificates to trust instead of the system store.",
    )
    cert_sha256: str | None = Field(
        default=None,
        pattern=r"^([0-9A-Fa-f]{2}:?){31}[0-9A-Fa-f]{2}$",
        description="Pin: SHA-256 of the server certificate (hex, colons allowed); "
        "checked in addition to normal verification.",
    )
    tls_verify: bool = Field(
        strict=True,
        default=True,
        description="Verify the certificate and host name; false only for tests or "
        "with a cert_sha256 pin.",
    )
    allow_plaintext_password: bool = Field(
        strict=True,
        default=False,
        validate_default=True,
        description="Allow credentials over a connection without TLS "
        "(security = 'none'); off by default (RFC 2595 §2.3).",
    )

    @field_validator("allow_plaintext_password")
    @classmethod
    def _plaintext_needs_consent(cls, allow: bool, info: ValidationInfo) -> bool:
        # RFC 2595 §2.3 / S-01: no password in clear without explicit consent.
        if info.data.get("security") == "none" and not allow:
            raise ValueError(
                "security = 'none' would send the password in clear text; use "
                "'tls' or 'starttls', or set allow_plaintext_password = true"
            )
        return allow

    def ssl_context(
        self, host: str | None = None, port: int | None = None
    ) -> ssl.SSLContext | None:
        """The verifying context for these options; None for ``security = 'none'``.

        With ``host`` and ``port``: the context shared by every mailbox of that server,
        which resumes TLS sessions (:func:`server_context`).
        """
        if self.security == "none":
            return None
        ca = str(self.ca_file) if self.ca_file else None
        if host is not None and port is not None:
            return server_context(host, port, ca, verify=self.tls_verify)
        return make_ssl_context(ca, verify=self.tls_verify)
