"""store.attachments on the real file system: blobs, manifests, names, filters."""

from __future__ import annotations

import email.policy
import hashlib
import json
import os
import unicodedata
from email.message import EmailMessage
from pathlib import Path

import pytest
from mailpipe.plugins.parse import parse_into
from mailpipe.plugins.store.attachments import (
    MAX_NAME_BYTES,
    AttachmentsOptions,
    AttachmentsStore,
    safe_filename,
)

from mailpipe import Message, ProcessorContext

PDF = b"%PDF-1.4 pretend report\n"
PNG = b"\x89PNG\r\n\x1a\n pretend image"


def make_message(
    files: list[tuple[str | None, bytes, str]], *, inline_png: bool = False, uid: str = "1"
) -> Message:
    msg = EmailMessage()
    msg["From"] = "alice@example.com"
    msg["Subject"] = "files"
    msg.set_content("see attached")
    if inline_png:
        msg.add_related(PNG, maintype="image", subtype="png", cid="<logo@x>",
                        disposition="inline")
    for name, data, ctype in files:
        maintype, subtype = ctype.split("/")
        msg.add_attachment(data, maintype=maintype, subtype=subtype, filename=name)
    return Message.from_bytes(msg.as_bytes(policy=email.policy.SMTP), uid=uid)


def store(tmp_path: Path, *, dry_run: bool = False, **options: object) -> AttachmentsStore:
    opts = AttachmentsOptions.model_validate({"dir": "att", **options})
    return AttachmentsStore(opts, ProcessorContext(base_dir=tmp_path, dry_run=dry_run))


def manifest(tmp_path: Path, m: Message) -> dict[str, object]:
    data: dict[str, object] = json.loads(
        (tmp_path / "att" / "manifests" / f"{m.key}.json").read_bytes()
    )
    return data


def test_blobs_are_content_addressed_and_listed_in_the_manifest(tmp_path: Path) -> None:
    m = make_message([("report.pdf", PDF, "application/pdf"),
                      ("copy.pdf", PDF, "application/pdf")])
    parse_into(m)
    store(tmp_path).process(m)
    digest = hashlib.sha256(PDF).hexdigest()
    blob = tmp_path / "att" / digest[:2] / digest
    assert blob.read_bytes() == PDF
    assert blob.stat().st_mode & 0o222 == 0  # read-only
    doc = manifest(tmp_path, m)
    assert doc["key"] == m.key and doc["message_sha256"] == m.sha256
    assert doc["skipped"] == []
    assert [
        (a["filename"], a["name"], a["content_type"], a["size"], a["sha256"], a["path"])
        for a in doc["attachments"]  # type: ignore[attr-defined]
    ] == [
        ("report.pdf", "report.pdf", "application/pdf", len(PDF), digest,
         f"{digest[:2]}/{digest}"),
        ("copy.pdf", "copy.pdf", "application/pdf", len(PDF), digest,
         f"{digest[:2]}/{digest}"),
    ]
    assert sorted(p.name for p in (tmp_path / "att").iterdir()) == [digest[:2], "manifests"]


def test_rerun_writes_nothing_twice(tmp_path: Path) -> None:
    m = make_message([("report.pdf", PDF, "application/pdf")])
    parse_into(m)
    store(tmp_path, extract_names=True).process(m)
    root = tmp_path / "att"

    def snapshot() -> dict[str, tuple[int, int]]:
        return {
            str(p.relative_to(root)): (p.stat().st_ino, p.stat().st_mtime_ns)
            for p in root.rglob("*") if p.is_file()
        }

    before = snapshot()
    store(tmp_path, extract_names=True).process(m)
    assert snapshot() == before
    assert len(before) == 3  # blob, manifest, by-message link


def test_without_a_parse_step_the_message_is_parsed_here(tmp_path: Path) -> None:
    a = make_message([("report.pdf", PDF, "application/pdf")], uid="1")
    b = Message.from_bytes(a.raw, uid="1")
    parse_into(a)
    store(tmp_path / "with").process(a)
    store(tmp_path / "without").process(b)
    assert b.record is None
    assert manifest(tmp_path / "with", a) == manifest(tmp_path / "without", b)


def test_messages_without_attachments_get_no_manifest(tmp_path: Path) -> None:
    m = make_message([])
    store(tmp_path).process(m)
    assert not (tmp_path / "att").exists()


def test_filters_by_type_size_and_inline(tmp_path: Path) -> None:
    big = b"x" * 5000
    m = make_message(
        [("report.pdf", PDF, "application/pdf"), ("big.pdf", big, "application/pdf"),
         ("notes.txt", b"notes", "text/plain")],
        inline_png=True,
    )
    parse_into(m)
    store(tmp_path, types=["application/*", "image/png"], max_size="1KB").process(m)
    doc = manifest(tmp_path, m)
    assert [a["filename"] for a in doc["attachments"]] == ["report.pdf"]  # type: ignore[attr-defined]
    assert sorted(
        (s["filename"] or "", s["reason"]) for s in doc["skipped"]  # type: ignore[attr-defined]
    ) == [("", "inline"), ("big.pdf", "size"), ("notes.txt", "type")]

    store(tmp_path / "inline", include_inline=True, types=["image/*"]).process(m)
    doc = manifest(tmp_path / "inline", m)
    attachments: list[dict[str, object]] = doc["attachments"]  # type: ignore[assignment]
    (png,) = attachments
    assert png["inline"] is True and png["content_id"] == "logo@x"
    assert png["name"] == "attachment-0.png"


