"""``parse``'s ``process_nowait``: a small in-memory message is parsed on the event loop
with exactly the result of ``process`` (issue 18); anything else is left to the step's
thread, the message unchanged."""

from __future__ import annotations

import email.policy
import sys
import threading
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import pytest
import structlog
from mailpipe.plugins.parse import PAYLOADS_KEY, ParseProcessor
from mailpipe.plugins.parse.processor import ParseOptions

from mailpipe import LATER
from mailpipe.chain import Chain
from mailpipe.config import StepSpec
from mailpipe.errors import BudgetExceeded
from mailpipe.message import Message, MessageRef
from mailpipe.processor import ProcessorContext
from mailpipe.worker import Budget

pytestmark = pytest.mark.timeout(120)

DATA = Path(__file__).resolve().parents[1] / "data" / "parse"


def parser(**options: Any) -> ParseProcessor:
    p = ParseProcessor(ParseOptions.model_validate(options), ProcessorContext())
    p.process(Message.from_bytes(b"Subject: warm-up\r\n\r\nloads the parser\r\n"))
    return p


def message(raw: bytes, *, headers_only: bool = False) -> Message:
    ref = MessageRef(mailbox="mb", number=1, uid="u1", size=len(raw) + 100)
    return Message(ref=ref, data=raw, headers_only=headers_only, tags={"seen-by-filter"})


def with_attachment() -> bytes:
    msg = EmailMessage()
    msg["From"] = "Alice <alice@example.com>"
    msg["To"] = "bob@example.org, =?utf-8?q?Caf=C3=A9?= <cafe@example.org>"
    msg["Subject"] = "=?utf-8?b?UmFwcG9ydA==?= attached"
    msg.set_content("A body long enough to be cut.\n" * 20)
    msg.add_attachment(b"%PDF-1.4 tiny", maintype="application", subtype="pdf",
                       filename="report.pdf")
    return msg.as_bytes(policy=email.policy.SMTP)


def outcome(p: ParseProcessor, m: Message, method: str) -> tuple[Any, ...]:
    """What ``method`` leaves: its return value, the record, the payloads, the rest of
    meta, and the log lines (without the time they report)."""
    with structlog.testing.capture_logs() as logs:
        result = getattr(p, method)(m)
    for line in logs:
        line.pop("ms", None)
    record = m.record.model_dump() if m.record is not None else None
    payloads = [bytes(x) for x in m.meta.get(PAYLOADS_KEY, [])]
    rest = {k: v for k, v in m.meta.items() if k != PAYLOADS_KEY}
    return result, record, payloads, rest, logs


CASES = [
    *sorted(DATA.glob("*.eml")),  # defects, a wrapped notice, charsets, a bounce, …
    "attachment",
    "headers-only",
    "truncated",
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: getattr(c, "name", c))
def test_nowait_gives_exactly_what_process_gives(case: Path | str) -> None:
    headers_only = case == "headers-only"
    options = {"max_body_size": 100} if case == "truncated" else {}
    if isinstance(case, Path):
        raw = case.read_bytes()
    else:
        raw = with_attachment()
        if headers_only:
            raw = raw.split(b"\r\n\r\n", 1)[0] + b"\r\n\r\n"
    p = parser(**options)
    p.NOWAIT_OCTETS = p.NOWAIT_BOUNDARIES = p.NOWAIT_ATS = p.NOWAIT_WORDS = 1 << 20
    p.NOWAIT_NOT_UTF8 = True  # the path, not the bounds
    by_thread = message(raw, headers_only=headers_only)
    by_thread.record = "a stale record"  # process() parses again: so must nowait
    on_loop = message(raw, headers_only=headers_only)
    on_loop.record = "a stale record"
    expected = outcome(p, by_thread, "process")
    got = outcome(p, on_loop, "process_nowait")
    assert got == expected
    assert got[0] is None and got[1] is not None
    if case == "truncated":
        assert any(d["kind"] == "BodyTruncated" for d in got[1]["defects"])
    if case == "attachment":
        assert got[2] == [b"%PDF-1.4 tiny"]


def test_a_small_message_is_parsed_on_the_loop_within_the_bounds() -> None:
    p = parser()
    raw = with_attachment()
    assert len(raw) <= p.NOWAIT_OCTETS
    m = message(raw)
    assert p.process_nowait(m) is None
    assert m.record is not None and m.meta[PAYLOADS_KEY] == [b"%PDF-1.4 tiny"]


def unchanged_later(p: ParseProcessor, m: Message) -> None:
    assert p.process_nowait(m) is LATER
    assert m.record is None and m.meta == {}


