"""Filter conditions: the `when` tables of filter rules and how they match a message."""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import cached_property
from typing import Annotated, Any, Literal

from mailpipe.plugins.parse.addresses import idn_to_unicode
from mailpipe.plugins.parse.record import Address, MessageRecord
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    field_validator,
    model_validator,
)

from mailpipe.units import ByteSize, Duration

Shorthand = Literal["equals", "contains", "glob"]


def _as_list(value: Any) -> Any:
    return [value] if isinstance(value, str) else value


StrList = Annotated[list[str], BeforeValidator(_as_list)]


class TextMatch(BaseModel):
    """Tests on a text value; every key given must hold, a list means any of its items.

    All comparisons ignore case (``regex`` too: ``(?-i:...)`` makes a group strict).
    """

    model_config = ConfigDict(extra="forbid", defer_build=True)

    equals: StrList | None = Field(default=None, description="Whole value equals.")
    contains: StrList | None = Field(default=None, description="Value contains.")
    regex: StrList | None = Field(
        default=None, description="Python regular expression found in the value."
    )
    glob: StrList | None = Field(
        default=None, description="Shell pattern matching the whole value (*.pdf)."
    )

    @field_validator("regex")
    @classmethod
    def _compile(cls, value: list[str] | None) -> list[str] | None:
        for pattern in value or ():
            try:
                re.compile(pattern, re.I)
            except re.error as exc:
                raise ValueError(f"invalid regex {pattern!r}: {exc}") from exc
        return value

    @model_validator(mode="after")
    def _not_empty(self) -> TextMatch:
        if not any((self.equals, self.contains, self.regex, self.glob)):
            raise ValueError("give at least one of equals, contains, regex, glob")
        return self

    @cached_property
    def _compiled(self) -> list[re.Pattern[str]]:
        return [re.compile(p, re.I) for p in self.regex or ()]

    def test(self, value: str) -> bool:
        """True when ``value`` passes every test given."""
        folded = value.casefold()
        if self.equals is not None and not any(
            folded == e.casefold() for e in self.equals
        ):
            return False
        if self.contains is not None and not any(
            c.casefold() in folded for c in self.contains
        ):
            return False
        if self.glob is not None and not any(
            fnmatch.fnmatchcase(folded, g.casefold()) for g in self.glob
        ):
            return False
        return not self.regex or any(p.search(value) for p in self._compiled)

    def any_of(self, values: Iterable[str]) -> bool:
        """True when some value passes."""
        return any(self.test(v) for v in values)


def _shorthand(kind: Shorthand) -> Callable[[Any], Any]:
    def convert(value: Any) -> Any:
        if isinstance(value, str | list):
            return {kind: value}
        return value

    return convert


Equals = Annotated[TextMatch, BeforeValidator(_shorthand("equals"))]
Contains = Annotated[TextMatch, BeforeValidator(_shorthand("contains"))]
Glob = Annotated[TextMatch, BeforeValidator(_shorthand("glob"))]


class HeaderTest(BaseModel):
    """A test on one header field (any of its occurrences), decoded (RFC 2047)."""

    model_config = ConfigDict(extra="forbid", defer_build=True)

    name: str = Field(description="Header field name, any case.", min_length=1)
    exists: bool | None = Field(
        strict=True,
        default=None, description="True: present; false: absent. Default with no test."
    )
    equals: StrList | None = Field(default=None, description="A value equals.")
    contains: StrList | None = Field(default=None, description="A value contains.")
    regex: StrList | None = Field(default=None, description="Regex found in a value.")
    glob: StrList | None = Field(default=None, description="Shell pattern on a value.")

    @field_validator("regex")
    @classmethod
    def _compile(cls, value: list[str] | None) -> list[str] | None:
        return TextMatch._compile(value)

    @cached_property
    def _text(self) -> TextMatch | None:
        if not any((self.equals, self.contains, self.regex, self.glob)):
            return None
        return TextMatch(
            equals=self.equals, contains=self.contains, regex=self.regex, glob=self.glob
        )

    def test(self, headers: dict[str, list[str]]) -> bool:
        """True when the header passes (``exists`` and/or the value tests)."""
        values = headers.get(self.name.lower(), [])
        text = self._text
        if text is None:
            return bool(values) == (self.exists is not False)
        if self.exists is False:
            return not values
        return text.any_of(v.strip() for v in values)


