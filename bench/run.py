"""End-to-end benchmark: mailpipe beside mpop, fetchmail, getmail6 and stdlib poplib.

One command starts a private Dovecot (mailpipe.testing.dovecot) on 127.0.0.1, fills a
mailbox with a deterministic profile, and times each tool retrieving every message
with deletion (RETR, store, DELE, QUIT):

  mailpipe-e2e      ``mailpipe run --once``: parse + store.sqlite (raw inline, WAL,
                    synchronous=FULL, group commit flushed before any DELE), DELE, QUIT
  mailpipe-maildir  ``mailpipe run --once``: store.maildir only (tmp, fsync, new/)
  mpop              Debian mpop, ``delivery maildir``, ``keep off`` (pipelines)
  fetchmail         Debian fetchmail, ``fetchall nokeep``, mda safecat into a Maildir
  getmail           Debian getmail6, SimplePOP3Retriever, Maildir destination, delete
  poplib            stdlib poplib: RETR n, Maildir (tmp, fsync, rename), DELE n, QUIT

Each run gets a freshly filled mailbox, runs as its own process group (peak RSS and CPU
from wait4), and is verified: every message arrived exactly once and intact (Maildir
files, or the ``message_raw`` table of the SQLite store, compared with what was delivered
after CRLF->LF), and the mailbox is empty afterwards (STAT). Dovecot's own logout lines
give the RETR/DELE counts. Profiles: ``small`` 2,000 messages of 2-4 KB; ``mixed``
1,000 messages from 300 B to 2 MB. ``--latency-ms N`` puts the clients behind
bench/proxy.py (N/2 ms each way: N ms added round trip).

    bench/run                       # both profiles, every installed tool, 3 rounds
    bench/run --small               # 50 small / 20 mixed messages, 1 round
    bench/run --profile small --latency-ms 20 --count 300
    bench/run --tools mailpipe-e2e,mpop --repeat 5 --json out.json

Prints one Markdown table per profile and exits 0 only when every row verified.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import datetime
import hashlib
import json
import os
import platform
import poplib
import pwd
import random
import re
import shlex
import shutil
import signal
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from email.utils import formatdate
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
HOST = "127.0.0.1"
MARK = b"X-Bench-Id: "
BASE_TIME = 1_700_000_000
ALL_TOOLS = ("mailpipe-e2e", "mailpipe-maildir", "mpop", "fetchmail", "getmail", "poplib")
EXTRA_TOOLS = ("mailpipe-e2e-nogroup", "mailpipe-e2e-defaults", "ceiling",
               "base-maildir", "base-e2e-defaults")
# base-*: the same runs with another interpreter (another checkout's venv), for
# before/after comparisons interleaved in one run.
BASE_PYTHON = os.environ.get("MAILPIPE_BENCH_BASE_PYTHON", "")
# The minimal pipelined client of the shared harness (issue 18's yardstick): RETR+DELE
# pipelined on a raw socket, Maildir via tmp/ + rename, one syncfs() before QUIT.
CEILING = Path(os.environ.get("MAILPIPE_BENCH_CEILING",
                              "/work/shared/bench-harness/clients/ceiling.py"))
FULL_COUNTS = {"small": 2000, "mixed": 1000}
SMALL_COUNTS = {"small": 50, "mixed": 20}

# ---------------------------------------------------------------------------
# deterministic messages
# ---------------------------------------------------------------------------

_WORDS = (
    "the of and to in is that for it as was with be by on not this are or from at "
    "which but have an they you were there been one all would their we has when who "
    "will more if out so said what up its about into than them can only other new "
    "some could time these two may then do first any my now such like our over also "
    "after did many before must through back years where much your way well down "
    "should because each just those people how too state good very make world still "
    "own see work long get here between both life being under never day same another "
    "know while last might great old year off come since against right used take "
    "invoice report meeting schedule project budget quarterly review deadline attached "
    "please regards thanks update server release deployment customer order shipment "
    "contract proposal agenda minutes action items database backup migration latency "
    "throughput pipeline mailbox retrieval"
)
WORDS = _WORDS.split()
ACCENTED = ["café", "naïve", "Grüße", "résumé", "Zürich", "São", "Ærø", "façade",
            "jalapeño", "Malmö", "crème", "€100"]
JA = ["お世話になっております。", "会議の資料を添付いたします。", "来週の打ち合わせ",
      "ご確認をお願いします。", "請求書", "見積書", "納品予定日", "株式会社サンプル",
      "システムメンテナンス", "営業部", "承知いたしました。", "日程調整"]
NAMES = ["Alice Smith", "Bob Jones", "Carol Garcia", "Dave Miller", "Erin Davis",
         "Frank Lopez", "Grace Wilson", "Heidi Moore", "Ivan Lee", "Judy Martin"]
DOMAINS = ["example.org", "example.com", "example.net", "corp.example.com"]
DOT_LINES = [".", "..", "...", ". dot and space", ".hidden", "..double", "...."]
ATTACH = [("application/pdf", "pdf"), ("application/zip", "zip"), ("image/png", "png"),
          ("image/jpeg", "jpg"), ("application/octet-stream", "bin")]


def _prose(rng: random.Random, nbytes: int, accents: bool = False) -> str:
    vocab = WORDS + ACCENTED if accents else WORDS
    lines: list[str] = []
    size = 0
    while size < nbytes:
        words = rng.choices(vocab, k=rng.randint(6, 12))
        line = " ".join(words)
        if rng.random() < 0.1:
            lines.append("")
            size += 1
        lines.append(line)
        size += len(line.encode()) + 1
    return "\n".join(lines) + "\n"


def _dots(rng: random.Random, text: str, n: int) -> str:
    lines = text.split("\n")
    for _ in range(n):
        lines.insert(rng.randrange(len(lines)), rng.choice(DOT_LINES))
    return "\n".join(lines)


def _qp(text: str, charset: str = "utf-8") -> str:
    return binascii.b2a_qp(text.encode(charset), istext=True).decode("ascii")


def _ja_word(text: str) -> str:
    return "\n ".join(
        "=?ISO-2022-JP?B?" + base64.b64encode(text[k:k + 10].encode("iso2022_jp")).decode()
        + "?=" for k in range(0, len(text), 10)
    )


def _headers(rng: random.Random, mid: str, i: int, subject: str) -> list[str]:
    name = rng.choice(NAMES)
    dom = rng.choice(DOMAINS)
    addr = name.lower().replace(" ", ".") + "@" + dom
    date = formatdate(BASE_TIME + i * 61, usegmt=True)
    sig = base64.b64encode(rng.randbytes(128)).decode()
    return [
        f"X-Bench-Id: {mid}",
        f"Received: from out.{dom} (out.{dom} [192.0.2.{i % 250 + 1}])\n\tby mx.bench."
        f"example (Postfix) with ESMTPS id {rng.getrandbits(40):010X}\n\tfor "
        f"<bench@bench.example>; {date}",
        f"DKIM-Signature: v=1; a=rsa-sha256; c=relaxed/relaxed; d={dom}; s=s1;\n\t"
        f"h=from:to:subject:date:message-id;\n\tb="
        + "\n\t".join(sig[k:k + 72] for k in range(0, len(sig), 72)),
        f"Date: {date}",
        f'From: "{name}" <{addr}>',
        "To: bench@bench.example",
        f"Subject: {subject}",
        f"Message-ID: <{mid}.{rng.getrandbits(48):012x}@{dom}>",
        "MIME-Version: 1.0",
    ]


def _subject(rng: random.Random) -> str:
    return " ".join(rng.choices(WORDS, k=rng.randint(3, 9))).capitalize()


def _small(rng: random.Random, mid: str, i: int) -> bytes:
    h = _headers(rng, mid, i, _subject(rng))
    h += ["Content-Type: text/plain; charset=us-ascii", "Content-Transfer-Encoding: 7bit"]
    head = "\n".join(h) + "\n\n"
    total = rng.randint(2100, 3900)  # 2-4 KB in all
    body = _prose(rng, max(200, total - len(head) - 80))
    if rng.random() < 0.1:
        body = _dots(rng, body, rng.randint(1, 3))
    return (head + body).encode("ascii")


def _mixed(rng: random.Random, mid: str, i: int) -> bytes:
    u = rng.random()
    size = int(3000 * 10 ** (rng.random() * 1.3))  # log-uniform 3-60 KB
    h = _headers(rng, mid, i, _subject(rng))
    if u < 0.45:  # text/plain, ASCII or UTF-8 (8bit or quoted-printable)
        accents = rng.random() < 0.4
        body = _prose(rng, size, accents)
        if rng.random() < 0.2:
            body = _dots(rng, body, rng.randint(1, 5))
        if accents and rng.random() < 0.5:
            h += ["Content-Type: text/plain; charset=utf-8",
                  "Content-Transfer-Encoding: quoted-printable"]
            return ("\n".join(h) + "\n\n" + _qp(body)).encode("ascii")
        cs, cte = ("utf-8", "8bit") if accents else ("us-ascii", "7bit")
        h += [f"Content-Type: text/plain; charset={cs}", f"Content-Transfer-Encoding: {cte}"]
        return ("\n".join(h) + "\n\n" + body).encode("utf-8")
    if u < 0.62:  # multipart/alternative text + HTML
        text = _prose(rng, size // 2, True)
        html = "<html><body>\n" + "".join(
            f"<p>{p}</p>\n" for p in text.split("\n") if p) + "</body></html>\n"
        b = f"=_alt_{rng.getrandbits(64):016x}"
        h.append(f'Content-Type: multipart/alternative;\n\tboundary="{b}"')
        parts = ["\n".join(h), "", f"--{b}", "Content-Type: text/plain; charset=utf-8",
                 "Content-Transfer-Encoding: quoted-printable", "", _qp(text), f"--{b}",
                 "Content-Type: text/html; charset=utf-8",
                 "Content-Transfer-Encoding: quoted-printable", "", _qp(html),
                 f"--{b}--", ""]
        return "\n".join(parts).encode("ascii")
    if u < 0.72:  # ISO-2022-JP, RFC 2047 subject
        subject = "".join(rng.choices(JA, k=rng.randint(1, 3)))[:24]
        h = [x if not x.startswith("Subject: ") else "Subject: " + _ja_word(subject)
             for x in h]
        h += ['Content-Type: text/plain; charset="ISO-2022-JP"',
              "Content-Transfer-Encoding: 7bit"]
        lines = ["".join(rng.choices(JA, k=rng.randint(1, 2)))[:30]
                 for _ in range(max(1, min(size, 30000) // 40))]
        return ("\n".join(h) + "\n\n").encode() + "\n".join(lines).encode(
            "iso2022_jp") + b"\n"
    if u < 0.80:  # unfolded 1-20 KB lines, many lines starting with '.'
        out = []
        n = 0
        while n < size:
            r = rng.random()
            if r < 0.35:
                k = rng.randint(1000, 20000)
                s = " ".join(rng.choices(WORDS, k=k // 5 + 1))[:k]
            elif r < 0.6:
                s = rng.choice(DOT_LINES)
            else:
                s = " ".join(rng.choices(WORDS, k=rng.randint(3, 12)))
            out.append(s)
            n += len(s) + 1
        out.append(".")  # a lone dot as the last line
        h += ["Content-Type: text/plain; charset=us-ascii", "Content-Transfer-Encoding: 7bit"]
        return ("\n".join(h) + "\n\n" + "\n".join(out) + "\n").encode("ascii")
    if u < 0.92:  # short notification, sometimes an empty body
        h += ["Content-Type: text/plain; charset=us-ascii", "Auto-Submitted: auto-generated"]
        body = "" if rng.random() < 0.15 else _prose(rng, rng.randint(50, 1500))
        return ("\n".join(h) + "\n\n" + body).encode("ascii")
    # multipart/mixed with a 100 KB - 1.45 MB binary attachment (base64: up to ~2 MB)
    raw = int(100_000 * 10 ** (rng.random() * 1.16))
    ctype, ext = rng.choice(ATTACH)
    b = f"=_mix_{rng.getrandbits(64):016x}"
    h.append(f'Content-Type: multipart/mixed;\n\tboundary="{b}"')
    fname = f"{rng.choice(WORDS)}-{i}.{ext}"
    parts = ["\n".join(h), "", f"--{b}", "Content-Type: text/plain; charset=us-ascii", "",
             _prose(rng, rng.randint(200, 3000)), f"--{b}",
             f'Content-Type: {ctype}; name="{fname}"', "Content-Transfer-Encoding: base64",
             f'Content-Disposition: attachment; filename="{fname}"', "",
             base64.encodebytes(rng.randbytes(raw)).decode("ascii") + f"--{b}--", ""]
    return "\n".join(parts).encode("ascii")


def make_message(profile: str, seed: int, i: int) -> bytes:
    """Message ``i`` of ``profile`` (LF line ends; the same bytes for the same args)."""
    rng = random.Random(f"mailpipe-bench/{profile}/{seed}/{i}")
    mid = f"{profile}-{seed}-{i}"
    data = _small(rng, mid, i) if profile == "small" else _mixed(rng, mid, i)
    return data if data.endswith(b"\n") else data + b"\n"


@dataclass
class Corpus:
    """The messages of one profile: bytes, their sha256 and POP3 (CRLF) octets."""

    profile: str
    messages: dict[str, bytes]
    sha: dict[str, str]
    octets: int

    @classmethod
    def build(cls, profile: str, count: int, seed: int) -> Corpus:
        msgs = {f"{profile}-{seed}-{i}": make_message(profile, seed, i)
                for i in range(1, count + 1)}
        sha = {k: hashlib.sha256(v).hexdigest() for k, v in msgs.items()}
        octets = sum(len(v) + v.count(b"\n") for v in msgs.values())
        return cls(profile, msgs, sha, octets)


def fill_mailbox(maildir: Path, corpus: Corpus, uid: int, gid: int) -> None:
    """Replace the Maildir (and Dovecot's index files) with ``corpus``, then sync."""
    if maildir.exists():
        shutil.rmtree(maildir)
    for sub in ("", "cur", "new", "tmp"):
        p = maildir / sub
        p.mkdir(mode=0o700, exist_ok=True)
        if os.geteuid() == 0:
            os.chown(p, uid, gid)
    new = maildir / "new"
    for n, data in enumerate(corpus.messages.values(), 1):
        # Dovecot numbers new/ files in name (time) order; S=/W= save it a stat/read.
        vsize = len(data) + data.count(b"\n")
        name = f"{BASE_TIME + n}.M{n}P1.bench,S={len(data)},W={vsize}"
        fd = os.open(new / name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.write(fd, data)
            if os.geteuid() == 0:
                os.fchown(fd, uid, gid)
        finally:
            os.close(fd)
    os.sync()


# ---------------------------------------------------------------------------
# verification
# ---------------------------------------------------------------------------


def _fields(header: bytes) -> list[bytes]:
    out: list[bytes] = []
    for line in header.split(b"\n"):
        if line[:1] in (b" ", b"\t") and out:
            out[-1] += b"\n" + line
        else:
            out.append(line)
    return out


def _unfold(f: bytes) -> bytes:
    name, _, value = f.partition(b":")
    return name.strip().lower() + b":" + b" ".join(value.split())


def _fold_norm(b: bytes) -> bytes:
    return re.sub(rb"[ \t]+", b" ", re.sub(rb"[ \t]*\n[ \t]+", b" ", b))


def classify(data: bytes, corpus: Corpus) -> tuple[str | None, str]:
    """(id, verdict) of one delivered message; verdict ``identical``, ``prepended``
    (only header fields added at the top), ``inserted`` (fields added among the
    original ones), ``refolded`` (original fields re-folded or moved, equal after
    RFC 5322 unfolding; body identical), ``refolded-body`` or a failure reason."""
    norm = data.replace(b"\r\n", b"\n")
    head_end = norm.find(b"\n\n")
    if norm.startswith(MARK):
        pos = 0
    else:
        k = norm.find(b"\n" + MARK)
        pos = k + 1 if k >= 0 else -1
    if pos < 0 or 0 <= head_end < pos:
        return None, "no X-Bench-Id header"
    mid = norm[pos + len(MARK):norm.find(b"\n", pos)].decode("ascii", "replace").strip()
    orig = corpus.messages.get(mid)
    if orig is None:
        return mid, "unknown id"
    if hashlib.sha256(norm[pos:]).hexdigest() == corpus.sha[mid]:
        return mid, "identical" if pos == 0 else "prepended"
    ho, _, bo = orig.partition(b"\n\n")
    hx, _, bx = norm.partition(b"\n\n")
    body_refolded = False
    if bx != bo:
        if _fold_norm(bx) != _fold_norm(bo):
            k = next((j for j in range(min(len(bx), len(bo))) if bx[j] != bo[j]),
                     min(len(bx), len(bo)))
            return mid, f"body differs at byte {k}: {bx[max(0, k - 12):k + 12]!r}"
        body_refolded = True
    fo, fx = _fields(ho), _fields(hx)
    it = iter(fx)
    if not body_refolded and all(any(a == b for b in it) for a in fo):
        return mid, "inserted"
    have: dict[bytes, int] = {}
    for f in fx:
        have[_unfold(f)] = have.get(_unfold(f), 0) + 1
    for f in fo:
        if not have.get(_unfold(f)):
            return mid, f"header field changed or lost: {f[:60]!r}"
        have[_unfold(f)] -= 1
    return mid, "refolded-body" if body_refolded else "refolded"


OK_VERDICTS = ("identical", "prepended", "inserted", "refolded", "refolded-body")


def verify_blobs(blobs: list[bytes], corpus: Corpus) -> dict[str, Any]:
    """Check delivered messages: each corpus message exactly once, intact."""
    seen: dict[str, int] = {}
    res: dict[str, Any] = {v: 0 for v in OK_VERDICTS}
    res.update(files=len(blobs), bad=0, duplicates=0, examples=[])
    for data in blobs:
        mid, verdict = classify(data, corpus)
        if mid is not None:
            seen[mid] = seen.get(mid, 0) + 1
            if seen[mid] > 1:
                res["duplicates"] += 1
                continue
        if verdict in OK_VERDICTS:
            res[verdict] += 1
        else:
            res["bad"] += 1
            if len(res["examples"]) < 3:
                res["examples"].append(f"{mid}: {verdict}")
    res["missing"] = sum(1 for k in corpus.messages if k not in seen)
    res["intact"] = sum(res[v] for v in OK_VERDICTS)
    res["passed"] = (res["intact"] == len(corpus.messages) and not res["bad"]
                     and not res["duplicates"])
    return res


def maildir_blobs(out: Path) -> list[bytes]:
    return [p.read_bytes() for sub in ("new", "cur") if (out / sub).is_dir()
            for p in sorted((out / sub).iterdir())]


def sqlite_blobs(db: Path) -> tuple[list[bytes], int]:
    """The raw column of every stored row, and how many rows the parse step filled."""
    if not db.exists():
        return [], 0
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        rows = conn.execute(
            "SELECT r.raw, m.parsed FROM messages m LEFT JOIN message_raw r USING (key)"
        ).fetchall()
    finally:
        conn.close()
    return [bytes(r[0] or b"") for r in rows], sum(1 for r in rows if r[1])


def describe(v: dict[str, Any], n: int, emptied: bool, parsed: int | None) -> str:
    if v["passed"] and emptied:
        how = "byte-identical"
        if v["prepended"] or v["inserted"]:
            how = "original bytes + client-added header fields"
        if v["refolded"] or v["refolded-body"]:
            how = "bodies identical, headers re-folded/moved"
            if v["refolded-body"]:
                how += f" ({v['refolded-body']} with MIME part headers re-folded)"
        extra = f", {parsed} parsed rows" if parsed is not None else ""
        return f"OK {v['intact']}/{n} {how}{extra}, mailbox empty"
    probs = []
    for key, word in (("bad", "corrupted"), ("missing", "missing"),
                      ("duplicates", "duplicated")):
        if v[key]:
            probs.append(f"{v[key]} {word}")
    if not emptied:
        probs.append("mailbox NOT empty")
    return f"FAIL {v['intact']}/{n} intact: " + ", ".join(probs) + (
        " (" + "; ".join(v["examples"]) + ")" if v["examples"] else "")


# ---------------------------------------------------------------------------
# tools
# ---------------------------------------------------------------------------


@dataclass
class Ctx:
    """What a tool needs to know for one run."""

    port: int
    user: str
    password: str
    work: Path
    out: Path
    log_level: str


def _private(path: Path, text: str) -> None:
    path.write_text(text)
    path.chmod(0o600)


def _mailpipe_config(c: Ctx, processors: str) -> Path:
    cfg = c.work / "pipeline.toml"
    _private(cfg, f"""[state]
path = "state/journal.sqlite3"

[quarantine]
dir = "quarantine"

[scheduler]
spool_dir = "spool"

[[mailboxes]]
name = "bench"
source = "pop3"
host = "{HOST}"
port = {c.port}
security = "none"
allow_plaintext_password = true
username = "{c.user}"
password = "{c.password}"
delete = "after_processing"
pipeline = "bench"

[pipelines.bench]
processors = [
{processors}
]
""")
    return cfg


def _mailpipe_cmd(c: Ctx, cfg: Path, python: str = sys.executable) -> list[str]:
    return [python, "-m", "mailpipe", "--log-format", "json", "--log-level",
            c.log_level, "run", str(cfg), "--once"]


def tool_mailpipe_e2e(c: Ctx, group: bool = True) -> list[str]:
    db = c.out / "mail.sqlite3"
    procs = ('  { use = "parse" },\n'
             f'  {{ use = "store.sqlite", path = "{db}", raw = "inline", '
             f'group_commit = {"true" if group else "false"} }},')
    return _mailpipe_cmd(c, _mailpipe_config(c, procs))


def tool_mailpipe_maildir(c: Ctx, python: str = sys.executable) -> list[str]:
    return _mailpipe_cmd(
        c, _mailpipe_config(c, f'  {{ use = "store.maildir", path = "{c.out}" }},'), python
    )


def tool_mailpipe_e2e_defaults(c: Ctx, python: str = sys.executable) -> list[str]:
    """parse + store.sqlite with every store option at its default."""
    db = c.out / "mail.sqlite3"
    procs = f'  {{ use = "parse" }},\n  {{ use = "store.sqlite", path = "{db}" }},'
    return _mailpipe_cmd(c, _mailpipe_config(c, procs), python)


def tool_mpop(c: Ctx) -> list[str]:
    rc = c.work / "mpoprc"
    _private(rc, f"""defaults
account bench
host {HOST}
port {c.port}
user {c.user}
password {c.password}
auth user
tls off
delivery maildir {c.out}
keep off
only_new off
uidls_file {c.work}/mpop_uidls
""")
    return ["mpop", "-q", f"--file={rc}", "bench"]


def tool_fetchmail(c: Ctx) -> list[str]:
    rc = c.work / "fetchmailrc"
    _private(rc, f"""set no syslog
set no bouncemail
poll {HOST} service {c.port} proto POP3 auth password timeout 120
    user "{c.user}" there with password "{c.password}" is "root" here
    fetchall nokeep no rewrite
    sslproto ''
    mda "/usr/bin/safecat {c.out}/tmp {c.out}/new"
""")
    return ["fetchmail", "-s", "-f", str(rc), "--pidfile", str(c.work / "fetchmail.pid"),
            "-i", str(c.work / "fetchids")]


def tool_getmail(c: Ctx) -> list[str]:
    user_line = ""
    if os.geteuid() == 0:
        # getmail refuses to deliver as root; its per-message delivery child switches to
        # the destination's `user` instead.
        pw = pwd.getpwnam("nobody")
        for d in (c.out, *(c.out / s for s in ("cur", "new", "tmp"))):
            os.chown(d, pw.pw_uid, pw.pw_gid)
        user_line = "user = nobody\n"
    rc = c.work / "getmailrc"
    _private(rc, f"""[retriever]
type = SimplePOP3Retriever
server = {HOST}
port = {c.port}
username = {c.user}
password = {c.password}

[destination]
type = Maildir
path = {c.out}/
{user_line}
[options]
verbose = 0
read_all = true
delete = true
message_log_syslog = false
""")
    return ["getmail", f"--getmaildir={c.work}", f"--rcfile={rc}"]


def tool_poplib(c: Ctx) -> list[str]:
    return [sys.executable, str(Path(__file__).resolve()), "--poplib-client", c.user,
            c.password, str(c.port), str(c.out)]


def tool_ceiling(c: Ctx) -> list[str]:
    return ["env", f"MAILPIPE_POP3_HOST={HOST}", f"MAILPIPE_POP3_PORT={c.port}",
            f"MAILPIPE_POP3_USER={c.user}", f"MAILPIPE_POP3_PASSWORD={c.password}",
            f"MAILPIPE_OUT={c.out}", sys.executable, str(CEILING), "maildir"]


TOOLS: dict[str, tuple[Callable[[Ctx], list[str]], str | None]] = {
    "ceiling": (tool_ceiling, None),
    "mailpipe-e2e": (tool_mailpipe_e2e, None),
    "mailpipe-e2e-nogroup": (lambda c: tool_mailpipe_e2e(c, group=False), None),
    "mailpipe-maildir": (tool_mailpipe_maildir, None),
    "mailpipe-e2e-defaults": (tool_mailpipe_e2e_defaults, None),
    "base-maildir": (lambda c: tool_mailpipe_maildir(c, BASE_PYTHON), None),
    "base-e2e-defaults": (lambda c: tool_mailpipe_e2e_defaults(c, BASE_PYTHON), None),
    "mpop": (tool_mpop, "mpop"),
    "fetchmail": (tool_fetchmail, "fetchmail"),
    "getmail": (tool_getmail, "getmail"),
    "poplib": (tool_poplib, None),
}


def installed(tool: str) -> bool:
    binary = TOOLS[tool][1]
    if tool == "ceiling":
        return CEILING.is_file()
    if tool.startswith("base-"):
        return bool(BASE_PYTHON) and os.access(BASE_PYTHON, os.X_OK)
    if binary is None:
        return True
    if tool == "fetchmail" and not os.access("/usr/bin/safecat", os.X_OK):
        return False
    return shutil.which(binary) is not None


def poplib_client(user: str, password: str, port: int, out: str) -> int:
    """The stdlib baseline: STAT, then RETR n -> Maildir (fsync, rename) -> DELE n; QUIT."""
    # The stdlib's 2048-octet line limit fails on long lines ("line too long").
    poplib._MAXLINE = 16 << 20  # type: ignore[attr-defined]
    p = poplib.POP3(HOST, port, timeout=120)
    p.user(user)
    p.pass_(password)
    count, _ = p.stat()
    host = socket.gethostname().replace("/", "_").replace(":", "_")
    for i in range(1, count + 1):
        _, lines, _ = p.retr(i)  # poplib removes the dot-stuffing
        data = b"\n".join(lines) + b"\n"
        name = f"{time.time_ns() // 1000}.P{os.getpid()}Q{i}.{host}"
        tmp = os.path.join(out, "tmp", name)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(tmp, os.path.join(out, "new", name))
        p.dele(i)
    p.quit()
    return 0


# ---------------------------------------------------------------------------
# running and measuring
# ---------------------------------------------------------------------------

LOGOUT = re.compile(
    rb"pop3\(([^)]+)\).*?Disconnected: .*?top=\d+/\d+, retr=(\d+)/(\d+), del=(\d+)/\d+"
)


def dovecot_sessions(log: Path, offset: int, user: str) -> list[tuple[int, int, int]]:
    """(retr, retr_bytes, dele) of each session of ``user`` logged after ``offset``."""
    try:
        with open(log, "rb") as f:
            f.seek(offset)
            text = f.read()
    except OSError:
        return []
    return [(int(m[2]), int(m[3]), int(m[4])) for m in LOGOUT.finditer(text)
            if m[1].decode() == user]


def stat(port: int, user: str, password: str) -> tuple[int, int]:
    p = poplib.POP3(HOST, port, timeout=30)
    try:
        p.user(user)
        p.pass_(password)
        return p.stat()
    finally:
        p.quit()


def cpu_busy(interval: float = 0.5) -> float:
    def snap() -> tuple[int, int]:
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:]]
        return sum(v), v[3] + v[4]

    t1, i1 = snap()
    time.sleep(interval)
    t2, i2 = snap()
    return 100.0 * (1 - (i2 - i1) / max(1, t2 - t1))


