"""store.maildir's options: where the Maildir is and how group commit makes it durable.

Contract: :class:`MaildirOptions` validates the ``store.maildir`` table (unknown keys
are errors); ``folder`` is a plain Maildir++ folder name, never a path.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from mailpipe.units import Duration


class MaildirOptions(BaseModel):
    """Options of ``store.maildir``."""

    model_config = ConfigDict(extra="forbid", defer_build=True)

    path: Path = Field(description="The Maildir root (holds cur/, new/ and tmp/).")
    folder: str | None = Field(
        default=None,
        description="A Maildir++ subfolder name (stored in <path>/.<folder>); "
        "dots separate levels, e.g. 'Archive.2024'.",
    )
    tmp_max_age: Duration = Field(
        default=36 * 3600.0,
        description="Remove mailpipe's own files left in tmp/ by a crash once they "
        "are this old (the Maildir convention is 36 hours).",
    )
    group_commit: bool = Field(
        strict=True,
        default=True,
        description="Make a group durable at flush (before any DELE) instead of "
        "before each process() returns: messages held in memory are written as "
        "unnamed files, made durable (see sync) and linked into new/ at flush (no "
        "file is named in new/ before its content is durable), and new/ is fsynced "
        "once per group; flush fails the group if one write failed.",
    )
    sync: Literal["auto", "file"] = Field(
        default="auto",
        description="How group commit makes a group's files durable before naming "
        "them in new/. 'auto': one syncfs() of the Maildir's file system per group "
        "(at most 128 files) where syncfs reports write-back errors (Linux 5.8 or "
        "later, on ext4, XFS, Btrfs or tmpfs: not overlayfs nor FUSE, 9p or NFS), "
        "else 'file'. 'file': one fsync per file, on writer threads; choose "
        "it when the Maildir shares its file system with a busy database or other "
        "heavy writers, whose dirty data a syncfs would also have to write.",
    )

    @field_validator("folder")
    @classmethod
    def _plain_folder(cls, value: str | None) -> str | None:
        if value is None:
            return None
        if (
            not value
            or "/" in value
            or "\\" in value
            or "\0" in value
            or value.startswith(".")
            or value.endswith(".")
            or ".." in value
        ):
            raise ValueError(
                "a folder name must be non-empty, without slashes or "
                "leading, trailing or double dots"
            )
        return value