def _header_tests(value: Any) -> Any:
    """Accept one test, a list of tests, or the shorthand table {name = value}."""
    if isinstance(value, dict) and "name" not in value:
        return [{"name": k, "equals": v} for k, v in value.items()]
    if isinstance(value, dict):
        return [value]
    return value


def _domains(value: Any) -> Any:
    values = _as_list(value)
    if not isinstance(values, list):
        return values
    out = []
    for v in values:
        if not isinstance(v, str):
            return values
        v = v.strip().lstrip("@").removeprefix("*.").rstrip(".")
        if not v or " " in v or "@" in v:
            raise ValueError(f"not a domain: {v!r}")
        out.append(idn_to_unicode(v).casefold())
    return out


Domains = Annotated[list[str], BeforeValidator(_domains)]


class Range(BaseModel):
    """Numeric bounds; every bound given must hold."""

    model_config = ConfigDict(extra="forbid", defer_build=True)

    gt: float | None = Field(
        default=None, strict=True, description="Greater than."
    )
    ge: float | None = Field(
        default=None, strict=True, description="Greater than or equal."
    )
    lt: float | None = Field(
        default=None, strict=True, description="Less than."
    )
    le: float | None = Field(
        default=None, strict=True, description="Less than or equal."
    )
    eq: float | None = Field(
        default=None, strict=True, description="Equal."
    )

    @model_validator(mode="after")
    def _not_empty(self) -> Range:
        if all(v is None for v in (self.gt, self.ge, self.lt, self.le, self.eq)):
            raise ValueError("give at least one of gt, ge, lt, le, eq")
        return self

    def test(self, value: float) -> bool:
        """True when ``value`` is within every bound."""
        return not (
            (self.gt is not None and not value > self.gt)
            or (self.ge is not None and not value >= self.ge)
            or (self.lt is not None and not value < self.lt)
            or (self.le is not None and not value <= self.le)
            or (self.eq is not None and value != self.eq)
        )


class SizeRange(Range):
    """Size bounds in octets; accepts sizes like "10MB"."""

    gt: ByteSize | None = Field(default=None, description="Larger than.")
    ge: ByteSize | None = Field(default=None, description="At least.")
    lt: ByteSize | None = Field(default=None, description="Smaller than.")
    le: ByteSize | None = Field(default=None, description="At most.")
    eq: ByteSize | None = Field(default=None, description="Exactly.")


class AgeRange(Range):
    """Age bounds (now minus the Date header); accepts durations like "30d"."""

    gt: Duration | None = Field(default=None, description="Older than.")
    ge: Duration | None = Field(default=None, description="At least this old.")
    lt: Duration | None = Field(default=None, description="Newer than.")
    le: Duration | None = Field(default=None, description="At most this old.")
    eq: Duration | None = Field(default=None, description="Exactly this old.")


def _count(value: Any) -> Any:
    return (
        {"eq": value}
        if isinstance(value, int) and not isinstance(value, bool)
        else value
    )


@dataclass
class Facts:
    """What conditions look at: the record, the tags so far, the size and the time."""

    record: MessageRecord
    tags: set[str] = field(default_factory=set)
    size: int = 0
    now: datetime = field(default_factory=lambda: datetime.now(UTC))

    @cached_property
    def headers(self) -> dict[str, list[str]]:
        """Decoded header values by lower-case name."""
        out: dict[str, list[str]] = {}
        for name, value in self.record.headers:
            out.setdefault(name.lower(), []).append(value)
        return out

    @cached_property
    def recipients(self) -> list[Address]:
        """To, Cc and Bcc."""
        r = self.record
        return [*r.to, *r.cc, *r.bcc]

    @cached_property
    def mailing_list(self) -> bool:
        """List-Id, List-Post or List-Unsubscribe (RFC 2919/2369), or Precedence: list."""
        h = self.headers
        if self.record.list_id or "list-post" in h or "list-unsubscribe" in h:
            return True
        return any(v.strip().lower() == "list" for v in h.get("precedence", ()))


def _addresses(addresses: list[Address]) -> list[str]:
    return [a.address for a in addresses if a.address]


def _domain_in(addresses: list[Address], domains: list[str]) -> bool:
    for a in addresses:
        domain = a.address.rpartition("@")[2].casefold().rstrip(".")
        if not domain:
            continue
        if any(domain == d or domain.endswith("." + d) for d in domains):
            return True
    return False


