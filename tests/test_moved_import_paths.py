"""The public names of the modules split into mixins (journal.sqlite, journal.postgres,
store.maildir, imap.source) or by idea (parse.parser) still import from their former
home, as the same objects as in their new modules."""

from __future__ import annotations

import importlib

import pytest

MOVED = [
    ("mailpipe.journal.sqlite", "mailpipe.journal.sqlite_schema", "MIGRATIONS"),
    ("mailpipe.journal.sqlite", "mailpipe.journal.sqlite_schema", "SCHEMA_VERSION"),
    ("mailpipe.journal.sqlite", "mailpipe.journal.sqlite_leases", "lock_path"),
    ("mailpipe.journal.postgres", "mailpipe.journal.postgres_schema", "MIGRATIONS"),
    ("mailpipe.journal.postgres", "mailpipe.journal.postgres_schema", "SCHEMA_VERSION"),
    ("mailpipe.plugins.store.maildir", "mailpipe.plugins.store._maildir_keys", "MARKERS"),
    ("mailpipe.plugins.store.maildir", "mailpipe.plugins.store._maildir_keys", "key_of"),
    ("mailpipe.plugins.store.maildir", "mailpipe.plugins.store._maildir_keys",
     "file_name"),
    ("mailpipe.plugins.store.maildir", "mailpipe.plugins.store._maildir_options",
     "MaildirOptions"),
    ("mailpipe.plugins.imap.source", "mailpipe.plugins.imap.retrieval",
     "MAX_HEADER_OCTETS"),
    ("mailpipe.plugins.parse.parser", "mailpipe.plugins.parse.walk", "MAX_PARTS"),
    ("mailpipe.plugins.parse.parser", "mailpipe.plugins.parse.walk", "MAX_BODY"),
    # private, but imported from parser by the tests of issue 18's clean-up
    ("mailpipe.plugins.parse.parser", "mailpipe.plugins.parse.cleaning",
     "_clean_record"),
    ("mailpipe.plugins.parse.parser", "mailpipe.plugins.parse.cleaning", "_clean"),
    ("mailpipe.plugins.parse.parser", "mailpipe.plugins.parse.cleaning",
     "_has_surrogate"),
]


@pytest.mark.parametrize(("old", "new", "name"), MOVED)
def test_a_moved_public_name_imports_from_its_former_home(
    old: str, new: str, name: str
) -> None:
    assert getattr(importlib.import_module(old), name) is getattr(
        importlib.import_module(new), name
    )
