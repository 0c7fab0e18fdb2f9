"""The ``imap`` session's acknowledgement: what happens on the server once mail is safe.

Acknowledgement happens at :meth:`~mailpipe.plugins.imap.source.ImapSession.commit`, or
at :meth:`~mailpipe.plugins.imap.source.ImapSession.checkpoint` between two commit
windows of one session (MP-06), after the engine made every marked message durable:
``delete`` (``UID STORE +FLAGS.SILENT (\\Deleted)`` then ``UID EXPUNGE``, IC-37),
``move`` (``UID MOVE``, or ``UID COPY`` + the delete pair, IC-40/IC-41) or ``flag``
(``UID STORE +FLAGS.SILENT (flag)``, IC-42). Without UIDPLUS no EXPUNGE of any kind is
sent (IC-38): the messages are marked ``\\Deleted`` and the expunge is left to the
mailbox owner, logged as ``imap_expunge_deferred``. ``CLOSE`` is never sent (IC-39).
``abort`` closes the connection without acknowledging anything.

Contract: :class:`ImapAcknowledgement` is the acknowledgement half of
:class:`~mailpipe.plugins.imap.source.ImapSession` (a mixin, never used alone):
nothing changes on the server before :meth:`ImapAcknowledgement.commit` or
:meth:`ImapAcknowledgement.checkpoint`, which the engine calls only after every
marked message is durable; a refused acknowledgement or a lost connection raises
CommitError.
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from mailpipe.errors import CommitError, SourceError
from mailpipe.message import MessageRef
from mailpipe.source import Ack, AckKind

from . import events as cmd
from . import mutf7
from .client import CommandFailed, ImapClient
from .folder import _Folder, _Where

_FLAG = re.compile(r"^\\?[A-Za-z0-9$_.\-]{1,64}$")
_SYSTEM_FLAGS = ("\\Seen", "\\Answered", "\\Flagged", "\\Draft")


class ImapAcknowledgement:
    """The acknowledgement of :class:`~mailpipe.plugins.imap.source.ImapSession`."""

    # The session's (see ImapSession.__init__).
    client: ImapClient
    _where: dict[int, _Where]
    _marked: list[tuple[MessageRef, Ack]]
    _committed: bool
    _selected: bytes | None
    _log: Any
    _select: Callable[[bytes], Awaitable[_Folder]]

    async def acknowledge(self, refs: Sequence[MessageRef], ack: Ack) -> None:
        """Remember ``refs`` to be acknowledged with ``ack`` at :meth:`commit`
        (nothing changes on the server before); ``keep`` changes nothing."""
        if ack.kind is AckKind.KEEP:
            return
        self._marked.extend((r, ack) for r in refs if r.number in self._where)

    async def mark_deleted(self, refs: Sequence[MessageRef]) -> None:
        """The first contract's call: acknowledge ``refs`` by deleting them."""
        await self.acknowledge(refs, Ack(AckKind.DELETE))

    async def commit(self) -> None:
        """Acknowledge every marked message (per folder, IC-37..IC-42), then LOGOUT.

        Raises:
            CommitError: an acknowledgement was refused or the connection failed.
        """
        self._committed = True
        await self._apply_marked()
        await self.client.logout()  # IC-39: never CLOSE
        self._log.info("imap_committed", acknowledged=len(self._marked))

    async def checkpoint(self) -> None:
        """MP-06: acknowledge every message marked since the last checkpoint, as
        :meth:`commit` does (UID EXPUNGE, MOVE and STORE take effect at once), and
        stay logged in. The next
        :meth:`~mailpipe.plugins.imap.source.ImapSession.list` selects each folder
        again, so it sees the folder as it is now (EXISTS, UIDVALIDITY).

        Raises:
            CommitError: an acknowledgement was refused or the connection failed.
        """
        await self._apply_marked()
        self._log.info("imap_checkpoint", acknowledged=len(self._marked))
        self._marked = []
        self._selected = None

    async def _apply_marked(self) -> None:
        groups: dict[tuple[bytes, Ack], list[int]] = {}
        for ref, ack in self._marked:
            where = self._where[ref.number]
            groups.setdefault((where.folder, ack), []).append(where.uid)
        try:
            for (wire, ack), uids in groups.items():
                folder = await self._select(wire)
                if not folder.read_write:
                    raise CommitError(f"folder {wire!r} is read-only; nothing acknowledged")
                for uidset in cmd.split_uid_sets(uids):
                    await self._acknowledge(folder, uidset, ack)
        except (SourceError, OSError) as exc:
            await self.client.abort()
            if isinstance(exc, CommitError):
                raise
            raise CommitError(f"{self.client.where}: acknowledgement failed: {exc}") from None

    async def _acknowledge(self, folder: _Folder, uidset: str, ack: Ack) -> None:
        caps = self.client.capabilities
        if ack.kind is AckKind.FLAG:
            flag = ack.target or ""
            if not _FLAG.fullmatch(flag) or flag.lower() == "\\deleted" or (
                flag.startswith("\\") and flag not in _SYSTEM_FLAGS
            ):
                raise CommitError(f"{flag!r} is not a flag mailpipe sets (IC-42)")
            flags = folder.permanent_flags
            if (
                not flag.startswith("\\") and flags is not None
                and "\\*" not in flags and flag not in flags
            ):
                # IC-42: a keyword the server would keep for the session only.
                raise CommitError(
                    f"folder {folder.wire!r} does not keep keyword {flag!r} "
                    f"(PERMANENTFLAGS {' '.join(flags)})"
                )
            await self.client.command(cmd.uid_store(uidset, "+FLAGS.SILENT", [flag]))
            return
        if ack.kind is AckKind.MOVE:
            target = mutf7.encode(ack.target or "")
            if "MOVE" in caps:
                await self._with_trycreate(cmd.uid_move(uidset, target), target)
                return
            await self._with_trycreate(cmd.uid_copy(uidset, target), target)  # IC-41
        await self.client.command(cmd.uid_store(uidset, "+FLAGS.SILENT", ["\\Deleted"]))
        if "UIDPLUS" in caps or "IMAP4REV2" in caps:
            await self.client.command(cmd.uid_expunge(uidset))  # IC-37
        else:
            # IC-38: a bare EXPUNGE would also remove other clients' \Deleted mail.
            self._log.warning("imap_expunge_deferred", uids=uidset[:200])

    async def _with_trycreate(self, command: cmd.Command, target: bytes) -> None:
        try:
            await self.client.command(command)
        except CommandFailed as exc:
            code = exc.done.code
            if code is None or code.name != "TRYCREATE":
                raise
            await self.client.command(cmd.create(target))
            self._log.info("imap_folder_created", folder=target.decode("ascii"))
            await self.client.command(command)
