"""The `extract` processor: text of each format, the limits, failures as defect notes,
no network, every corpus file."""

from __future__ import annotations

import base64
import io
import socket
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from mailpipe.plugins.extract import extract, format_of
from mailpipe.plugins.parse import parse_into

from mailpipe.message import Message


def _pdf(text: str, *, content: bytes | None = None) -> bytes:
    """A one-page PDF showing ``text`` (hand-written objects, exact xref), or with
    ``content`` as its content stream object (dictionary and stream)."""
    stream = f"BT /F1 12 Tf 72 720 Td ({text}) Tj ET".encode()
    objects = [
        b"<< /Type /Catalog /Pages 2 0 R >>",
        b"<< /Type /Pages /Kids [3 0 R] /Count 1 >>",
        b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Contents 4 0 R "
        b"/Resources << /Font << /F1 5 0 R >> >> >>",
        content or (b"<< /Length %d >>\nstream\n" % len(stream) + stream + b"\nendstream"),
        b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>",
    ]
    out = bytearray(b"%PDF-1.4\n")
    offsets = []
    for i, body in enumerate(objects, 1):
        offsets.append(len(out))
        out += b"%d 0 obj\n" % i + body + b"\nendobj\n"
    xref = len(out)
    out += b"xref\n0 %d\n0000000000 65535 f \n" % (len(objects) + 1)
    out += b"".join(b"%010d 00000 n \n" % o for o in offsets)
    out += b"trailer\n<< /Size %d /Root 1 0 R >>\nstartxref\n%d\n%%%%EOF\n" % (
        len(objects) + 1, xref)
    return bytes(out)


def _docx(text: str) -> bytes:
    import docx

    doc = docx.Document()
    doc.add_paragraph(text)
    doc.add_paragraph("second paragraph")
    buf = io.BytesIO()
    doc.save(buf)
    return buf.getvalue()


def _xlsx() -> bytes:
    import openpyxl

    wb = openpyxl.Workbook()
    ws = wb.active
    ws.append(["order", "amount"])
    ws.append(["A-17", 42])
    buf = io.BytesIO()
    wb.save(buf)
    return buf.getvalue()


def _pptx(text: str) -> bytes:
    import pptx

    deck = pptx.Presentation()
    slide = deck.slides.add_slide(deck.slide_layouts[1])
    slide.shapes.title.text = text
    buf = io.BytesIO()
    deck.save(buf)
    return buf.getvalue()


def _odt(text: str) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("mimetype", "application/vnd.oasis.opendocument.text")
        z.writestr("content.xml", (
            '<?xml version="1.0"?><office:document-content xmlns:office="o" '
            'xmlns:text="t"><office:automatic-styles><style:style name="P1"/>'
            "</office:automatic-styles><office:body><office:text><text:h>Title</text:h>"
            f"<text:p>{text} &amp; more<text:tab/>x</text:p></office:text>"
            "</office:body></office:document-content>"))
    return buf.getvalue()


CASES = {
    "report.pdf": (_pdf("Quarterly invoice 4711"), "Quarterly invoice 4711"),
    "letter.docx": (_docx("Dear support, the printer jams"), "the printer jams\nsecond"),
    "orders.xlsx": (_xlsx(), "A-17\t42"),
    "deck.pptx": (_pptx("Roadmap 2025"), "Roadmap 2025"),
    "notes.odt": (_odt("Meeting notes"), "Title\nMeeting notes & more\tx"),
    "page.html": (b"<html><body><h1>Status</h1><p>All systems go</p></body></html>",
                  "Status\n\nAll systems go"),
    "data.csv": ("name;city\nJürgen;Köln\n".encode(), "Jürgen;Köln"),
}


@pytest.mark.parametrize("filename", list(CASES))
def test_each_format_gives_its_text(filename: str) -> None:
    data, expected = CASES[filename]
    fmt = format_of("application/octet-stream", filename)
    assert fmt is not None
    text, truncated = extract(fmt, data, max_chars=10_000, timeout=30)
    assert expected in text
    assert not truncated


def _mail(files: dict[str, bytes]) -> bytes:
    parts = b"".join(
        b"--b\r\nContent-Type: application/octet-stream\r\nContent-Disposition: "
        b"attachment; filename=" + name.encode() + b"\r\nContent-Transfer-Encoding: "
        b"base64\r\n\r\n" + base64.encodebytes(data) for name, data in files.items())
    return (b"From: a@x.example\r\nSubject: files\r\nMIME-Version: 1.0\r\nContent-Type:"
            b" multipart/mixed; boundary=b\r\n\r\n--b\r\nContent-Type: text/plain\r\n\r\n"
            b"see attached\r\n" + parts + b"--b--\r\n")


