"""forward.nats, forward.rabbitmq and forward.redis against the real local brokers.

Servers: NATS with JetStream on 127.0.0.1:4222, RabbitMQ on 127.0.0.1:5672 (guest),
Redis on 127.0.0.1:6379. Each test uses its own stream/queue names and removes them.
Unreachable servers skip, or fail when ``CI`` is set.
"""

from __future__ import annotations

import base64
import json
import os
import socket
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from mailpipe.plugins.forward.nats import NatsForwardOptions, NatsForwardProcessor
from mailpipe.plugins.forward.rabbitmq import (
    RabbitmqForwardOptions,
    RabbitmqForwardProcessor,
)
from mailpipe.plugins.forward.redis import RedisForwardOptions, RedisForwardProcessor
from mailpipe.plugins.parse.processor import parse_into
from pydantic import ValidationError

from mailpipe import Message, ProcessorContext, TemporaryFailure
from mailpipe.plugin_manager import get_plugin_manager
from mailpipe.registry import collect

pytestmark = [pytest.mark.timeout(60), pytest.mark.services]

NATS_URL = os.environ.get("MAILPIPE_TEST_NATS", "nats://127.0.0.1:4222")
AMQP_URL = os.environ.get("MAILPIPE_TEST_AMQP", "amqp://guest:guest@127.0.0.1:5672/")
REDIS_URL = os.environ.get("MAILPIPE_TEST_REDIS", "redis://127.0.0.1:6379/0")
RAW = (
    b"From: Alice <alice@example.org>\r\n"
    b"To: tickets@example.org\r\n"
    b"Subject: printer on fire\r\n"
    b"Message-ID: <t-1@example.org>\r\n"
    b"\r\n"
    b"It is on fire.\r\n"
)


def require(url: str) -> None:
    host_port = url.split("@")[-1].split("//")[-1].split("/")[0]
    host, port = host_port.rsplit(":", 1)
    try:
        socket.create_connection((host, int(port)), timeout=3).close()
    except OSError as exc:
        reason = f"{url.split('@')[-1]} unreachable: {exc}"
        if os.environ.get("CI"):
            pytest.fail(reason)
        pytest.skip(reason)


def closed_port() -> int:
    with socket.socket() as sock:  # bound, never listening: connection refused
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def context(tmp_path: Path, dry_run: bool = False) -> ProcessorContext:
    return ProcessorContext(base_dir=tmp_path, dry_run=dry_run)


def message(uid: str = "UID-1", *, parsed: bool = True) -> Message:
    msg = Message.from_bytes(RAW, mailbox="support", uid=uid)
    if parsed:
        parse_into(msg)
    msg.tags.add("ticket")
    return msg


def check_document(doc: dict[str, Any], msg: Message, *, raw: bool = False) -> None:
    assert (doc["key"], doc["mailbox"], doc["uid"], doc["tags"]) == (
        msg.key,
        "support",
        msg.ref.uid,
        ["ticket"],
    )
    # The mailpipe.message/1 document (docs/message-document.md): flat, versioned.
    assert doc["schema"] == "mailpipe.message/1"
    assert doc["parsed"] is (msg.record is not None)
    assert doc["subject"] == "printer on fire"
    assert "stored_at" not in doc  # forwarders send the same bytes every time
    assert (base64.b64decode(doc["raw"]) if raw else doc["raw"]) == (
        RAW if raw else None
    )


# -- NATS JetStream ------------------------------------------------------------------


@pytest.fixture
async def jetstream() -> AsyncIterator[tuple[Any, str]]:
    require(NATS_URL)
    import nats

    name = f"MAILPIPE_{uuid.uuid4().hex[:10].upper()}"
    nc = await nats.connect(NATS_URL, connect_timeout=5, allow_reconnect=False)
    js = nc.jetstream(timeout=10)
    yield js, name
    try:
        await js.delete_stream(name)
    except Exception:
        pass  # the test never created it
    await nc.close()


def nats_forwarder(
    tmp_path: Path, name: str, dry_run: bool = False, **opts: Any
) -> NatsForwardProcessor:
    table = {
        "url": NATS_URL,
        "subject": f"mail.{name}",
        "stream": name,
        "create_stream": True,
        "storage": "memory",
        **opts,
    }
    options = NatsForwardOptions.model_validate(table, context={"base_dir": tmp_path})
    return NatsForwardProcessor(options, context(tmp_path, dry_run))


async def nats_messages(js: Any, name: str) -> list[Any]:
    info = await js.stream_info(name)
    return [
        await js.get_msg(name, seq)
        for seq in range(info.state.first_seq, info.state.last_seq + 1)
        if info.state.messages
    ]


