"""The `unwrap` processor: S/MIME, PGP/MIME, TNEF and Outlook .msg envelopes."""

from __future__ import annotations

import hashlib
from typing import TYPE_CHECKING, Any, ClassVar, Final

from mailpipe.plugins.parse import PAYLOADS_KEY, parse_into, parse_message
from mailpipe.plugins.parse.attachments import TNEF_TYPES
from mailpipe.plugins.parse.desk import Envelope
from mailpipe.plugins.parse.record import Attachment, Defect, MessageRecord
from pydantic import BaseModel, ConfigDict, Field

from mailpipe.processor import ProcessorContext, Result
from mailpipe.units import ByteSize

from .cms import signed_content
from .outlook import is_msg, may_be_msg, read_msg
from .smime import (
    PGP_ENCRYPTED,
    PGP_SIGNATURE,
    PKCS7_MIME,
    PKCS7_SIGNATURE,
    cms_kind,
    der_of,
    inline_pgp,
    signers,
)

if TYPE_CHECKING:
    from mailpipe.message import Message

#: ``Defect.kind`` of an envelope that could not be opened.
UNWRAP_FAILED: Final = "UnwrapFailed"
#: Nested envelopes opened at most (a signed message inside a signed message ...).
MAX_DEPTH: Final = 3


class UnwrapOptions(BaseModel):
    """Options of the `unwrap` processor."""

    model_config = ConfigDict(extra="forbid", defer_build=True)

    max_size: ByteSize = Field(
        25 * 2**20,
        gt=0,
        description="Largest S/MIME blob or .msg attachment opened; bigger ones are "
        "marked and left as they are (a defect note says so).",
    )
    outlook: bool = Field(
        True, strict=True, description="Open attached Outlook .msg items."
    )


def _data(payload: Any, limit: int) -> bytes | None:
    if isinstance(payload, bytes | bytearray):
        return bytes(payload) if len(payload) <= limit else None
    if len(payload) > limit:  # a SpooledPayload: read only when small enough
        return None
    return bytes(payload)