def test_extract_names_sanitises_and_deduplicates(tmp_path: Path) -> None:
    names = [
        "../../etc/passwd", "/etc/shadow", "C:\\Windows\\win.ini", "CON.txt", "nul",
        "Re\u0301sume\u0301.pdf", "report.pdf", "REPORT.pdf", "..", None,
        "x" * 300 + ".pdf",
    ]
    m = make_message([(n, f"file {i}".encode(), "application/pdf")
                      for i, n in enumerate(names)])
    parse_into(m)
    store(tmp_path, extract_names=True).process(m)
    folder = tmp_path / "att" / "by-message" / m.key
    got = [a["name"] for a in manifest(tmp_path, m)["attachments"]]  # type: ignore[attr-defined]
    assert got[:9] == [
        "passwd", "shadow", "win.ini", "_CON.txt", "_nul", "Résumé.pdf",
        "report.pdf", "REPORT (2).pdf", "attachment-8.pdf",
    ]
    assert got[9] == "attachment-9.pdf"
    assert got[10].endswith(".pdf") and len(got[10].encode()) == MAX_NAME_BYTES
    assert unicodedata.is_normalized("NFC", got[5])
    assert sorted(os.listdir(folder)) == sorted(got)
    for i, name in enumerate(got):
        path = folder / name
        assert path.resolve().parent == folder.resolve()
        assert path.read_bytes() == f"file {i}".encode()


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("../../../etc/passwd", "passwd"),
        ("..\\..\\boot.ini", "boot.ini"),
        ("/absolute/path.txt", "path.txt"),
        ("C:/x/y.doc", "y.doc"),
        ("AUX", "_AUX"),
        ("com1.tar.gz", "_com1.tar.gz"),
        ("LPT9 .txt", "_LPT9.txt"),
        ("Console.txt", "Console.txt"),
        ("a\x00b\x07c\x1b.txt", "abc.txt"),
        ("evil\u202egnp.exe", "evilgnp.exe"),
        ("tab\there.txt", "tab here.txt"),
        ('what?<>:"|*.txt', "what_______.txt"),
        ("  .hidden  ", "hidden"),
        ("trailing. . .", "trailing"),
        ("...", "fallback.bin"),
        ("", "fallback.bin"),
        ("e\u0301", "\u00e9"),
    ],
)
def test_safe_filename(name: str, expected: str) -> None:
    assert safe_filename(name, fallback="fallback.bin") == expected


def test_safe_filename_bounds_utf8_length_without_splitting_characters() -> None:
    name = "ü" * 200 + ".pdf"
    out = safe_filename(name, fallback="f", suffix=" (12)")
    assert len(out.encode("utf-8")) <= MAX_NAME_BYTES
    assert out.endswith(" (12).pdf") and set(out[:-9]) == {"ü"}


def test_dry_run_writes_nothing(tmp_path: Path) -> None:
    m = make_message([("report.pdf", PDF, "application/pdf")])
    store(tmp_path, dry_run=True).process(m)
    assert not (tmp_path / "att").exists()


def _same_named(n: int, name: str = "a.bin") -> Message:
    """A message of ``n`` one-byte attachments all called ``name`` (issue 20 item 4)."""
    head = (
        b"From: a@example.com\r\nSubject: many\r\nMIME-Version: 1.0\r\n"
        b"Content-Type: multipart/mixed; boundary=XX\r\n\r\n"
    )
    part = (
        b"--XX\r\nContent-Type: application/octet-stream\r\n"
        b'Content-Disposition: attachment; filename="' + name.encode() + b'"\r\n\r\nx\r\n'
    )
    return Message.from_bytes(head + part * n + b"--XX--\r\n", uid="1")


def test_same_named_attachments_are_named_in_linear_time(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """De-duplicating n equal names costs O(n) sanitising calls, not O(n²) (5,000
    same-named parts took 49 s)."""
    import mailpipe.plugins.store.attachments as mod

    calls = 0
    real = mod.safe_filename

    def counting(*args: object, **kwargs: object) -> str:
        nonlocal calls
        calls += 1
        return real(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(mod, "safe_filename", counting)
    n = 1000
    m = _same_named(n)
    parse_into(m)
    store(tmp_path).process(m)
    got = [a["name"] for a in manifest(tmp_path, m)["attachments"]]  # type: ignore[attr-defined]
    assert len(got) == n and len({g.casefold() for g in got}) == n
    assert got[:3] == ["a.bin", "a (2).bin", "a (3).bin"] and got[-1] == f"a ({n}).bin"
    assert calls <= 3 * n


def test_dedup_skips_names_already_taken_by_a_numbered_original(
    tmp_path: Path,
) -> None:
    m = make_message([(n, f"file {i}".encode(), "application/pdf")
                      for i, n in enumerate(["a (2).pdf", "a.pdf", "A.pdf", "a.pdf"])])
    parse_into(m)
    store(tmp_path).process(m)
    got = [a["name"] for a in manifest(tmp_path, m)["attachments"]]  # type: ignore[attr-defined]
    assert got == ["a (2).pdf", "a.pdf", "A (3).pdf", "a (4).pdf"]


def test_attachments_over_the_part_cap_are_counted_not_stored(tmp_path: Path) -> None:
    """A record with more attachments than the parser's cap (another parser, an old
    record) is cut at the cap too; the manifest says how many were left out."""
    from mailpipe.plugins.parse import MAX_PARTS, Attachment

    m = _same_named(1)
    record = parse_into(m)
    over = MAX_PARTS + 7
    record.attachments = [
        Attachment(index=i, filename=f"f{i}.bin", content_type="application/octet-stream",
                   size=1, sha256=hashlib.sha256(b"x").hexdigest(), part="1")
        for i in range(over)
    ]
    m.meta["attachment_payloads"] = [b"x"] * over
    store(tmp_path).process(m)
    doc = manifest(tmp_path, m)
    assert len(doc["attachments"]) == MAX_PARTS  # type: ignore[arg-type]
    assert doc["over_limit"] == 7
