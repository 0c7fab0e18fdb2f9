"""`mailpipe search` and `mailpipe show` end to end: the real CLI in a subprocess over
the store.sqlite archive of real runs (the demo; the testing kit's POP3 server)."""

from __future__ import annotations

import json
import shlex
from pathlib import Path
from typing import Any

import pytest

from mailpipe.testing.e2e import run_cli as mp
from mailpipe.testing.server import Pop3Server

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """The demo run once: (its pipeline.toml, its closing advice)."""
    root = tmp_path_factory.mktemp("demo")
    done = mp("demo", "--dir", str(root / "demo"), cwd=root)
    assert done.returncode == 0, done.stderr
    return root / "demo" / "pipeline.toml", done.stdout


def lines(cfg: Path, *args: str) -> list[dict[str, Any]]:
    done = mp("search", str(cfg), *args, "--json", cwd=cfg.parent)
    assert done.returncode == 0, done.stderr
    return [json.loads(x) for x in done.stdout.splitlines()]


def subjects(cfg: Path, *args: str) -> list[str]:
    return [hit["subject"] for hit in lines(cfg, *args)]


def test_the_demo_advice_runs(demo: tuple[Path, str]) -> None:
    cfg, advice = demo
    assert "import sqlite3" not in advice
    commands = [
        shlex.split(line.strip())[1:]
        for line in advice.splitlines()
        if line.strip().startswith(
            ("mailpipe search", "mailpipe show", "mailpipe status")
        )
    ]
    assert [c[0] for c in commands] == ["search", "search", "show", "status"]
    outputs = [mp(*command, cwd=cfg.parent) for command in commands]
    assert all(o.returncode == 0 for o in outputs), [o.stderr for o in outputs]
    printer, customer, shown, _ = (o.stdout for o in outputs)
    assert printer.count("Printer on floor 3") == 3
    assert [json.loads(x)["tags"] for x in customer.splitlines()] == [["customer"]] * 2
    assert "Subject:     Invoice 2026-114" in shown
    assert "invoice-2026-114.pdf  application/pdf" in shown


def test_search_filters(demo: tuple[Path, str]) -> None:
    cfg, _ = demo
    assert len(subjects(cfg, "printer")) == 3
    assert len(subjects(cfg)) == 10  # no query: the newest (all of them here)
    assert subjects(cfg, "printer", "--from", "ALICE") == [
        "Printer on floor 3 prints blank pages"
    ]
    assert len(subjects(cfg, "--from", "customer.example")) == 2  # address substring
    assert subjects(cfg, "invoice", "--from", "carla@supplier.example") == [
        "Invoice 2026-114 and a photo of the broken part"
    ]
    assert len(subjects(cfg, "--tag", "customer")) == 2
    assert subjects(cfg, "--tag", "customer", "--tag", "newsletter") == []
    assert subjects(cfg, "--mailbox", "elsewhere") == []
    assert len(subjects(cfg, "--mailbox", "support", "printer")) == 3
    late = lines(cfg, "--since", "2026-11-24")
    # a message without a Date header counts by when it was stored (just now)
    assert late and all(
        hit["date"] is None or hit["date"] >= "2026-11-24" for hit in late
    )
    assert len(late) < 7
    assert [hit["date"] for hit in lines(cfg, "--since", "1d")] == [None]  # ditto
    assert len(subjects(cfg, "printer OR invoice")) == 4  # FTS5 syntax
    # unicode61 splits on spaces and punctuation only: unspaced Japanese is one token,
    # found by a prefix query (a known limit of the store's tokenizer)
    assert subjects(cfg, "プリンター") == []
    assert subjects(cfg, "プリンター*") == ["プリンターが故障しました"]
    assert len(subjects(cfg, "print*")) >= 3
    assert len(subjects(cfg, "printer", "--limit", "1")) == 1
    hit = lines(cfg, "invoice")[0]
    assert set(hit) == {
        "key",
        "mailbox",
        "uid",
        "date",
        "from",
        "subject",
        "size",
        "tags",
        "attachments",
    }
    assert (
        hit["attachments"] == 3
        and hit["from"] == "Carla Núñez <carla@supplier.example>"
    )


def test_a_query_fts5_cannot_parse_is_searched_as_words(demo: tuple[Path, str]) -> None:
    cfg, _ = demo
    # '@' and '-' are FTS5 syntax errors; ':' names a column that does not exist
    assert "Invoice 2026-114 and a photo of the broken part" in subjects(
        cfg, "2026-114"
    )
    assert subjects(cfg, "carla@supplier.example")
    assert subjects(cfg, 'subject:"invoice"')  # a real FTS5 column filter still works
    assert subjects(cfg, "from:carla") == []  # no such column: searched as words
    for odd in ('O"Brien', '"', "*"):  # review: these raised a traceback
        done = mp("search", str(cfg), odd, cwd=cfg.parent)
        assert done.returncode == 0 and "Traceback" not in done.stderr, done.stderr