def test_a_message_past_the_size_bound_is_left_to_the_thread() -> None:
    p = parser()
    raw = b"Subject: big\r\n\r\n" + b"x" * (p.NOWAIT_OCTETS - 16) + b"\r\n"
    assert len(raw) == p.NOWAIT_OCTETS + 2
    unchanged_later(p, message(raw))
    assert p.process_nowait(message(raw[:-2])) is None  # at the bound: on the loop


def test_a_message_of_many_parts_is_left_to_the_thread() -> None:
    p = parser()
    parts = "".join(
        "--b\r\nContent-Type: text/plain\r\n\r\npart\r\n"
        for _ in range(p.NOWAIT_BOUNDARIES)
    )
    head = 'Content-Type: multipart/mixed; boundary="b"\r\n\r\n'
    unchanged_later(p, message(f"{head}{parts}--b--\r\n".encode()))  # one line too many
    assert p.process_nowait(message(f"{head}{parts}".encode())) is None


def test_a_message_of_many_addresses_is_left_to_the_thread() -> None:
    p = parser()
    to = ", ".join(f"u{i}@example.com" for i in range(p.NOWAIT_ATS))
    raw = f"To: {to}\r\n\r\nbody\r\n".encode()
    assert p.process_nowait(message(raw)) is None
    unchanged_later(p, message(raw.replace(b"body", b"to me@example.com")))


def test_a_spooled_message_is_left_to_the_thread(tmp_path: Path) -> None:
    p = parser()
    path = tmp_path / "m.eml"
    path.write_bytes(b"Subject: spooled\r\n\r\nbody\r\n")
    ref = MessageRef(mailbox="mb", number=1, uid="u1", size=path.stat().st_size)
    unchanged_later(p, Message(ref=ref, spool_path=path))


