"""The lease part of a no-new-mail cycle, alone: take and release many mailboxes' leases.

    python bench/lease_cycle.py [--mailboxes 1000] [--cycles 3] [--peer NAME=PYTHON]

What the scheduler does around every poll of a long-running worker (``mailpipe run``):
``MailboxLease.acquire`` (the journal's ``lock_mailbox`` and ``fence``) and
``release``, over every mailbox once a cycle, on one SQLite journal in a temporary
folder (on the disk of the temporary folder, so with its fsync cost). Two processes
run one after the other on the same folder, each its own owner (``host:pid``, as
workers are): rows ``new journal`` (the first process's first cycle: lock files and
lease rows created), ``first cycle`` (the second process's first cycle: what every
``mailpipe run --once`` pays) and ``later cycles`` (its other cycles: a long-running
``mailpipe run``). Times are per take (wall and CPU of the process, which does
nothing else). ``--peer`` runs the same in another interpreter (another install of
mailpipe) alternately, ``--rounds`` times.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def measure(folder: Path, mailboxes: int, cycles: int) -> list[tuple[float, float]]:
    """(wall, CPU) seconds of each cycle over ``mailboxes`` leases."""
    from mailpipe.journal.sqlite import SqliteJournal
    from mailpipe.leases import MailboxLease
    from mailpipe.logs import configure

    configure(level="warning", fmt="json", stream=sys.stderr)  # as ``run`` does

    names = [f"mailbox{i:05d}" for i in range(mailboxes)]
    results = []
    owner = f"bench:{os.getpid()}"
    journal = SqliteJournal(folder / "journal.sqlite3")
    try:
        for _ in range(cycles):
            wall, cpu = time.perf_counter(), time.process_time()
            for name in names:
                lease = MailboxLease(journal, name, owner=owner, ttl=300)
                if not lease.acquire():
                    raise RuntimeError(f"{name}: lease not taken")
                lease.release()
            results.append(
                (time.perf_counter() - wall, time.process_time() - cpu)
            )
    finally:
        journal.close()
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--mailboxes", type=int, default=1000)
    parser.add_argument("--cycles", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--peer", action="append", default=[], metavar="NAME=PYTHON")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(measure(Path(args.child), args.mailboxes, args.cycles)))
        return 0
    pythons = {"this": sys.executable}
    pythons.update(p.split("=", 1) for p in args.peer)
    rows = ("new journal", "first cycle", "later cycles")
    runs: dict[str, dict[str, list[tuple[float, float]]]] = {
        name: {row: [] for row in rows} for name in pythons
    }
    for _ in range(args.rounds):
        for name, python in pythons.items():
            with tempfile.TemporaryDirectory(prefix="mailpipe-leases-") as tmp:
                results = [
                    json.loads(subprocess.run(
                        [python, str(Path(__file__).resolve()), "--child", tmp,
                         "--mailboxes", str(args.mailboxes), "--cycles",
                         str(args.cycles)],
                        capture_output=True, text=True, check=True, cwd="/",
                    ).stdout)
                    for _process in range(2)
                ]
            runs[name]["new journal"].append(results[0][0])
            runs[name]["first cycle"].append(results[1][0])
            runs[name]["later cycles"] += results[1][1:]
    print(f"{args.mailboxes} leases a cycle, {args.cycles} cycles a process, "
          f"{args.rounds} rounds; ms per take (median over the cycles)")
    print("| mailpipe | cycle | wall ms | CPU ms |")
    print("|---|---|---:|---:|")
    n = args.mailboxes
    for name, by_row in runs.items():
        for row, cycles in by_row.items():
            if cycles:
                wall = statistics.median(w for w, _ in cycles) / n * 1000
                cpu = statistics.median(c for _, c in cycles) / n * 1000
                print(f"| {name} | {row} | {wall:.3f} | {cpu:.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
