"""Metrics plugin and the /metrics + /healthz endpoint over real HTTP on 127.0.0.1."""

from __future__ import annotations

import asyncio
import json

from mailpipe.metrics import MetricsCollector, MetricsServer
from mailpipe.plugin_manager import Hooks, get_plugin_manager


async def _get(port: int, path: str) -> tuple[int, bytes]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    await writer.drain()
    data = await asyncio.wait_for(reader.read(), 10)
    writer.close()
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), body


async def test_metrics_count_outcomes_and_health_turns_unhealthy() -> None:
    pm = get_plugin_manager(entry_points=False)
    collector = MetricsCollector(["a", "b"], unhealthy_after=3600)
    pm.register(collector, "metrics")
    hooks = Hooks(pm)
    server = MetricsServer(collector, "127.0.0.1", 0)
    await server.start()
    try:
        hooks.session_started(mailbox="a", count=7, octets=700)
        hooks.session_finished(
            mailbox="a",
            summary={
                "retrieved": 5,
                "processed": 4,
                "failed": 1,
                "bytes": 500,
                "seconds": 0.5,
                "error": None,
            },
        )
        hooks.session_finished(
            mailbox="b",
            summary={
                "error": "AuthenticationError: no",
                "error_type": "AuthenticationError",
                "seconds": 0.1,
            },
        )
        status, body = await _get(server.port, "/metrics")
        text = body.decode()
        assert status == 200
        assert 'mailpipe_server_backlog_messages{mailbox="a"} 7.0' in text
        assert 'mailpipe_messages_total{mailbox="a",outcome="processed"} 4.0' in text
        assert 'mailpipe_retrieved_bytes_total{mailbox="a"} 500.0' in text
        assert 'mailpipe_authentication_failures_total{mailbox="b"} 1.0' in text
        status, body = await _get(server.port, "/healthz")
        assert status == 200 and json.loads(body)["healthy"] is True
        collector.unhealthy_after = 0.0  # every mailbox is now stale
        collector.last_success["a"] -= 1
        collector.started -= 1
        status, body = await _get(server.port, "/healthz")
        assert status == 503 and set(json.loads(body)["stale"]) == {"a", "b"}
        status, _ = await _get(server.port, "/nope")
        assert status == 404
    finally:
        await server.stop()