async def test_nats_publishes_once_per_key(
    jetstream: tuple[Any, str], tmp_path: Path
) -> None:
    js, name = jetstream
    forwarder = nats_forwarder(tmp_path, name, include_raw=True)
    await forwarder.open()
    try:
        first = message()
        await forwarder.process(first)
        await forwarder.process(first)  # re-run after a crash: JetStream drops it
        await forwarder.process(message("UID-2"))
    finally:
        await forwarder.close()

    stored = await nats_messages(js, name)
    assert [m.headers["Nats-Msg-Id"] for m in stored] == [
        first.key,
        message("UID-2").key,
    ]
    assert stored[0].subject == f"mail.{name}"
    check_document(json.loads(stored[0].data), first, raw=True)


async def test_nats_without_a_stream_is_a_temporary_failure(
    jetstream: tuple[Any, str], tmp_path: Path
) -> None:
    _, name = jetstream
    forwarder = nats_forwarder(tmp_path, name, create_stream=False, stream=None)
    try:
        with pytest.raises(TemporaryFailure, match="publish"):
            await forwarder.process(message())
    finally:
        await forwarder.close()


async def test_nats_unreachable_is_a_temporary_failure(tmp_path: Path) -> None:
    forwarder = nats_forwarder(tmp_path, "X", url=f"nats://127.0.0.1:{closed_port()}")
    with pytest.raises(TemporaryFailure, match="cannot connect"):
        await forwarder.open()


def test_nats_create_stream_needs_a_name(tmp_path: Path) -> None:
    with pytest.raises(ValidationError, match="create_stream needs"):
        NatsForwardOptions.model_validate(
            {"url": NATS_URL, "subject": "s", "create_stream": True},
            context={"base_dir": tmp_path},
        )


# -- RabbitMQ ------------------------------------------------------------------------


@pytest.fixture
async def amqp() -> AsyncIterator[tuple[Any, str]]:
    require(AMQP_URL)
    import aio_pika

    name = f"mailpipe-test-{uuid.uuid4().hex[:10]}"
    connection = await aio_pika.connect(AMQP_URL, timeout=10)
    yield connection, name
    channel = await connection.channel()
    await channel.queue_delete(name)
    await connection.close()


def rabbit_forwarder(
    tmp_path: Path, name: str, dry_run: bool = False, **opts: Any
) -> RabbitmqForwardProcessor:
    table = {"url": AMQP_URL, "routing_key": name, "declare_queue": name, **opts}
    options = RabbitmqForwardOptions.model_validate(
        table, context={"base_dir": tmp_path}
    )
    return RabbitmqForwardProcessor(options, context(tmp_path, dry_run))


async def drain(connection: Any, name: str) -> list[Any]:
    channel = await connection.channel()
    queue = await channel.declare_queue(name, durable=True)
    got: list[Any] = []
    for _ in range(100):
        incoming = await queue.get(fail=False, no_ack=True)
        if incoming is None:
            return got
        got.append(incoming)
    raise AssertionError("queue did not drain")


async def test_rabbitmq_publishes_a_persistent_confirmed_message(
    amqp: tuple[Any, str], tmp_path: Path
) -> None:
    connection, name = amqp
    forwarder = rabbit_forwarder(tmp_path, name)
    await forwarder.open()
    try:
        msg = message(parsed=False)
        await forwarder.process(msg)
    finally:
        await forwarder.close()
    (got,) = await drain(connection, name)
    assert (got.message_id, got.delivery_mode, got.content_type) == (
        msg.key,
        2,
        "application/json",
    )
    assert got.headers["X-Mailpipe-Key"] == msg.key
    check_document(json.loads(got.body), msg)


async def test_rabbitmq_repeat_carries_the_same_message_id(
    amqp: tuple[Any, str], tmp_path: Path
) -> None:
    # RabbitMQ cannot drop a repeat (no de-duplication without a server plugin); the
    # journal prevents re-runs, and after a crash consumers de-duplicate by message_id.
    connection, name = amqp
    forwarder = rabbit_forwarder(tmp_path, name)
    try:
        msg = message()
        await forwarder.process(msg)
        await forwarder.process(msg)
        await forwarder.process(message("UID-2"))
    finally:
        await forwarder.close()
    got = await drain(connection, name)
    assert [m.message_id for m in got] == [msg.key, msg.key, message("UID-2").key]
    assert len({m.message_id for m in got}) == 2  # what a consumer keeps


async def test_rabbitmq_unroutable_message_is_a_temporary_failure(
    amqp: tuple[Any, str], tmp_path: Path
) -> None:
    _, name = amqp
    forwarder = rabbit_forwarder(
        tmp_path, name, routing_key=f"{name}-nobody", declare_queue=None
    )
    try:
        with pytest.raises(TemporaryFailure, match="publish"):
            await forwarder.process(message())
    finally:
        await forwarder.close()


