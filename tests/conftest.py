"""Shared pytest configuration: the mailpipe.testing fixtures (fake POP3, Dovecot, sinks)."""

from collections.abc import Iterator

import pytest

pytest_plugins = ["mailpipe.testing.pytest_plugin"]


@pytest.fixture(autouse=True)
def _isolated_secret_registry() -> Iterator[None]:
    """Each test starts with an empty redaction set (secrets are process-wide)."""
    from mailpipe.secrets import forget_secrets

    forget_secrets()
    yield
    forget_secrets()
