"""Selection of new IMAP mail against a real Dovecot imapd on 127.0.0.1 (MP-05, IC-26).

``mailpipe run --once`` keeps mail on the server (``delete = "never"``): the second run
lists each folder only past the journal's UID watermark and fetches nothing twice;
``select = "unseen"`` takes only unseen mail and leaves its flags alone (unless the
acknowledgement is ``\\Seen``); ``since_days`` searches by INTERNALDATE; a new
UIDVALIDITY starts from no watermark.
"""

from __future__ import annotations

import imaplib
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from mailpipe.journal.sqlite import SqliteJournal
from mailpipe.testing.dovecot import Dovecot, DovecotUser
from mailpipe.testing.e2e import log_events
from mailpipe.testing.imap_reference import logged_in
from mailpipe.testing.servers.interop import mailpipe_once, stored_messages
from tests.e2e.test_imap_dovecot import crafted
from tests.e2e.test_imap_dovecot import pipeline as imap_pipeline

pytestmark = [pytest.mark.dovecot, pytest.mark.timeout(600)]


def append(
    d: Dovecot, user: DovecotUser, folder: str, raws: list[bytes], *,
    flags: str = "", days_ago: float = 0,
) -> None:
    """APPEND ``raws`` to ``folder`` (created if missing) with ``flags`` and an
    INTERNALDATE ``days_ago`` days back, by an independent client."""
    when = imaplib.Time2Internaldate(time.time() - days_ago * 86400)
    with logged_in(d.host, d.imaps_port, d.ca_file, user.name, user.password) as client:
        client.create(f'"{folder}"')
        for raw in raws:
            assert client.append(f'"{folder}"', flags, when, raw)[0] == "OK"


def filled(d: Dovecot, raws: list[bytes], **append_keys: Any) -> DovecotUser:
    """A new user whose folder ``Support`` holds ``raws``."""
    user = d.add_user()
    append(d, user, "Support", raws, **append_keys)
    return user


def pipeline(tmp_path: Path, d: Dovecot, user: DovecotUser, **mailbox: Any) -> Path:
    """The IMAP suite's pipeline (store.maildir) on folder ``Support``."""
    return imap_pipeline(tmp_path, d, user, folders=["Support"], **mailbox)


def run(config: Path) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """One ``run --once``: its summary and its ``imap_folder_listed`` events."""
    done, summary = mailpipe_once(config)
    assert done.returncode == 0, done.stderr[-3000:]
    listed = [e for e in log_events(done.stderr) if e.get("event") == "imap_folder_listed"]
    assert listed, done.stderr[-3000:]
    return summary, listed


def cursors(tmp_path: Path) -> dict[str, int]:
    journal = SqliteJournal(tmp_path / "var" / "journal.sqlite3")
    try:
        return journal.cursors("box")
    finally:
        journal.close()


def flags_of(d: Dovecot, user: DovecotUser, folder: str) -> list[str]:
    return [flags for _, flags in d.imap_messages(user, folder)]


def test_mp05_keep_mode_second_run_lists_from_the_watermark(
    dovecot_imap: Dovecot, tmp_path: Path
) -> None:
    d, raws = dovecot_imap, crafted(5)
    user = filled(d, raws[:3])
    config = pipeline(tmp_path, d, user, delete="never")
    summary, listed = run(config)
    assert summary["retrieved"] == 3, summary
    assert (listed[0]["from_uid"], listed[0]["listed"]) == (1, 3)
    [scope] = cursors(tmp_path)
    assert cursors(tmp_path)[scope] == 3
    append(d, user, "Support", raws[3:])
    summary, listed = run(config)
    assert summary["retrieved"] == 2, summary
    assert (listed[0]["from_uid"], listed[0]["listed"]) == (4, 2)
    assert all(e["from_uid"] > 1 for e in listed)
    summary, listed = run(config)
    assert summary["retrieved"] == 0, summary
    assert [(e["from_uid"], e["listed"]) for e in listed] == [(6, 0)]
    # Every message stored once, and all of them still on the server, unchanged.
    assert Counter(stored_messages(tmp_path / "Maildir")) == Counter(raws)
    assert [r for r, _ in d.imap_messages(user, "Support")] == raws
    assert all("\\Seen" not in f for f in flags_of(d, user, "Support"))


def test_mp05_select_unseen_takes_only_unseen_mail_and_leaves_it_unseen(
    dovecot_imap: Dovecot, tmp_path: Path
) -> None:
    d, raws = dovecot_imap, crafted(4)
    user = filled(d, raws[:2], flags="(\\Seen)")
    append(d, user, "Support", raws[2:])
    config = pipeline(tmp_path, d, user, delete="never", select="unseen")
    summary, listed = run(config)
    assert summary["retrieved"] == 2, summary
    assert listed[0]["search"] == "UNSEEN"
    assert Counter(stored_messages(tmp_path / "Maildir")) == Counter(raws[2:])
    # IC-30: read with BODY.PEEK, kept: the unseen mail is still unseen.
    assert ["\\Seen" in f for f in flags_of(d, user, "Support")] == [
        True, True, False, False
    ]
    summary, _ = run(config)
    assert summary["retrieved"] == 0, summary


def test_mp05_select_unseen_with_the_seen_flag_as_acknowledgement(
    dovecot_imap: Dovecot, tmp_path: Path
) -> None:
    d, raws = dovecot_imap, crafted(3)
    user = filled(d, raws[:1], flags="(\\Seen)")
    append(d, user, "Support", raws[1:])
    config = pipeline(tmp_path, d, user, select="unseen",
                      acknowledge={"flag": "\\Seen"})
    summary, _ = run(config)
    assert summary["retrieved"] == 2 and summary["deleted"] == 2, summary
    assert all("\\Seen" in f for f in flags_of(d, user, "Support"))
    assert Counter(stored_messages(tmp_path / "Maildir")) == Counter(raws[1:])
    summary, _ = run(config)
    assert summary["retrieved"] == 0, summary


def test_mp05_since_days_takes_only_recent_mail(
    dovecot_imap: Dovecot, tmp_path: Path
) -> None:
    d, raws = dovecot_imap, crafted(4)
    old, new = raws[:2], raws[2:]
    user = filled(d, old, days_ago=40)
    append(d, user, "Support", new, days_ago=1)
    config = pipeline(tmp_path, d, user, delete="never", since_days=7)
    summary, listed = run(config)
    assert summary["retrieved"] == 2, summary
    assert listed[0]["search"].startswith("SINCE ")
    assert Counter(stored_messages(tmp_path / "Maildir")) == Counter(new)


def test_mp05_new_uidvalidity_resets_the_watermark(
    dovecot_imap: Dovecot, tmp_path: Path
) -> None:
    d, raws = dovecot_imap, crafted(4)
    user = filled(d, raws[:3])
    config = pipeline(tmp_path, d, user, delete="never")
    run(config)
    [before] = cursors(tmp_path).items()
    assert before[1] == 3
    with logged_in(d.host, d.imaps_port, d.ca_file, user.name, user.password) as other:
        assert other.delete('"Support"')[0] == "OK"  # and recreated: a new UIDVALIDITY
    append(d, user, "Support", raws)
    summary, listed = run(config)
    assert listed[0]["from_uid"] == 1  # the whole folder again, under the new epoch
    # IC-25: the three processed before are adopted by content hash, one is new.
    assert summary["processed"] == 1 and summary["reconciled"] == 3, summary
    [after] = cursors(tmp_path).items()
    assert after[0] != before[0] and after[1] == 4
    assert Counter(stored_messages(tmp_path / "Maildir")) == Counter(raws)
