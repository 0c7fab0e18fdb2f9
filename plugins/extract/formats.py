"""Text out of attachment formats: PDF (pypdf), DOCX, XLSX, PPTX, ODF (zip + XML read
with linear-time patterns, no XML parser and so no entity expansion), HTML, CSV and
plain text. Every reader is bounded: a character budget that text runs enter one at a
time (taking stops when it is full), a deadline checked between pages, sheets and
archive members and every :data:`CHECK_EVERY` matches inside one, and a cap on the
octets inflated from an archive that grows with the budget (:func:`inflate_cap`).
PDF is read in a child process with a memory cap and a hard time limit
(:mod:`.worker`). Nothing here opens a file or a socket: the bytes are given."""

from __future__ import annotations

import codecs
import html as html_lib
import io
import logging
import re
import time
import zipfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Final

from mailpipe.plugins.parse.html_text import html_to_text

#: Most octets inflated from one archive whatever the budget (a zip bomb stops here).
MAX_INFLATE: Final = 64 * 2**20
#: Octets inflated from one archive per character of the budget (the XML markup
#: around the text), and the least any budget gets.
INFLATE_PER_CHAR: Final = 8
MIN_INFLATE: Final = 64 * 1024
#: Pattern matches (runs, cells, shared strings) between two deadline checks.
CHECK_EVERY: Final = 1024


def inflate_cap(max_chars: int) -> int:
    """Most octets inflated from one archive for a budget of ``max_chars``: past it
    the member being read is cut and the text marked truncated."""
    return min(MAX_INFLATE, max(max_chars * INFLATE_PER_CHAR, MIN_INFLATE))


#: Most members of one archive looked at.
MAX_MEMBERS: Final = 2000


class ExtractError(Exception):
    """The attachment could not be read (becomes a defect note, never escapes)."""


class Budget:
    """The limits of one extraction: characters left, octets an archive may still
    inflate, and a deadline."""

    def __init__(self, max_chars: int, timeout: float) -> None:
        self.left = max_chars
        self.inflate_left = inflate_cap(max_chars)
        self.deadline = time.monotonic() + timeout
        self.parts: list[str] = []
        self.truncated = False

    def check(self) -> None:
        """Raise ExtractError when the deadline passed."""
        if time.monotonic() > self.deadline:
            raise ExtractError("time limit reached")

    def add(self, text: str) -> bool:
        """Keep ``text`` (cut to what is left); False once the budget is spent."""
        self.check()
        text = text.strip()
        if not text:
            return self.left > 0
        if len(text) >= self.left:
            self.parts.append(text[: self.left])
            self.left, self.truncated = 0, True
            return False
        self.parts.append(text)
        self.left -= len(text) + 1
        return True

    def add_runs(self, runs: Iterable[str]) -> bool:
        """``add("".join(runs))``, but runs are taken one at a time and taking stops
        once the budget is full, so a huge part is never joined whole; the deadline
        is checked every :data:`CHECK_EVERY` runs. False once the budget is spent."""
        kept: list[str] = []
        size = lead = 0  # characters taken; leading blanks of the first run
        for n, run in enumerate(runs):
            if n % CHECK_EVERY == 0:
                self.check()
            if not kept:
                if not run.strip():
                    continue  # leading blanks: add() strips them
                lead = len(run) - len(run.lstrip())
            kept.append(run)
            size += len(run)
            stripped = run.rstrip()
            # what add() keeps ends at the last non-blank character taken
            if stripped and size - (len(run) - len(stripped)) - lead > self.left:
                break
        return self.add("".join(kept))

    def text(self) -> str:
        """Everything kept, one piece per line block."""
        return "\n".join(self.parts)


_TAG_TEXT: Final = {
    "docx": (re.compile(r"^word/(document|header\d*|footer\d*|footnotes|endnotes)\.xml$"),
             re.compile(r"<w:t(?:\s[^>]*)?>([^<]*)</w:t>|</w:p>|<w:tab/>|<w:br/>")),
    "pptx": (re.compile(r"^ppt/(slides/slide\d+|notesSlides/notesSlide\d+)\.xml$"),
             re.compile(r"<a:t(?:\s[^>]*)?>([^<]*)</a:t>|</a:p>")),
    "odf": (re.compile(r"^content\.xml$"),
            re.compile(r"(</text:(?:p|h)>|<text:(?:tab|line-break)\b[^>]*>)|<[^>]*>|([^<]+)")),
}
_NUM: Final = re.compile(r"(\d+)")


def _members(zf: zipfile.ZipFile, name_re: re.Pattern[str]) -> list[zipfile.ZipInfo]:
    infos = zf.infolist()[:MAX_MEMBERS]
    found = [i for i in infos if name_re.match(i.filename)]
    # slide10 after slide9: order by the numbers in the name
    return sorted(found, key=lambda i: [int(n) if n.isdigit() else n
                                        for n in _NUM.split(i.filename)])


