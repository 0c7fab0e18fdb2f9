"""Hook specifications: every extension point mailpipe calls.

Theory of operation
-------------------
Hooks *find things*; plain objects do the work. Two kinds exist:

* Registration hooks (``mailpipe_register_*``) are called once per plugin manager, after
  every plugin is loaded. Each receives a ``register`` callable; a plugin calls it with
  classes. Built-ins use the very same hooks as third-party plugins.
* Event hooks (``mailpipe_<subject>_<past participle>``) only observe. Their return values
  are ignored, and they must not raise: if one does, mailpipe logs it and carries on.

The processor chain is an explicit ordered list from the config, never pluggy's call
order. Hooks only ever gain keyword arguments (pluggy lets an implementation accept a
subset of a spec's arguments), so adding one stays compatible.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pluggy

if TYPE_CHECKING:
    from mailpipe.registry import Register

hookspec = pluggy.HookspecMarker("mailpipe")
hookimpl = pluggy.HookimplMarker("mailpipe")


# --- Registration hooks: called once, after all plugins are loaded ------------------


@hookspec
def mailpipe_register_sources(register: Register) -> None:
    """Register source classes that a mailbox can name with ``source = ...``.

    :param register: call ``register(SourceClass)``. The class's ``name`` is what users
        write in ``source``, and its ``Options`` model validates the mailbox's other keys.
        ``register.lazy("name", "package.module:Class")`` defers the import (see below).

    Registering a name that is already taken raises :class:`mailpipe.PluginError`.
    """


@hookspec
def mailpipe_register_processors(register: Register) -> None:
    """Register processor classes that a pipeline can name with ``{ use = ... }``.

    :param register: call ``register(ProcessorClass)``. The class's ``name`` is what users
        write in ``use``, and its ``Options`` model validates the rest of the table.
        ``register.lazy("name", "package.module:Class")`` registers the name without
        importing the module until a configuration uses it (the built-ins do this, so
        a plugin with many processors costs nothing at start-up); the class is checked
        then, and its ``name`` must match.

    Registering a name that is already taken raises :class:`mailpipe.PluginError`.
    """


# --- Event hooks: observe only; return values ignored; must not raise ---------------


@hookspec
def mailpipe_session_started(mailbox: str, count: int, octets: int) -> None:
    """Called once per poll, after the message list (UIDL + LIST) is known.

    :param mailbox: the mailbox's configured name.
    :param count: messages on the server.
    :param octets: their total size per LIST.
    """


@hookspec
def mailpipe_session_finished(mailbox: str, summary: dict[str, Any]) -> None:
    """Called after QUIT, or after an abort (then ``summary["committed"]`` is False).

    :param mailbox: the mailbox's configured name.
    :param summary: counts (retrieved, processed, dropped, kept, failed, quarantined,
        deleted, bytes, seconds), ``committed`` and ``error`` (a string or None).
    """


@hookspec
def mailpipe_message_done(mailbox: str, uid: str, key: str, disposition: str) -> None:
    """Called when a message's chain has finished and its steps are durable.

    :param mailbox: the mailbox's configured name.
    :param uid: the message's UIDL.
    :param key: the stable message key stores and forwarders use.
    :param disposition: ``done``, ``keep`` or ``quarantine``.
    """


@hookspec
def mailpipe_message_failed(
    mailbox: str, uid: str, key: str, processor: str, error: str, attempts: int
) -> None:
    """Called when a processor raised; the message stays on the server.

    :param mailbox: the mailbox's configured name.
    :param uid: the message's UIDL.
    :param key: the stable message key.
    :param processor: the failing step's name.
    :param error: a one-line summary of the exception (never secrets).
    :param attempts: attempts so far, this one included.
    """


@hookspec
def mailpipe_message_quarantined(
    mailbox: str, uid: str, key: str, reason: str, path: str
) -> None:
    """Called after a message's raw bytes were written to quarantine.

    :param mailbox: the mailbox's configured name.
    :param uid: the message's UIDL.
    :param key: the stable message key.
    :param reason: why (an error summary, a rule name, an oversize note).
    :param path: the quarantined ``.eml`` file.
    """
