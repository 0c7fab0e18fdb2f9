"""docs/conformance.md lists every requirement id the repository cites, and every test it
names exists.

Only the "## Requirement tables" section of that file is read, up to the next
second-level heading, so other sections may follow it. An id is cited by:

- a comment or a string (docstrings included) in a ``.py`` file under mailpipe/,
  plugins/, tests/ or bench/;
- a test function name, as a ``_``-separated segment: ``test_c11_total_size_cap`` cites
  C-11;
- the text of a Markdown file in docs/ (this table excepted), in bench/, or the README.

A range such as ``T-01..T-15`` cites every id in it.
"""

from __future__ import annotations

import ast
import io
import re
import tokenize
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "conformance.md"
SECTION = "## Requirement tables"
CODE_DIRS = ("mailpipe", "plugins", "tests", "bench")

#: POP3 checklist families (C, T, P, S), the IMAP checklist's (IC, IT, IP, IS), and
#: mailpipe's own delivery rules (MP).
FAMILY = r"(?:IC|IT|IP|IS|MP|C|T|P|S)"
ID = re.compile(rf"\b({FAMILY})-(\d{{2}})\b")
RANGE = re.compile(
    rf"\b({FAMILY})-(\d{{2}})\s*(?:\.\.|\u2013|\u2014)\s*(?:\1-)?(\d{{2}})\b"
)
NAME_SEGMENT = re.compile(r"(ic|it|ip|is|mp|c|t|p|s)(\d{2})")
ROW = re.compile(rf"^\|\s*({FAMILY}-\d{{2}})\s*\|")
TEST_REF = re.compile(r"`(tests/[\w/]+\.py)::([\w:]+)(?:\[[^\]`]*\])?`")
NO_TEST = "no test"


# --- what the repository cites ---------------------------------------------------------


def ids_in_text(text: str) -> set[str]:
    found = {f"{fam}-{num}" for fam, num in ID.findall(text)}
    for fam, lo, hi in RANGE.findall(text):
        found |= {f"{fam}-{n:02d}" for n in range(int(lo), int(hi) + 1)}
    return found


def ids_in_test_name(name: str) -> set[str]:
    out = set()
    for segment in name.split("_")[1:]:
        m = NAME_SEGMENT.fullmatch(segment)
        if m:
            out.add(f"{m[1].upper()}-{m[2]}")
    return out


def python_citations(path: Path) -> Iterator[tuple[str, int]]:
    """(id, line) for every id in a comment, a string or a test function name."""
    source = path.read_text(encoding="utf-8")
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type in (tokenize.COMMENT, tokenize.STRING):
            for offset, text in enumerate(tok.string.splitlines()):
                for rid in ids_in_text(text):
                    yield rid, tok.start[0] + offset
    for node in ast.walk(ast.parse(source)):
        if isinstance(
            node, ast.FunctionDef | ast.AsyncFunctionDef
        ) and node.name.startswith("test_"):
            for rid in ids_in_test_name(node.name):
                yield rid, node.lineno


def cited_ids() -> dict[str, list[str]]:
    """Every cited id → where it is cited (``path:line``)."""
    where: dict[str, list[str]] = {}

    def add(rid: str, path: Path, line: int) -> None:
        where.setdefault(rid, []).append(f"{path.relative_to(ROOT)}:{line}")

    for top in CODE_DIRS:
        for path in sorted((ROOT / top).rglob("*.py")):
            if path == Path(__file__).resolve():
                continue  # this module's own examples are not citations
            for rid, line in python_citations(path):
                add(rid, path, line)
    markdown = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    markdown += sorted((ROOT / "bench").rglob("*.md"))
    for path in markdown:
        if path == DOC or not path.is_file():
            continue
        for n, text in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            for rid in ids_in_text(text):
                add(rid, path, n)
    return where


# --- what the table says -----------------------------------------------------------------