def wait_quiet(max_wait: float, threshold: float = 15.0) -> float:
    """Wait up to ``max_wait`` s for both CPUs to be mostly idle; return busy %."""
    end = time.monotonic() + max_wait
    busy = cpu_busy()
    while busy > threshold and time.monotonic() < end:
        busy = cpu_busy()
    return busy


def _time_v(path: Path) -> dict[str, float]:
    text = path.read_text(errors="replace") if path.exists() else ""
    got = {}
    for key, pat in (("user", r"User time \(seconds\): ([\d.]+)"),
                     ("sys", r"System time \(seconds\): ([\d.]+)"),
                     ("rss_kb", r"Maximum resident set size \(kbytes\): (\d+)")):
        m = re.search(pat, text)
        if m:
            got[key] = float(m.group(1))
    return got


def run_measured(argv: list[str], env: dict[str, str], cwd: Path, log: Path,
                 timeout: float) -> dict[str, Any]:
    """Run ``argv`` in its own process group under GNU ``time -v`` (peak RSS of the
    process tree, CPU summed over it; without GNU time, wait4 on the child, whose RSS
    then also counts this process's pages from before exec); wall time around it."""
    time_file = cwd / "time-v.txt"
    gnu_time = os.access("/usr/bin/time", os.X_OK)
    if gnu_time:
        argv = ["/usr/bin/time", "-v", "-o", str(time_file), *argv]
    with open(log, "wb") as out:
        t0 = time.monotonic()
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, env=env, cwd=cwd,
                                start_new_session=True)
        timed_out = threading.Event()

        def kill() -> None:
            timed_out.set()
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

        timer = threading.Timer(timeout, kill)
        timer.start()
        try:
            _, status, ru = os.wait4(proc.pid, 0)
        finally:
            timer.cancel()
        wall = time.monotonic() - t0
        proc.returncode = code = os.waitstatus_to_exitcode(status)
    tv = _time_v(time_file) if gnu_time else {}
    rss_kb = tv.get("rss_kb", ru.ru_maxrss)
    cpu = tv["user"] + tv["sys"] if "user" in tv else ru.ru_utime + ru.ru_stime
    return {"wall_s": wall, "exit": code, "timed_out": timed_out.is_set(),
            "max_rss_mb": rss_kb / 1024, "cpu_s": cpu}


