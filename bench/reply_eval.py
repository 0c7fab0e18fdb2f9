"""Exact-match accuracy per language of the `reply` rules beside mail-parser-reply and
email-reply-parser on tests/data/reply/{labelled,heldout}.jsonl; prints a Markdown
table whose cells are exact matches / messages (n), that share, and in brackets the
line precision.

    python bench/reply_eval.py
"""

from __future__ import annotations

from pathlib import Path

from email_reply_parser import EmailReplyParser
from mailparser_reply import EmailReplyParser as MailParserReply
from mailpipe.plugins.reply import reply_of
from mailpipe.plugins.reply.evaluate import Extractor, load, score

DATA = Path(__file__).resolve().parents[1] / "tests" / "data" / "reply"
SETS = {"labelled": load(DATA / "labelled.jsonl"), "held-out": load(DATA / "heldout.jsonl")}
LANGS = ["en", "de", "fr", "es", "pt", "ja", "zh"]
_mpr = MailParserReply(languages=["en", "de", "fr", "es", "ja", "zh"])
ENGINES: dict[str, Extractor] = {
    "mailpipe rules": reply_of,
    "mail-parser-reply 1.36": lambda r: _mpr.parse_reply(r.text or "") or "",
    "email-reply-parser 0.5.12": lambda r: EmailReplyParser.parse_reply(r.text or ""),
}


def main() -> None:
    print("| set | engine | " + " | ".join(LANGS) + " | all |")
    print("|---" * (len(LANGS) + 3) + "|")
    for label, rows in SETS.items():
        for name, extract in ENGINES.items():
            scores = score(rows, extract)
            cells = [
                f"{scores[lang].exact}/{scores[lang].total} = "
                f"{scores[lang].accuracy:.0%} ({scores[lang].line_precision:.0%})"
                for lang in LANGS
            ]
            exact = sum(s.exact for s in scores.values())
            print(f"| {label} | {name} | " + " | ".join(cells) + f" | {exact}/{len(rows)} |")


if __name__ == "__main__":
    main()
