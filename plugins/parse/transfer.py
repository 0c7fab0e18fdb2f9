"""Streaming Content-Transfer-Encoding decoders (quoted-printable, identity) to spool files.

Each gives, fed the encoded octets in any pieces, exactly what the stdlib's
``Message.get_payload(decode=True)`` (policy compat32) gives for the whole: for
quoted-printable ``quopri.decodestring``, i.e. :func:`binascii.a2b_qp`; for every
other encoding but base64 and uuencode the octets themselves. Base64 is
:class:`~.spool.RunDecoder`'s.
"""

from __future__ import annotations

import binascii
from pathlib import Path
from typing import Final

from .spool import CHUNK, SpooledPayload, SpoolWriter


class QpDecoder(SpoolWriter):
    """Quoted-printable (RFC 2045 §6.7) decoded as ``binascii.a2b_qp`` decodes it whole.

    ``a2b_qp`` looks ahead at most two octets after ``=``, except after ``=`` CR, a
    soft line break it ends only at the next LF. So decoding stops at a cut after an
    LF (nothing pending there), or, in a longer line, at a cut with no ``=`` in the two
    octets before it and no ``=`` CR before it in the line; the rest waits for more.
    """

    #: Carried octets past which a line without LF is cut where it is safe.
    LONG: Final = CHUNK

    def __init__(self, spool_dir: Path | None) -> None:
        super().__init__(spool_dir)
        self._carry = b""

    def feed(self, text: bytes) -> None:
        """Decode up to the last safe cut; keep the rest for the next piece."""
        data = self._carry + text
        cut = data.rfind(b"\n") + 1
        if len(data) - cut > self.LONG and b"=\r" not in data[cut:]:
            safe = len(data)
            while safe > cut and b"=" in data[max(cut, safe - 2) : safe]:
                safe -= 1
            cut = safe
        if cut:
            self._write(binascii.a2b_qp(data[:cut]))
        self._carry = data[cut:]

    def finish(self) -> tuple[SpooledPayload, str | None]:
        """Decode the rest; quoted-printable decoding reports no defects."""
        self._write(binascii.a2b_qp(self._carry))
        self._carry = b""
        return self.payload(), None


class CopyDecoder(SpoolWriter):
    """The identity (7bit, 8bit, binary, and any unknown encoding): octets as they are."""

    def feed(self, text: bytes) -> None:
        """Copy ``text``."""
        self._write(text)

    def finish(self) -> tuple[SpooledPayload, str | None]:
        """Nothing pending; no defects."""
        return self.payload(), None