@dataclass
class Bench:
    """The server, the mailbox and the options shared by every run."""

    args: argparse.Namespace
    dovecot: Any
    user: Any
    client_port: int
    work: Path
    runs: list[dict[str, Any]] = field(default_factory=list)

    def run_one(self, tool: str, corpus: Corpus, rnd: int) -> dict[str, Any]:
        a, d, u = self.args, self.dovecot, self.user
        # A new directory per round, all removed at the end: on ext4 without a journal
        # (this machine's /), allocating an inode skips every inode of its group freed
        # in the last 60-360 s (fs/ext4/ialloc.c, recently_deleted()), so deleting
        # the previous round's output here charged each tool for its own last round
        # (about 0.5 ms per file created, twice per message for store.maildir).
        work = self.work / f"{corpus.profile}-{tool}-{rnd}"
        if work.exists():
            shutil.rmtree(work)
        out = work / "out"
        for sub in ("cur", "new", "tmp"):
            (out / sub).mkdir(parents=True)
        ctx = Ctx(self.client_port, u.name, u.password, work, out, a.mailpipe_log_level)
        argv = TOOLS[tool][0](ctx)
        fill_mailbox(u.maildir, corpus, d.mail_uid, d.mail_gid)
        busy = wait_quiet(a.quiet_wait) if a.quiet_wait else cpu_busy(0.2)
        env = dict(os.environ, HOME=str(work))
        offset = d.info_log_path.stat().st_size if d.info_log_path.exists() else 0
        r = run_measured(argv, env, work, work / "output.log", a.timeout)
        time.sleep(0.2)  # Dovecot writes its logout line after the client's QUIT
        sessions = dovecot_sessions(d.info_log_path, offset, u.name)
        try:
            left = stat(d.pop3_port, u.name, u.password)[0]
        except (OSError, poplib.error_proto) as exc:
            print(f"  ! STAT after the run failed: {exc}", file=sys.stderr)
            left = -1
        parsed = None
        if "e2e" in tool:
            blobs, parsed = sqlite_blobs(out / "mail.sqlite3")
        else:
            blobs = maildir_blobs(out)
        v = verify_blobs(blobs, corpus)
        ok = r["exit"] == 0 and not r["timed_out"] and v["passed"] and left == 0
        verdict = describe(v, len(corpus.messages), left == 0, parsed)
        if r["exit"] != 0 or r["timed_out"]:
            verdict = (f"FAIL exit {r['exit']}{' (timed out)' if r['timed_out'] else ''}"
                       f"; {verdict}")
        tail = (work / "output.log").read_bytes()[-400:].decode("utf-8", "replace")
        run = {"tool": tool, "profile": corpus.profile, "round": rnd, **r,
               "busy_before_pct": round(busy, 1), "messages": len(corpus.messages),
               "octets": corpus.octets, "sessions": len(sessions),
               "server_retr": sum(s[0] for s in sessions),
               "server_retr_bytes": sum(s[1] for s in sessions),
               "server_dele": sum(s[2] for s in sessions), "left_on_server": left,
               "verify": v, "parsed_rows": parsed, "ok": ok, "verdict": verdict,
               "output_tail": tail if not ok else ""}
        self.runs.append(run)
        print(f"#  [{rnd}] {corpus.profile:5s} {tool:20s} {r['wall_s']:7.2f} s  "
              f"cpu {r['cpu_s']:5.2f} s  rss {r['max_rss_mb']:6.1f} MiB  "
              f"retr={run['server_retr']} dele={run['server_dele']} "
              f"sessions={len(sessions)} busy-before={busy:.0f}%  {verdict}",
              file=sys.stderr, flush=True)
        if not ok and tail:
            last = tail.strip().splitlines()[-5:]
            print("     output: " + "\n     ".join(last), file=sys.stderr)
        return run


