"""C-60 thresholds of mailpipe.uidl_reset.assess, against a minimal journal."""

from __future__ import annotations

from typing import Any

import pytest

from mailpipe.message import MessageRef
from mailpipe.uidl_reset import MIN_MESSAGES, ResetEvidence, assess


class Retained:
    """Just the journal query the check uses; counts how often it is asked."""

    def __init__(self, entries: dict[str, int]) -> None:
        self.entries = entries
        self.calls = 0

    def retained(self, mailbox: str) -> dict[str, int]:
        self.calls += 1
        return dict(self.entries)


def refs(uids: list[str], size: int = 100) -> list[MessageRef]:
    return [
        MessageRef(mailbox="box", number=n, uid=u, size=size)
        for n, u in enumerate(uids, 1)
    ]


def old(n: int) -> list[str]:
    return [f"old-{i}" for i in range(n)]


def new(n: int) -> list[str]:
    return [f"new-{i}" for i in range(n)]


def check(listed: list[str], kept: list[str], known: list[str]) -> Any:
    journal = Retained(dict.fromkeys(kept, 100))
    return assess(refs(listed), set(known), journal, "box"), journal


def test_full_rename_is_suspected_with_counts() -> None:
    evidence, _ = check(new(12), old(12), known=[])
    assert evidence == ResetEvidence(
        listed=12, unseen=12, retained=12, vanished=12, same_size=12
    )


def test_a_small_maildrop_is_never_suspected_nor_queried() -> None:
    evidence, journal = check(new(MIN_MESSAGES - 1), old(50), known=[])
    assert evidence is None and journal.calls == 0


def test_half_unseen_is_not_more_than_half() -> None:
    listed = old(10) + new(10)
    evidence, journal = check(listed, old(10) + [f"x{i}" for i in range(40)], old(10))
    assert evidence is None and journal.calls == 0


@pytest.mark.parametrize(
    ("kept", "suspected"),
    [
        (old(0), False),  # a fresh journal: the first keep-mode poll
        (old(9), False),  # every kept one vanished, but too few to matter
        (old(10), True),
        (old(10) + new(10), False),  # half of the kept ones still listed
        (old(11) + new(10), True),
    ],
)
def test_most_kept_mail_must_have_vanished(kept: list[str], suspected: bool) -> None:
    listed = new(10) + [f"fresh-{i}" for i in range(15)]
    evidence, _ = check(listed, kept, known=[u for u in kept if u in listed])
    assert (evidence is not None) == suspected


def test_same_size_counts_matching_sizes_once_each() -> None:
    journal = Retained({"a": 5, "b": 5, "c": 7, **dict.fromkeys(old(10), 9)})
    listed = refs(new(10), size=9) + refs(["n1", "n2"], size=5)
    listed += refs(["n3", "n4"], size=7)
    evidence = assess(listed, set(), journal, "box")
    assert evidence is not None and evidence.same_size == 13  # the second 7 is new


def test_new_mail_after_another_client_emptied_the_box_is_not_a_reset() -> None:
    # 50 kept messages deleted elsewhere (webmail), then 12 new ones arrive: as many
    # uids unseen and vanished as after a reset, but the sizes do not match.
    journal = Retained({f"old-{i}": 1000 + i for i in range(50)})
    listed = [
        MessageRef(mailbox="box", number=n, uid=f"new-{n}", size=5000 + n)
        for n in range(1, 13)
    ]
    assert assess(listed, set(), journal, "box") is None
    # The same 12 sizes among the vanished ones: that is renamed mail.
    renamed = Retained({f"old-{i}": 5000 + i for i in range(1, 13)})
    assert assess(listed, set(), renamed, "box") is not None
