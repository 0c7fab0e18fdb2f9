"""`mailpipe demo`: offline, idempotent, and running the real example pipeline."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_bundled_example_is_the_root_example() -> None:
    bundled = ROOT / "mailpipe" / "samples" / "pipeline.example.toml"
    assert bundled.read_bytes() == (ROOT / "pipeline.example.toml").read_bytes()


def _demo(tmp_path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "mailpipe",
            "--log-format",
            "json",
            "demo",
            "--dir",
            str(tmp_path / "demo"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
        env={**os.environ, "COLUMNS": "200"},
    )


def test_demo_runs_twice_idempotently(tmp_path: Path) -> None:
    first = _demo(tmp_path)
    assert first.returncode == 0, first.stderr
    assert "mailpipe run summary" in first.stdout and "ok" in first.stdout
    demo = tmp_path / "demo"
    db = sqlite3.connect(demo / "var" / "tickets.sqlite3")
    subjects = [s for (s,) in db.execute("select subject from messages")]
    db.close()
    assert len(subjects) == 10  # 11 samples, the auto-reply dropped on its headers
    assert "プリンターが故障しました" in subjects
    assert not any("Automatic reply" in s for s in subjects)
    blobs = [p for p in (demo / "var" / "attachments").rglob("*") if p.is_file()]
    assert any(p.read_bytes().startswith(b"%PDF") for p in blobs)
    assert any(p.read_bytes().startswith(b"\x89PNG") for p in blobs)
    records = (demo / "var" / "records.jsonl").read_text().splitlines()
    assert len(records) == 10
    # the helpdesk steps on their samples (issue 17)
    by_id = {r.get("message_id"): r for r in map(json.loads, records)}
    jp = by_id["jp-2001-2@example.jp"]
    assert "正常に印刷できる" in jp["reply"] and "お試しください" not in jp["reply"]
    assert jp["ticket"]["tickets"] == ["2001"] and "ticket-reply" in jp["tags"]
    bounce = by_id["20261123110113.4F2A1@mx.mailpipe.example"]["bounce"]
    assert bounce["recipients"][0]["address"] == "erik@customer-old.example"
    assert bounce["recipients"][0]["status"] == "5.1.1"
    assert bounce["original_message_id"] == "reply-1002-1@mailpipe.example"
    outlook = by_id["vpn-3001@partner.example"]
    assert [e["kind"] for e in outlook["envelopes"]] == ["ms-tnef"]
    assert "certificate expired" in outlook["reply"]
    assert any(a["filename"] == "vpn-error.png" for a in outlook["attachments"])
    assert not list((demo / "server-mailbox" / "new").iterdir())  # mailbox emptied
    events = [json.loads(x) for x in first.stderr.splitlines() if x.startswith("{")]
    finished = [e for e in events if e["event"] == "session_finished"]
    assert finished[-1]["deleted"] == 11 and finished[-1]["dropped"] == 1

    second = _demo(tmp_path)
    assert second.returncode == 0, second.stderr
    assert len((demo / "var" / "records.jsonl").read_text().splitlines()) == 10
    events = [json.loads(x) for x in second.stderr.splitlines() if x.startswith("{")]
    finished = [e for e in events if e["event"] == "session_finished"]
    assert finished[-1]["listed"] == 0 and finished[-1]["processed"] == 0
    assert "mailpipe state list" in second.stdout
