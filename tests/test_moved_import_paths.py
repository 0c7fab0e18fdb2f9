"""The public names of the modules split into mixins or helper modules (journal.sqlite,
journal.postgres, store.maildir, store.sqlite, imap.source), and the private ones that
tests import, still import from their former home, as the same objects as in their new
modules."""

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
    ("mailpipe.plugins.store.sqlite", "mailpipe.plugins.store._sqlite_schema",
     "MIGRATIONS"),
    ("mailpipe.plugins.store.sqlite", "mailpipe.plugins.store._sqlite_schema",
     "SCHEMA_VERSION"),
    ("mailpipe.plugins.store.sqlite", "mailpipe.plugins.store._sqlite_schema",
     "Step"),
    ("mailpipe.plugins.store.sqlite", "mailpipe.plugins.store._sqlite_schema",
     "classify"),
    ("mailpipe.plugins.store.sqlite", "mailpipe.plugins.store._sqlite_schema",
     "connect"),
    ("mailpipe.plugins.store.sqlite", "mailpipe.plugins.store._sqlite_schema",
     "migrate"),
    ("mailpipe.plugins.store.sqlite", "mailpipe.plugins.store._sqlite_schema",
     "schema_version"),
    ("mailpipe.plugins.store.sqlite", "mailpipe.plugins.store._sqlite_rows",
     "_COLUMNS"),
    ("mailpipe.plugins.store.sqlite", "mailpipe.plugins.store._sqlite_rows",
     "_UPSERT"),
]


@pytest.mark.parametrize(("old", "new", "name"), MOVED)
def test_a_moved_public_name_imports_from_its_former_home(
    old: str, new: str, name: str
) -> None:
    assert getattr(importlib.import_module(old), name) is getattr(
        importlib.import_module(new), name
    )
