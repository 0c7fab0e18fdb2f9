"""forward.nats: publish each message to a NATS JetStream subject and wait for the ack.

Commits when JetStream returns its PubAck (the message is stored in the stream).
Idempotency: the ``Nats-Msg-Id`` header carries ``message.key``, so JetStream drops a
second publish of the same key within the stream's ``duplicate_window`` (the PubAck then
says ``duplicate``). A stream this forwarder creates gets ``duplicate_window`` from the
options (default one day); for an existing stream, its own window applies.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import structlog
from pydantic import BaseModel, Field, model_validator

from mailpipe.document import encode, message_document
from mailpipe.errors import TemporaryFailure
from mailpipe.message import Message
from mailpipe.processor import ProcessorContext
from mailpipe.secrets import Secret, redact
from mailpipe.units import Duration

from ._broker import KEY_HEADER, BrokerOptions

if TYPE_CHECKING:
    from nats.aio.client import Client
    from nats.js import JetStreamContext

log = structlog.get_logger()


class NatsForwardOptions(BrokerOptions):
    """Options of ``forward.nats``."""

    url: Secret = Field(
        description="Server URL, e.g. nats://127.0.0.1:4222 (may hold credentials)."
    )
    subject: str = Field(description="Subject to publish to; a stream must bind it.")
    stream: str | None = Field(
        default=None,
        description="Expected stream name (JetStream rejects the publish if the "
        "subject is bound to another stream).",
    )
    create_stream: bool = Field(
        strict=True,
        default=False,
        description="Create 'stream' (bound to 'subject', file storage) when missing.",
    )
    storage: Literal["file", "memory"] = Field(
        default="file", description="Storage of a stream this forwarder creates."
    )
    duplicate_window: Duration = Field(
        default=86400.0,
        description="De-duplication window of a stream this forwarder creates.",
    )

    @model_validator(mode="after")
    def _stream_named(self) -> NatsForwardOptions:
        if self.create_stream and not self.stream:
            raise ValueError("create_stream needs 'stream'")
        return self


class NatsForwardProcessor:
    """Publish one JSON document per message to JetStream; commits on the PubAck.

    Body: the message's ``mailpipe.message/1`` document (:mod:`mailpipe.document`).
    Connection failures,
    a missing stream and ack timeouts raise TemporaryFailure.
    """

    name: ClassVar[str] = "forward.nats"
    Options: ClassVar[type[BaseModel]] = NatsForwardOptions
    commits: ClassVar[bool] = True
    concurrent: ClassVar[bool] = True  # the client is safe for concurrent use
    idempotent: ClassVar[bool] = True  # writes are keyed by message.key

    def __init__(self, options: NatsForwardOptions, context: ProcessorContext) -> None:
        self.options = options
        self.context = context
        self._nc: Client | None = None
        self._js: JetStreamContext | None = None

    async def open(self) -> None:
        """Connect (and create the stream when asked); nothing in dry-run."""
        if not self.context.dry_run:
            await self._jetstream()

    async def close(self) -> None:
        """Drain and close the connection."""
        nc, self._nc, self._js = self._nc, None, None
        if nc is not None and not nc.is_closed:
            try:
                await nc.close()
            except Exception as exc:  # closing a broken link is best effort
                log.warning("nats_close_failed", error=str(exc))

    async def _jetstream(self) -> JetStreamContext:
        if self._js is not None and self._nc is not None and self._nc.is_connected:
            return self._js
        await self.close()
        import nats

        timeout = self.options.timeout
        try:
            # nats-py retries the first connect per max_reconnect_attempts (default:
            # 60 x 2 s); one retry, and an overall bound, keep a dead server cheap.
            nc = await asyncio.wait_for(
                nats.connect(
                    servers=[self.options.url.get()],
                    connect_timeout=max(1, round(timeout)),
                    allow_reconnect=False,
                    max_reconnect_attempts=1,
                    reconnect_time_wait=0.2,
                    error_cb=self._on_error,
                ),
                timeout=2 * timeout + 1,
            )
        except Exception as exc:
            raise TemporaryFailure(
                redact(f"{self.name}: cannot connect: {exc}")
            ) from exc
        js = nc.jetstream(timeout=timeout)
        try:
            if self.options.create_stream:
                await self._ensure_stream(js)
        except Exception as exc:
            await nc.close()
            raise TemporaryFailure(f"{self.name}: stream setup failed: {exc}") from exc
        self._nc, self._js = nc, js
        return js

    async def _ensure_stream(self, js: JetStreamContext) -> None:
        from nats.js.api import StorageType, StreamConfig
        from nats.js.errors import NotFoundError

        assert self.options.stream is not None
        try:
            await js.stream_info(self.options.stream)
            return
        except NotFoundError:
            pass
        await js.add_stream(
            StreamConfig(
                name=self.options.stream,
                subjects=[self.options.subject],
                storage=StorageType(self.options.storage),
                duplicate_window=self.options.duplicate_window,
            )
        )
        log.info("nats_stream_created", stream=self.options.stream)

    async def _on_error(self, exc: Exception) -> None:
        log.warning("nats_connection_error", error=redact(str(exc)))

    async def process(self, message: Message) -> None:
        """Publish and wait for the PubAck; a duplicate ack counts as delivered."""
        if self.context.dry_run:
            log.info("forward_skipped_dry_run", forwarder=self.name, key=message.key)
            return
        body = encode(
            message_document(message, include_raw=self.options.include_raw)
        )
        js = await self._jetstream()
        headers: dict[str, Any] = {"Nats-Msg-Id": message.key, KEY_HEADER: message.key}
        try:
            ack = await js.publish(
                self.options.subject,
                body,
                timeout=self.options.timeout,
                stream=self.options.stream,
                headers=headers,
            )
        except Exception as exc:
            await self.close()  # reconnect on the next message
            raise TemporaryFailure(
                redact(f"{self.name}: publish to {self.options.subject!r}: {exc!r}")
            ) from exc
        log.info(
            "message_forwarded",
            forwarder=self.name,
            key=message.key,
            stream=ack.stream,
            seq=ack.seq,
            duplicate=bool(ack.duplicate),
        )


PROCESSORS = [NatsForwardProcessor]
