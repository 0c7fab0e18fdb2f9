"""CPU per message of mailpipe's own pieces of the POP3 → parse → store.sqlite path.

Each piece is timed alone in this process, in CPU (user + system of the process, from
``getrusage``), so a shared machine's load moves the figures far less than wall time:

  hop     one synchronous step call through ``StepWorker.call`` (a function that does
          nothing, with a budget): the thread hand-over and the loop's wake-up
  parse   ``parse_into`` of bench/run.py's small messages (2-4 KB; ``--profile
          mixed``: its mixed ones, 3 KB - 2 MB, all in memory)
  store   ``store.sqlite`` (defaults: group commit, raw inline, FTS) ``process`` of
          those messages, parsed beforehand, with a ``flush`` every ``--group`` (50;
          the engine's groups in bench/run are up to 256); the flushes' fsyncs are in
          the figure, on the file system of ``--dir``
  maildir store.maildir (defaults: group commit, syncfs where it reports errors)
          ``process`` of those messages, a ``flush`` every 256 (the engine's group);
          its syncfs calls are in the figure, on the file system of ``--dir``
  journal the SQLite journal's ``begin`` of 50 entries in one batch, then their
          ``step_committed`` + ``finish`` in another (the ledger's per-message writes;
          ``begin_many``, ``steps_committed`` and ``finish_many`` where the journal
          has them, as the ledger then calls them)

For a before/after comparison, run it under each checkout's interpreter, interleaved:

    for i in 1 2 3; do /work/venv-main/bin/python bench/per_message_cpu.py --label base
                       python bench/per_message_cpu.py --label branch; done
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import os
import resource
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
GROUP = 50


def cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def small_messages(count: int, profile: str = "small") -> list[bytes]:
    """bench/run.py's ``profile`` (small by default), as the server sends it (CRLF)."""
    spec = importlib.util.spec_from_file_location("bench_run", HERE / "run.py")
    assert spec is not None and spec.loader is not None
    run = importlib.util.module_from_spec(spec)
    sys.modules["bench_run"] = run
    spec.loader.exec_module(run)
    return [run.make_message(profile, 1, i).replace(b"\n", b"\r\n") for i in range(count)]


async def hop(count: int) -> float:
    from mailpipe.worker import Budget, StepWorker

    worker = StepWorker("bench/0:hop")
    budget = Budget(1e9)
    try:
        await worker.call(lambda: None, budget=budget)  # the thread exists
        start = cpu()
        for _ in range(count):
            await worker.call(lambda: None, budget=budget)
        return (cpu() - start) / count
    finally:
        worker.shutdown()


def parse(raws: list[bytes]) -> float:
    from mailpipe.plugins.parse import parse_into

    from mailpipe import Message

    parse_into(Message.from_bytes(raws[0], mailbox="bench", uid="warm"))
    start = cpu()
    for i, raw in enumerate(raws):
        parse_into(Message.from_bytes(raw, mailbox="bench", uid=f"u{i}"))
    return (cpu() - start) / len(raws)


def store(raws: list[bytes], work: Path, group: int = GROUP) -> float:
    from mailpipe.plugins.parse import parse_into
    from mailpipe.plugins.store.sqlite import SqliteOptions, SqliteStore

    from mailpipe import Message, ProcessorContext

    messages = []
    for i, raw in enumerate(raws):
        message = Message.from_bytes(raw, mailbox="bench", uid=f"u{i}")
        parse_into(message)
        messages.append(message)
    options = SqliteOptions.model_validate({"path": str(work / "mail.sqlite3")})
    s = SqliteStore(options, ProcessorContext(base_dir=work))
    s.open()
    try:
        start = cpu()
        for i, message in enumerate(messages):
            s.process(message)
            if i % group == group - 1:
                s.flush()
        s.flush()
        return (cpu() - start) / len(messages)
    finally:
        s.close()


def maildir(raws: list[bytes], work: Path) -> float:
    from mailpipe.plugins.store.maildir import MaildirOptions, MaildirStore

    from mailpipe import Message, ProcessorContext

    messages = [Message.from_bytes(raw, mailbox="bench", uid=f"u{i}")
                for i, raw in enumerate(raws)]
    s = MaildirStore(MaildirOptions(path=work / "Maildir"), ProcessorContext(base_dir=work))
    s.open()
    try:
        start = cpu()
        for i, message in enumerate(messages):
            s.process(message)
            if i % 256 == 255:  # the engine's GROUP_SIZE
                s.flush()
        s.flush()
        return (cpu() - start) / len(messages)
    finally:
        s.close()


def journal(count: int, work: Path) -> float:
    from mailpipe import message_key
    from mailpipe.journal import Status
    from mailpipe.journal.sqlite import SqliteJournal

    with SqliteJournal(work / "journal.sqlite3") as j:
        start = cpu()
        for first in range(0, count, GROUP):
            uids = [f"u{i}" for i in range(first, min(first + GROUP, count))]
            if hasattr(j, "begin_many"):  # one statement per write and group (92.)
                from mailpipe.journal import Finish

                with j.batch():
                    j.begin_many("bench", [(u, message_key("bench", u), 3000)
                                           for u in uids])
                with j.batch():
                    j.steps_committed("bench", [(u, "bench/1:store.sqlite")
                                                for u in uids])
                    j.finish_many("bench", [Finish(u, Status.COMMITTED, "done",
                                                   "ab" * 32, "", True) for u in uids])
                continue
            with j.batch():
                for uid in uids:
                    j.begin("bench", uid, key=message_key("bench", uid), size=3000)
            with j.batch():
                for uid in uids:
                    j.step_committed("bench", uid, "bench/1:store.sqlite")
                    j.finish("bench", uid, status=Status.COMMITTED, disposition="done",
                             sha256="ab" * 32, delete_due=True)
        return (cpu() - start) / count


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("--count", type=int, default=2000, help="messages (and calls)")
    ap.add_argument("--label", default=sys.executable)
    ap.add_argument("--profile", choices=("small", "mixed"), default="small",
                    help="bench/run.py's messages that parse and store take (mixed: "
                    "all in memory, the ones over the 1 MB spool threshold too)")
    ap.add_argument("--group", type=int, default=GROUP, help="store: flush every N")
    ap.add_argument("--dir", default=None, help="where the databases go (default: "
                    "the system's temporary directory)")
    a = ap.parse_args()
    from mailpipe.logs import configure

    # The bench runs' format and level (debug lines are not written), to nowhere.
    configure("json", "info", stream=open(os.devnull, "w"))  # noqa: SIM115
    raws = small_messages(a.count, a.profile)
    with tempfile.TemporaryDirectory(prefix="mailpipe-cpu-", dir=a.dir) as tmp:
        work = Path(tmp)
        (work / "store").mkdir()
        (work / "journal").mkdir()
        (work / "maildir").mkdir()
        figures = {
            "hop": asyncio.run(hop(a.count * 2)),
            "parse": parse(raws),
            "store": store(raws, work / "store", a.group),
            "maildir": maildir(raws, work / "maildir"),
            "journal": journal(a.count, work / "journal"),
        }
    print(f"{a.label}: " + "  ".join(f"{k} {v * 1e6:6.1f} us" for k, v in figures.items()),
          flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