async def test_rabbitmq_unreachable_is_a_temporary_failure(tmp_path: Path) -> None:
    url = f"amqp://guest:guest@127.0.0.1:{closed_port()}/"
    forwarder = rabbit_forwarder(tmp_path, "q", url=url)
    with pytest.raises(TemporaryFailure, match="cannot connect"):
        await forwarder.process(message())
    await forwarder.close()


# -- Redis streams -------------------------------------------------------------------


@pytest.fixture
async def redis_stream() -> AsyncIterator[tuple[Any, str]]:
    require(REDIS_URL)
    import redis.asyncio

    client = redis.asyncio.from_url(REDIS_URL)
    name = f"mailpipe-test-{uuid.uuid4().hex[:10]}"
    yield client, name
    markers = [k async for k in client.scan_iter(match=f"*{name}:*")]
    await client.delete(name, *markers)
    await client.aclose()


def redis_forwarder(
    tmp_path: Path, name: str, dry_run: bool = False, **opts: Any
) -> RedisForwardProcessor:
    table = {"url": REDIS_URL, "stream": name, **opts}
    options = RedisForwardOptions.model_validate(table, context={"base_dir": tmp_path})
    return RedisForwardProcessor(options, context(tmp_path, dry_run))


async def test_redis_adds_each_key_once(
    redis_stream: tuple[Any, str], tmp_path: Path
) -> None:
    client, name = redis_stream
    forwarder = redis_forwarder(tmp_path, name, include_raw=True)
    await forwarder.open()
    msg = message()
    try:
        await forwarder.process(msg)
        await forwarder.process(msg)
    finally:
        await forwarder.close()
    again = redis_forwarder(tmp_path, name)  # another worker, same key
    try:
        await again.process(msg)
        await again.process(message("UID-2"))
    finally:
        await again.close()

    entries = await client.xrange(name)
    assert [fields[b"key"].decode() for _, fields in entries] == [
        msg.key,
        message("UID-2").key,
    ]
    first_id, fields = entries[0]
    check_document(json.loads(fields[b"payload"]), msg, raw=True)
    assert await client.get(forwarder.marker(msg.key)) == first_id
    assert 0 < await client.ttl(forwarder.marker(msg.key)) <= 30 * 86400


async def test_redis_marker_without_ttl_and_trimming(
    redis_stream: tuple[Any, str], tmp_path: Path
) -> None:
    client, name = redis_stream
    forwarder = redis_forwarder(tmp_path, name, dedupe_ttl=0, maxlen=1000)
    try:
        await forwarder.process(message())
    finally:
        await forwarder.close()
    assert await client.xlen(name) == 1
    assert await client.ttl(forwarder.marker(message().key)) == -1  # never expires


async def test_redis_unreachable_is_a_temporary_failure(tmp_path: Path) -> None:
    forwarder = redis_forwarder(
        tmp_path, "s", url=f"redis://127.0.0.1:{closed_port()}/0", timeout="2s"
    )
    with pytest.raises(TemporaryFailure):
        await forwarder.process(message())
    await forwarder.close()


# -- all three -----------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["nats", "rabbitmq", "redis"])
async def test_dry_run_publishes_nothing(
    kind: str,
    tmp_path: Path,
    jetstream: tuple[Any, str],
    amqp: tuple[Any, str],
    redis_stream: tuple[Any, str],
) -> None:
    makers: dict[str, Callable[..., Any]] = {
        "nats": lambda: nats_forwarder(tmp_path, jetstream[1], dry_run=True),
        "rabbitmq": lambda: rabbit_forwarder(tmp_path, amqp[1], dry_run=True),
        "redis": lambda: redis_forwarder(tmp_path, redis_stream[1], dry_run=True),
    }
    forwarder = makers[kind]()
    await forwarder.open()
    await forwarder.process(message())
    await forwarder.close()
    from aio_pika.exceptions import ChannelNotFoundEntity
    from nats.js.errors import NotFoundError

    js, stream = jetstream
    with pytest.raises(NotFoundError):
        await js.stream_info(stream)  # not even created
    assert await redis_stream[0].exists(redis_stream[1]) == 0
    connection, queue = amqp
    with pytest.raises(ChannelNotFoundEntity):
        await (await connection.channel()).declare_queue(queue, passive=True)


def test_brokers_are_registered() -> None:
    registry = collect(get_plugin_manager(entry_points=False))
    assert registry.processor("forward.nats") is NatsForwardProcessor
    assert registry.processor("forward.rabbitmq") is RabbitmqForwardProcessor
    assert registry.processor("forward.redis") is RedisForwardProcessor
