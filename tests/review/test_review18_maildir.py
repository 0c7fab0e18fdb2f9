"""Review 18: store.maildir staged (O_TMPFILE) files are fsynced before they are
named in new/ (guard: no existing test fails when that fsync is removed)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

import mailpipe.plugins.store.maildir as maildir_module
from mailpipe import Message
from tests.plugins.test_store_maildir import RAW, store


def test_staged_file_is_fsynced_before_it_is_linked_into_new(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    events: list[tuple[str, object]] = []
    real_fsync, real_link = os.fsync, os.link

    def fsync(fd: int) -> None:
        events.append(("fsync", os.fstat(fd).st_ino))
        real_fsync(fd)

    def link(src, dst, *a, **kw):  # type: ignore[no-untyped-def]
        if str(src).startswith("/proc/self/fd/"):
            events.append(("link", os.fstat(int(str(src).rsplit("/", 1)[1])).st_ino))
        return real_link(src, dst, *a, **kw)

    monkeypatch.setattr(maildir_module.os, "fsync", fsync)
    monkeypatch.setattr(maildir_module.os, "link", link)
    s = store(tmp_path)
    for i in range(3):
        s.process(Message.from_bytes(RAW + b"%d\r\n" % i, uid=str(i)))
    s.flush()
    s.close()
    links = [ino for kind, ino in events if kind == "link"]
    if not links:
        pytest.skip("no O_TMPFILE linking here")
    for ino in links:
        assert events.index(("fsync", ino)) < events.index(("link", ino))
