"""Fixtures of the OAuth tests: a local authorization server, a movable clock."""

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pydantic import TypeAdapter

from mailpipe.oauth import gauges, pool
from mailpipe.oauth.options import AnyOAuth, OAuthOptions
from mailpipe.oauth.sealing import new_key
from mailpipe.testing.authserver import AuthServer


class Clock:
    """A clock the test moves; shared by the client side and the server."""

    def __init__(self) -> None:
        self.now = 1_800_000_000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def auth_server(tmp_path: Path, clock: Clock) -> Iterator[AuthServer]:
    """Clients: ``app`` (secret ``app-secret``), ``pub`` (public), ``certapp``
    (certificate), ``sa@example.iam`` (a Google service account)."""
    server = AuthServer(
        clients={
            "app": "app-secret",
            "pub": None,
            "certapp": "cert",
            "sa@example.iam": "cert",
        },
        clock=clock,
        app_user="shared",
        directory=tmp_path,
    )
    with server:
        yield server


@pytest.fixture
def cache_key() -> str:
    return new_key()


@pytest.fixture(autouse=True)
def _fresh_oauth_state() -> Iterator[None]:
    gauges.reset()
    yield
    pool.close_all()
    gauges.reset()


def oauth(
    table: dict[str, Any], *, state: Path | None = None, base_dir: Path | None = None
) -> AnyOAuth:
    """Validate an ``oauth`` table as the config loader does."""
    ctx: dict[str, str] = {}
    if state is not None:
        ctx["state_path"] = str(state)
    if base_dir is not None:
        ctx["base_dir"] = str(base_dir)
    result: AnyOAuth = TypeAdapter(OAuthOptions).validate_python(table, context=ctx)
    return result