class _Unwrapper:
    """One message's walk: envelopes found, attachments and payloads appended."""

    def __init__(self, record: MessageRecord, payloads: list[Any], limit: int) -> None:
        self.record, self.payloads, self.limit = record, payloads, limit

    def defect(self, part: str, detail: str) -> None:
        self.record.defects.append(Defect(part=part, kind=UNWRAP_FAILED, detail=detail))

    def add(self, att: Attachment, payload: Any, part: str, source: str) -> None:
        copy = att.model_copy(
            update={"index": len(self.record.attachments), "part": part,
                    "source": source}
        )
        self.record.attachments.append(copy)
        self.payloads.append(payload)

    def adopt_body(self, text: str | None, html: str | None, from_html: bool) -> None:
        """Take an inner body when the outer message shows none of its own."""
        r = self.record
        if (text or html) and not (r.text or "").strip() and not (r.html or "").strip():
            r.text, r.html, r.text_from_html = text, html, from_html

    def smime(self, att: Attachment, data: bytes, depth: int) -> Envelope | None:
        kind = cms_kind(data)
        if kind is None:
            return None
        who = signers(data)
        if kind == "smime-encrypted":
            return Envelope(kind=kind, part=att.part, detail="encrypted for its "
                            "recipients; mailpipe holds no key, so it stays sealed")
        inner = signed_content(der_of(data))
        if inner is None:
            self.defect(att.part, "opaque-signed S/MIME without readable content")
            return Envelope(kind=kind, part=att.part, signature="unverified",
                            signers=who, detail="content unreadable")
        rec, pays = parse_message(inner)
        self.adopt_body(rec.text, rec.html, rec.text_from_html)
        for a, p in zip(rec.attachments, pays, strict=False):
            self.add(a, p, f"{att.part}/{a.part}" if a.part else att.part, "smime")
        found = [Envelope(kind=kind, part=att.part, unwrapped=True,
                          signature="unverified", signers=who,
                          detail="inner message shown; signature not verified")]
        if depth < MAX_DEPTH:  # the inner message may be wrapped again
            found += self.walk(rec, pays, depth + 1)
        self.record.envelopes.extend(found[1:])
        return found[0]

    def outlook(self, att: Attachment, data: bytes) -> Envelope:
        item = read_msg(data)
        if isinstance(item, str):
            self.defect(att.part, item)
            return Envelope(kind="outlook-msg", part=att.part, detail=item)
        self.adopt_body(item.text, item.html, False)
        for i, (name, ctype, payload) in enumerate(item.attachments):
            a = Attachment(index=0, filename=name, content_type=ctype,
                           disposition="attachment", size=len(payload),
                           sha256=hashlib.sha256(payload).hexdigest(), part="")
            self.add(a, payload, f"{att.part}/msg.{i + 1}", "msg")
        for note in item.notes:
            self.defect(att.part, note)
        att.text = "\n\n".join(x for x in (item.subject, item.text) if x) or None
        return Envelope(kind="outlook-msg", part=att.part, unwrapped=True,
                        detail=f"{len(item.attachments)} attachments")

    def walk(self, record: MessageRecord, payloads: list[Any], depth: int,
             outlook: bool = True) -> list[Envelope]:
        found: list[Envelope] = []
        types = {a.content_type for a in record.attachments}
        if PGP_ENCRYPTED in types:
            found.append(Envelope(kind="pgp-encrypted", detail="PGP/MIME encrypted; "
                                  "stays sealed"))
        if PGP_SIGNATURE in types:
            found.append(Envelope(kind="pgp-signed", signature="unverified",
                                  detail="PGP/MIME detached signature, not verified"))
        kind = inline_pgp(record.text) if depth == 0 else None
        if kind is not None and not found:
            found.append(Envelope(kind=kind,
                                  signature="unverified" if kind == "pgp-signed"
                                  else "none", detail="inline PGP"))
        for att, payload in zip(list(record.attachments), list(payloads), strict=False):
            if att.source in ("smime", "msg"):
                continue  # opened by this step already
            ctype, name = att.content_type, (att.filename or "").lower()
            if ctype in PKCS7_SIGNATURE or name.endswith(".p7s"):
                signature = _data(payload, self.limit) or b""
                found.append(Envelope(kind="smime-signed", part=att.part,
                                      signature="unverified",
                                      signers=signers(signature),
                                      detail="detached signature, not verified"))
            elif ctype in PKCS7_MIME or name.endswith(".p7m"):
                blob = _data(payload, self.limit)
                if blob is None:
                    self.defect(att.part, f"S/MIME part of {att.size} octets is over "
                                "max_size; left sealed")
                    continue
                env = self.smime(att, blob, depth)
                if env is not None:
                    found.append(env)
            elif ctype in TNEF_TYPES or name == "winmail.dat":
                opened = [a for a in record.attachments if a.source == "tnef"]
                found.append(Envelope(kind="ms-tnef", part=att.part, unwrapped=True,
                                      detail=f"opened by parse: {len(opened)} "
                                      "attachments, body used when none other"))
            elif outlook and depth == 0 and may_be_msg(att.filename, ctype):
                item = _data(payload, self.limit)  # name or type first: no other is read
                if item is not None and is_msg(att.filename, ctype, item):
                    found.append(self.outlook(att, item))
        return found


class UnwrapProcessor:
    """Open the envelopes a helpdesk would otherwise show as an empty ticket.

    * opaque-signed S/MIME (``application/pkcs7-mime``, SignedData): the inner
      message's body becomes the record's (when the outer one has none) and its
      attachments are appended (``source = "smime"``); the signature is marked
      ``unverified`` with the signers' certificate subjects: a claim, never proof;
    * detached S/MIME and PGP/MIME signatures: marked ``unverified``;
    * encrypted S/MIME and PGP/MIME (and inline PGP): recognised, marked, left sealed;
    * TNEF (winmail.dat): ``parse`` already opens it; marked;
    * attached Outlook ``.msg`` items (``extract-msg``): their attachments are
      appended (``source = "msg"``), their subject and body become the .msg
      attachment's ``text`` and, when the message has no body, the record's.

    Everything found is in ``record.envelopes``; what could not be opened is a
    defect of kind ``UnwrapFailed``. Never raises on bad input; never stops the
    chain; ``message.raw`` is never changed. Parses first when no step did.
    """

    name: ClassVar[str] = "unwrap"
    Options: ClassVar[type[BaseModel]] = UnwrapOptions
    commits: ClassVar[bool] = False
    concurrent: ClassVar[bool] = True

    def __init__(self, options: UnwrapOptions, context: ProcessorContext) -> None:
        self.options = options
        self.context = context

    def process(self, message: Message) -> Result:
        """Fill ``record.envelopes`` and open what can be opened; always continues."""
        record = parse_into(message)
        if record.envelopes or message.meta.get("unwrapped"):
            return None  # ran already (a route back through the same step)
        payloads = message.meta.setdefault(PAYLOADS_KEY, [])
        walker = _Unwrapper(record, payloads, self.options.max_size)
        found = walker.walk(record, list(payloads), 0, self.options.outlook)
        record.envelopes[:0] = found
        message.meta["unwrapped"] = True
        return None

