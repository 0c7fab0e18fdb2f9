"""The latest reply of a plain-text body: quoted history, signatures and mobile footers
cut by line rules in seven languages (English, German, French, Spanish, Portuguese,
Japanese, Chinese), and a few more labels where they cost nothing.

Theory of operation: the body is read top-down and cut at the first line that opens
quoted history: a client's attribution line ("On … wrote:", "Am … schrieb …:",
"…のメッセージ:", "在…写道"), possibly wrapped over two lines; an Outlook header block
(a From label followed within four lines by a Sent/Date/To/Subject label); an
"Original Message" separator; or a run of ``>`` lines that lasts to the end. What is
left loses a ``-- `` signature and trailing mobile footers ("Sent from my iPhone").
Runs in linear time; never raises.
"""

from __future__ import annotations

import re
from typing import Final

#: A colon, ASCII or fullwidth (U+FF1A, Japanese and Chinese).
_COLON: Final = "[:\uff1a]"
_WROTE: Final = (
    r"wrote|schrieb|a\s+écrit|escribió|escreveu|escrito|ha\s+scritto|schreef|skrev"
    r"|napisał|写道|寫道|書きました|のメッセージ|さんは書きました"
)
# An attribution line: starts like a client's, ends with the verb and a colon.
_ATTRIBUTION: Final = [
    re.compile(p, re.I)
    for p in (
        rf"^(on|am|le|el|em|il|op|den|dnia)\b.{{0,300}}\b({_WROTE})\b.{{0,300}}{_COLON}\s*$",
        rf"^(on|am|le|el|em|il|op|den|dnia)\b.{{0,300}}\b({_WROTE})\s*{_COLON}?\s*$",
        rf"^.{{0,300}}({_WROTE})\s*{_COLON}\s*$",
        rf"^在.{{0,300}}(写道|寫道)\s*{_COLON}?\s*$",
        # Gmail in Japanese/Chinese: "2024年1月8日(月) 10:15 Name <addr>:"
        rf"^\d{{4}}[年/.-]\s?\d{{1,2}}[月/.-]\s?\d{{1,2}}.{{0,200}}<[^<>\s]+@[^<>\s]+>\)?\s*{_COLON}\s*$",
    )
]
_FROM_LABEL: Final = re.compile(
    rf"^\s*\*?(from|von|de|da|van|från|fra|od|от|差出人|送信者|发件人|寄件者)\*?\s*{_COLON}",
    re.I,
)
_BLOCK_LABEL: Final = re.compile(
    r"^\s*\*?(sent|date|to|subject|gesendet|datum|an|betreff|envoyé|date|à|objet"
    r"|enviado|enviada|fecha|para|asunto|data|assunto|inviato|oggetto|verzonden"
    r"|onderwerp|skickat|ämne|送信日時|日時|宛先|件名|发送时间|日期|收件人|主题|寄件日期"
    rf"|收件者|主旨)\*?\s*{_COLON}",
    re.I,
)
_SEPARATOR: Final = re.compile(
    r"^\s*-{2,}\s*(original message|ursprüngliche nachricht|message d'origine"
    r"|message original|mensaje original|mensagem original|messaggio originale"
    r"|oorspronkelijk bericht|originalmeddelande|原始邮件|原始郵件|元のメッセージ"
    r"|forwarded message|weitergeleitete nachricht|message transféré"
    r"|mensaje reenviado|mensagem encaminhada|转发邮件)\s*-{2,}\s*$",
    re.I,
)
_RULE: Final = re.compile(r"^\s*(_{8,}|-{8,}|={8,})\s*$")
_SIGNATURE: Final = re.compile(r"^--\s?$")
_FOOTER: Final = re.compile(
    r"^\s*((sent|envoyé|enviado|inviato|gesendet|verzonden|skickat)\s+(from|de|desde|do"
    r"|da|von|vanaf|met|från)\s+(my|mon|mi|meu|mio|meinem|mijn|min)\b.{0,60}"
    r"|von\s+meinem\s+\S+(\s+\S+)?\s+gesendet|sent\s+(from|via)\s+.{1,40}"
    r"|get\s+outlook\s+for\s+\S+|.{1,30}から送信|发自我的.{1,30}|從我的.{1,30}傳送"
    r"|来自.{1,30}的\s?(iphone|ipad|android|手机))\s*$",
    re.I,
)
_ENDINGS: Final = (":", "\uff1a")
_WROTE_WORDS: Final = (
    "wrote", "schrieb", "écrit", "escribió", "escreveu", "escrito", "scritto", "schreef",
    "skrev", "napisał", "写道", "寫道", "書きました", "のメッセージ",
)
#: Characters of a body searched for the start of quoted history; a reply is near
#: the top, and a bounded scan keeps a megabyte log pasted into a mail cheap.
MAX_SCAN: Final = 100_000

