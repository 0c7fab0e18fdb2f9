"""The latest reply of an HTML body: cut at the markup clients wrap quoted history in,
then the plain-text rules."""

from __future__ import annotations

import re
from typing import Final

from mailpipe.plugins.parse.html_text import html_to_text

from .rules import latest_reply

# Where clients put the quoted history or the signature (everything after it goes):
# Gmail, Outlook (desktop, web, new), Thunderbird, Apple Mail, Yahoo, Proton, Zimbra.
_QUOTE_START: Final = re.compile(
    r"<div\b[^<>]*\b(class\s*=\s*[\"']?[^\"'<>]*\b(gmail_quote|gmail_signature"
    r"|moz-cite-prefix|moz-signature|yahoo_quoted|protonmail_quote"
    r"|OutlookMessageHeader|zmail_extra)\b|id\s*=\s*[\"']?(divRplyFwdMsg|appendonsend"
    r"|mail-editor-reference-message-container|OLK_SRC_BODY_SECTION|Signature)\b)"
    r"|<blockquote\b|<hr\b[^<>]*>\s*<div\b[^<>]*\bid\s*=\s*[\"']?divRplyFwdMsg",
    re.I,
)


def latest_reply_html(html: str) -> str:
    """Return the new text of an HTML body (rendered as plain text); never raises.

    A body whose text all sits below its first quote marker (bottom-posting) is read
    whole by the plain-text rules instead.
    """
    m = _QUOTE_START.search(html)
    if m is not None:
        reply = latest_reply(html_to_text(html[: m.start()]))
        if reply:
            return reply
    return latest_reply(html_to_text(html))
