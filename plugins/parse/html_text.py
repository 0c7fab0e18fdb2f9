"""A plain-text rendering of HTML for HTML-only mail (regular expressions, linear time)."""

from __future__ import annotations

import html as html_lib
import re

_SKIP_OPEN = re.compile(r"<(script|style|head|title|template|noscript)\b|<!--", re.I)
_BREAK = re.compile(r"<br\b[^<>]*>|<hr\b[^<>]*>", re.I)
_ITEM = re.compile(r"<li\b[^<>]*>", re.I)
_PARA = re.compile(r"</?(?:p|h[1-6]|table|blockquote|pre)\b[^<>]*>", re.I)
_BLOCK = re.compile(
    r"</?(?:address|article|aside|div|dl|dt|dd|fieldset|figcaption|figure|footer|form"
    r"|header|main|nav|ol|section|tr|ul)\b[^<>]*>",
    re.I,
)
_CELL = re.compile(r"<t[dh]\b[^<>]*>", re.I)
_TAG = re.compile(r"<[A-Za-z/!?][^<>]*>")
_WS = re.compile(r"[ \t\r\n\f\v]+")
_SPACES = re.compile(r"[ \t\u00a0]+")
_BLANKS = re.compile(r"\n\s*\n(?:\s*\n)+")


def html_to_text(html: str) -> str:
    """Render ``html`` as readable plain text: block structure kept, markup dropped.

    Never raises and runs in linear time: scripts, styles, comments and the head are
    removed, block elements become line breaks, list items "- ", entities decoded.
    """
    text = _drop_hidden(html)
    text = _WS.sub(" ", text)  # source line breaks are not rendered
    text = _BREAK.sub("\n", text)
    text = _ITEM.sub("\n- ", text)
    text = _PARA.sub("\n\n", text)
    text = _BLOCK.sub("\n", text)
    text = _CELL.sub(" ", text)
    text = _TAG.sub("", text)
    text = html_lib.unescape(text)
    lines = (_SPACES.sub(" ", line).strip() for line in text.split("\n"))
    return _BLANKS.sub("\n\n", "\n".join(lines)).strip()


def _drop_hidden(html: str) -> str:
    """Remove comments and non-rendered elements in one left-to-right pass.

    An element left open runs to the end of the document, as in browsers; each
    character is scanned a bounded number of times whatever the input.
    """
    if _SKIP_OPEN.search(html) is None:
        return html
    lower = html.lower()
    out: list[str] = []
    pos = 0
    while True:
        m = _SKIP_OPEN.search(html, pos)
        if m is None:
            out.append(html[pos:])
            break
        out.append(html[pos : m.start()])
        closer = "-->" if m.group(1) is None else f"</{m.group(1).lower()}"
        end = lower.find(closer, m.end())
        if end < 0:
            break
        gt = lower.find(">", end)
        pos = len(html) if gt < 0 else gt + 1
        out.append(" ")
    return "".join(out)
