"""forward.redis: append each message to a Redis stream (XADD), exactly once per key.

Idempotency: one Lua script, atomic on the server, checks the marker key
``<dedupe_prefix><stream>:<message key>``; when absent it runs ``XADD`` and sets the
marker to the new entry id (expiring after ``dedupe_ttl``; 0 keeps it forever). A
second run for the same key adds nothing and returns the first id. Within the TTL a
message therefore appears in the stream once, whatever crashes in between. (In Redis
Cluster put the stream name in ``{…}`` hash tags so both keys share a slot.)

Durability: Redis acknowledges writes in memory; the step commits when the script
returns, so configure ``appendonly yes`` with ``appendfsync always`` for the "durable
before DELE" promise, and/or set ``wait_replicas`` to wait for replicas (``WAIT``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar, Final

import structlog
from pydantic import BaseModel, Field

from mailpipe.document import encode, message_document
from mailpipe.errors import PermanentFailure, TemporaryFailure
from mailpipe.message import Message
from mailpipe.processor import ProcessorContext
from mailpipe.secrets import Secret, redact
from mailpipe.units import Duration

from ._broker import BrokerOptions

if TYPE_CHECKING:
    from redis.asyncio import Redis
    from redis.commands.core import AsyncScript

log = structlog.get_logger()

# KEYS: stream, marker. ARGV: message key, payload, marker TTL in ms (0: none),
# MAXLEN (0: none). Returns {1, id} when added, {0, id} when the key was seen.
XADD_ONCE: Final = """
local seen = redis.call('GET', KEYS[2])
if seen then return {0, seen} end
local id
if tonumber(ARGV[4]) > 0 then
  id = redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[4], '*',
                  'key', ARGV[1], 'payload', ARGV[2])
else
  id = redis.call('XADD', KEYS[1], '*', 'key', ARGV[1], 'payload', ARGV[2])
end
if tonumber(ARGV[3]) > 0 then
  redis.call('SET', KEYS[2], id, 'PX', ARGV[3])
else
  redis.call('SET', KEYS[2], id)
end
return {1, id}
"""

# Server replies that mean "busy or out of memory right now", not a broken request.
_TEMPORARY_REPLIES: Final = (
    "OOM",
    "BUSY",
    "LOADING",
    "TRYAGAIN",
    "MASTERDOWN",
    "READONLY",
)


class RedisForwardOptions(BrokerOptions):
    """Options of ``forward.redis``."""

    url: Secret = Field(
        description="Redis URL, e.g. redis://127.0.0.1:6379/0 (a secret when it holds "
        "a password)."
    )
    stream: str = Field(description="Stream key to XADD to.")
    maxlen: int = Field(
        strict=True,
        default=0,
        ge=0,
        description="Trim the stream to about this many entries (MAXLEN ~); 0 never.",
    )
    dedupe_prefix: str = Field(
        default="mailpipe:forwarded:",
        description="Prefix of the per-message marker keys that make XADD idempotent.",
    )
    dedupe_ttl: Duration = Field(
        default=30 * 86400.0,
        description="How long a marker key lives; 0 keeps it forever.",
    )
    wait_replicas: int = Field(
        strict=True,
        default=0,
        ge=0,
        description="After XADD, WAIT until this many replicas have the write.",
    )


class RedisForwardProcessor:
    """XADD one JSON document per message, at most once per key (see module docstring).

    Stream entry fields: ``key`` (the message key) and ``payload`` (the message's
    ``mailpipe.message/1`` document, see :mod:`mailpipe.document`). Connection errors, a busy
    or full server and too few replicas raise TemporaryFailure.
    """

    name: ClassVar[str] = "forward.redis"
    Options: ClassVar[type[BaseModel]] = RedisForwardOptions
    commits: ClassVar[bool] = True
    concurrent: ClassVar[bool] = True  # the client is safe for concurrent use
    idempotent: ClassVar[bool] = True  # writes are keyed by message.key

    def __init__(self, options: RedisForwardOptions, context: ProcessorContext) -> None:
        self.options = options
        self.context = context
        self._client: Redis | None = None
        self._script: AsyncScript | None = None

    def marker(self, key: str) -> str:
        """The de-duplication key of message ``key``."""
        return f"{self.options.dedupe_prefix}{self.options.stream}:{key}"

    async def open(self) -> None:
        """Connect and check the server answers; nothing in dry-run."""
        if not self.context.dry_run:
            client = self._connect()
            await self._call(client.ping())

    async def close(self) -> None:
        """Close the connection pool."""
        client, self._client = self._client, None
        self._script = None
        if client is not None:
            await client.aclose()

    def _connect(self) -> Redis:
        if self._client is None:
            import redis.asyncio

            self._client = redis.asyncio.from_url(
                self.options.url.get(),
                socket_connect_timeout=self.options.timeout,
                socket_timeout=self.options.timeout,
            )
            self._script = self._client.register_script(XADD_ONCE)
        return self._client

    async def _call(self, awaitable: Any) -> Any:
        import redis.exceptions

        try:
            return await awaitable
        except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError) as exc:
            await self.close()
            raise TemporaryFailure(redact(f"{self.name}: {exc}")) from exc
        except redis.exceptions.ResponseError as exc:
            text = redact(f"{self.name}: {exc}")
            if str(exc).startswith(_TEMPORARY_REPLIES):
                raise TemporaryFailure(text) from exc
            raise PermanentFailure(text) from exc

    async def process(self, message: Message) -> None:
        """XADD unless this key was already added; then WAIT for replicas if asked."""
        if self.context.dry_run:
            log.info("forward_skipped_dry_run", forwarder=self.name, key=message.key)
            return
        body = encode(
            message_document(message, include_raw=self.options.include_raw)
        )
        client = self._connect()
        assert self._script is not None
        added, entry_id = await self._call(
            self._script(
                keys=[self.options.stream, self.marker(message.key)],
                args=[
                    message.key,
                    body,
                    round(self.options.dedupe_ttl * 1000),
                    self.options.maxlen,
                ],
            )
        )
        if self.options.wait_replicas:
            acked = await self._call(
                client.wait(
                    self.options.wait_replicas, round(self.options.timeout * 1000)
                )
            )
            if int(acked) < self.options.wait_replicas:
                raise TemporaryFailure(
                    f"{self.name}: {acked} of {self.options.wait_replicas} replicas "
                    "acknowledged the write"
                )
        entry = entry_id.decode() if isinstance(entry_id, bytes) else str(entry_id)
        log.info(
            "message_forwarded",
            forwarder=self.name,
            key=message.key,
            stream=self.options.stream,
            entry_id=entry,
            duplicate=not added,
        )


PROCESSORS = [RedisForwardProcessor]
