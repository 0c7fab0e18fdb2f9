"""Ticket and thread keys of a message: subject tags, reply/forward prefixes in many
languages, and the In-Reply-To/References chain. Pure functions; never raise."""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Final

from mailpipe.plugins.parse.desk import TicketKeys

#: Subject tags of common helpdesks: ``[#1234]`` (RT, FreeScout, osTicket),
#: ``[Ticket#2024010110000011]`` (Zammad, OTRS), ``[PROJ-42]`` (Jira-style keys).
DEFAULT_PATTERNS: Final = (
    r"\[#(\d+)\]",
    r"\[Ticket#\s?(\d+)\]",
    r"\[([A-Z][A-Z0-9]{1,9}-\d+)\]",
)

#: Reply prefixes: English, German (AW, Antw), Nordic (SV, VS), Dutch, Polish (Odp),
#: French/Italian/Spanish/Portuguese (Réf, Rif, RE, RES, RV is forward), Turkish,
#: Greek, Japanese, Chinese.
REPLY_PREFIXES: Final = (
    "re", "aw", "antw", "antwort", "sv", "vs", "odp", "réf", "ref", "rif", "res",
    "r", "ynt", "απ", "σχετ", "返信", "答复", "回复", "回覆",
)
#: Forward prefixes: Fwd/Fw, German WG, French TR, Spanish/Portuguese RV/ENC,
#: Italian I, Dutch Doorst, Swedish VB, Finnish VL, Polish PD, Japanese, Chinese.
FORWARD_PREFIXES: Final = (
    "fwd", "fw", "wg", "tr", "rv", "enc", "i", "inoltro", "doorst", "vb", "vl",
    "pd", "ilt", "πρθ", "転送", "转发", "轉寄", "転送済み",
)


def _prefix_re(words: Iterable[str]) -> re.Pattern[str]:
    alternatives = "|".join(sorted((re.escape(w) for w in words), key=len, reverse=True))
    # "Re:", "RE :", "Re[2]:", "Re(2):", "Re^2:", fullwidth colon (U+FF1A)
    return re.compile(
        rf"^\s*(?:{alternatives})\s*(?:\[\d+\]|\(\d+\)|\^\d+)?\s*[:\uff1a]\s*", re.I
    )


@dataclass(frozen=True, slots=True)
class SubjectRules:
    """Compiled subject rules: ticket-tag patterns (one group: the id) and prefixes."""

    patterns: tuple[re.Pattern[str], ...]
    reply: re.Pattern[str]
    forward: re.Pattern[str]

    @classmethod
    def build(
        cls,
        patterns: Sequence[str] = DEFAULT_PATTERNS,
        reply_prefixes: Sequence[str] = (),
        forward_prefixes: Sequence[str] = (),
    ) -> SubjectRules:
        """Compile ``patterns`` (each with exactly one group) and the prefixes (the
        built-in ones plus the extra ones given)."""
        return cls(
            patterns=tuple(re.compile(p) for p in patterns),
            reply=_prefix_re((*REPLY_PREFIXES, *reply_prefixes)),
            forward=_prefix_re((*FORWARD_PREFIXES, *forward_prefixes)),
        )


#: Most prefixes stripped from one subject ("Re: Re: Fwd: …" loops are bounded).
MAX_PREFIXES: Final = 20


def ticket_keys(
    subject: str | None,
    in_reply_to: Sequence[str],
    references: Sequence[str],
    rules: SubjectRules,
) -> TicketKeys:
    """The ticket keys of a message from its subject and its thread headers."""
    text = subject or ""
    tickets: list[str] = []
    for pattern in rules.patterns:
        for m in pattern.finditer(text):
            value = m.group(1) if m.groups() else m.group(0)
            if value and value not in tickets:
                tickets.append(value)
        text = pattern.sub(" ", text)
    is_reply = is_forward = False
    for _ in range(MAX_PREFIXES):
        reply = rules.reply.match(text)
        forward = None if reply else rules.forward.match(text)
        hit = reply or forward
        if hit is None:
            break
        is_reply, is_forward = is_reply or bool(reply), is_forward or bool(forward)
        text = text[hit.end() :]
    thread_ids: list[str] = []
    for mid in (*references, *in_reply_to):
        if mid and mid not in thread_ids:
            thread_ids.append(mid)
    return TicketKeys(
        tickets=tickets,
        thread_ids=thread_ids,
        root_id=thread_ids[0] if thread_ids else None,
        subject=" ".join(text.split()),
        is_reply=is_reply or bool(in_reply_to),
        is_forward=is_forward,
    )
