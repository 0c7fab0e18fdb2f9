"""pytest fixtures for mailpipe: fake POP3 and IMAP servers, a real Dovecot, SMTP/HTTP sinks.

Opt in from a ``conftest.py``::

    pytest_plugins = ["mailpipe.testing.pytest_plugin"]
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from typing import TYPE_CHECKING, Any

import pytest

from .dovecot import Dovecot, DovecotUser, dovecot_unavailable_reason

if TYPE_CHECKING:
    from .imap_server import ImapServer
    from .server import Pop3Server
    from .servers import LabServer


def skip_or_fail(reason: str) -> None:
    """Skip a test whose real server or tool is missing, except in CI (env ``CI``
    set), where a missing component is a failure, never a silent skip."""
    if os.environ.get("CI"):
        pytest.fail(f"{reason} (failing because CI is set)", pytrace=False)
    pytest.skip(reason)


_skip_or_fail = skip_or_fail  # the name the fixtures below and older tests use


@pytest.fixture(scope="session")
def dovecot() -> Iterator[Dovecot]:
    """A private Dovecot on 127.0.0.1 for the whole session; see :class:`Dovecot`.

    Skips when Dovecot is not installed, fails instead when env ``CI`` is set.
    Tests create their own users (``dovecot.add_user()`` or the ``dovecot_user``
    fixture), so they never see each other's mail. Set ``MAILPIPE_KEEP_DOVECOT=1``
    to keep the base directory (logs, Maildirs) after the session.
    """
    yield from dovecot_server(imap=False)


def dovecot_server(*, imap: bool, extra_config: str = "") -> Iterator[Dovecot]:
    """Start a private Dovecot (``extra_config`` appended to its configuration), yield
    it, stop it; for fixtures. Skips, or fails in CI, when Dovecot is missing."""
    reason = dovecot_unavailable_reason(imap=imap)
    if reason is not None:
        _skip_or_fail(reason)
    # Not pytest's tmp_path: its 0700 parent would stop the mail uid reaching homes.
    base = tempfile.mkdtemp(prefix="mailpipe-dovecot-")
    server = Dovecot(base, imap=imap, extra_config=extra_config)
    try:
        server.start()
        yield server
    finally:
        server.stop()
        if not os.environ.get("MAILPIPE_KEEP_DOVECOT"):
            shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(scope="session")
def dovecot_imap() -> Iterator[Dovecot]:
    """A private Dovecot serving IMAP (and POP3) on 127.0.0.1 for the whole session.

    Like :func:`dovecot`, with ``imap_port`` (plaintext, STARTTLS) and ``imaps_port``
    (implicit TLS). Skips when Dovecot or dovecot-imapd is missing, fails when ``CI``
    is set.
    """
    yield from dovecot_server(imap=True)


@pytest.fixture(scope="session")
def lab_servers() -> Iterator[Callable[[str], LabServer]]:
    """Start interop lab servers by name (``lab_servers("courier")``); see
    :mod:`mailpipe.testing.servers`. Each starts on first use and runs until the
    session ends. A server that cannot run here skips the test, or fails it when env
    ``CI`` is set. Tests call ``load()`` first: the mailbox is shared.
    Set ``MAILPIPE_KEEP_LAB=1`` to keep the servers' directories (logs, mail).
    """
    from .servers import LabServerError, server_class

    started: dict[str, LabServer] = {}
    broken: dict[str, str] = {}

    def get(name: str) -> LabServer:
        if name in broken:
            _skip_or_fail(broken[name])
        if name not in started:
            cls = server_class(name)
            reason = cls.unavailable_reason()
            if reason is None:
                server = cls()
                try:
                    server.start()
                except LabServerError as exc:
                    server.stop()
                    if not os.environ.get("MAILPIPE_KEEP_LAB"):
                        shutil.rmtree(server.base_dir, ignore_errors=True)
                    reason = str(exc)
                else:
                    started[name] = server
            if reason is not None:
                broken[name] = reason
                _skip_or_fail(reason)
        return started[name]

    try:
        yield get
    finally:
        for server in started.values():
            server.stop()
            if not os.environ.get("MAILPIPE_KEEP_LAB"):
                shutil.rmtree(server.base_dir, ignore_errors=True)


@pytest.fixture
def dovecot_user(dovecot: Dovecot) -> DovecotUser:
    """A fresh user with an empty mailbox on the session's Dovecot."""
    return dovecot.add_user()


@pytest.fixture
def pop3_server_factory() -> Iterator[Callable[..., Pop3Server]]:
    """Start fake POP3 servers with :class:`Pop3Server` options; all stop at teardown.

    ``srv = pop3_server_factory(messages=[b"..."], faults=Faults(stall_on="RETR"))``
    """
    from .server import Pop3Server

    with ExitStack() as stack:

        def make(**options: Any) -> Pop3Server:
            return stack.enter_context(Pop3Server(**options))

        yield make


@pytest.fixture
def pop3_server(pop3_server_factory: Callable[..., Pop3Server]) -> Pop3Server:
    """A running fake POP3 server (user ``user``, password ``pass``, empty mailbox).

    Add mail with ``pop3_server.add_message(b"...")``, set faults with
    ``pop3_server.faults = Faults(...)``, and assert on ``pop3_server.transcript``.
    """
    return pop3_server_factory()


@pytest.fixture
def imap_server_factory() -> Iterator[Callable[..., ImapServer]]:
    """Start fake IMAP servers with :class:`~mailpipe.testing.imap_server.ImapServer`
    options; all stop at teardown.

    ``srv = imap_server_factory(faults=ImapFaults(bye_on="UID FETCH"), extensions=())``
    """
    from .imap_server import ImapServer

    with ExitStack() as stack:

        def make(*args: Any, **options: Any) -> ImapServer:
            return stack.enter_context(ImapServer(*args, **options))

        yield make


@pytest.fixture
def imap_server(imap_server_factory: Callable[..., ImapServer]) -> ImapServer:
    """A running fake IMAP server (user ``user``, password ``pass``, empty INBOX).

    Add mail with ``imap_server.add_message(b"...", folder="INBOX")``, set faults with
    ``imap_server.faults = ImapFaults(...)``, and assert on ``imap_server.transcript``.
    """
    return imap_server_factory()


@pytest.fixture
def smtp_sink_factory() -> Iterator[Callable[..., Any]]:
    """Start :class:`~mailpipe.testing.sinks.SmtpSink` servers with any options
    (``tls=``, ``auth=``, ``reply_code=``...); all stop at teardown."""
    from .sinks import SmtpSink

    with ExitStack() as stack:

        def make(**options: Any) -> Any:
            return stack.enter_context(SmtpSink(**options))

        yield make


@pytest.fixture
def smtp_sink(smtp_sink_factory: Callable[..., Any]) -> Any:
    """A real in-process SMTP server on 127.0.0.1 that records what it receives."""
    return smtp_sink_factory()


@pytest.fixture
def http_sink_factory() -> Iterator[Callable[..., Any]]:
    """Start :class:`~mailpipe.testing.sinks.HttpSink` servers with any options
    (``responses=``, ``tls=``...); all stop at teardown."""
    from .sinks import HttpSink

    with ExitStack() as stack:

        def make(*args: Any, **options: Any) -> Any:
            return stack.enter_context(HttpSink(*args, **options))

        yield make


@pytest.fixture
def http_sink(http_sink_factory: Callable[..., Any]) -> Any:
    """A real in-process HTTP server on 127.0.0.1 that records the requests it gets."""
    return http_sink_factory()
