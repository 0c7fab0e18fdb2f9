"""Text out of attachment formats: PDF (pypdf), DOCX, XLSX, PPTX, ODF (zip + XML read
with linear-time patterns, no XML parser and so no entity expansion), HTML, CSV and
plain text. Every reader is bounded: a character budget, a deadline checked between
pages, sheets and archive members, and a cap on the octets inflated from an archive.
Nothing here opens a file or a socket: the bytes are given."""

from __future__ import annotations

import html as html_lib
import io
import logging
import re
import time
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Final

from mailpipe.plugins.parse.html_text import html_to_text

#: Most octets inflated from one archive (a zip bomb stops here).
MAX_INFLATE: Final = 64 * 2**20
#: Most members of one archive looked at.
MAX_MEMBERS: Final = 2000


class ExtractError(Exception):
    """The attachment could not be read (becomes a defect note, never escapes)."""


class Budget:
    """The limits of one extraction: characters left and a deadline."""

    def __init__(self, max_chars: int, timeout: float) -> None:
        self.left = max_chars
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


def _read(zf: zipfile.ZipFile, info: zipfile.ZipInfo, used: list[int]) -> str:
    left = MAX_INFLATE - used[0]
    with zf.open(info) as f:
        data = f.read(left + 1)
    if len(data) > left:
        raise ExtractError(f"archive inflates past {MAX_INFLATE} octets")
    used[0] += len(data)
    return data.decode("utf-8", "replace")


def _xml_runs(xml: str, pattern: re.Pattern[str], kind: str) -> Iterator[str]:
    """Text runs of a document part; a paragraph end yields '\\n'."""
    for m in pattern.finditer(xml):
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
    used = [0]
    with zipfile.ZipFile(io.BytesIO(data)) as zf:
        members = _members(zf, name_re)
        if not members:
            raise ExtractError(f"no {kind} document part in the archive")
        for info in members:
            budget.check()
            xml = _read(zf, info, used)
            if kind == "odf":  # only the body text, not styles' names
                start = xml.find("<office:body")
                xml = xml[start:] if start >= 0 else xml
            if not budget.add("".join(_xml_runs(xml, pattern, kind))):
                return


_SHARED: Final = re.compile(r"<si>(.*?)</si>", re.S)
_T: Final = re.compile(r"<t(?:\s[^>]*)?>([^<]*)</t>")
_ROW: Final = re.compile(r"<row\b[^>]*>(.*?)</row>", re.S)
_CELL: Final = re.compile(r"<c\b([^>]*?)(?:/>|>(.*?)</c>)", re.S)
_V: Final = re.compile(r"<v>([^<]*)</v>")


def _xlsx(data: bytes, budget: Budget) -> None:
    used = [0]
    with zipfile.ZipFile(io.BytesIO(data)) as zf:
        names = {i.filename for i in zf.infolist()[:MAX_MEMBERS]}
        shared: list[str] = []
        if "xl/sharedStrings.xml" in names:
            xml = _read(zf, zf.getinfo("xl/sharedStrings.xml"), used)
            shared = [html_lib.unescape("".join(_T.findall(si)))
                      for si in _SHARED.findall(xml)]
        sheets = _members(zf, re.compile(r"^xl/worksheets/sheet\d+\.xml$"))
        if not sheets:
            raise ExtractError("no worksheet in the archive")
        for info in sheets:
            budget.check()
            for row in _ROW.finditer(_read(zf, info, used)):
                cells = []
                for cell in _CELL.finditer(row.group(1)):
                    attrs, body = cell.group(1), cell.group(2) or ""
                    if 't="s"' in attrs:
                        v = _V.search(body)
                        i = int(v.group(1)) if v and v.group(1).isdigit() else -1
                        cells.append(shared[i] if 0 <= i < len(shared) else "")
                    elif 't="inlineStr"' in attrs:
                        cells.append(html_lib.unescape("".join(_T.findall(body))))
                    else:
                        v = _V.search(body)
                        cells.append(html_lib.unescape(v.group(1)) if v else "")
                if any(cells) and not budget.add("\t".join(cells)):
                    return


def _pdf(data: bytes, budget: Budget) -> None:
    try:
        from pypdf import PdfReader
    except ImportError as exc:
        raise ExtractError("pypdf is not installed (pip install 'mailpipe[extract]')") \
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


FORMATS: Final = (
    Format("pdf", frozenset({"application/pdf", "application/x-pdf"}), (".pdf",), _pdf),
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


def extract(fmt: Format, data: bytes, *, max_chars: int, timeout: float) -> tuple[str, bool]:
    """(text, truncated) of ``data``; raises ExtractError (only) when unreadable."""
    budget = Budget(max_chars, timeout)
    try:
        fmt.read(data, budget)
    except ExtractError:
        raise
    except (zipfile.BadZipFile, KeyError) as exc:
        raise ExtractError(f"not a valid {fmt.name} archive: {exc}") from exc
    except RecursionError as exc:
        raise ExtractError("nesting too deep") from exc
    except Exception as exc:  # a third-party reader's own error on hostile input
        raise ExtractError(f"{type(exc).__name__}: {exc}"[:300]) from exc
    return budget.text(), budget.truncated
