"""Address-list headers to Address(name, address): RFC 2047 names, IDN domains."""

from __future__ import annotations

import re

from .headers import _WORD, decode_words, raw_to_text, unfold
from .record import Address

_PLACEHOLDER = re.compile("\ue000(\\d+)\ue001")
_SPACES = re.compile(r"\s+")
# a run of encoded-words separated by white space is one unit (RFC 2047 §6.2)
_WORD_RUN = re.compile(rf"{_WORD.pattern}(?:[ \t]*{_WORD.pattern})*")
_ANGLE = re.compile(r"^(.*?)<([^<>]*)>(.*)$", re.S)
_COMMENT = re.compile(r"\(((?:[^()\\]|\\.)*)\)")
_ESCAPE = re.compile(r"\\(.)")


def idn_to_unicode(domain: str) -> str:
    """Decode A-labels ("xn--...", RFC 5891) to Unicode; keep the input when invalid."""
    if "xn--" not in domain.lower():
        return domain
    labels = []
    for label in domain.split("."):
        if label.lower().startswith("xn--"):
            try:
                label = label[4:].encode("ascii").decode("punycode")
            except (UnicodeError, ValueError):
                return domain
        labels.append(label)
    return ".".join(labels)


def split_list(text: str) -> list[str]:
    """Split an address list at top-level commas (RFC 5322 §3.4).

    Commas inside quoted strings, comments and angle brackets do not split; a group's
    ``name:`` prefix and its closing ``;`` are dropped (§3.4 group syntax).
    """
    if "," not in text and ";" not in text and ":" not in text:
        # Nothing can split or drop (issue 18: the loop below costs about 0.1 us a
        # character): one entry, whatever the quotes, comments and brackets.
        entry = text.strip()
        return [entry] if entry else []
    entries: list[str] = []
    buf: list[str] = []
    quoted = escaped = False
    angle = paren = 0
    for ch in text:
        if escaped:
            buf.append(ch)
            escaped = False
            continue
        if ch == "\\" and (quoted or paren):
            buf.append(ch)
            escaped = True
            continue
        if quoted:
            quoted = ch != '"'
        elif paren:
            paren += {"(": 1, ")": -1}.get(ch, 0)
        elif ch == '"':
            quoted = True
        elif ch == "(":
            paren = 1
        elif ch == "<":
            angle += 1
        elif ch == ">":
            angle = max(0, angle - 1)
        elif not angle and ch in ",;":
            entries.append("".join(buf))
            buf = []
            continue
        elif not angle and ch == ":" and not any(c in "@<" for c in buf):
            buf = []  # a group's display name
            continue
        buf.append(ch)
    entries.append("".join(buf))
    return [e for e in (e.strip() for e in entries) if e]


def _unquote(name: str) -> str:
    name = name.strip()
    if len(name) >= 2 and name[0] == name[-1] == '"':
        return _ESCAPE.sub(r"\1", name[1:-1])
    return _ESCAPE.sub(r"\1", name.replace('"', ""))


def _entry(entry: str) -> tuple[str, str]:
    m = _ANGLE.match(entry)
    if m is not None:
        name = _unquote(_COMMENT.sub(" ", m.group(1))).strip("<> ")
        addr = m.group(2)
        if not name:  # "<a@b> (Name)"
            comment = _COMMENT.search(m.group(3))
            name = comment.group(1) if comment else ""
        if ":" in addr:  # RFC 5322 §4.4 obsolete route: <@a,@b:user@host>
            addr = addr.rpartition(":")[2]
    else:
        comment = _COMMENT.search(entry)
        name = comment.group(1) if comment else ""
        addr = _COMMENT.sub(" ", entry).strip().strip("<>")
    addr = addr.strip()
    if "@" in addr and '"' not in addr:  # RFC 5322 §3.2.2: CFWS around dots
        addr = _SPACES.sub("", addr)
    return name, addr


def parse_addresses(
    values: list[str], hint: str | None = None
) -> tuple[list[Address], list[str]]:
    """Parse address-list header values; never raises.

    Encoded-words are shielded before splitting, so a comma inside an encoded display
    name does not split the list. Returns (addresses, problems); empty entries and
    empty groups (``undisclosed-recipients:;``) are dropped. ``hint`` is the body
    charset, used for raw 8-bit bytes.
    """
    problems: list[str] = []
    words: list[str] = []

    def shield(m: re.Match[str]) -> str:
        words.append(m.group(0))
        return f"\ue000{len(words) - 1}\ue001"

    out: list[Address] = []
    for value in values:
        text, problem = raw_to_text(unfold(value), hint)
        if problem is not None:
            problems.append(problem)
        if "=?" in text:
            text = _WORD_RUN.sub(shield, text)
        for entry in split_list(text):
            name, addr = _entry(entry)
            if words:
                name, addr = _restore(name, words), _restore(addr, words)
            if "=?" in name:
                name, name_problems = decode_words(name)
                problems.extend(name_problems)
            name = _SPACES.sub(" ", name).strip()
            if not addr and not name:
                continue
            if "@" in addr:
                local, _, domain = addr.rpartition("@")
                if not local or not domain or "@" in local.strip('"'):
                    problems.append(f"invalid address {addr[:80]!r}")
                addr = f"{local}@{idn_to_unicode(domain)}"
            elif " " in addr:  # no address at all, e.g. "Undisclosed recipients"
                name, addr = name or addr, ""
            out.append(Address(name=name, address=addr))
    return out, problems


def _restore(text: str, words: list[str]) -> str:
    return _PLACEHOLDER.sub(lambda m: words[int(m.group(1))], text)