def summarize(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    rows = []
    for tool in dict.fromkeys(r["tool"] for r in runs):
        rs = [r for r in runs if r["tool"] == tool]
        walls = [r["wall_s"] for r in rs]
        wall = statistics.median(walls)
        worst = min(rs, key=lambda r: (r["ok"], r["verify"]["intact"]))
        rows.append({
            "tool": tool, "rounds": len(rs), "messages": rs[0]["messages"],
            "retr": min(r["server_retr"] for r in rs), "octets": rs[0]["octets"],
            "wall_s": wall, "wall_min": min(walls), "wall_max": max(walls),
            "msg_s": rs[0]["messages"] / wall, "mb_s": rs[0]["octets"] / wall / 1e6,
            "max_rss_mb": statistics.median(r["max_rss_mb"] for r in rs),
            "cpu_s": statistics.median(r["cpu_s"] for r in rs),
            "sessions": max(r["sessions"] for r in rs),
            "ok": all(r["ok"] for r in rs),
            "verdict": worst["verdict"] if worst["ok"] or len(rs) == 1 else
            f"{sum(not r['ok'] for r in rs)} of {len(rs)} rounds: {worst['verdict']}",
        })
    return rows


def table(rows: list[dict[str, Any]]) -> str:
    ref = {r["tool"]: r["msg_s"] for r in rows}
    e2e, md = ref.get("mailpipe-e2e"), ref.get("mailpipe-maildir")
    multi = any(r["rounds"] > 1 for r in rows)
    secs = "seconds (median; min-max)" if multi else "seconds"
    lines = [f"| tool | messages | MB | {secs} | messages/s | MB/s | peak RSS MiB | CPU s "
             "| mailpipe-e2e / tool | mailpipe-maildir / tool | verified |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        wall = f"{r['wall_s']:.2f}" + (f" ({r['wall_min']:.2f}-{r['wall_max']:.2f})"
                                       if multi else "")
        ratio_e2e = f"{e2e / r['msg_s']:.2f}" if e2e else "-"
        ratio_md = f"{md / r['msg_s']:.2f}" if md else "-"
        lines.append(
            f"| {r['tool']} | {r['retr']} | {r['octets'] / 1e6:.1f} | {wall} | "
            f"{r['msg_s']:.0f} | {r['mb_s']:.1f} | {r['max_rss_mb']:.1f} | "
            f"{r['cpu_s']:.2f} | {ratio_e2e} | {ratio_md} | {r['verdict']} |")
    return "\n".join(lines)


def targets(rows: list[dict[str, Any]], profile: str, count: int,
            latency_ms: float = 0.0) -> list[str]:
    """Issue 18's targets, as read from this table (never asserted; a short run mostly
    measures start-up, so the verdicts are given only at the issue's sizes):

    - 2,000 small, no added latency: mailpipe-maildir ≥ 1.2x mpop's messages/s and
      ≥ 0.9x the minimal client's (``ceiling``), its CPU ≤ 1.3x the client's;
      mailpipe-e2e-defaults (parse + store.sqlite, defaults) ≥ 0.9x mpop's messages/s;
    - 1,000 mixed: mailpipe-e2e-defaults ≥ 0.7x mpop's MB/s;
    - with added latency: mailpipe-maildir ≥ 0.9x the minimal client's messages/s.

    Other runs only show the ratios to mpop."""
    ref = {r["tool"]: r for r in rows}

    def ratio(tool: str, peer: str, key: str) -> float | None:
        if tool not in ref or peer not in ref or not ref[peer][key]:
            return None
        return float(ref[tool][key] / ref[peer][key])

    goals: list[tuple[str, str, str, float, str]] = []  # tool, peer, key, goal, what
    if latency_ms:
        goals.append(("mailpipe-maildir", "ceiling", "msg_s", 0.9, "messages/s"))
    elif profile == "small" and count >= 2000:
        goals += [("mailpipe-maildir", "mpop", "msg_s", 1.2, "messages/s"),
                  ("mailpipe-maildir", "ceiling", "msg_s", 0.9, "messages/s"),
                  ("mailpipe-e2e-defaults", "mpop", "msg_s", 0.9, "messages/s")]
    elif profile == "mixed" and count >= 1000:
        goals.append(("mailpipe-e2e-defaults", "mpop", "mb_s", 0.7, "MB/s"))
    out = []
    for tool, peer, key, goal, what in goals:
        r = ratio(tool, peer, key)
        if r is not None:
            out.append(f"- {profile}: {tool} at {r:.2f}x {peer}'s {what} "
                       f"(target ≥ {goal:.1f}x): {'met' if r >= goal else 'MISSED'}")
    cpu = ratio("mailpipe-maildir", "ceiling", "cpu_s")
    if cpu is not None and not latency_ms and profile == "small" and count >= 2000:
        out.append(f"- {profile}: mailpipe-maildir CPU at {cpu:.2f}x ceiling's "
                   f"(target ≤ 1.3x): {'met' if cpu <= 1.3 else 'MISSED'}")
    if not goals:
        out += [f"- {profile}: {tool} at {ratio(tool, 'mpop', 'msg_s'):.2f}x mpop's "
                "messages/s" for tool in ("mailpipe-e2e", "mailpipe-e2e-defaults",
                                          "mailpipe-maildir")
                if ratio(tool, "mpop", "msg_s") is not None]
    return out


def versions(base_dir: str = "/tmp") -> dict[str, str]:
    def sh(cmd: str) -> str:
        try:
            return subprocess.run(cmd, shell=True, capture_output=True, text=True,
                                  timeout=20).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return "?"

    from mailpipe import __version__

    return {
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "nproc": str(os.cpu_count()),
        "cpu": sh("grep -m1 'model name' /proc/cpuinfo | cut -d: -f2-"),
        "memory": sh("free -h | awk '/Mem:/{print $2}'"),
        "kernel": platform.release(),
        "os": sh(". /etc/os-release && echo $PRETTY_NAME"),
        "python": platform.python_version(),
        "mailpipe": __version__,
        "dovecot": sh("dovecot --version"),
        "mpop": sh("mpop --version 2>/dev/null | head -1"),
        "fetchmail": sh("dpkg-query -W -f='${Version}' fetchmail 2>/dev/null"),
        "getmail6": sh("dpkg-query -W -f='${Version}' getmail6 2>/dev/null"),
        "safecat": sh("dpkg-query -W -f='${Version}' safecat 2>/dev/null"),
        "filesystem": sh(f"df -T {shlex.quote(base_dir)} | awk 'NR==2{{print $2}}'")
        + ("" if "has_journal" in sh(f"dumpe2fs -h $(df --output=source "
                                      f"{shlex.quote(base_dir)} | tail -1) 2>/dev/null")
           else " (no journal, or not ext*)"),
    }


class Proxy:
    """bench/proxy.py as a child process (stopped by its pid)."""

    def __init__(self, target_port: int, rtt_ms: float, log: str | None = None) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, str(HERE / "proxy.py"), "--target", f"{HOST}:{target_port}",
             "--delay-ms", str(rtt_ms / 2), *(["--log", log] if log else [])],
            stdout=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True)
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()  # "listening PORT"
        if not line.startswith("listening "):
            self.stop()
            raise SystemExit(f"bench/proxy.py did not start: {line!r}")
        self.port = int(line.split()[1])

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def noop_rtt(port: int, user: str, password: str) -> float:
    """Median NOOP round trip (ms) through ``port``."""
    p = poplib.POP3(HOST, port, timeout=30)
    try:
        p.user(user)
        p.pass_(password)
        times = []
        for _ in range(5):
            t = time.monotonic()
            p.noop()
            times.append(time.monotonic() - t)
        return statistics.median(times) * 1000
    finally:
        p.quit()


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        prog="bench/run", description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--small", action="store_true",
                    help="CI size: 50 small / 20 mixed messages, one round")
    ap.add_argument("--profile", choices=["small", "mixed", "all"], default="all")
    ap.add_argument("--count", type=int, help="messages per profile (default 2,000 small, "
                    "1,000 mixed; --small: 50 / 20)")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--tools", default=",".join(ALL_TOOLS),
                    help=f"comma list from {', '.join(ALL_TOOLS + EXTRA_TOOLS)} "
                    "(tools not installed are left out with a note)")
    ap.add_argument("--latency-ms", type=float, default=0.0,
                    help="added round-trip time via bench/proxy.py (N/2 ms each way)")
    ap.add_argument("--repeat", type=int, help="rounds, tools interleaved; the table "
                    "shows the median (default 3, --small 1)")
    ap.add_argument("--quiet-wait", type=float, default=0.0, metavar="S",
                    help="before each run wait up to S s for the CPUs to be <15%% busy")
    ap.add_argument("--timeout", type=float, default=600.0, help="per-run kill timer, s")
    ap.add_argument("--proxy-log", metavar="FILE",
                    help="with --latency-ms: the proxy logs every chunk's time here "
                         "(bench/proxy.py --log), to count the turnarounds")
    ap.add_argument("--mailpipe-log-level", default="info",
                    choices=["debug", "info", "warning", "error"])
    ap.add_argument("--workdir", help="where clients write (default: a new dir in "
                    "--base-dir)")
    ap.add_argument("--base-dir", default="/tmp",
                    help="where the run's directory (Dovecot's mailbox, the clients' "
                    "output) is made (default /tmp). On ext4 without a journal, "
                    "creating a file skips every inode of its group freed in the last "
                    "60-360 s (ext4's recently_deleted()), so file creation there "
                    "costs about 0.5 ms after any recent run: give a directory on a "
                    "journaled file system (RESULTS §27)")
    ap.add_argument("--keep-output", action="store_true")
    ap.add_argument("--json", help="write every run and the summary to this file")
    ap.add_argument("--report", metavar="JSON",
                    help="print the tables of an earlier --json file and exit")
    ap.add_argument("--poplib-client", nargs=4, metavar=("USER", "PASS", "PORT", "OUT"),
                    help=argparse.SUPPRESS)
    return ap.parse_args(argv)


