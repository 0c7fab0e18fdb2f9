"""Scoring a reply extractor on a labelled set (``tests/data/reply/labelled.jsonl``
format: one JSON object per line with ``lang``, ``raw`` and ``expected``)."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from mailpipe.plugins.parse import parse_message
from mailpipe.plugins.parse.record import MessageRecord

#: An extractor: a parsed record in, the reply text out.
Extractor = Callable[[MessageRecord], str]


@dataclass
class Score:
    """Counts for one language.

    ``exact``: messages whose reply equals the expected text (whitespace-normalised);
    ``line_precision``: of all non-blank lines extracted, the share that belong to
    the expected reply (quoted history or signature kept lowers it);
    ``line_recall``: of the expected lines, the share extracted.
    """

    total: int = 0
    exact: int = 0
    lines_out: int = 0
    lines_right: int = 0
    lines_expected: int = 0
    lines_found: int = 0
    misses: list[str] = field(default_factory=list)

    @property
    def accuracy(self) -> float:
        """Exact-match accuracy: exact matches over messages (``total`` of them)."""
        return self.exact / self.total if self.total else 0.0

    @property
    def line_precision(self) -> float:
        """Right lines over extracted lines."""
        return self.lines_right / self.lines_out if self.lines_out else 1.0

    @property
    def line_recall(self) -> float:
        """Expected lines found over expected lines."""
        return self.lines_found / self.lines_expected if self.lines_expected else 1.0


def _lines(text: str) -> list[str]:
    return [" ".join(line.split()) for line in text.splitlines() if line.strip()]


def load(path: Path) -> list[dict[str, str]]:
    """Read a labelled set."""
    with path.open(encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def score(rows: Iterable[dict[str, str]], extract: Extractor) -> dict[str, Score]:
    """Score ``extract`` per language; an exception counts as an empty reply."""
    out: dict[str, Score] = {}
    for row in rows:
        record, _ = parse_message(row["raw"].encode("utf-8"))
        try:
            got = extract(record) or ""
        except Exception:
            got = ""
        s = out.setdefault(row["lang"], Score())
        s.total += 1
        want = _lines(row["expected"])
        have = _lines(got)
        if have == want:
            s.exact += 1
        else:
            s.misses.append(row.get("id", "?"))
        s.lines_out += len(have)
        s.lines_right += sum(1 for line in have if line in want)
        s.lines_expected += len(want)
        s.lines_found += sum(1 for line in want if line in have)
    return out
