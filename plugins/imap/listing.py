"""The ``imap`` session's listing: which messages of the folders a poll looks at.

Listing (IC-26, MP-05): the session is a :class:`mailpipe.source.CursorSession` whose
scope is the folder under its UIDVALIDITY; with a cursor W a folder is listed with
``UID FETCH W+1:*`` and UIDs up to W are dropped (``n:*`` holds the last message).
``select = "unseen"``, ``since`` and ``since_days`` search first (``UID SEARCH``) and
fetch the sizes of what was found: they choose among new mail, so a message the
watermark has passed is not looked at again (one marked unseen later included). The
criteria are part of the scope (:func:`cursor_scope`): a changed selection starts
from no cursor. The journal's owed messages (acknowledgement due) are always listed
too, by ``UID FETCH <their UIDs>`` whatever the cursor and criteria, so an owed
acknowledgement is sent even after the message left the search and one not listed is
gone from the server; PENDING ones are listed while the criteria select them
(``UID SEARCH UID <set> <criteria>``), and one the criteria leave out but the server
still has holds the cursor below it (``Coverage.held``), so it is retried once
selected again. Gmail ids carry no UID: while one is unfinished each folder's
``UID FETCH 1:* (UID X-GM-MSGID)`` finds their UIDs. Without UIDPLUS every folder is
listed whole and the session reports no coverage, so no cursor is stored (MP-05).

Contract: :class:`ImapListing` is the listing half of
:class:`~mailpipe.plugins.imap.source.ImapSession` (a mixin, never used alone):
:meth:`ImapListing.list` numbers the messages it returns in ``_where`` for retrieval
and acknowledgement, and records each folder's UIDNEXT and UIDVALIDITY in the
source's maps. It reads the server only (IC-30).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from mailpipe.errors import SourcePermanentError
from mailpipe.message import MessageRef
from mailpipe.source import Ack, AckKind, Coverage

from . import events as cmd
from .client import ImapClient
from .events import (
    Data,
    Done,
    esearch_all,
    fetch_items,
    flag_list,
    parse_number,
    search_uids,
)
from .folder import _Folder, _show, _Where
from .identity import cursor_scope, gmail_uid, message_uid, parse_message_uid
from .options import ImapOptions


class ImapListing:
    """The listing of :class:`~mailpipe.plugins.imap.source.ImapSession`."""

    # The session's (see ImapSession.__init__).
    options: ImapOptions
    mailbox: str
    ack: Ack | None
    client: ImapClient
    folders: dict[bytes, _Folder]
    listed_uidnext: dict[bytes, int]
    listed_uidvalidity: dict[bytes, int]
    _epoch_changed: bool
    _where: dict[int, _Where]
    _cursors: Mapping[str, int]
    _unfinished: frozenset[str]
    _owed: frozenset[str]
    _coverage: dict[str, Coverage]
    _log: Any
    _select: Callable[[bytes], Awaitable[_Folder]]

    async def list(self) -> list[MessageRef]:
        """Every message of every configured folder, by UID with its RFC822.SIZE.

        MP-05/IC-26: after :meth:`~mailpipe.plugins.imap.source.ImapSession.resume`,
        a folder is listed only past its cursor; ``select``, ``since`` and
        ``since_days`` narrow it with ``UID SEARCH``.

        IC-46: when the server offers X-GM-EXT-1 (Gmail) the id is the message's
        ``X-GM-MSGID``, the same in every folder (label) it appears in, so a message
        with several labels is listed once, in the first configured folder showing it.
        """
        refs: list[MessageRef] = []
        gmail = "X-GM-EXT-1" in self.client.capabilities
        listed: set[str] = set()
        self._coverage = {}
        self._epoch_changed = False  # IC-25: as of this listing (MP-06: one of several)
        # MP-05: without UIDPLUS a delete leaves the message in the folder, marked
        # \Deleted (IC-38); its entry is pruned once it is DELETED and not listed, so
        # such a folder is always listed whole, never from a cursor.
        caps = self.client.capabilities
        expunges = "UIDPLUS" in caps or "IMAP4REV2" in caps
        for wire in list(self.folders):
            folder = await self._select(wire)
            if folder.uidvalidity is None:
                # IC-24: no persistent UIDs; identity by UID is impossible.
                raise SourcePermanentError(
                    f"{self.client.where}: folder {wire.decode('ascii', 'replace')!r} "
                    "has no UIDVALIDITY; mailpipe cannot key its messages"
                )
            if folder.uidnext is not None:
                self.listed_uidnext[wire] = folder.uidnext
            self._note_epoch(wire, folder.uidvalidity)
            scope = cursor_scope(wire, folder.uidvalidity, self.options.selection())
            cover = Coverage(self._cursors.get(scope, 0) if expunges else 0)
            if expunges:
                self._coverage[scope] = cover
            if not folder.exists:
                continue
            explicit = await self._unfinished_listing(wire, folder.uidvalidity, cover)
            found = await self._list_folder(
                wire, gmail=gmail, after=cover.start, explicit=explicit,
            )
            copies = 0
            for uid in sorted(found):
                size, msgid = found[uid]
                key = (
                    gmail_uid(msgid) if msgid is not None
                    else message_uid(wire, folder.uidvalidity, uid)
                )
                cover.listed[uid] = key
                if key in listed:
                    copies += 1  # IC-46: another label of a message listed already
                    continue
                listed.add(key)
                number = len(self._where) + 1
                self._where[number] = _Where(wire, uid)
                refs.append(MessageRef(
                    mailbox=self.mailbox, number=number, uid=key, size=size
                ))
            if copies:
                self._log.debug("imap_label_copies", folder=_show(wire), count=copies)
            self._log.info(
                "imap_folder_listed", folder=_show(wire), from_uid=cover.start + 1,
                listed=len(cover.listed), search=self.options.search_criteria(cover.start),
            )
        return refs

    def _note_epoch(self, wire: bytes, uidvalidity: int) -> None:
        """IC-25: remember the folder's UIDVALIDITY; another one than the previous
        listing saw (or none seen yet) makes
        :meth:`~mailpipe.plugins.imap.source.ImapSession.epoch_changed` true."""
        if self.listed_uidvalidity.get(wire) == uidvalidity:
            return
        if wire in self.listed_uidvalidity:
            self._log.warning(
                "imap_uidvalidity_changed", folder=_show(wire),
                was=self.listed_uidvalidity[wire], now=uidvalidity,
            )
        self._epoch_changed = True
        self.listed_uidvalidity[wire] = uidvalidity

    def _uids_in(self, uids: frozenset[str], wire: bytes, uidvalidity: int) -> set[int]:
        """The UIDs of this folder (under ``uidvalidity``) among journal ``uids``."""
        out: set[int] = set()
        for uid in uids:
            parsed = parse_message_uid(uid)
            if parsed is not None and parsed[0] == wire and parsed[1] == uidvalidity:
                out.add(parsed[2])
        return out

    async def _unfinished_listing(
        self, wire: bytes, uidvalidity: int, cover: Coverage
    ) -> set[int]:
        """MP-05: the UIDs of the selected folder to list besides the cursor's range:
        every owed one (an acknowledgement is sent whatever the criteria), and the
        PENDING ones the criteria still select (retried). A PENDING one on the
        server the criteria leave out goes to ``cover.held``: no cursor passes it,
        and it is retried once selected again."""
        owed = self._uids_in(self._owed, wire, uidvalidity)
        pending = self._uids_in(self._unfinished - self._owed, wire, uidvalidity) - owed
        if any(u.startswith("X-GM-MSGID=") for u in self._unfinished):
            by_id = await self._gmail_uids()
            owed |= {uid for key, uids in by_id.items() if key in self._owed
                     for uid in uids}
            pending |= {uid for key, uids in by_id.items()
                        if key in self._unfinished and key not in self._owed
                        for uid in uids}
        criteria = self.options.search_criteria(0)
        if not pending or criteria is None:
            return owed | pending
        selected: set[int] = set()
        present: set[int] = set()
        for uidset in cmd.split_uid_sets(pending):
            selected |= await self._search(f"UID {uidset} {criteria}", 0)
            present |= await self._search(f"UID {uidset}", 0)
        cover.held = (present & pending) - selected
        return owed | (selected & pending)

    async def _gmail_uids(self) -> dict[str, set[int]]:
        """IC-46, MP-05: Gmail id → UIDs in the selected folder, by ``UID FETCH 1:*
        (UID X-GM-MSGID)`` (only while the journal holds an unfinished Gmail id,
        which carries no UID)."""
        out: dict[str, set[int]] = {}
        async for event in self.client.stream([cmd.uid_fetch("1:*", "UID X-GM-MSGID")]):
            if isinstance(event, Data) and event.name == "FETCH":
                items = fetch_items(event.values)
                uid_v, msgid_v = items.get("UID"), items.get("X-GM-MSGID")
                if uid_v is not None and msgid_v is not None:
                    key = gmail_uid(parse_number(msgid_v, limit=2**64 - 1))
                    out.setdefault(key, set()).add(parse_number(uid_v))
            elif isinstance(event, Done) and not event.ok:
                raise SourcePermanentError(
                    f"{self.client.where}: UID FETCH refused: {event.text[:200]}"
                )
        return out

    async def _list_folder(
        self, wire: bytes, *, gmail: bool, after: int = 0,
        explicit: set[int] | None = None,
    ) -> dict[int, tuple[int, int | None]]:
        """UID → (RFC822.SIZE, X-GM-MSGID or None) of the selected folder's messages
        past UID ``after`` that ``select``/``since`` want, and those of ``explicit``
        (unfinished journal entries, MP-05) whatever ``after`` and the criteria,
        without the messages that already carry a ``flag`` acknowledgement (IC-42).
        On Gmail an unfinished ``X-GM-MSGID`` id has no UID: while one exists the
        folder's ids are read first (:meth:`_gmail_uids`).

        IC-26: ``n:*`` always includes the folder's last message, even when its UID
        is below ``n`` (RFC 9051 §6.4.9), so every UID up to ``after`` is dropped."""
        found: dict[int, tuple[int, int | None]] = {}
        explicit = set() if explicit is None else explicit
        uidsets = [f"{after + 1}:*"] if after < cmd.MAX_NUMBER else []
        criteria = self.options.search_criteria(after)
        wanted: set[int] | None = None
        if criteria is not None:
            wanted = await self._search(criteria, after)
            uidsets = cmd.split_uid_sets(wanted) if wanted else []
        extra = {u for u in explicit
                 if u <= after or (wanted is not None and u not in wanted)}
        uidsets += cmd.split_uid_sets(extra) if extra else []
        if not uidsets:
            return found
        done_flag = (
            self.ack.target.lower()
            if self.ack is not None and self.ack.kind is AckKind.FLAG and self.ack.target
            else None
        )
        skipped = 0
        items_wanted = (
            "UID RFC822.SIZE"
            + (" X-GM-MSGID" if gmail else "")
            + (" FLAGS" if done_flag else "")
        )
        fetches = [cmd.uid_fetch(uidset, items_wanted) for uidset in uidsets]
        async for event in self.client.stream(fetches):
            if isinstance(event, Data) and event.name == "FETCH":
                items = fetch_items(event.values)
                uid_v, size_v = items.get("UID"), items.get("RFC822.SIZE")
                uid_n = parse_number(uid_v) if uid_v is not None else None
                msgid_v = items.get("X-GM-MSGID") if gmail else None
                if uid_n is not None and (
                    uid_n <= after or (wanted is not None and uid_n not in wanted)
                ) and uid_n not in explicit:
                    continue  # IC-26: below the range (n:*), or not asked for
                flags = {f.lower() for f in flag_list(items.get("FLAGS"))}
                if done_flag is not None and done_flag in flags:
                    # IC-42: the flag is the acknowledgement: already done (also
                    # after a UIDVALIDITY change, IC-25).
                    skipped += 1
                    continue
                if uid_v is None or size_v is None:
                    continue
                found[parse_number(uid_v)] = (
                    parse_number(size_v, limit=2**63 - 1),
                    parse_number(msgid_v, limit=2**64 - 1) if msgid_v is not None else None,
                )
            elif isinstance(event, Done) and not event.ok:
                raise SourcePermanentError(
                    f"{self.client.where}: UID FETCH refused: {event.text[:200]}"
                )
        if skipped:
            self._log.debug("imap_already_flagged", folder=_show(wire), count=skipped)
        return found

    async def _search(self, criteria: str, after: int) -> set[int]:
        """``UID SEARCH criteria`` → the UIDs above ``after`` (IC-26, IC-33): a
        ``* SEARCH`` or an ``* ESEARCH ... ALL set`` answer, in any order."""
        found: set[int] = set()
        async for event in self.client.stream([cmd.uid_search(criteria)]):
            if isinstance(event, Data) and event.name == "SEARCH":
                found.update(search_uids(event.values))
            elif isinstance(event, Data) and event.name == "ESEARCH":
                found.update(esearch_all(event.values))
            elif isinstance(event, Done) and not event.ok:
                raise SourcePermanentError(
                    f"{self.client.where}: UID SEARCH refused: {event.text[:200]}"
                )
        return {uid for uid in found if uid > after}
