"""Delivery proof 8d: keep mode over three polls with new mail arriving in between.

Against a real Dovecot, mail is left on the server either by the mailbox policy
(``delete = "never"``) or by the pipeline (``on_complete = "keep"``). Each poll runs
``mailpipe run --once``; new mail is delivered before the next. Every message is
processed exactly once (counted by a forward step that logs each invocation), stored
once, and stays on the server.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from mailpipe.journal.base import Status
from mailpipe.testing.dovecot import Dovecot
from mailpipe.testing.e2e import (
    delivery_message,
    journal_entries,
    key_log_step,
    line_counts,
    maildir_key_numbers,
    maildir_numbers,
    run_mailpipe,
    server_numbers,
    sqlite_numbers,
    store_steps,
    write_pipeline,
)

pytestmark = [pytest.mark.dovecot, pytest.mark.slow, pytest.mark.timeout(600)]

BATCH = 40
POLLS = 3

MODES: dict[str, dict[str, Any]] = {
    "delete_never": {"mailbox": {"delete": "never"}},
    "on_complete_keep": {"pipeline": {"on_complete": "keep"}},
}


@pytest.mark.parametrize("mode", list(MODES))
def test_keep_mode_processes_each_message_exactly_once(
    dovecot: Dovecot, tmp_path: Path, mode: str
) -> None:
    user = dovecot.add_user()
    out = tmp_path / "out"
    keylog = tmp_path / "forwarded.log"
    config = write_pipeline(
        tmp_path,
        dovecot=dovecot,
        user=user,
        processors=[*store_steps(out), key_log_step(keylog)],
        **MODES[mode],
    )
    journal = tmp_path / "var" / "journal.sqlite3"
    delivered = 0
    for poll in range(POLLS):
        for n in range(delivered, delivered + BATCH):
            dovecot.deliver(user, delivery_message(n))
        delivered += BATCH
        run = run_mailpipe(config, "run", "{config}", "--once")
        assert run.returncode == 0, f"poll {poll}:\n{run.stderr[-3000:]}"

        everything = Counter(range(delivered))
        assert server_numbers(dovecot, user) == everything  # nothing deleted
        assert maildir_numbers(out / "maildir") == everything
        assert sqlite_numbers(out / "store.sqlite3") == everything
        keys = maildir_key_numbers(out / "maildir")
        forwarded = line_counts(keylog)
        assert set(forwarded) == set(keys), f"poll {poll}: not all processed"
        assert set(forwarded.values()) == {1}, f"poll {poll}: processed twice"
        entries = journal_entries(journal)
        assert len(entries) == delivered
        expected = Status.KEPT if mode == "on_complete_keep" else Status.COMMITTED
        assert {(e.status, e.delete_due) for e in entries} == {(expected, False)}
        assert {e.key for e in entries} == set(keys)
