"""forward.webhook: POST the message record as JSON to an HTTP endpoint."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import ssl
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import structlog
from pydantic import BaseModel, ConfigDict, Field, field_validator

from mailpipe import __version__
from mailpipe.document import encode, message_document
from mailpipe.errors import PermanentFailure, TemporaryFailure
from mailpipe.message import Message
from mailpipe.processor import ProcessorContext
from mailpipe.secrets import (
    Secret,
    is_credential,
    is_secret_name,
    redact,
    remember_secret,
)
from mailpipe.units import Duration

from ._retry import Backoff, cert_error, client_tls_context, retry_after

if TYPE_CHECKING:
    import httpx

log = structlog.get_logger()

SIGNATURE_HEADER = "X-Mailpipe-Signature"
# RFC 9110 §15.5.9 / RFC 6585 §4: a timeout or a rate limit; trying again later helps.
RETRYABLE_4XX = frozenset({408, 429})
_RESERVED = frozenset(
    {
        "content-type",
        "content-length",
        "idempotency-key",
        "authorization",
        SIGNATURE_HEADER.lower(),
    }
)


class WebhookForwardOptions(BaseModel):
    """Options of ``forward.webhook``."""

    model_config = ConfigDict(extra="forbid", defer_build=True)

    url: str = Field(description="Endpoint URL (http or https).")
    method: Literal["POST", "PUT", "PATCH"] = Field(
        default="POST", description="HTTP method."
    )
    headers: dict[str, str] = Field(
        default_factory=dict,
        repr=False,
        description="Extra request headers (not Content-Type, Authorization, "
        "Idempotency-Key or the signature header).",
    )
    timeout: Duration = Field(
        default=30.0, gt=0, description="Timeout of each request."
    )
    retries: int = Field(
        strict=True,
        default=3,
        ge=0,
        le=10,
        description="Further attempts within one delivery after a 5xx, 408, 429 or a "
        "connection error.",
    )
    backoff: Duration = Field(
        default=1.0, description="First delay between attempts; doubles each time."
    )
    max_backoff: Duration = Field(
        default=30.0, description="Upper bound of one delay between attempts."
    )
    include_raw: bool = Field(
        strict=True,
        default=False, description="Add the raw message, base64-encoded, as 'raw'."
    )
    attachments: Literal["none", "inline", "reference"] = Field(
        default="none",
        description="'inline' adds each attachment's content, base64-encoded, as "
        "'content_base64' to its entry in the document's 'attachments' (name, type, "
        "size and sha256 from the parse record); 'none' and 'reference' send the "
        "entries alone, to fetch the bytes from a content-addressed store.",
    )
    hmac_secret: Secret | None = Field(
        default=None,
        description="Shared secret; when set, X-Mailpipe-Signature: sha256=<hex> is the "
        "HMAC-SHA256 of the exact body bytes.",
    )
    bearer_token: Secret | None = Field(
        default=None, description="Sent as 'Authorization: Bearer <token>'."
    )
    tls_verify: bool = Field(
        strict=True,
        default=True,
        description="Verify the server certificate; false is an explicit opt-out.",
    )
    ca_file: Path | None = Field(
        default=None,
        description="PEM file of CA certificates to trust instead of the system store.",
    )

    @field_validator("url")
    @classmethod
    def _url(cls, value: str) -> str:
        import httpx  # imported when a webhook is configured, not at plugin load

        url = httpx.URL(value)
        if url.scheme not in ("http", "https") or not url.host:
            raise ValueError("expected an http:// or https:// URL with a host")
        return value

    @field_validator("headers")
    @classmethod
    def _headers(cls, value: dict[str, str]) -> dict[str, str]:
        for name, text in value.items():
            if name.lower() in _RESERVED:
                raise ValueError(f"header {name!r} is set by the forwarder")
            if any(c in name + text for c in "\r\n\0"):
                raise ValueError(f"header {name!r} contains a line break")
            if is_secret_name(name) or is_credential(text):
                remember_secret(text)  # masked in logs, like a Secret
        return value


class WebhookForwardProcessor:
    """POST one JSON document per message; commits on a 2xx answer.

    The body is the message's ``mailpipe.message/1`` document (:mod:`mailpipe.document`).
    ``Idempotency-Key`` carries the message key, so the endpoint can drop a repeat after
    a crash. 5xx, 408, 429 and connection errors are retried with bounded back-off, then
    raise TemporaryFailure; other 4xx raise PermanentFailure at once.
    """

    name: ClassVar[str] = "forward.webhook"
    Options: ClassVar[type[BaseModel]] = WebhookForwardOptions
    commits: ClassVar[bool] = True
    concurrent: ClassVar[bool] = True  # the client is safe for concurrent use

    def __init__(
        self, options: WebhookForwardOptions, context: ProcessorContext
    ) -> None:
        self.options = options
        self.context = context
        ca_file = context.resolve(options.ca_file) if options.ca_file else None
        self._tls: ssl.SSLContext = client_tls_context(
            ca_file, verify=options.tls_verify
        )
        self._client: httpx.AsyncClient | None = None

    async def open(self) -> None:
        """Create the connection pool (reused across the session's messages)."""
        if self._client is None:
            import httpx

            self._client = httpx.AsyncClient(
                verify=self._tls,
                timeout=self.options.timeout,
                follow_redirects=False,
                headers={"User-Agent": f"mailpipe/{__version__}"},
            )

    async def close(self) -> None:
        """Close the connection pool."""
        client, self._client = self._client, None
        if client is not None:
            await client.aclose()

    def body(self, message: Message) -> bytes:
        """The exact JSON bytes sent (and signed) for ``message``: its
        ``mailpipe.message/1`` document (:mod:`mailpipe.document`), each attachment's
        content inline when ``attachments = "inline"``."""
        doc = message_document(message, include_raw=self.options.include_raw)
        if self.options.attachments == "inline":
            _inline_contents(doc, message)
        return encode(doc)

    def headers(self, message: Message, body: bytes) -> dict[str, str]:
        """Request headers: extras, JSON type, Idempotency-Key, auth and signature."""
        headers = dict(self.options.headers)
        headers["Content-Type"] = "application/json"
        headers["Idempotency-Key"] = message.key
        if self.options.bearer_token is not None:
            headers["Authorization"] = f"Bearer {self.options.bearer_token.get()}"
        if self.options.hmac_secret is not None:
            headers[SIGNATURE_HEADER] = "sha256=" + sign(
                self.options.hmac_secret.get(), body
            )
        return headers

    async def process(self, message: Message) -> None:
        """Deliver one message; return once the endpoint answered 2xx."""
        o = self.options
        bound = log.bind(processor=self.name, key=message.key, uid=message.ref.uid)
        if self.context.dry_run:
            bound.info("forward_skipped", reason="dry_run", url=_safe_url(o.url))
            return
        if self._client is None:
            await self.open()
        assert self._client is not None
        body = self.body(message)
        headers = self.headers(message, body)
        delays = Backoff(retries=o.retries, base=o.backoff, cap=o.max_backoff).delays()
        attempt = 0
        while True:
            attempt += 1
            outcome, suggested = await self._attempt(body, headers)
            if outcome is None:
                bound.info(
                    "forward_sent",
                    url=_safe_url(o.url),
                    size=len(body),
                    attempts=attempt,
                )
                return
            if isinstance(outcome, PermanentFailure):
                bound.warning("forward_failed", error=str(outcome), attempts=attempt)
                raise outcome
            delay = next(delays, None)
            if delay is None:
                bound.warning("forward_deferred", error=str(outcome), attempts=attempt)
                raise outcome
            if suggested is not None:
                delay = min(max(delay, suggested), max(o.max_backoff, delay))
            bound.info(
                "forward_retrying",
                error=str(outcome),
                delay=round(delay, 3),
                attempt=attempt,
            )
            await asyncio.sleep(delay)

    async def _attempt(
        self, body: bytes, headers: dict[str, str]
    ) -> tuple[TemporaryFailure | PermanentFailure | None, float | None]:
        """One request: (None, _) when committed, else the failure and a Retry-After."""
        import httpx

        assert self._client is not None
        where = _safe_url(self.options.url)
        try:
            response = await self._client.request(
                self.options.method, self.options.url, content=body, headers=headers
            )
            await response.aread()
        except httpx.TimeoutException as exc:
            return TemporaryFailure(f"{where}: timed out ({type(exc).__name__})"), None
        except httpx.TransportError as exc:
            return TemporaryFailure(f"{where}: {_describe(exc)}"), None
        status = response.status_code
        if 200 <= status < 300:
            return None, None
        text = f"{where} answered {status} {response.reason_phrase}"
        if status >= 500 or status in RETRYABLE_4XX:
            return TemporaryFailure(text), retry_after(
                response.headers.get("Retry-After")
            )
        # 1xx/3xx are not a commit either (redirects are not followed: the body is signed
        # for one endpoint); like 4xx, retrying the same request cannot help.
        return PermanentFailure(text), None


def sign(secret: str, body: bytes) -> str:
    """Hex HMAC-SHA256 of ``body`` under ``secret`` (what X-Mailpipe-Signature carries)."""
    return hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def _safe_url(url: str) -> str:
    """The URL without user info or query (either may hold credentials)."""
    import httpx

    u = httpx.URL(url)
    return redact(str(u.copy_with(userinfo=b"", query=None, fragment=None)))


def _describe(exc: BaseException) -> str:
    bad_cert = cert_error(exc)
    if bad_cert is not None:
        detail = bad_cert.verify_message or str(bad_cert)
        return redact(f"certificate verification failed ({detail})")
    return redact(f"{type(exc).__name__}: {' '.join(str(exc).split())}")[:300]


PROCESSORS = [WebhookForwardProcessor]


def _inline_contents(doc: dict[str, Any], message: Message) -> None:
    """Add ``content_base64`` to each entry of ``doc["attachments"]`` whose bytes the
    parse step kept in memory (aligned by position with ``record.attachments``)."""
    entries = doc.get("attachments")
    payloads = message.meta.get("attachment_payloads") or []
    if not isinstance(entries, list):
        return
    for entry, payload in zip(entries, payloads, strict=False):
        if isinstance(entry, dict) and isinstance(payload, bytes | bytearray):
            entry["content_base64"] = base64.b64encode(payload).decode("ascii")
