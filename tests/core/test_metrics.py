"""Metrics plugin and the /metrics + /healthz endpoint over real HTTP on 127.0.0.1."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from mailpipe.metrics import MetricsCollector, MetricsServer
from mailpipe.oauth import gauges
from mailpipe.plugin_manager import Hooks, get_plugin_manager


async def _get(port: int, path: str) -> tuple[int, bytes]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    await writer.drain()
    data = await asyncio.wait_for(reader.read(), 10)
    writer.close()
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), body


async def _served(mailboxes: list[str]) -> tuple[Hooks, MetricsServer]:
    """A collector for ``mailboxes`` registered on a fresh plugin manager, served."""
    pm = get_plugin_manager(entry_points=False)
    collector = MetricsCollector(mailboxes, unhealthy_after=3600)
    pm.register(collector, "metrics")
    server = MetricsServer(collector, "127.0.0.1", 0)
    await server.start()
    return Hooks(pm), server


async def test_metrics_count_outcomes_and_health_turns_unhealthy() -> None:
    hooks, server = await _served(["a", "b"])
    collector = server.collector
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


# --- `mailpipe healthcheck` (the container HEALTHCHECK) ------------------------------


def test_healthz_url_reaches_a_wildcard_listener_on_loopback() -> None:
    from mailpipe.metrics import healthz_url

    assert healthz_url("0.0.0.0:9108") == "http://127.0.0.1:9108/healthz"
    assert healthz_url("[::]:9108") == "http://[::1]:9108/healthz"
    assert healthz_url("127.0.0.1:1") == "http://127.0.0.1:1/healthz"
    assert healthz_url("[::1]:9108") == "http://[::1]:9108/healthz"
    assert healthz_url("mailpipe:80") == "http://mailpipe:80/healthz"


def _healthcheck(config: Path) -> tuple[int, str]:
    from click.testing import CliRunner

    from mailpipe.cli import cli

    result = CliRunner().invoke(cli, ["healthcheck", str(config), "--timeout", "5"])
    return result.exit_code, result.output


async def test_healthcheck_follows_healthz_of_a_running_server(tmp_path: Path) -> None:
    collector = MetricsCollector(["a"], unhealthy_after=3600)
    server = MetricsServer(collector, "127.0.0.1", 0)
    await server.start()
    config = tmp_path / "pipeline.toml"
    config.write_text(f'[metrics]\nlisten = "0.0.0.0:{server.port}"\n')
    try:
        code, out = await asyncio.to_thread(_healthcheck, config)
        assert code == 0, out
        assert f"http://127.0.0.1:{server.port}/healthz: 200" in out
        collector.unhealthy_after = 0.001
        await asyncio.sleep(0.01)
        code, out = await asyncio.to_thread(_healthcheck, config)
        assert code == 1, out
        assert ": 503 " in out and '"a"' in out
    finally:
        await server.stop()
    code, out = await asyncio.to_thread(_healthcheck, config)  # nobody listens now
    assert code == 1, out


def test_healthcheck_passes_without_metrics_and_refuses_a_bad_config(
    tmp_path: Path,
) -> None:
    config = tmp_path / "pipeline.toml"
    config.write_text('[state]\npath = "x.sqlite3"\n')
    code, out = _healthcheck(config)
    assert (code, "metrics off" in out) == (0, True), out
    config.write_text('[metrics]\nlisten = "no port"\n')
    # 1, never 2: Docker reserves exit 2 of a HEALTHCHECK command (review finding)
    assert _healthcheck(config)[0] == 1
    assert _healthcheck(tmp_path / "missing.toml")[0] == 1


async def test_healthcheck_never_goes_through_an_http_proxy(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Review finding: container engines pass http_proxy into containers; a loopback
    probe through it made a healthy worker look unhealthy."""
    monkeypatch.setenv("http_proxy", "http://127.0.0.1:9")
    monkeypatch.setenv("HTTP_PROXY", "http://127.0.0.1:9")
    collector = MetricsCollector(["a"], unhealthy_after=3600)
    server = MetricsServer(collector, "127.0.0.1", 0)
    await server.start()
    config = tmp_path / "pipeline.toml"
    config.write_text(f'[metrics]\nlisten = "127.0.0.1:{server.port}"\n')
    try:
        code, out = await asyncio.to_thread(_healthcheck, config)
    finally:
        await server.stop()
    assert code == 0, out


