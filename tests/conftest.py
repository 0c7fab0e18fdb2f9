"""Shared pytest configuration: the mailpipe.testing fixtures (fake POP3, Dovecot, sinks)."""

pytest_plugins = ["mailpipe.testing.pytest_plugin"]
