"""The public names of the modules split into mixins or helper modules (journal.sqlite,
journal.postgres, store.maildir, store.sqlite, imap.source, pop3.source) or by idea
(parse.parser), and the private ones that tests import, still import from their former
home, as the same objects as in their new modules; and the cross-references in the
docstrings of moved code name objects that exist from where that code now is."""

from __future__ import annotations

import ast
import importlib
import inspect
import re
from types import ModuleType

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
    ("mailpipe.plugins.parse.parser", "mailpipe.plugins.parse.walk", "MAX_PARTS"),
    ("mailpipe.plugins.parse.parser", "mailpipe.plugins.parse.walk", "MAX_BODY"),
    # private, but imported from parser by the tests of issue 18's clean-up
    ("mailpipe.plugins.parse.parser", "mailpipe.plugins.parse.cleaning",
     "_clean_record"),
    ("mailpipe.plugins.parse.parser", "mailpipe.plugins.parse.cleaning", "_clean"),
    ("mailpipe.plugins.parse.parser", "mailpipe.plugins.parse.cleaning",
     "_has_surrogate"),
    ("mailpipe.plugins.pop3.source", "mailpipe.plugins.pop3.options", "Pop3Options"),
    ("mailpipe.testing.e2e", "mailpipe.testing.cutting_proxy", "CuttingProxy"),
    ("mailpipe.testing.e2e", "mailpipe.testing.cutting_proxy", "Cut"),
    ("mailpipe.testing.e2e", "mailpipe.testing.cutting_proxy", "ConnectionRecord"),
    # private, defined in pop3.source before its split
    ("mailpipe.plugins.pop3.source", "mailpipe.plugins.pop3.retrieval", "_Sink"),
    ("mailpipe.plugins.pop3.source", "mailpipe.plugins.pop3.retrieval", "_discard"),
]


@pytest.mark.parametrize(("old", "new", "name"), MOVED)
def test_a_moved_public_name_imports_from_its_former_home(
    old: str, new: str, name: str
) -> None:
    assert getattr(importlib.import_module(old), name) is getattr(
        importlib.import_module(new), name
    )


#: Modules whose docstrings' ``:role:`target``` references are checked.
DOCUMENTED = [
    "mailpipe.plugins.store.sqlite",
    "mailpipe.plugins.store._sqlite_schema",
    "mailpipe.plugins.store._sqlite_rows",
    "mailpipe.plugins.imap.source",
    "mailpipe.plugins.imap.listing",
    "mailpipe.plugins.imap.retrieval",
    "mailpipe.plugins.imap.acknowledgement",
    "mailpipe.plugins.imap.folder",
    "mailpipe.journal.sqlite",
    "mailpipe.journal.postgres",
    "mailpipe.plugins.store.maildir",
    "mailpipe.plugins.parse.parser",
    "mailpipe.plugins.parse.walk",
    "mailpipe.plugins.parse.cleaning",
    "mailpipe.plugins.pop3.source",
    "mailpipe.plugins.pop3.options",
    "mailpipe.plugins.pop3.retrieval",
    "mailpipe.plugins.pop3.acknowledgement",
    "mailpipe.testing.e2e",
    "mailpipe.testing.cutting_proxy",
]
_REFERENCE = re.compile(r":(?:func|data|class|meth|mod|attr):`~?([\w.]+)`")


def _resolves(module: ModuleType, owner: str | None, target: str) -> bool:
    """Whether ``target`` names an object from ``module`` (or its class ``owner``),
    as a relative module, or as an absolute dotted path."""
    if target.startswith("."):  # relative to the module's package: a module or an
        target = module.__name__.rpartition(".")[0] + target  # object in one
    parts = target.split(".")
    bases = [getattr(module, owner)] if owner else []
    if any(_walk(base, parts) for base in [*bases, module]):
        return True
    for i in range(len(parts), 0, -1):
        try:
            start = importlib.import_module(".".join(parts[:i]))
        except ImportError:
            continue
        return _walk(start, parts[i:])
    return False


def _walk(obj: object, parts: list[str]) -> bool:
    """Whether ``obj`` has the attribute path ``parts``."""
    for part in parts:
        if not hasattr(obj, part):
            return False
        obj = getattr(obj, part)
    return True


@pytest.mark.parametrize("name", DOCUMENTED)
def test_the_references_in_a_moved_modules_docstrings_resolve(name: str) -> None:
    module = importlib.import_module(name)
    tree = ast.parse(inspect.getsource(module))
    docs: list[tuple[str | None, str | None]] = [(None, ast.get_docstring(tree))]
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            docs.append((None, ast.get_docstring(node)))
        elif isinstance(node, ast.ClassDef):
            docs.append((node.name, ast.get_docstring(node)))
            docs += [
                (node.name, ast.get_docstring(method))
                for method in node.body
                if isinstance(method, (ast.FunctionDef, ast.AsyncFunctionDef))
            ]
    unresolved = [
        target
        for owner, doc in docs
        for target in _REFERENCE.findall(doc or "")
        if not _resolves(module, owner, target)
    ]
    assert unresolved == []