async def test_revoked_grant_makes_healthz_unhealthy_and_metrics_show_it() -> None:
    hooks, server = await _served(["a", "b"])
    try:
        for mailbox in ("a", "b"):
            hooks.session_finished(mailbox=mailbox, summary={"seconds": 0.1})
        gauges.token_issued("a", expires_at=2e9, rt_at_risk=None, refreshed=True)
        assert (await _get(server.port, "/healthz"))[0] == 200
        gauges.refresh_failed("b", reason="invalid_grant", revoked=True)
        hooks.session_finished(
            mailbox="b", summary={"error": "grant refused", "error_type": "GrantRevoked"}
        )
        status, body = await _get(server.port, "/healthz")
        assert status == 503
        assert json.loads(body)["oauth_revoked"] == {"b": "invalid_grant"}
        _, text = await _get(server.port, "/metrics")
        metrics = text.decode()
        assert 'mailpipe_oauth_token_expiry_timestamp_seconds{mailbox="a"} 2e+09' in metrics
        assert ('mailpipe_oauth_refreshes_total{mailbox="b",outcome="failure",'
                'reason="invalid_grant"} 1.0') in metrics
        assert ('mailpipe_oauth_refreshes_total{mailbox="a",outcome="success",'
                'reason=""} 1.0') in metrics
        assert 'mailpipe_authentication_failures_total{mailbox="b"} 1.0' in metrics
        hooks.session_finished(  # a cache_key that does not open the entry
            mailbox="b", summary={"error": "cache_key", "error_type": "SealError"}
        )
        _, text = await _get(server.port, "/metrics")
        assert 'mailpipe_authentication_failures_total{mailbox="b"} 2.0' in text.decode()
        gauges.token_issued("b", expires_at=2e9, rt_at_risk=None, refreshed=True)
        assert (await _get(server.port, "/healthz"))[0] == 200  # after a new login
    finally:
        await server.stop()
        gauges.reset()


def test_next_poll_comes_from_the_journal_at_each_scrape(tmp_path: Path) -> None:
    from datetime import UTC, datetime

    from mailpipe.journal import open_journal
    from mailpipe.journal.base import PollRecord

    journal = open_journal(str(tmp_path / "state.db"), base_dir=tmp_path)
    try:
        collector = MetricsCollector(["a", "b"], unhealthy_after=60, polls=journal.polls)
        planned = datetime(2030, 1, 1, tzinfo=UTC)
        journal.record_poll("a", owner="w:1", next_poll=planned)
        text = collector.render().decode()
        [line] = [
            x for x in text.splitlines()
            if x.startswith('mailpipe_next_poll_timestamp_seconds{mailbox="a"}')
        ]
        assert float(line.split()[-1]) == planned.timestamp()
        assert 'mailpipe_next_poll_timestamp_seconds{mailbox="b"}' not in text
        # `run --once` plans none: the series goes away
        journal.record_poll("a", owner="w:1", next_poll=None)
        text = collector.render().decode()
        assert 'mailpipe_next_poll_timestamp_seconds{mailbox="a"}' not in text
    finally:
        journal.close()
    # an unreadable journal keeps the scrape working
    def broken() -> dict[str, PollRecord]:
        raise OSError("gone")

    collector = MetricsCollector(["a"], unhealthy_after=60, polls=broken)
    assert b"mailpipe_poll_interval_seconds" in collector.render()