#: Lines a signature may span; a longer "-- " tail is body text, not a signature.
MAX_SIGNATURE_LINES: Final = 12


def latest_reply(text: str) -> str:
    """Return the new text of ``text``: everything before the quoted history, without
    a trailing ``-- `` signature or mobile footer, stripped. Never raises."""
    lines = text.replace("\r\n", "\n").replace("\r", "\n").split("\n")
    lines = lines[: quote_start(lines)]
    lines = _drop_signature(lines)
    return "\n".join(_drop_tail(lines)).strip()


def quote_start(lines: list[str]) -> int:
    """Index of the first line of quoted history (``len(lines)`` when there is none);
    only the first :data:`MAX_SCAN` characters are searched."""
    # quoted_to_end[i]: every non-blank line from i on starts with ">" (one pass)
    quoted_to_end = [True] * (len(lines) + 1)
    for i in range(len(lines) - 1, -1, -1):
        rest = lines[i].lstrip()
        quoted_to_end[i] = quoted_to_end[i + 1] and (not rest or rest.startswith(">"))
    seen = 0
    for i, line in enumerate(lines):
        seen += len(line) + 1
        if seen > MAX_SCAN:
            break
        s = line.strip()
        if not s:
            continue
        if i and _opens_quote(lines, i, s):
            return i
        if s.startswith(">") and quoted_to_end[i]:
            return i
    return len(lines)


def _ends_like_attribution(s: str) -> bool:
    """A cheap test before the attribution patterns: a colon or a "wrote" at the end."""
    return s.endswith(_ENDINGS) or s.casefold().endswith(_WROTE_WORDS)


def _opens_quote(lines: list[str], i: int, s: str) -> bool:
    if s[0] in "-_" and _SEPARATOR.match(s):
        return True
    if len(s) <= 400 and _ends_like_attribution(s) and any(
        p.match(s) for p in _ATTRIBUTION
    ):
        return True
    # an attribution wrapped over two lines: "On … <" / "addr> wrote:"
    nxt = lines[i + 1].strip() if i + 1 < len(lines) else ""
    if (
        nxt
        and len(s) + len(nxt) <= 400
        and not nxt.startswith(">")
        and _ends_like_attribution(nxt)
    ):
        joined = f"{s} {nxt}"
        if any(p.match(joined) for p in _ATTRIBUTION[:2] + _ATTRIBUTION[3:]) or (
            _ATTRIBUTION[2].match(joined) and re.search(r"@|\d", s)
        ):
            return True
    if _FROM_LABEL.match(s):
        following = [ln for ln in lines[i + 1 : i + 5] if ln.strip()]
        return any(_BLOCK_LABEL.match(ln) for ln in following[:3])
    return False


def _drop_signature(lines: list[str]) -> list[str]:
    for i in range(len(lines) - 1, 0, -1):
        if len(lines) - i > MAX_SIGNATURE_LINES:
            break
        if _SIGNATURE.match(lines[i]):
            return lines[:i]
    return lines


def _drop_tail(lines: list[str]) -> list[str]:
    """Drop trailing blank lines, rules (_____) and mobile footers."""
    end = len(lines)
    while end > 1:
        s = lines[end - 1].strip()
        if not s or _RULE.match(s) or _FOOTER.match(s):
            end -= 1
            continue
        break
    return lines[:end]