def test_processor_fills_attachment_text_and_notes_failures(
    make_message: Callable[[bytes], Message], processor: Callable[..., Any],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def no_network(*args: object, **kwargs: object) -> None:
        raise AssertionError("extraction opened a socket")

    monkeypatch.setattr(socket, "socket", no_network)
    files = {name: data for name, (data, _) in CASES.items()}
    files["broken.docx"] = b"PK\x03\x04 not really a zip"
    files["broken.pdf"] = b"%PDF-1.4 garbage"
    files["photo.jpg"] = b"\xff\xd8\xff"
    message = make_message(_mail(files))
    assert processor("extract").process(message) is None
    record = parse_into(message)
    by_name = {a.filename: a for a in record.attachments}
    for name, (_, expected) in CASES.items():
        assert expected in (by_name[name].text or ""), name
    assert by_name["photo.jpg"].text is None
    failed = {d.part for d in record.defects if d.kind == "ExtractFailed"}
    assert failed == {by_name["broken.docx"].part, by_name["broken.pdf"].part}


def test_limits_size_chars_and_formats(
    make_message: Callable[[bytes], Message], processor: Callable[..., Any],
) -> None:
    big = b"x" * 5000
    message = make_message(_mail({"big.csv": big, "long.txt": b"word " * 500,
                                  "report.pdf": CASES["report.pdf"][0]}))
    step = processor("extract", max_size="4KB", max_chars=100, formats=["csv", "text"])
    step.process(message)
    record = parse_into(message)
    by_name = {a.filename: a for a in record.attachments}
    assert by_name["big.csv"].text is None
    assert by_name["report.pdf"].text is None  # pdf not in formats
    assert len(by_name["long.txt"].text or "") == 100
    kinds = sorted(d.kind for d in record.defects)
    assert kinds == ["ExtractSkipped", "ExtractTruncated"]


def test_time_limit_is_a_defect_note(
    make_message: Callable[[bytes], Message], processor: Callable[..., Any],
) -> None:
    message = make_message(_mail({"deck.pptx": CASES["deck.pptx"][0]}))
    processor("extract", timeout=1e-9).process(message)
    record = parse_into(message)
    assert [d.kind for d in record.defects] == ["ExtractFailed"]
    assert "time limit" in record.defects[0].detail


@pytest.fixture
def inflated(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Octets handed out by every zip member read (read and read1 counted)."""
    counted: list[int] = []
    for method in ("read", "read1"):
        real = getattr(zipfile.ZipExtFile, method)

        def counting(self: zipfile.ZipExtFile, n: int = -1, _real: Any = real) -> bytes:
            data: bytes = _real(self, n)
            counted.append(len(data))
            return data

        monkeypatch.setattr(zipfile.ZipExtFile, method, counting)
    return counted


def _zip(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
        for name, data in members.items():
            z.writestr(name, data)
    return buf.getvalue()


#: The cap on octets inflated from one archive for max_chars=1000 (8 per character,
#: at least 64 KiB).
CAP_1000 = 64 * 1024


def _docx_bomb() -> bytes:
    """The review's 60 MiB DOCX bomb (~150 KB zipped): one "a" per paragraph."""
    return _zip({"word/document.xml": b"<w:p><w:t>a</w:t></w:p>" * (60 * 2**20 // 23)})


def test_zip_bomb_stops_at_the_inflate_cap(inflated: list[int]) -> None:
    data = _zip({"word/document.xml": b"<w:t>a</w:t>" + b" " * (65 * 2**20)})
    fmt = format_of("", "bomb.docx")
    assert fmt is not None
    text, truncated = extract(fmt, data, max_chars=100, timeout=600)
    assert (text, truncated) == ("a", True)
    assert 0 < sum(inflated) <= CAP_1000


def test_docx_bomb_inflates_at_most_the_cap(inflated: list[int]) -> None:
    fmt = format_of("", "bomb.docx")
    assert fmt is not None
    text, truncated = extract(fmt, _docx_bomb(), max_chars=1000, timeout=600)
    assert truncated and 0 < len(text) <= 1000
    assert set(text) == {"a", "\n"}
    assert 0 < sum(inflated) <= CAP_1000


def test_xlsx_shared_strings_bomb_inflates_at_most_the_cap(inflated: list[int]) -> None:
    fmt = format_of("", "bomb.xlsx")
    assert fmt is not None
    data = _zip({"xl/sharedStrings.xml": b"<si><t>a</t></si>" * (60 * 2**20 // 17),
                 "xl/worksheets/sheet1.xml": b'<row><c t="s"><v>0</v></c></row>'})
    text, truncated = extract(fmt, data, max_chars=1000, timeout=600)
    assert (text, truncated) == ("a", True)  # half the cap for strings, the sheet read
    assert 0 < sum(inflated) <= CAP_1000


def test_one_huge_xlsx_row_is_cut_at_max_chars(inflated: list[int]) -> None:
    fmt = format_of("", "bomb.xlsx")
    assert fmt is not None
    data = _zip({"xl/worksheets/sheet1.xml":
                 b"<row>" + b"<c><v>1</v></c>" * (60 * 2**20 // 15) + b"</row>"})
    text, truncated = extract(fmt, data, max_chars=1000, timeout=600)
    assert truncated and 0 < len(text) <= 1000 and set(text) == {"1", "\t"}
    assert 0 < sum(inflated) <= CAP_1000


def test_runs_are_taken_until_the_budget_is_full() -> None:
    """A part's runs go into the budget one at a time: taking stops when it is full,
    so a member is never joined whole (counted: runs drawn from the generator)."""
    from mailpipe.plugins.extract.formats import Budget

    drawn = 0

    def runs() -> Any:
        nonlocal drawn
        for _ in range(1_000_000):
            drawn += 1
            yield "word "

    budget = Budget(1000, timeout=600)
    assert not budget.add_runs(runs())
    assert budget.truncated and len(budget.text()) == 1000
    assert drawn <= 1000 // len("word ") + 1


def test_bad_option_names_the_accepted_formats(processor: Callable[..., Any]) -> None:
    with pytest.raises(ValueError) as info:
        processor("extract", formats=["doc"])
    assert "formats" in str(info.value) and "'pdf'" in str(info.value)


@pytest.mark.timeout(600)
def test_extract_on_every_corpus_file(
    corpus_files: list[Path], make_message: Callable[[bytes], Message],
    processor: Callable[..., Any],
) -> None:
    step = processor("extract", inline=True)
    texts = 0
    for path in corpus_files:
        message = make_message(path.read_bytes())
        assert step.process(message) is None, path.name
        texts += sum(a.text is not None for a in parse_into(message).attachments)
    assert texts > 0


def test_store_sqlite_indexes_attachment_text(
    tmp_path: Path, make_message: Callable[[bytes], Message],
    processor: Callable[..., Any],
) -> None:
    from mailpipe.plugins.store.sqlite import (
        SqliteOptions,
        SqliteStore,
        connect,
        search,
    )

    from mailpipe.processor import ProcessorContext

    message = make_message(_mail({"report.pdf": CASES["report.pdf"][0]}))
    processor("parse").process(message)
    processor("extract").process(message)
    store = SqliteStore(SqliteOptions(path="s.sqlite3"), ProcessorContext(base_dir=tmp_path))
    store.open()
    store.process(message)
    store.close()
    conn = connect(tmp_path / "s.sqlite3")
    assert search(conn, "quarterly") == [message.key]  # only in the PDF
    assert search(conn, "attached") == [message.key]  # the body still is indexed
    message.record.attachments[0].text = None  # type: ignore[union-attr]
    store.open()
    store.process(message)  # an update forgets the old text (contentless index)
    store.close()
    assert search(conn, "quarterly") == []
    conn.execute("DELETE FROM messages")
    assert search(conn, "attached") == []
    conn.close()


def _pdf_bomb(mib: int) -> bytes:
    """The review's PDF bomb: one page whose one content stream inflates to ``mib``
    MiB of text operators (~150 KB deflated for 60 MiB)."""
    import zlib

    line = b"BT /F1 12 Tf 10 10 Td (a) Tj ET\n"
    packed = zlib.compress(line * (mib * 2**20 // len(line)), 9)
    return _pdf("", content=b"<< /Length %d /Filter /FlateDecode >>\nstream\n"
                % len(packed) + packed + b"\nendstream")


_BOMB_RUN = """
import json, resource, sys
from mailpipe.message import Message, MessageRef
from mailpipe.plugins.extract.processor import ExtractOptions, ExtractProcessor
from mailpipe.plugins.parse import parse_into
from mailpipe.processor import ProcessorContext

raw = open(sys.argv[1], "rb").read()
step = ExtractProcessor(ExtractOptions(), ProcessorContext())
message = Message(ref=MessageRef(mailbox="mb", number=1, uid="u1", size=len(raw)),
                  data=raw)
step.process(message)
record = parse_into(message)
print(json.dumps({
    "defects": [[d.kind, d.detail] for d in record.defects],
    "text": [a.text for a in record.attachments],
    "children_maxrss": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024,
    # VmHWM, not RUSAGE_SELF: the latter keeps the high-water mark of the process this
    # interpreter was forked from (pytest, hundreds of MiB in a full run) across exec.
    "self_maxrss": next(int(line.split()[1]) * 1024
                        for line in open("/proc/self/status")
                        if line.startswith("VmHWM:")),
}))
"""


@pytest.mark.timeout(600)
def test_pdf_bomb_is_a_defect_note_and_its_reader_stays_under_the_memory_cap(
    tmp_path: Path,
) -> None:
    """The 60 MiB single-stream Flate bomb, run by the processor with its defaults in
    a fresh interpreter, whose only children are the PDF readers: a defect note, and
    the peak RSS of the reader (getrusage of the children) under ``max_memory``."""
    import json
    import subprocess
    import sys

    from mailpipe.plugins.extract.worker import DEFAULT_MAX_MEMORY

    mail = tmp_path / "bomb.eml"
    mail.write_bytes(_mail({"bomb.pdf": _pdf_bomb(60)}))
    done = subprocess.run([sys.executable, "-c", _BOMB_RUN, str(mail)], capture_output=True,
                          timeout=540, check=True)
    out = json.loads(done.stdout)
    # the reader did run and grow (the interpreter alone is ~50 MiB), and stayed capped
    assert 100 * 2**20 < out["children_maxrss"] < DEFAULT_MAX_MEMORY
    assert out["self_maxrss"] < DEFAULT_MAX_MEMORY  # the bytes never inflated here
    assert out["text"] == [None]
    assert [kind for kind, _ in out["defects"]] == ["ExtractFailed"]
    # the cap stops it (pypdf 7.1: ~236 MiB RSS); a pypdf with lower limits of its own
    # may stop it first, which the cap still bounds
    assert ("memory limit reached (max_memory, 268435456 octets)" in out["defects"][0][1]
            or "LimitReachedError" in out["defects"][0][1])


@pytest.mark.timeout(600)
def test_pdf_reader_is_killed_at_the_timeout() -> None:
    """Inside one content stream no budget check runs: only the parent's kill can end
    the read at the time limit (a 60 MiB stream takes seconds of CPU, not 0.2 s)."""
    fmt = format_of("", "bomb.pdf")
    assert fmt is not None
    with pytest.raises(Exception) as info:
        extract(fmt, _pdf_bomb(60), max_chars=1000, timeout=0.2, max_memory=2**30)
    assert type(info.value).__name__ == "ExtractError"
    assert "time limit reached (the reader process was killed)" in str(info.value)


def test_ordinary_pdf_in_the_reader_process_keeps_max_chars() -> None:
    fmt = format_of("application/pdf", None)
    assert fmt is not None and fmt.isolated
    text, truncated = extract(fmt, _pdf("Quarterly invoice 4711"), max_chars=9,
                              timeout=60)
    assert (text, truncated) == ("Quarterly", True)


def test_max_memory_below_the_floor_names_key_and_floor(
    processor: Callable[..., Any],
) -> None:
    with pytest.raises(ValueError) as info:
        processor("extract", max_memory="64MiB")
    assert "max_memory" in str(info.value) and str(128 * 2**20) in str(info.value)


@pytest.mark.parametrize(("executable", "reason"), [
    ("/bin/false", "the reader process ended with status 1 and no answer"),
    ("/nonexistent/python", "the reader process could not start"),
])
def test_a_reader_process_without_an_answer_is_a_defect_note(
    executable: str, reason: str, make_message: Callable[[bytes], Message],
    processor: Callable[..., Any], monkeypatch: pytest.MonkeyPatch,
) -> None:
    import sys

    monkeypatch.setattr(sys, "executable", executable)
    message = make_message(_mail({"report.pdf": CASES["report.pdf"][0]}))
    assert processor("extract").process(message) is None
    record = parse_into(message)
    assert record.attachments[0].text is None
    assert [d.kind for d in record.defects] == ["ExtractFailed"]
    assert reason in record.defects[0].detail