def test_the_first_message_is_left_to_the_thread_which_loads_the_parser(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    p = parser()
    monkeypatch.delitem(sys.modules, "mailpipe.plugins.parse.parser")
    unchanged_later(p, message(b"Subject: first\r\n\r\nbody\r\n"))


async def test_in_a_chain_a_small_message_never_reaches_the_steps_thread(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    parser()  # the parser loaded, as after a session's first message
    threads: list[str] = []
    process = ParseProcessor.process

    def spy(self: ParseProcessor, m: Message) -> Any:
        threads.append(threading.current_thread().name)
        return process(self, m)

    monkeypatch.setattr(ParseProcessor, "process", spy)
    spec = StepSpec(index=0, step="1:parse", use="parse", cls=ParseProcessor,
                    options=ParseOptions())
    c = Chain({"p": [spec]}, base_dir=tmp_path)
    try:
        small = message(b"Subject: small\r\n\r\nbody\r\n")
        result = await c.run("p", small)
        assert result.ok and small.record is not None
        assert threads == [threading.current_thread().name]  # on the loop
        big = message(b"Subject: big\r\n\r\n" + b"x\r\n" * (1 << 12))
        result = await c.run("p", big)
        assert result.ok and big.record is not None
        assert threads[1] != threading.current_thread().name  # the step's thread
        # The budget behaviour of process(): a message whose processing_budget
        # earlier steps spent is never started, small or not (quarantined).
        spent = Budget(1.0)
        spent.left = 0.0
        late = message(b"Subject: small\r\n\r\nbody\r\n")
        with pytest.raises(BudgetExceeded, match="not started"):
            await c.pipelines["p"][0].gated("process", late, budget=spent)
        assert late.record is None and len(threads) == 2
    finally:
        await c.close()


# Review r-e2e (S-12: a hostile server cannot exhaust the event loop's time).


def test_bare_cr_boundary_lines_count_against_the_bound() -> None:
    """The parser ends a line at a bare CR too: ``\\r--b`` lines are MIME boundaries
    (many parts, each parsed and charset-decoded on the loop), so they count."""
    p = parser()
    parts = "".join(
        "--b\rContent-Type: application/octet-stream\r\rpart\r"
        for _ in range(p.NOWAIT_BOUNDARIES + 4)
    )
    raw = f'Content-Type: multipart/mixed; boundary="b"\r\r{parts}--b--\r'.encode()
    assert raw.count(b"\n--") == 0 and len(raw) <= p.NOWAIT_OCTETS
    by_thread = message(raw)
    p.process(by_thread)  # the parser sees every part
    assert by_thread.record is not None
    assert len(by_thread.record.attachments) > p.NOWAIT_BOUNDARIES
    unchanged_later(p, message(raw))


def test_many_unknown_charsets_are_left_to_the_thread() -> None:
    """Each unknown charset label costs a codec search on disk (an import attempt),
    with new labels in every message: past NOWAIT_WORDS encoded words the message
    is parsed on the step's thread. Counted with a codec search function."""
    import codecs

    p = parser()
    searched: list[str] = []

    def search(name: str) -> None:
        searched.append(name)

    codecs.register(search)
    try:
        words = " ".join(f"=?x{i}?q?a?=" for i in range(250))  # ~4 KiB
        m = message(f"Subject: {words}\r\n\r\nbody\r\n".encode())
        assert len(m.raw) <= p.NOWAIT_OCTETS
        p.process_nowait(m)
        assert len(searched) <= 64  # 250 searched on the loop before the bound
        n = p.NOWAIT_WORDS + 1
        words = " ".join(f"=?x-r-e2e-v{i}?q?a?=" for i in range(n))
        unchanged_later(p, message(f"Subject: {words}\r\n\r\nbody\r\n".encode()))
        assert len(searched) <= 64
        searched.clear()
        words = " ".join(f"=?x-r-e2e-w{i}?q?a?=" for i in range(n - 1))
        assert p.process_nowait(message(f"Subject: {words}\r\n\r\nb\r\n".encode())) is None
        assert len(searched) <= p.NOWAIT_WORDS  # the bound is what it costs
    finally:
        codecs.unregister(search)


LAZY_SCRIPT = r"""
import sys
from mailpipe.message import Message, MessageRef
from mailpipe.plugins.parse import ParseProcessor
from mailpipe.plugins.parse.processor import ParseOptions
from mailpipe.processor import ProcessorContext
p = ParseProcessor(ParseOptions(), ProcessorContext())
p.process(Message.from_bytes(b"Subject: first\r\n\r\nplain ascii\r\n"))
raw = sys.stdin.buffer.read()
before = set(sys.modules)
m = Message(ref=MessageRef(mailbox="mb", number=1, uid="u", size=len(raw)), data=raw)
result = p.process_nowait(m)
print(sorted(set(sys.modules) - before))
"""


@pytest.mark.parametrize(
    "raw",
    [
        # charset detection (charset_normalizer: ~90 modules, ~20 ms from disk)
        b"Content-Type: text/plain; charset=utf-8\r\n\r\n"
        + "Привет мир, проверка. ".encode("cp1251") * 20,
        # a uuencoded file's type (mimetypes reads the system's mime.types)
        b"Subject: uu\r\n\r\nbegin 644 a.txt\r\n#86)C\r\n`\r\nend\r\n",
        # a charset whose codec module is not loaded yet
        b"Content-Type: text/plain; charset=iso-8859-2\r\n\r\n\xb1\xb6\xbc text\r\n",
    ],
    ids=["charset-detection", "uuencode-type", "codec-module"],
)
def test_process_nowait_never_imports_on_the_loop(raw: bytes) -> None:
    """After the first message (parsed by process() on the step's thread), nothing
    a small message makes the parser import lazily is imported on the event loop
    (a fresh interpreter: the test's own modules are not loaded)."""
    import subprocess

    out = subprocess.run(
        [sys.executable, "-c", LAZY_SCRIPT], input=raw, capture_output=True,
        check=True, timeout=60,
    ).stdout.decode()
    assert out.strip().splitlines()[-1] == "[]"


def test_many_legacy_8bit_header_lines_are_left_to_the_thread(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Each header line of 8-bit bytes that are not UTF-8 runs charset detection
    (charset_normalizer: ~0.3 ms a line): 200 such lines in 4 KiB took ~60 ms on the
    loop. Invalid UTF-8 (which alone leads to detection, for header lines and
    parts alike) sends the message to the step's thread (counted in detections)."""
    from mailpipe.plugins.parse import charsets

    p = parser()
    detected: list[bytes] = []
    detect = charsets._detect

    def counting(data: bytes) -> str | None:
        detected.append(data)
        return detect(data)

    monkeypatch.setattr(charsets, "_detect", counting)
    word = "Привет мир".encode("cp1251")
    raw = b"".join(b"X-%d: %s\r\n" % (i, word) for i in range(200)) + b"\r\nbody\r\n"
    assert len(raw) <= p.NOWAIT_OCTETS
    m = message(raw)
    p.process_nowait(m)
    assert len(detected) <= p.NOWAIT_BOUNDARIES  # (h-e2e: 200 on the loop)
    by_thread = message(raw)
    p.process(by_thread)  # the same record, on the step's thread
    assert len(detected) >= 200 and by_thread.record is not None
    utf8 = "Привет мир".encode()  # valid UTF-8 headers never reach detection
    detected.clear()
    assert p.process_nowait(message(b"Subject: %s\r\n\r\nbody\r\n" % utf8)) is None
    assert detected == []