def table_rows(text: str) -> list[tuple[str, str, str]]:
    """(family heading, id, whole row) for every row of the requirement tables."""
    lines = text.splitlines()
    try:
        start = lines.index(SECTION)
    except ValueError:
        raise AssertionError(f"{DOC.name} has no {SECTION!r} section") from None
    rows: list[tuple[str, str, str]] = []
    heading = ""
    for line in lines[start + 1 :]:
        if line.startswith("## "):
            break  # another section (e.g. the interop results) begins
        if line.startswith("### "):
            heading = line[4:]
        m = ROW.match(line)
        if m:
            rows.append((heading, m[1], line))
    return rows


def defined_tests(path: Path) -> set[str]:
    """``name`` and ``Class::name`` for every function and method defined in ``path``."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    names: set[str] = set()
    for node in tree.body:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            names.add(node.name)
        elif isinstance(node, ast.ClassDef):
            for item in node.body:
                if isinstance(item, ast.FunctionDef | ast.AsyncFunctionDef):
                    names.add(f"{node.name}::{item.name}")
    return names


@pytest.fixture(scope="module")
def rows() -> list[tuple[str, str, str]]:
    found = table_rows(DOC.read_text(encoding="utf-8"))
    assert found, f"no requirement rows found under {SECTION!r}"
    return found


# --- the checks ---------------------------------------------------------------------------


def test_every_cited_id_has_a_row(rows: list[tuple[str, str, str]]) -> None:
    documented = {rid for _, rid, _ in rows}
    cited = cited_ids()
    missing = {rid: where for rid, where in cited.items() if rid not in documented}
    assert not missing, (
        "ids cited in the repository but missing from docs/conformance.md:\n"
        + (
            "\n".join(
                f"  {rid}: {', '.join(where[:3])}"
                for rid, where in sorted(missing.items())
            )
        )
    )


def test_every_named_test_exists(rows: list[tuple[str, str, str]]) -> None:
    cache: dict[Path, set[str]] = {}
    broken: list[str] = []
    for _, rid, line in rows:
        for rel, name in TEST_REF.findall(line):
            path = ROOT / rel
            if not path.is_file():
                broken.append(f"{rid}: {rel} does not exist")
                continue
            if path not in cache:
                cache[path] = defined_tests(path)
            if name not in cache[path]:
                broken.append(f"{rid}: {rel}::{name} is not defined")
    assert not broken, (
        "docs/conformance.md names tests that do not exist:\n  " + "\n  ".join(broken)
    )


def test_rows_are_well_formed(rows: list[tuple[str, str, str]]) -> None:
    problems: list[str] = []
    seen: set[str] = set()
    for heading, rid, line in rows:
        if rid in seen:
            problems.append(f"{rid}: listed twice")
        seen.add(rid)
        family = rid.split("-")[0]
        if not heading.startswith(f"{family} "):
            problems.append(
                f"{rid}: under the heading {heading!r}, not its family {family}"
            )
        cells = [c.strip() for c in line.strip().strip("|").split(" | ")]
        if len(cells) != 4 or not all(cells):
            problems.append(
                f"{rid}: needs 4 non-empty cells (id, rule, RFC, proved by)"
            )
            continue
        if not TEST_REF.search(cells[3]) and NO_TEST not in cells[3]:
            problems.append(f"{rid}: names no test and does not say {NO_TEST!r}")
    assert not problems, "\n".join(problems)


def test_the_scanner_sees_what_the_codebase_cites() -> None:
    # The forms the code uses, so a regex change cannot silently find nothing.
    assert ids_in_text("# C-12 / T-28: EOF before the terminator") == {"C-12", "T-28"}
    assert ids_in_text("# --- C-07 / T-01..T-03: framing") == {
        "C-07",
        "T-01",
        "T-02",
        "T-03",
    }
    assert ids_in_text("SHA-256, UTF-8, P-256 and X-GOOGLE-RICO are not ids") == set()
    assert ids_in_test_name("test_t23_t24_t43_uidl_edge_cases") == {
        "T-23",
        "T-24",
        "T-43",
    }
    assert ids_in_test_name("test_mpop14_capa_token_at_end") == set()
    assert "C-60" in cited_ids()
