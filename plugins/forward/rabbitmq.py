"""forward.rabbitmq: publish each message to RabbitMQ with publisher confirms.

Commits when the broker confirms the publish (``basic.ack``): the message is persistent
(``delivery_mode=2``) and, for a durable queue, written to disk. ``mandatory`` is set,
so a message no queue would take is returned and raises TemporaryFailure instead of
vanishing.

Idempotency: RabbitMQ has no built-in de-duplication, so the forwarder cannot make a
second publish of the same key disappear. It sets ``message_id`` (and the
``X-Mailpipe-Key`` header) to ``message.key``; the journal skips this step once it has
committed, so a repeat happens only when mailpipe crashes between the broker's confirm
and the journal write, and consumers drop it by ``message_id``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

import structlog
from pydantic import BaseModel, Field, model_validator

from mailpipe.document import encode, message_document
from mailpipe.errors import TemporaryFailure
from mailpipe.message import Message
from mailpipe.processor import ProcessorContext
from mailpipe.secrets import Secret, redact

from ._broker import KEY_HEADER, BrokerOptions

if TYPE_CHECKING:
    from aio_pika.abc import (
        AbstractChannel,
        AbstractConnection,
        AbstractExchange,
    )

log = structlog.get_logger()


class RabbitmqForwardOptions(BrokerOptions):
    """Options of ``forward.rabbitmq``."""

    url: Secret = Field(
        description="AMQP URL, e.g. amqp://guest:guest@127.0.0.1:5672/ (a secret when "
        "it holds a password)."
    )
    exchange: str = Field(
        default="",
        description="Exchange to publish to (must exist); '' is the default exchange, "
        "which routes by queue name.",
    )
    routing_key: str = Field(description="Routing key (the queue name for '').")
    declare_queue: str | None = Field(
        default=None,
        description="Declare this durable queue on connect (and bind it to 'exchange' "
        "with 'routing_key' when an exchange is named).",
    )

    @model_validator(mode="after")
    def _default_exchange_routes_by_name(self) -> RabbitmqForwardOptions:
        default_exchange = not self.exchange
        if default_exchange and self.declare_queue not in (None, self.routing_key):
            raise ValueError(
                "with the default exchange, declare_queue must equal routing_key"
            )
        return self


class RabbitmqForwardProcessor:
    """Publish one persistent JSON message per mail; commits on the publisher confirm.

    Body: the message's ``mailpipe.message/1`` document (:mod:`mailpipe.document`);
    ``message_id`` is the key. Connection failures, a nack, a returned (unroutable) message and a confirm
    timeout raise TemporaryFailure; the connection is reopened for the next message.
    """

    name: ClassVar[str] = "forward.rabbitmq"
    Options: ClassVar[type[BaseModel]] = RabbitmqForwardOptions
    commits: ClassVar[bool] = True

    def __init__(
        self, options: RabbitmqForwardOptions, context: ProcessorContext
    ) -> None:
        self.options = options
        self.context = context
        self._connection: AbstractConnection | None = None
        self._channel: AbstractChannel | None = None
        self._exchange: AbstractExchange | None = None

    async def open(self) -> None:
        """Connect and open a confirming channel; nothing in dry-run."""
        if not self.context.dry_run:
            await self._target()

    async def close(self) -> None:
        """Close the channel and the connection."""
        connection, self._connection = self._connection, None
        self._channel = self._exchange = None
        if connection is not None and not connection.is_closed:
            try:
                await connection.close()
            except Exception as exc:  # closing a broken link is best effort
                log.warning("rabbitmq_close_failed", error=str(exc))

    async def _target(self) -> AbstractExchange:
        channel = self._channel
        if self._exchange is not None and channel is not None and not channel.is_closed:
            return self._exchange
        await self.close()
        import aio_pika

        try:
            connection = await aio_pika.connect(
                self.options.url.get(), timeout=self.options.timeout
            )
        except Exception as exc:
            raise TemporaryFailure(
                redact(f"{self.name}: cannot connect: {exc}")
            ) from exc
        try:
            # on_return_raises: a mandatory message that no queue takes fails publish().
            channel = await connection.channel(
                publisher_confirms=True, on_return_raises=True
            )
            if self.options.exchange:
                exchange = await channel.get_exchange(
                    self.options.exchange, ensure=True
                )
            else:
                exchange = channel.default_exchange
            if self.options.declare_queue:
                queue = await channel.declare_queue(
                    self.options.declare_queue, durable=True
                )
                if self.options.exchange:
                    await queue.bind(exchange, routing_key=self.options.routing_key)
        except Exception as exc:
            await connection.close()
            raise TemporaryFailure(
                redact(f"{self.name}: channel setup failed: {exc!r}")
            ) from exc
        self._connection, self._channel, self._exchange = connection, channel, exchange
        return exchange

    async def process(self, message: Message) -> None:
        """Publish and wait for the broker's confirm."""
        if self.context.dry_run:
            log.info("forward_skipped_dry_run", forwarder=self.name, key=message.key)
            return
        import aio_pika

        body = encode(
            message_document(message, include_raw=self.options.include_raw)
        )
        exchange = await self._target()
        amqp_message = aio_pika.Message(
            body,
            content_type="application/json",
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
            message_id=message.key,
            app_id="mailpipe",
            headers={KEY_HEADER: message.key},
        )
        try:
            await exchange.publish(
                amqp_message,
                routing_key=self.options.routing_key,
                mandatory=True,
                timeout=self.options.timeout,
            )
        except Exception as exc:
            await self.close()
            raise TemporaryFailure(
                redact(f"{self.name}: publish to {self.options.routing_key!r}: {exc!r}")
            ) from exc
        log.info(
            "message_forwarded",
            forwarder=self.name,
            key=message.key,
            routing_key=self.options.routing_key,
        )


PROCESSORS = [RabbitmqForwardProcessor]
