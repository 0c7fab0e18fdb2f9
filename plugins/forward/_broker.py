"""What the broker forwarders share: their options and the key header.

They publish the message's ``mailpipe.message/1`` document (:mod:`mailpipe.document`).
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from mailpipe.units import Duration

#: Header (NATS, AMQP) carrying the message key beside the broker's own id field.
KEY_HEADER = "X-Mailpipe-Key"


class BrokerOptions(BaseModel):
    """Options every broker forwarder has."""

    model_config = ConfigDict(extra="forbid", defer_build=True)

    include_raw: bool = Field(
        strict=True,
        default=False, description="Add the raw message, base64-encoded, as 'raw'."
    )
    timeout: Duration = Field(
        default=10.0,
        gt=0,
        description="Timeout of connecting and of waiting for the broker's ack.",
    )
