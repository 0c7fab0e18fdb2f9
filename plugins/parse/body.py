"""Body selection: which decoded parts make the text and HTML bodies of a message."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from .html_text import html_to_text

_META_CHARSET = re.compile(
    rb"""<meta[^>]+charset\s*=\s*["']?\s*([A-Za-z0-9_.:-]+)""", re.I
)


def html_charset(data: bytes) -> str | None:
    """Return the charset an HTML document declares in a <meta> tag, if any."""
    m = _META_CHARSET.search(data[:4096])
    return m.group(1).decode("ascii") if m else None


def cut_body(head: bytes) -> bytes:
    """``head`` (a body part's first octets, the rest dropped) cut where text ends
    whole: after its last line end when that is in its second half, else before a
    UTF-8 sequence the cut left incomplete."""
    end = head.rfind(b"\n") + 1
    if end > len(head) // 2:
        return head[:end]
    end = len(head)
    for back in range(1, min(4, end) + 1):
        byte = head[end - back]
        if byte < 0x80:
            break  # ASCII: nothing cut
        if byte >= 0xC0:  # a lead byte: keep its sequence only when complete
            need = 2 if byte < 0xE0 else 3 if byte < 0xF0 else 4
            return head if back >= need else head[: end - back]
    return head


@dataclass(slots=True)
class BodyParts:
    """Collects body parts in document order and decides the text and HTML bodies.

    Every non-blank inline text/plain part without a file name joins the text body
    (mailing-list footers, split bodies); likewise for text/html. TNEF bodies are used
    only when the MIME structure gave none; HTML is rendered as text when no plain
    part has content.
    """

    texts: list[str] = field(default_factory=list)
    htmls: list[str] = field(default_factory=list)
    fallback_texts: list[str] = field(default_factory=list)
    fallback_htmls: list[str] = field(default_factory=list)

    def add_text(self, text: str) -> None:
        """Add a decoded text/plain body part."""
        self.texts.append(text)

    def add_html(self, html: str) -> None:
        """Add a decoded text/html body part."""
        self.htmls.append(html)

    def add_fallback_text(self, text: str) -> None:
        """Add a plain body found inside a container (TNEF)."""
        self.fallback_texts.append(text)

    def add_fallback_html(self, html: str) -> None:
        """Add an HTML body found inside a container (TNEF)."""
        self.fallback_htmls.append(html)

    def result(self) -> tuple[str | None, str | None, bool]:
        """Return (text, html, text_from_html)."""
        texts = [t for t in self.texts if t.strip()] or self.fallback_texts
        htmls = [h for h in self.htmls if h.strip()] or self.fallback_htmls
        html = "\n".join(htmls) if htmls else None
        if texts:
            return "\n".join(texts), html, False
        if html is not None:
            return html_to_text(html), html, True
        return ("" if self.texts or self.htmls else None), html, False