def test_show_one_record_with_its_attachments(demo: tuple[Path, str]) -> None:
    cfg, _ = demo
    key = lines(cfg, "invoice")[0]["key"]
    done = mp("show", str(cfg), key[:6], "--json", cwd=cfg.parent)
    assert done.returncode == 0, done.stderr
    doc = json.loads(done.stdout)
    assert doc["key"] == key and doc["subject"].startswith("Invoice 2026-114")
    assert "invoice and a photo" in doc["text"]
    names = [a["filename"] for a in doc["attachments"]]
    assert names[:2] == ["invoice-2026-114.pdf", "broken part (photo).png"]
    pdf = Path(doc["attachments"][0]["file"])
    assert pdf.read_bytes().startswith(b"%PDF")
    table = mp("show", str(cfg), key, cwd=cfg.parent)
    assert table.returncode == 0 and str(pdf) in table.stdout

    unknown = mp("show", str(cfg), "ffffffffffffffff0", cwd=cfg.parent)
    assert unknown.returncode == 2 and "no stored message" in unknown.stderr
    ambiguous = mp("show", str(cfg), "", cwd=cfg.parent)
    assert ambiguous.returncode == 2 and "ambiguous" in ambiguous.stderr


def test_bad_since_is_a_usage_error(demo: tuple[Path, str]) -> None:
    cfg, _ = demo
    done = mp("search", str(cfg), "--since", "last tuesday", cwd=cfg.parent)
    assert done.returncode == 2 and "--since 'last tuesday'" in done.stderr


def msg(n: int, subject: str) -> bytes:
    return (
        f"From: Dora <dora{n}@example.com>\r\nTo: b@example.com\r\n"
        f"Message-ID: <m{n}@example.com>\r\nSubject: {subject}\r\n\r\nbody {n}\r\n"
    ).encode()


def write_config(tmp_path: Path, steps: str, port: int = 1, ca: str = "x") -> Path:
    cfg = tmp_path / "pipeline.toml"
    cfg.write_text(
        f"""
[state]
path = "var/journal.sqlite3"
[[mailboxes]]
name = "box"
host = "127.0.0.1"
port = {port}
security = "tls"
ca_file = "{ca}"
username = "user"
password = "pass"
[pipelines.default]
processors = [{steps}]
"""
    )
    return cfg


def test_choosing_among_several_stores(tmp_path: Path) -> None:
    steps = (
        '{ use = "parse" }, { use = "store.sqlite", path = "var/a.sqlite3" }, '
        '{ use = "store.sqlite", name = "archive", path = "var/b.sqlite3" }'
    )
    with Pop3Server(
        [msg(1, "quarterly report"), msg(2, "lunch")], tls="implicit"
    ) as srv:
        cfg = write_config(tmp_path, steps, srv.port, str(srv.ca_file))
        assert mp("run", str(cfg), "--once", cwd=tmp_path).returncode == 0

    several = mp("search", str(cfg), "report", cwd=tmp_path)
    assert several.returncode == 2
    assert "pipelines.default.processors[1]" in several.stderr
    assert "pipelines.default.processors[2] (name 'archive'" in several.stderr
    assert "--store" in several.stderr
    by_name = mp(
        "search", str(cfg), "report", "--store", "archive", "--json", cwd=tmp_path
    )
    by_path = mp(
        "search", str(cfg), "report", "--store", "var/a.sqlite3", "--json", cwd=tmp_path
    )
    for done in (by_name, by_path):
        assert done.returncode == 0, done.stderr
        (hit,) = [json.loads(x) for x in done.stdout.splitlines()]
        assert (
            hit["subject"] == "quarterly report"
            and hit["from"] == "Dora <dora1@example.com>"
        )
    unknown = mp("search", str(cfg), "report", "--store", "nope", cwd=tmp_path)
    assert (
        unknown.returncode == 2
        and "no store.sqlite step named 'nope'" in unknown.stderr
    )
    shown = mp("show", str(cfg), hit["key"], "--store", "archive", cwd=tmp_path)
    assert shown.returncode == 0 and "Dora <dora1@example.com>" in shown.stdout


def test_no_store_or_nothing_stored_yet(tmp_path: Path) -> None:
    none = write_config(
        tmp_path, '{ use = "parse" }, { use = "store.jsonl", path = "o" }'
    )
    done = mp("search", str(none), "x", cwd=tmp_path)
    assert done.returncode == 2 and "no pipeline has a store.sqlite step" in done.stderr

    empty = write_config(
        tmp_path, '{ use = "store.sqlite", path = "var/never.sqlite3" }'
    )
    done = mp("search", str(empty), "x", cwd=tmp_path)
    assert done.returncode == 1
    assert "pipelines.default.processors[0]" in done.stderr
    assert "does not exist (nothing stored yet?)" in done.stderr
    assert not (tmp_path / "var" / "never.sqlite3").exists()  # read-only: not created
