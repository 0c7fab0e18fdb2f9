"""Hook specifications: every extension point mailpipe calls.

Theory of operation
-------------------
Hooks *find things*; plain objects do the work. Two kinds exist:

* Registration hooks (``mailpipe_register_*``) are called once per plugin manager, after
  every plugin is loaded. Each receives a ``register`` callable; a plugin calls it with
  classes. Built-ins use the very same hooks as third-party plugins.
* Event hooks (``mailpipe_<subject>_<past participle>``) only observe. Their return values
  are ignored, and they must not raise: if one does, mailpipe logs it and carries on.

When the event hooks fire, for one poll of one mailbox (a poll is one or more commit
windows; POP3 runs each in its own session ending in QUIT, IMAP runs them all on one
session, each applying its acknowledgements at once, MP-06)::

    each commit window:  mailpipe_session_started      (after the listing)
      each message:      mailpipe_message_failed       (an attempt failed)
                         mailpipe_message_quarantined  (raw bytes written)
      group commit:      mailpipe_message_done         (journal durable, before the ack)
    once, at the end:    mailpipe_session_finished     (whole-poll summary)

So ``mailpipe_session_started`` may fire several times per
``mailpipe_session_finished``, and not at all when the first connection fails. Outside
polls, ``mailpipe quarantine replay`` fires ``mailpipe_message_done`` or
``mailpipe_message_failed`` for each message it replays; ``mailpipe process`` and
``mailpipe state mark-seen`` fire none. ``docs/plugins.md`` repeats this table; a test
keeps the two in step.

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

    Called when a plugin manager's registry is collected
    (:func:`mailpipe.registry.collect`; mailpipe does it once per manager), after every
    plugin is loaded, plugin by plugin in registration order (built-ins first).

    :param register: call ``register(SourceClass)``. The class's ``name`` is what users
        write in ``source``, and its ``Options`` model validates the mailbox's other
        keys. ``register.lazy("name", "package.module:Class")`` defers the import, as
        for processors (see :func:`mailpipe_register_processors`).

    Registering a name that is already taken raises :class:`mailpipe.PluginError`.
    """


@hookspec
def mailpipe_register_processors(register: Register) -> None:
    """Register processor classes that a pipeline can name with ``{ use = ... }``.

    Called like :func:`mailpipe_register_sources`, after it.

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
    """Called once per commit window, right after that window's listing is read.

    A poll runs one commit window per ``commit_window`` messages, and each window
    lists the mailbox anew, so this fires once per window, not once per poll nor
    once per connection: POP3 opens a connection per window, IMAP runs every window
    of a poll on one connection (MP-06). It fires before anything of the window is
    retrieved. It does not fire for a connection that fails before its listing
    (connect, TLS, login, UIDL/LIST errors).

    :param mailbox: the mailbox's configured name.
    :param count: messages in this listing (all on the server now, not only the ones
        this window will take).
    :param octets: their total size per LIST.
    """


@hookspec
def mailpipe_session_finished(mailbox: str, summary: dict[str, Any]) -> None:
    """Called once per poll, after its last commit window, whatever the outcome.

    It follows the last window's commit (QUIT, LOGOUT), or the abort of a failed
    window (then ``summary["committed"]`` is False and ``summary["error"]`` says why),
    and fires even when no connection could be opened (then without any
    ``mailpipe_session_started`` before it).

    :param mailbox: the mailbox's configured name.
    :param summary: the whole poll, all windows together: ``mailbox``, ``listed``,
        ``retrieved``, ``processed``, ``dropped``, ``kept``, ``skipped``, ``failed``,
        ``quarantined``, ``deleted``, ``bytes``, ``seconds``, ``sessions`` (logins),
        ``windows`` (commit windows; more than ``sessions`` on IMAP, MP-06),
        ``committed``, ``error`` and ``error_type`` (strings or None), ``backlog`` (the latest listing's count less what the poll acknowledged away from it, or None) and ``reconciled``
        (messages adopted by content hash after an epoch change, IC-25).
    """


@hookspec
def mailpipe_message_done(mailbox: str, uid: str, key: str, disposition: str) -> None:
    """Called when a message's outcome is durable in the journal, before it is acked.

    It fires after the group commit that made the message's steps and outcome
    durable (for a decision on headers alone, right after its journal write), and
    before the acknowledgement (POP3: DELE) and the commit (QUIT) that follow, so the
    message may still be on the server. It fires for a chain that decided (or ran to
    its end), a decision on headers alone, and a message quarantined by a rule or
    after its attempts (``quarantine``). It does not fire for a failed attempt that
    will be retried, a message whose group commit failed (it runs again), nor a
    message handled for its size without the chain (deleted unread, kept, or
    quarantined: see ``mailpipe_message_quarantined``). ``mailpipe quarantine
    replay`` fires it too, once a replayed message's outcome is journaled (``done``
    or ``keep``; the next poll acknowledges it).

    :param mailbox: the mailbox's configured name.
    :param uid: the message's UIDL.
    :param key: the stable message key stores and forwarders use.
    :param disposition: ``done``, ``keep`` or ``quarantine``.
    """


@hookspec
def mailpipe_message_failed(
    mailbox: str, uid: str, key: str, processor: str, error: str, attempts: int
) -> None:
    """Called when an attempt at a message failed; the message stays on the server.

    (Unless the failure spent its last attempt: it is then quarantined, and
    ``on_quarantine`` decides about the server copy.)

    It fires when a step of the chain raised, or when the source could not deliver
    the whole message (``processor`` is then ``retrieve``), as soon as the failure is
    known. The attempt reaches the journal with the window's group commit, after this
    hook (for a message downloaded only to be quarantined for its size, just before
    it). A quarantine the failure leads to comes after: ``mailpipe_message_quarantined``
    then follows. ``mailpipe quarantine replay`` fires it for a replay that failed,
    after journaling the error, with ``attempts`` 0 (a replay counts no attempt). A
    message whose chain the process did not survive is reported at the start of the
    next poll, after its attempt is journaled, with ``processor`` ``(process died)``.

    :param mailbox: the mailbox's configured name.
    :param uid: the message's UIDL.
    :param key: the stable message key.
    :param processor: the failing step's id (``pipeline/step``), ``retrieve``, or
        ``(process died)``.
    :param error: a one-line summary of the exception (never secrets).
    :param attempts: attempts so far, this one included; a
        :class:`~mailpipe.errors.TemporaryFailure` does not count, so it repeats the
        previous number.
    """


@hookspec
def mailpipe_message_quarantined(
    mailbox: str, uid: str, key: str, reason: str, path: str
) -> None:
    """Called after a message's raw bytes were written to quarantine.

    It fires as soon as the ``.eml`` file is written: before the journal records the
    message as quarantined (in the window's group commit, or at once for a message
    quarantined for its size) and before any acknowledgement the mailbox's
    ``on_quarantine`` policy asks for. Reasons: a rule decided ``quarantine``, the
    attempts ran out, a step ran past the processing budget, or the message was over
    the size limit with ``on_oversize = "quarantine"``.

    :param mailbox: the mailbox's configured name.
    :param uid: the message's UIDL.
    :param key: the stable message key.
    :param reason: why (an error summary, a rule name, an oversize note).
    :param path: the quarantined ``.eml`` file.
    """
