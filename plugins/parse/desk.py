"""The helpdesk fields of a record, set by the `reply`, `ticket`, `bounce` and `unwrap`
processors (``parse`` leaves them empty)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field

EnvelopeKind = Literal[
    "smime-signed", "smime-opaque-signed", "smime-encrypted", "pgp-signed",
    "pgp-encrypted", "ms-tnef", "outlook-msg",
]

#: What is known of a signature: never "valid" unless it was checked (see ``unwrap``).
SignatureVerdict = Literal["unverified", "valid", "invalid", "none"]


class TicketKeys(BaseModel):
    """Keys a helpdesk attaches a message to its ticket by (set by ``ticket``)."""

    tickets: list[str] = Field(
        default_factory=list,
        description="Ticket ids found by the subject-tag patterns, in order, e.g. "
        "'1234' for '[#1234]', 'PROJ-42' for '[PROJ-42]'.",
    )
    thread_ids: list[str] = Field(
        default_factory=list,
        description="Message-IDs this one answers: References then In-Reply-To, "
        "oldest first, without duplicates.",
    )
    root_id: str | None = Field(
        default=None, description="The thread's first Message-ID (References[0])."
    )
    subject: str = Field(
        default="",
        description="Subject without reply/forward prefixes (Re:, AW:, 返信:, ...) "
        "and without the ticket tags.",
    )
    is_reply: bool = Field(default=False, description="A reply prefix or In-Reply-To.")
    is_forward: bool = Field(default=False, description="A forward prefix (Fwd:, WG:).")


class BounceRecipient(BaseModel):
    """One recipient a delivery report speaks of."""

    address: str = Field(description="The recipient address (Final- or Original-).")
    action: str | None = Field(
        default=None, description="failed, delayed, delivered, relayed or expanded."
    )
    status: str | None = Field(
        default=None, description="RFC 3463 status code, e.g. 5.1.1."
    )
    diagnostic: str | None = Field(
        default=None, description="Diagnostic-Code text, e.g. 'smtp; 550 no such user'."
    )
    remote_mta: str | None = Field(default=None, description="Remote-MTA name.")


class Bounce(BaseModel):
    """A delivery report (set by ``bounce``)."""

    kind: Literal["dsn", "non-standard"] = Field(
        description="'dsn': RFC 3464 message/delivery-status; 'non-standard': "
        "recognised from the text of a report without one."
    )
    action: str = Field(
        description="Worst action over the recipients: failed > delayed > others."
    )
    permanent: bool = Field(
        description="True when delivery failed for good (action failed or 5.x.x)."
    )
    recipients: list[BounceRecipient] = Field(default_factory=list)
    reporting_mta: str | None = Field(default=None, description="Reporting-MTA.")
    original_message_id: str | None = Field(
        default=None, description="Message-ID of the message that bounced, if given."
    )


class Envelope(BaseModel):
    """A security or Outlook wrapper found around (or inside) the message."""

    kind: EnvelopeKind = Field(description="What wrapper it is.")
    part: str = Field(default="", description="MIME part path of the wrapper.")
    unwrapped: bool = Field(
        default=False,
        description="True when its content now is the record's body and attachments.",
    )
    signature: SignatureVerdict = Field(
        default="none",
        description="'unverified' for a signature that was not checked against a "
        "trust store: read the signer as a claim, not as proof.",
    )
    signers: list[str] = Field(
        default_factory=list, description="Subjects of the signing certificates."
    )
    detail: str = Field(default="", description="What was done or why not.")
