"""One whole poll of any source object through the real engine (for the contract
suite, :mod:`mailpipe.testing.contract`): journal, chain and store as in production."""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict

from mailpipe.chain import Chain
from mailpipe.engine import MailboxRunner
from mailpipe.journal.sqlite import SqliteJournal
from mailpipe.plugin_manager import Hooks, load
from mailpipe.quarantine import Quarantine
from mailpipe.source import AckKind, Source, acknowledgements_of
from mailpipe.validation import validate_config


class _NoOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")


async def poll_once(source: Source, work: Path) -> list[bytes]:
    """Poll ``source`` once into a Maildir under ``work`` (journal there too, so a
    second call sees the first's state); return the raw messages this poll stored."""
    kinds = acknowledgements_of(type(source))

    class Shim:  # stands in for the source's class in the config (options: none)
        name: ClassVar[str] = "contract-under-test"
        Options: ClassVar[type[BaseModel]] = _NoOptions
        acknowledgements: ClassVar[frozenset[AckKind]] = kinds

        def __init__(self, options: Any, context: Any) -> None:  # never constructed
            raise AssertionError("the contract poll passes its source object")

        def session(self) -> Any:  # never called: the runner gets the real source
            raise AssertionError("the contract poll passes its source object")

    pm, registry = load(entry_points=False)
    registry.add("source", Shim, "contract")
    ack: Any = "delete"
    if AckKind.DELETE not in kinds:
        ack = {"move": "Processed"} if AckKind.MOVE in kinds else {"flag": "$Processed"}
    maildir = work / "contract-maildir"
    config = validate_config(
        {
            "mailboxes": [{"name": "contract", "source": Shim.name, "acknowledge": ack,
                           **({} if kinds & {AckKind.DELETE, AckKind.MOVE, AckKind.FLAG}
                              else {"delete": "never"})}],
            "pipelines": {"default": {"processors": [
                {"use": "store.maildir", "path": str(maildir)}]}},
        },
        path=work / "contract.toml",
        registry=registry,
    )
    before = _stored(maildir)
    journal = SqliteJournal(work / "contract-journal.sqlite3")
    chain = Chain(config.pipelines, base_dir=work)
    await chain.open()
    try:
        runner = MailboxRunner(
            config.mailboxes[0], config=config, chain=chain, journal=journal,
            quarantine=Quarantine(work / "contract-quarantine"), hooks=Hooks(pm),
            source=source,
        )
        summary = await runner.poll()
        if summary.error:
            raise AssertionError(f"the contract poll failed: {summary.error}")
    finally:
        await chain.close()
        journal.close()
    after = _stored(maildir)
    return [after[name] for name in sorted(set(after) - set(before))]


def _stored(maildir: Path) -> dict[str, bytes]:
    out: dict[str, bytes] = {}
    for sub in ("new", "cur"):
        folder = maildir / sub
        if folder.is_dir():
            out.update({f"{sub}/{p.name}": p.read_bytes() for p in folder.iterdir()})
    return out
