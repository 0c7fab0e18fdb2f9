"""Built-in ``store.*`` processors; each module lists its classes in ``PROCESSORS``."""

from __future__ import annotations

from typing import TYPE_CHECKING, Final

from mailpipe import hookimpl

if TYPE_CHECKING:
    from mailpipe.registry import Register

MODULES: Final = ("sqlite", "maildir", "mbox", "attachments", "jsonl", "postgres")

#: Processor name -> "module:Class" (a test checks it against each module's PROCESSORS);
#: a module is imported only when a configuration uses one of its processors.
PROCESSORS: Final = {
    "store.sqlite": "sqlite:SqliteStore",
    "store.maildir": "maildir:MaildirStore",
    "store.mbox": "mbox:MboxStore",
    "store.attachments": "attachments:AttachmentsStore",
    "store.jsonl": "jsonl:JsonlStore",
    "store.postgres": "postgres:PostgresStore",
}


@hookimpl
def mailpipe_register_processors(register: Register) -> None:
    """Register every processor of :data:`PROCESSORS`, imported on first use."""
    for name, target in PROCESSORS.items():
        register.lazy(name, f"{__name__}.{target}")