def report(path: Path) -> int:
    """Re-print the tables of a ``--json`` file (e.g. after changing the layout)."""
    data = json.loads(path.read_text())
    failed = False
    for profile, p in data["profiles"].items():
        rows = summarize(p["runs"])
        failed |= not all(r["ok"] for r in rows)
        count = rows[0]["messages"] if rows else 0
        print(f"\n### {profile}: {count} messages, {data['info']['argv']}\n")
        print(table(rows) + "\n")
        for line in targets(rows, profile, count,
                            float(data['info'].get('latency_ms') or 0)):
            print(line)
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    if a.poplib_client:
        user, password, port, out = a.poplib_client
        return poplib_client(user, password, int(port), out)
    if a.report:
        return report(Path(a.report))
    from mailpipe.testing.dovecot import Dovecot, dovecot_unavailable_reason

    reason = dovecot_unavailable_reason()
    if reason:
        print(f"bench/run: {reason}", file=sys.stderr)
        return 2
    if a.repeat is None:
        a.repeat = 1 if a.small else 3
    profiles = ["small", "mixed"] if a.profile == "all" else [a.profile]
    wanted = [t.strip() for t in a.tools.split(",") if t.strip()]
    unknown = [t for t in wanted if t not in TOOLS]
    if unknown:
        print(f"bench/run: unknown tool(s) {', '.join(unknown)}", file=sys.stderr)
        return 2
    tools = [t for t in wanted if installed(t)]
    missing = [t for t in wanted if t not in tools]

    # Dovecot's mailbox and every client's output in one new directory of --base-dir
    # (see --help: use a journaled file system, as production does).
    base = Path(tempfile.mkdtemp(prefix="mailpipe-bench-", dir=a.base_dir))
    base.chmod(0o755)
    work = Path(a.workdir) if a.workdir else base / "work"
    work.mkdir(parents=True, exist_ok=True)
    info = versions(a.base_dir)
    info.update(argv=" ".join(sys.argv), latency_ms=str(a.latency_ms))
    proxy: Proxy | None = None
    results: dict[str, Any] = {"info": info, "profiles": {}}
    failed = False
    try:
        with Dovecot(base / "dovecot") as d:
            user = d.add_user("bench", "bench-pass")
            port = d.pop3_port
            rtt = None
            if a.latency_ms:
                proxy = Proxy(d.pop3_port, a.latency_ms, a.proxy_log)
                port = proxy.port
                rtt = noop_rtt(port, user.name, user.password)
            bench = Bench(a, d, user, port, work)
            print(f"# bench/run: Dovecot {info['dovecot'].split()[0]} on {HOST}:"
                  f"{d.pop3_port}" + (f", via proxy :{port} (NOOP RTT {rtt:.1f} ms)"
                                      if rtt is not None else "")
                  + f"; tools {', '.join(tools)}; {a.repeat} round(s)", file=sys.stderr)
            for profile in profiles:
                count = a.count or (SMALL_COUNTS if a.small else FULL_COUNTS)[profile]
                t0 = time.monotonic()
                corpus = Corpus.build(profile, count, a.seed)
                print(f"# {profile}: {count} messages, {corpus.octets / 1e6:.1f} MB "
                      f"(generated in {time.monotonic() - t0:.1f} s)", file=sys.stderr)
                runs = [bench.run_one(t, corpus, rnd) for rnd in range(1, a.repeat + 1)
                        for t in tools]
                rows = summarize(runs)
                failed |= not all(r["ok"] for r in rows)
                title = (f"### {profile} profile: {count} messages, "
                         f"{corpus.octets / 1e6:.1f} MB, plain POP3"
                         + (f", +{a.latency_ms:g} ms RTT (proxy; NOOP RTT {rtt:.1f} ms)"
                            if rtt is not None else ", no added latency")
                         + f", {a.repeat} round(s)")
                print(f"\n{title}\n\n{table(rows)}\n")
                for line in targets(rows, profile, count, a.latency_ms):
                    print(line)
                if missing:
                    print(f"- not installed, left out: {', '.join(missing)}")
                print(flush=True)
                results["profiles"][profile] = {"summary": rows, "runs": runs,
                                                "noop_rtt_ms": rtt}
    finally:
        if proxy is not None:
            proxy.stop()
        if not a.keep_output:
            shutil.rmtree(base, ignore_errors=True)
    if a.json:
        Path(a.json).write_text(json.dumps(results, indent=1, default=str))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
