""""Where is a message acknowledged?" has one answer: mailpipe/ledger.py (MP-01).

An AST scan of the core and the built-in plugins: no module but the ledger writes the
journal's delivery state, acknowledges on a session, or commits a session. Allowed
exceptions are named: the journal package itself, the source contract's dispatch
helper, the lease guard that passes calls through, and a source's own methods (a
POP3 session's ``acknowledge`` calls its ``mark_deleted``).
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
JOURNAL_WRITES = {"begin", "begin_many", "step_committed", "steps_committed", "finish",
                  "finish_many", "fail", "mark_deleted", "forget", "mark_seen",
                  "set_cursors"}
SESSION_EFFECTS = {"acknowledge", "mark_deleted", "commit", "checkpoint"}
#: (file, enclosing class) pairs allowed to pass session effects through.
PASS_THROUGH = {("mailpipe/leases.py", "LeaseGuardedSession")}


def violations(path: str, source: str) -> list[str]:
    """Calls in ``source`` (the file ``path``) that only the ledger may make."""
    found: list[str] = []

    def visit(node: ast.AST, cls: str | None) -> None:
        for child in ast.iter_child_nodes(node):
            visit(child, child.name if isinstance(child, ast.ClassDef) else cls)
        if not isinstance(node, ast.Call):
            return
        func = node.func
        if isinstance(func, ast.Name) and func.id == "acknowledge":
            if (path, cls) not in PASS_THROUGH:
                found.append(f"{path}:{node.lineno} acknowledge()")
            return
        if not isinstance(func, ast.Attribute):
            return
        receiver = ast.unparse(func.value).lower()
        if func.attr in JOURNAL_WRITES and "journal" in receiver:
            found.append(f"{path}:{node.lineno} {receiver}.{func.attr}()")
        if (func.attr in SESSION_EFFECTS and ("session" in receiver or receiver == "contract")
                and (path, cls) not in PASS_THROUGH):
            found.append(f"{path}:{node.lineno} {receiver}.{func.attr}()")

    visit(ast.parse(source), None)
    return found


def scanned() -> list[Path]:
    files = sorted((ROOT / "mailpipe").rglob("*.py")) + sorted((ROOT / "plugins").rglob("*.py"))
    skip = ("mailpipe/journal/", "mailpipe/ledger.py", "mailpipe/source.py",
            "mailpipe/testing/")
    return [p for p in files if not str(p.relative_to(ROOT)).startswith(skip)]


def test_only_the_ledger_writes_delivery_state_and_acknowledges() -> None:
    found = [v for p in scanned()
             for v in violations(str(p.relative_to(ROOT)), p.read_text())]
    assert found == []


def test_the_ledger_is_where_it_happens() -> None:
    # The scan would pass vacuously if it recognised nothing: it must see the ledger's.
    text = (ROOT / "mailpipe/ledger.py").read_text()
    found = violations("mailpipe/ledger.py", text)
    assert any(".mark_deleted()" in v for v in found)  # journal: deletions done
    assert any("session.commit()" in v for v in found)
    assert any("session.checkpoint()" in v for v in found)  # MP-06
    assert any("acknowledge()" in v for v in found)  # the contract's dispatch
    assert any(".set_cursors()" in v for v in found)  # listing cursors (MP-05)


def test_the_scan_catches_an_acknowledgement_elsewhere() -> None:
    snippet = (
        "async def f(session, refs, self):\n"
        "    await session.mark_deleted(refs)\n"
        "    self.journal.finish('b', 'u')\n"
        "    await opened.commit()\n"
    )
    found = violations("mailpipe/engine.py", snippet)
    assert len(found) == 2  # `opened` is no session by name: the guard is by name
    assert "session.mark_deleted()" in found[0] and "self.journal.finish()" in found[1]