#: Condition keys that need the message body; every other key is decided on headers
#: (or on the LIST size) alone.
BODY_KEYS = frozenset(
    {"body", "attachment_count", "attachment_name", "attachment_type",
     # set by the helpdesk steps (reply, ticket, bounce, unwrap, extract), which
     # header prefetch passes over: decided after download only
     "reply", "ticket", "is_reply", "bounce", "bounce_status", "envelope",
     "attachment_text"}
)
#: Condition keys on a record field a helpdesk step sets, and that step's ``use``
#: name: without the step earlier in the pipeline the field is always empty, so the
#: key is refused when the configuration is loaded (mailpipe.prerequisites).
STEP_KEYS = {
    "reply": "reply", "ticket": "ticket", "is_reply": "ticket", "bounce": "bounce",
    "bounce_status": "bounce", "envelope": "unwrap", "attachment_text": "extract",
}


class Condition(BaseModel):
    """A `when` table: every key given must hold (an implicit `all`).

    Combine with ``all``/``any`` (lists of tables) and ``not`` (a table).
    """

    model_config = ConfigDict(extra="forbid", defer_build=True, populate_by_name=True)

    all: list[Condition] | None = Field(default=None, description="Every one holds.")
    any: list[Condition] | None = Field(default=None, description="At least one holds.")
    not_: Condition | None = Field(default=None, alias="not", description="Negation.")
    header: Annotated[list[HeaderTest], BeforeValidator(_header_tests)] | None = Field(
        default=None,
        description="Header tests: {name, exists, equals, contains, regex, glob}, a "
        "list of them, or the shorthand {Header-Name = value} (equals).",
    )
    from_: Equals | None = Field(
        default=None, alias="from", description="A From address (string: equals)."
    )
    to: Equals | None = Field(default=None, description="A To address.")
    cc: Equals | None = Field(default=None, description="A Cc address.")
    recipient: Equals | None = Field(default=None, description="A To/Cc/Bcc address.")
    from_domain: Domains | None = Field(
        default=None, description="From domain is one of these or a subdomain."
    )
    to_domain: Domains | None = Field(default=None, description="A To domain.")
    cc_domain: Domains | None = Field(default=None, description="A Cc domain.")
    recipient_domain: Domains | None = Field(
        default=None, description="A To/Cc/Bcc domain."
    )
    subject: Contains | None = Field(
        default=None, description="Subject test (string: contains)."
    )
    body: Contains | None = Field(
        default=None, description="Text body test (string: contains); needs the body."
    )
    size: SizeRange | None = Field(default=None, description="Size bounds (10MB).")
    age: AgeRange | None = Field(
        default=None, description="Age bounds from the Date header (30d)."
    )
    attachment_count: Annotated[Range, BeforeValidator(_count)] | None = Field(
        default=None, description="Number of attachments (int: equals) or bounds."
    )
    attachment_name: Glob | None = Field(
        default=None, description="Some attachment file name (string: glob *.exe)."
    )
    attachment_type: Glob | None = Field(
        default=None, description="Some attachment MIME type (string: glob image/*)."
    )
    auto_reply: bool | None = Field(
        strict=True,
        default=None, description="Automatically generated mail (RFC 3834 and vendors)."
    )
    mailing_list: bool | None = Field(
        strict=True,
        default=None, description="Mailing-list mail (List-Id, List-Post, ...)."
    )
    list_id: Equals | None = Field(default=None, description="List-Id test.")
    tag: StrList | None = Field(
        default=None, description="The message already has one of these tags."
    )
    reply: Contains | None = Field(
        default=None,
        description="The new text of a reply (string: contains); needs `reply` before.",
    )
    ticket: Equals | None = Field(
        default=None,
        description="A ticket id from the subject tags (string: equals); needs "
        "`ticket` before.",
    )
    is_reply: bool | None = Field(
        strict=True, default=None,
        description="A reply (prefix or In-Reply-To); needs `ticket` before.",
    )
    bounce: bool | None = Field(
        strict=True, default=None,
        description="A delivery report; needs `bounce` before.",
    )
    bounce_status: Glob | None = Field(
        default=None,
        description="A bounced recipient's status (string: glob, e.g. 5.*); needs "
        "`bounce` before.",
    )
    envelope: Glob | None = Field(
        default=None,
        description="An envelope kind (string: glob, e.g. smime-*, pgp-encrypted); "
        "needs `unwrap` before.",
    )
    attachment_text: Contains | None = Field(
        default=None,
        description="Some attachment's text (string: contains); needs `extract` before.",
    )

    @model_validator(mode="after")
    def _not_empty(self) -> Condition:
        if not self.model_fields_set:
            raise ValueError("empty condition; give at least one key")
        return self

    def needs_body(self) -> bool:
        """True when deciding this condition needs the message body."""
        if self.model_fields_set & BODY_KEYS:
            return True
        subs = [*(self.all or ()), *(self.any or ())]
        if self.not_ is not None:
            subs.append(self.not_)
        return any(c.needs_body() for c in subs)

    def steps_needed(self, path: str) -> Iterable[tuple[str, str]]:
        """(key path, ``use`` name) for each key of this table and the tables inside
        it that reads a field set by another step (:data:`STEP_KEYS`); ``path`` is
        this table's key path, e.g. ``rules[0].when``."""
        for key in sorted(self.model_fields_set & STEP_KEYS.keys()):
            yield f"{path}.{key}", STEP_KEYS[key]
        for name, subs in (("all", self.all), ("any", self.any)):
            for i, sub in enumerate(subs or ()):
                yield from sub.steps_needed(f"{path}.{name}[{i}]")
        if self.not_ is not None:
            yield from self.not_.steps_needed(f"{path}.not")

    def matches(self, f: Facts) -> bool:
        """True when every key given holds for the message described by ``f``."""
        r = f.record
        if self.all is not None and not all(c.matches(f) for c in self.all):
            return False
        if self.any is not None and not any(c.matches(f) for c in self.any):
            return False
        if self.not_ is not None and self.not_.matches(f):
            return False
        if self.header is not None and not all(t.test(f.headers) for t in self.header):
            return False
        for test, addresses in (
            (self.from_, r.from_addresses),
            (self.to, r.to),
            (self.cc, r.cc),
            (self.recipient, f.recipients),
        ):
            if test is not None and not test.any_of(_addresses(addresses)):
                return False
        for domains, addresses in (
            (self.from_domain, r.from_addresses),
            (self.to_domain, r.to),
            (self.cc_domain, r.cc),
            (self.recipient_domain, f.recipients),
        ):
            if domains is not None and not _domain_in(addresses, domains):
                return False
        if self.subject is not None and not self.subject.test(r.subject or ""):
            return False
        if self.body is not None and not self.body.test(r.text or ""):
            return False
        if self.size is not None and not self.size.test(f.size):
            return False
        if self.age is not None:
            if r.date is None:  # unknown age never matches
                return False
            if not self.age.test((f.now - r.date).total_seconds()):
                return False
        if self.attachment_count is not None and not self.attachment_count.test(
            len(r.attachments)
        ):
            return False
        if self.attachment_name is not None and not self.attachment_name.any_of(
            a.filename for a in r.attachments if a.filename
        ):
            return False
        if self.attachment_type is not None and not self.attachment_type.any_of(
            a.content_type for a in r.attachments
        ):
            return False
        if self.auto_reply is not None and r.auto_reply != self.auto_reply:
            return False
        if self.mailing_list is not None and f.mailing_list != self.mailing_list:
            return False
        if self.list_id is not None and not self.list_id.test(r.list_id or ""):
            return False
        if self.tag is not None and not f.tags & set(self.tag):
            return False
        return self._helpdesk(r)

    def _helpdesk(self, r: MessageRecord) -> bool:
        """The keys on the helpdesk fields (absent field: no match, or false)."""
        if self.reply is not None and not self.reply.test(r.reply or ""):
            return False
        ticket = r.ticket
        if self.ticket is not None and not self.ticket.any_of(
            ticket.tickets if ticket else ()
        ):
            return False
        if self.is_reply is not None and (
            ticket is not None and ticket.is_reply
        ) != self.is_reply:
            return False
        if self.bounce is not None and (r.bounce is not None) != self.bounce:
            return False
        if self.bounce_status is not None and not self.bounce_status.any_of(
            x.status for x in (r.bounce.recipients if r.bounce else ()) if x.status
        ):
            return False
        if self.envelope is not None and not self.envelope.any_of(
            e.kind for e in r.envelopes
        ):
            return False
        return self.attachment_text is None or self.attachment_text.any_of(
            a.text for a in r.attachments if a.text
        )


#: The condition keys a `when` table accepts (TOML spelling), for error messages.
CONDITION_KEYS = tuple(
    (info.alias or name) for name, info in Condition.model_fields.items()
)
