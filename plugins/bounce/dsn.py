"""RFC 3464 delivery-status fields to a :class:`Bounce`; tolerant of what MTAs send
(missing or extra blank lines between the per-message and per-recipient groups,
folded fields, any case, CRLF or LF). Pure; never raises."""

from __future__ import annotations

import base64
import re
from typing import Final, Literal

from mailpipe.plugins.parse.desk import Bounce, BounceRecipient

_FIELD: Final = re.compile(r"^([A-Za-z][A-Za-z0-9-]*)[ \t]*:[ \t]*(.*)$")
_BASE64: Final = re.compile(r"^[A-Za-z0-9+/]{8,}={0,2}\s*$")
_STATUS: Final = re.compile(r"\b([245]\.\d{1,3}\.\d{1,3})\b")
#: Which action wins when recipients disagree (RFC 3464 §2.3.3 actions).
_RANK: Final = {"failed": 4, "delayed": 3, "relayed": 2, "expanded": 2, "delivered": 1}
#: Most recipients kept from one report (a hostile report can list millions).
MAX_RECIPIENTS: Final = 1000


def _groups(text: str) -> list[list[tuple[str, str]]]:
    """Field groups (RFC 3464 §2.1: separated by blank lines) as ``(lower-case name,
    value)`` pairs in order, folded lines joined. A group that is a base64 block (as
    some MTAs write the per-recipient fields) is decoded once."""
    groups: list[list[tuple[str, str]]] = [[]]
    blob: list[str] = []
    for line in text.replace("\r\n", "\n").replace("\r", "\n").split("\n"):
        if not line.strip():
            groups.append([])
            continue
        fields = groups[-1]
        if line[:1] in (" ", "\t") and fields:
            name, value = fields[-1]
            fields[-1] = (name, f"{value} {line.strip()}")
            continue
        m = _FIELD.match(line)
        if m is not None:
            fields.append((m.group(1).lower(), m.group(2).strip()))
        elif _BASE64.match(line):
            blob.append(line.strip())
    if blob:
        try:
            decoded = base64.b64decode("".join(blob), validate=False)
        except ValueError:
            decoded = b""
        if b":" in decoded:
            groups.extend(_groups(decoded.decode("utf-8", "replace")))  # shorter: ends
    return [g for g in groups if g]


def _split_recipients(group: list[tuple[str, str]]) -> list[list[tuple[str, str]]]:
    """One group per recipient: a group naming two Final-Recipients (no blank line
    between recipients) is split before the second recipient's first field."""
    out: list[list[tuple[str, str]]] = [[]]
    seen: set[str] = set()
    for name, value in group:
        if name in ("final-recipient", "original-recipient"):
            if name in seen:
                out.append([])
                seen = set()
            seen.add(name)
        out[-1].append((name, value))
    return [g for g in out if g]


def _address(value: str) -> str:
    """``rfc822; user@host`` → ``user@host`` (RFC 3464 §2.3.2 address-type)."""
    _, sep, addr = value.partition(";")
    return (addr if sep else value).strip().strip("<>").strip()


def parse_delivery_status(texts: list[str]) -> Bounce | None:
    """The bounce described by the delivery-status part(s) ``texts``; None when they
    name no recipient."""
    recipients: list[BounceRecipient] = []
    seen: set[str] = set()
    reporting: str | None = None
    for text in texts:
        for group in _groups(text):
            for fields in _split_recipients(group):
                f: dict[str, str] = {}
                for name, value in fields:
                    f.setdefault(name, value)
                if reporting is None and f.get("reporting-mta"):
                    reporting = _address(f["reporting-mta"]) or None
                address = _address(
                    f.get("final-recipient") or f.get("original-recipient") or ""
                )
                if (
                    not address
                    or address in seen
                    or len(recipients) >= MAX_RECIPIENTS
                ):
                    continue
                seen.add(address)
                action = f.get("action", "").split()
                status = _STATUS.search(f.get("status", ""))
                recipients.append(
                    BounceRecipient(
                        address=address,
                        action=action[0].lower() if action else None,
                        status=status.group(1) if status else None,
                        diagnostic=f.get("diagnostic-code", "")[:1000] or None,
                        remote_mta=_address(f.get("remote-mta", "")) or None,
                    )
                )
    if not recipients:
        return None
    return make_bounce("dsn", recipients, reporting)


def make_bounce(
    kind: Literal["dsn", "non-standard"], recipients: list[BounceRecipient], reporting: str | None = None
) -> Bounce:
    """A :class:`Bounce` whose action is the worst of its recipients'."""
    actions = [r.action or "" for r in recipients]
    action = max(actions, key=lambda a: _RANK.get(a, 0)) if actions else ""
    permanent = action == "failed" or any(
        (r.status or "").startswith("5") for r in recipients
    )
    return Bounce(
        kind=kind,
        action=action or ("failed" if permanent else "unknown"),
        permanent=permanent,
        recipients=recipients,
        reporting_mta=reporting,
    )
