"""The `reply` processor: the labelled set (tests/data/reply), libraries compared,
the processor in a chain, and every corpus file."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from mailpipe.plugins.parse import parse_into
from mailpipe.plugins.reply import latest_reply, latest_reply_html, reply_of
from mailpipe.plugins.reply.evaluate import load, score

from mailpipe.message import Message

DATA = Path(__file__).resolve().parents[1] / "data" / "reply"
LABELLED = DATA / "labelled.jsonl"
HELDOUT = DATA / "heldout.jsonl"  # written after the rules; never used to tune them
LANGS = {"en", "de", "fr", "es", "pt", "ja", "zh"}


@pytest.fixture(scope="module")
def rows() -> list[dict[str, str]]:
    return load(LABELLED)


def test_labelled_set_has_150_messages_in_seven_languages(
    rows: list[dict[str, str]],
) -> None:
    assert len(rows) >= 150
    assert {r["lang"] for r in rows} == LANGS
    assert all(sum(r["lang"] == lang for r in rows) >= 20 for lang in LANGS)
    assert len({r["id"] for r in rows}) == len(rows)


def test_rules_exact_match_accuracy_per_language_is_at_least_95_percent(
    rows: list[dict[str, str]],
) -> None:
    scores = score(rows, reply_of)
    for lang, s in scores.items():
        assert s.accuracy >= 0.95, (lang, s.misses)
        assert s.line_precision >= 0.98, lang


def test_rules_on_the_held_out_set() -> None:
    scores = score(load(HELDOUT), reply_of)
    assert set(scores) == LANGS
    assert sum(s.exact for s in scores.values()) >= 28  # of 35: 30 when written
    assert all(s.accuracy >= 0.8 for s in scores.values())  # n = 5 per language


@pytest.mark.parametrize("path", [LABELLED, HELDOUT], ids=["labelled", "held-out"])
def test_rules_beat_both_libraries_in_every_language(path: Path) -> None:
    """The evaluation behind keeping our own rules (docs/helpdesk.md)."""
    mpr = pytest.importorskip("mailparser_reply")
    erp = pytest.importorskip("email_reply_parser")
    parser = mpr.EmailReplyParser(languages=["en", "de", "fr", "es", "ja", "zh"])
    rows = load(path)
    ours = score(rows, reply_of)
    for extract in (
        lambda r: parser.parse_reply(r.text or "") or "",
        lambda r: erp.EmailReplyParser.parse_reply(r.text or ""),
    ):
        theirs = score(rows, extract)
        for lang in LANGS:
            assert ours[lang].exact >= theirs[lang].exact, lang
        assert sum(s.exact for s in ours.values()) > sum(
            s.exact for s in theirs.values()
        )


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        ("Thanks!\n\nOn Tue, 2 Jan 2024, Bob <b@x.example> wrote:\n> hi\n", "Thanks!"),
        ("Danke\n\nAm 02.01.2024 um 10:00 schrieb Bob <b@x.example>:\n> hi", "Danke"),
        ("了解です。\n\n2024/01/02 10:00、Bob <b@x.example> のメッセージ:\n> hi", "了解です。"),
        ("好的\n\n------------------ 原始邮件 ------------------\n发件人: Bob", "好的"),
        ("Ok\n\n-- \nBob\nACME", "Ok"),
        ("Ok\n\nSent from my iPhone", "Ok"),
        ("From: the login page I get an error.\nPlease help.", None),
        ("> quoted question\nmy answer below the quote", None),
        ("", ""),
    ],
    ids=["gmail-en", "apple-de", "apple-ja", "qq-zh", "signature", "mobile",
         "from-label-in-text", "interleaved-quote-kept", "empty"],
)
def test_latest_reply_cases(body: str, expected: str | None) -> None:
    assert latest_reply(body) == (body.strip() if expected is None else expected)


def test_html_bottom_posting_is_read_whole() -> None:
    html = "<blockquote>old</blockquote><p>new answer</p>"
    assert latest_reply_html(html) == "old\n\nnew answer"


def test_processor_sets_record_reply(
    make_message: Callable[[bytes], Message], processor: Callable[..., Any]
) -> None:
    raw = (
        b"From: a@x.example\r\nSubject: Re: hi\r\nContent-Type: text/plain; "
        b"charset=utf-8\r\n\r\nNew text\r\n\r\nOn Mon, Bob <b@x.example> wrote:\r\n"
        b"> old\r\n"
    )
    message = make_message(raw)
    assert processor("reply").process(message) is None
    assert message.record is not None
    assert message.record.reply == "New text"
    assert processor("reply", body="html").process(message) is None
    assert message.record.reply == ""


def test_processor_rejects_unknown_body_option(processor: Callable[..., Any]) -> None:
    with pytest.raises(ValueError, match="body"):
        processor("reply", body="rtf")


@pytest.mark.timeout(300)
def test_reply_on_every_corpus_file(
    corpus_files: list[Path], make_message: Callable[[bytes], Message],
    processor: Callable[..., Any],
) -> None:
    step = processor("reply")
    for path in corpus_files:
        message = make_message(path.read_bytes())
        assert step.process(message) is None, path.name
        record = parse_into(message)
        assert isinstance(record.reply, str), path.name


def test_docs_table_is_what_the_bench_prints(capsys: pytest.CaptureFixture[str]) -> None:
    """docs/helpdesk.md shows bench/reply_eval.py's table as printed: exact-match
    accuracy with n in every cell (the held-out cells have n = 5)."""
    import runpy

    root = Path(__file__).resolve().parents[2]
    runpy.run_path(str(root / "bench" / "reply_eval.py"), run_name="__main__")
    table = capsys.readouterr().out.strip().splitlines()
    assert len(table) == 8 and all("/5 = " in line for line in table[-3:])
    docs = (root / "docs" / "helpdesk.md").read_text(encoding="utf-8")
    assert "exact-match accuracy" in docs and "precision per message" not in docs
    for line in table:
        assert line in docs.splitlines(), line
