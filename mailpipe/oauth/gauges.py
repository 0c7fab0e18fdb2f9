"""What this process's token brokers observed, for ``/metrics`` and ``/healthz``.

Brokers write here; :class:`OAuthMetrics` exposes it through the Prometheus registry
of :class:`mailpipe.metrics.MetricsCollector`. ``revoked()`` lists mailboxes whose grant
is gone (the worker reports itself unhealthy until a login fixes it).
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any


@dataclass(slots=True)
class _Board:
    lock: threading.Lock = field(default_factory=threading.Lock)
    expiry: dict[str, float] = field(default_factory=dict)  # mailbox -> unix time
    rt_risk: dict[str, float] = field(default_factory=dict)  # mailbox -> unix time
    outcomes: Counter[tuple[str, str, str]] = field(default_factory=Counter)
    revoked: dict[str, str] = field(default_factory=dict)  # mailbox -> error code


BOARD = _Board()


def token_issued(
    mailbox: str, *, expires_at: float, rt_at_risk: float | None, refreshed: bool
) -> None:
    """A token is in use for ``mailbox``; ``refreshed`` when this process fetched it."""
    with BOARD.lock:
        BOARD.expiry[mailbox] = expires_at
        if rt_at_risk is not None:
            BOARD.rt_risk[mailbox] = rt_at_risk
        BOARD.revoked.pop(mailbox, None)
        if refreshed:
            BOARD.outcomes[(mailbox, "success", "")] += 1


def refresh_failed(
    mailbox: str, *, reason: str, revoked: bool, asked: bool = True
) -> None:
    """A refresh for ``mailbox`` failed with the provider's code ``reason``;
    ``asked`` is False when no request was made (a grant already known dead)."""
    with BOARD.lock:
        if asked:
            BOARD.outcomes[(mailbox, "failure", reason)] += 1
        if revoked:
            BOARD.revoked[mailbox] = reason


def revoked() -> dict[str, str]:
    """Mailboxes whose grant is gone, with the provider's error code."""
    with BOARD.lock:
        return dict(BOARD.revoked)


def reset() -> None:
    """Forget everything (tests)."""
    with BOARD.lock:
        BOARD.expiry.clear()
        BOARD.rt_risk.clear()
        BOARD.outcomes.clear()
        BOARD.revoked.clear()


class OAuthMetrics:
    """A Prometheus custom collector over :data:`BOARD`."""

    def __init__(self, clock: Any = None) -> None:
        import time

        self._clock = clock or time.time

    def collect(self) -> Iterator[Any]:
        """Yield the three OAuth metric families."""
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        with BOARD.lock:
            expiry = dict(BOARD.expiry)
            risk = dict(BOARD.rt_risk)
            outcomes = dict(BOARD.outcomes)
        g = GaugeMetricFamily(
            "mailpipe_oauth_token_expiry_timestamp_seconds",
            "Unix time at which the mailbox's current access token expires.",
            labels=["mailbox"],
        )
        for mailbox, value in sorted(expiry.items()):
            g.add_metric([mailbox], value)
        yield g
        c = CounterMetricFamily(
            "mailpipe_oauth_refreshes",
            "Token refreshes by outcome and, for failures, the provider's error code.",
            labels=["mailbox", "outcome", "reason"],
        )
        for (mailbox, outcome, reason), n in sorted(outcomes.items()):
            c.add_metric([mailbox, outcome, reason], n)
        yield c
        r = GaugeMetricFamily(
            "mailpipe_oauth_refresh_token_at_risk_seconds",
            "Seconds until the refresh token is considered at risk (its age reaches "
            "refresh_token_max_age); negative once past.",
            labels=["mailbox"],
        )
        now = self._clock()
        for mailbox, at in sorted(risk.items()):
            r.add_metric([mailbox], at - now)
        yield r