def _read(zf: zipfile.ZipFile, info: zipfile.ZipInfo, budget: Budget,
          share: int = 1) -> str:
    """A member's text, inflated no further than the archive's cap (1/``share`` of
    what is left of it): a longer member is cut there (a partial XML part; the text
    is marked truncated) and, when it had the whole rest, no member is read after."""
    with zf.open(info) as f:
        data = f.read(budget.inflate_left // share)
    budget.inflate_left -= len(data)
    cut = len(data) < info.file_size  # zipfile yields no more than file_size
    if cut:
        budget.truncated = True
        budget.inflate_left = budget.inflate_left if share > 1 else 0
    decoder = codecs.getincrementaldecoder("utf-8")("replace")
    return str(decoder.decode(data, final=not cut))  # a cut character is dropped


def _xml_runs(xml: str, pattern: re.Pattern[str], kind: str,
              budget: Budget) -> Iterator[str]:
    """Text runs of a document part; a paragraph end yields '\\n'."""
    for n, m in enumerate(pattern.finditer(xml)):
        if n % CHECK_EVERY == 0:
            budget.check()
        token = m.group(0)
        if kind == "odf":  # group 1: a line end; group 2: text; else another tag
            if m.group(1) is not None:
                yield "\t" if "tab" in token else "\n"
            elif m.group(2) is not None:
                yield html_lib.unescape(token)
            continue
        if m.group(1) is not None:
            yield html_lib.unescape(m.group(1))
        elif token.startswith("</"):
            yield "\n"
        else:
            yield "\t" if "tab" in token else "\n"


def _office(data: bytes, budget: Budget, kind: str) -> None:
    name_re, pattern = _TAG_TEXT[kind]
    with zipfile.ZipFile(io.BytesIO(data)) as zf:
        members = _members(zf, name_re)
        if not members:
            raise ExtractError(f"no {kind} document part in the archive")
        for info in members:
            budget.check()
            if not budget.inflate_left:
                return
            xml = _read(zf, info, budget)
            if kind == "odf":  # only the body text, not styles' names
                start = xml.find("<office:body")
                xml = xml[start:] if start >= 0 else xml
            if not budget.add_runs(_xml_runs(xml, pattern, kind, budget)):
                return


_SHARED: Final = re.compile(r"<si>(.*?)</si>", re.S)
_T: Final = re.compile(r"<t(?:\s[^>]*)?>([^<]*)</t>")
#: A cell, or the end of a row (group 1 unmatched).
_CELL_OR_ROW_END: Final = re.compile(r"<c\b([^>]*?)(?:/>|>(.*?)</c>)|</row>", re.S)
_V: Final = re.compile(r"<v>([^<]*)</v>")


def _cell(attrs: str, body: str, shared: list[str]) -> str:
    if 't="s"' in attrs:
        v = _V.search(body)
        i = int(v.group(1)) if v and v.group(1).isdigit() else -1
        return shared[i] if 0 <= i < len(shared) else ""
    if 't="inlineStr"' in attrs:
        return html_lib.unescape("".join(_T.findall(body)))
    v = _V.search(body)
    return html_lib.unescape(v.group(1)) if v else ""


def _sheet_runs(xml: str, shared: list[str], budget: Budget) -> Iterator[str]:
    """A sheet's cells one at a time: a row's cells apart by tabs (empty ones
    between kept, leading and trailing ones not), rows without text skipped, rows
    apart by line ends."""
    any_row = in_row = False
    gap = 0  # empty cells since the last cell with text in this row
    for n, m in enumerate(_CELL_OR_ROW_END.finditer(xml)):
        if n % CHECK_EVERY == 0:
            budget.check()
        if m.group(1) is None:  # </row>
            in_row, gap = False, 0
            continue
        text = _cell(m.group(1), m.group(2) or "", shared)
        if not text:
            gap += 1
        elif in_row:
            yield "\t" * (gap + 1) + text
            gap = 0
        else:
            yield ("\n" if any_row else "") + text
            any_row = in_row = True
            gap = 0


def _shared_strings(xml: str, budget: Budget) -> list[str]:
    shared: list[str] = []
    for n, si in enumerate(_SHARED.finditer(xml)):
        if n % CHECK_EVERY == 0:
            budget.check()
        shared.append(html_lib.unescape("".join(_T.findall(si.group(1)))))
    return shared


def _xlsx(data: bytes, budget: Budget) -> None:
    with zipfile.ZipFile(io.BytesIO(data)) as zf:
        names = {i.filename for i in zf.infolist()[:MAX_MEMBERS]}
        shared: list[str] = []
        if "xl/sharedStrings.xml" in names:
            # at most half the cap: the sheets that refer to them get the rest
            xml = _read(zf, zf.getinfo("xl/sharedStrings.xml"), budget, share=2)
            shared = _shared_strings(xml, budget)
        sheets = _members(zf, re.compile(r"^xl/worksheets/sheet\d+\.xml$"))
        if not sheets:
            raise ExtractError("no worksheet in the archive")
        for info in sheets:
            budget.check()
            if not budget.inflate_left:
                return
            xml = _read(zf, info, budget)
            if not budget.add_runs(_sheet_runs(xml, shared, budget)):
                return


def _pdf(data: bytes, budget: Budget) -> None:
    try:
        from pypdf import PdfReader
    except ImportError as exc:
        raise ExtractError("pypdf is not installed (the `extract` extra: pip install '.[extract]')") \
            from exc
    logger = logging.getLogger("pypdf")
    level, logger.level = logger.level, logging.ERROR  # a warning per broken object
    try:
        reader = PdfReader(io.BytesIO(data), strict=False)
        if reader.is_encrypted:
            raise ExtractError("the PDF is encrypted")
        for page in reader.pages:
            budget.check()
            if not budget.add(page.extract_text() or ""):
                return
    finally:
        logger.setLevel(level)


def _decode(data: bytes) -> str:
    for bom, codec in ((b"\xef\xbb\xbf", "utf-8-sig"), (b"\xff\xfe", "utf-16"),
                       (b"\xfe\xff", "utf-16")):
        if data.startswith(bom):
            return data.decode(codec, "replace")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        from charset_normalizer import from_bytes

        best = from_bytes(data[: 1 << 20]).best()
        return str(best) if best is not None else data.decode("latin-1")


def _text(data: bytes, budget: Budget) -> None:
    budget.add(_decode(data))


def _html(data: bytes, budget: Budget) -> None:
    budget.add(html_to_text(_decode(data)))


@dataclass(frozen=True, slots=True)
class Format:
    """One readable format: its name, the MIME types and file suffixes it answers to."""

    name: str
    types: frozenset[str]
    suffixes: tuple[str, ...]
    read: Callable[[bytes, Budget], None]
    #: Read in a child process under a memory cap and a hard time limit
    #: (:mod:`.worker`): the reader has steps no budget check reaches.
    isolated: bool = False


FORMATS: Final = (
    Format("pdf", frozenset({"application/pdf", "application/x-pdf"}), (".pdf",), _pdf,
           isolated=True),
    Format("docx", frozenset({
        "application/vnd.openxmlformats-officedocument.wordprocessingml.document"}),
        (".docx", ".docm"), lambda d, b: _office(d, b, "docx")),
    Format("xlsx", frozenset({
        "application/vnd.openxmlformats-officedocument.spreadsheetml.sheet"}),
        (".xlsx", ".xlsm"), _xlsx),
    Format("pptx", frozenset({
        "application/vnd.openxmlformats-officedocument.presentationml.presentation"}),
        (".pptx", ".pptm"), lambda d, b: _office(d, b, "pptx")),
    Format("odt", frozenset({
        "application/vnd.oasis.opendocument.text",
        "application/vnd.oasis.opendocument.spreadsheet",
        "application/vnd.oasis.opendocument.presentation"}),
        (".odt", ".ods", ".odp"), lambda d, b: _office(d, b, "odf")),
    Format("html", frozenset({"text/html", "application/xhtml+xml"}),
           (".html", ".htm", ".xhtml"), _html),
    Format("csv", frozenset({"text/csv", "text/tab-separated-values"}),
           (".csv", ".tsv"), _text),
    Format("text", frozenset({"text/plain", "text/markdown"}), (".txt", ".md", ".log"),
           _text),
)
FORMAT_NAMES: Final = tuple(f.name for f in FORMATS)


def format_of(content_type: str, filename: str | None) -> Format | None:
    """The format an attachment is in, by file name first (mail clients often send
    application/octet-stream), then by MIME type."""
    name = (filename or "").lower()
    for f in FORMATS:
        if name.endswith(f.suffixes):
            return f
    for f in FORMATS:
        if content_type in f.types:
            return f
    return None


def extract(fmt: Format, data: bytes, *, max_chars: int, timeout: float,
            max_memory: int | None = None) -> tuple[str, bool]:
    """(text, truncated) of ``data``; raises ExtractError (only) when unreadable.
    An isolated format (PDF) is read in a child process whose address space is
    capped at ``max_memory`` octets (default
    :data:`~.worker.DEFAULT_MAX_MEMORY`) and which is killed at ``timeout``."""
    if fmt.isolated:
        from .worker import DEFAULT_MAX_MEMORY, run_in_child

        return run_in_child(fmt.name, data, max_chars=max_chars, timeout=timeout,
                            max_memory=max_memory or DEFAULT_MAX_MEMORY)
    return extract_here(fmt, data, max_chars=max_chars, timeout=timeout)


def extract_here(fmt: Format, data: bytes, *, max_chars: int,
                 timeout: float) -> tuple[str, bool]:
    """:func:`extract` in this process, bounded only by the budget's checks."""
    budget = Budget(max_chars, timeout)
    try:
        fmt.read(data, budget)
    except ExtractError:
        raise
    except (zipfile.BadZipFile, KeyError) as exc:
        raise ExtractError(f"not a valid {fmt.name} archive: {exc}") from exc
    except RecursionError as exc:
        raise ExtractError("nesting too deep") from exc
    except MemoryError as exc:
        raise ExtractError("out of memory") from exc
    except Exception as exc:  # a third-party reader's own error on hostile input
        raise ExtractError(f"{type(exc).__name__}: {exc}"[:300]) from exc
    return budget.text(), budget.truncated
