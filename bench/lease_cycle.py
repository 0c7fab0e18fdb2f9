"""The lease part of a no-new-mail cycle, alone: take and release many mailboxes' leases.

    python bench/lease_cycle.py [--mailboxes 1000] [--cycles 3] [--peer NAME=PYTHON]

What the scheduler does around every poll of a long-running worker (``mailpipe run``):
``MailboxLease.acquire`` (the journal's ``lock_mailbox`` and ``fence``) and
``release``, over every mailbox once a cycle, on one SQLite journal in a temporary
folder (on the disk of the temporary folder, so with its fsync cost). The first cycle
of a process is reported apart from the later ones: ``mailpipe run --once`` only ever
runs a first cycle. Times are per take (wall and CPU of this process, which does
nothing else). ``--peer`` runs the same in another interpreter (another install of
mailpipe) alternately, ``--rounds`` times.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def measure(mailboxes: int, cycles: int) -> list[tuple[float, float]]:
    """(wall, CPU) seconds of each cycle over ``mailboxes`` leases."""
    from mailpipe.journal.sqlite import SqliteJournal
    from mailpipe.leases import MailboxLease
    from mailpipe.logs import configure

    configure(level="warning", fmt="json", stream=sys.stderr)  # as ``run`` does

    names = [f"mailbox{i:05d}" for i in range(mailboxes)]
    results = []
    with tempfile.TemporaryDirectory(prefix="mailpipe-leases-") as tmp:
        journal = SqliteJournal(Path(tmp) / "journal.sqlite3")
        try:
            for _ in range(cycles):
                wall, cpu = time.perf_counter(), time.process_time()
                for name in names:
                    lease = MailboxLease(journal, name, owner="bench:1", ttl=300)
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
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(measure(args.mailboxes, args.cycles)))
        return 0
    pythons = {"this": sys.executable}
    pythons.update(p.split("=", 1) for p in args.peer)
    runs: dict[str, list[list[tuple[float, float]]]] = {name: [] for name in pythons}
    for _ in range(args.rounds):
        for name, python in pythons.items():
            done = subprocess.run(
                [python, str(Path(__file__).resolve()), "--child", "--mailboxes",
                 str(args.mailboxes), "--cycles", str(args.cycles)],
                capture_output=True, text=True, check=True, cwd="/",
            )
            runs[name].append(json.loads(done.stdout))
    print(f"{args.mailboxes} leases a cycle, {args.cycles} cycles a process, "
          f"{args.rounds} processes each; ms per take (median over the processes)")
    print("| mailpipe | cycle | wall ms | CPU ms |")
    print("|---|---|---:|---:|")
    for name, results in runs.items():
        for label, pick in (("first", slice(0, 1)), ("later", slice(1, None))):
            walls = [w for r in results for w, _ in r[pick]]
            cpus = [c for r in results for _, c in r[pick]]
            if not walls:
                continue
            n = args.mailboxes
            print(f"| {name} | {label} | {statistics.median(walls) / n * 1000:.3f} | "
                  f"{statistics.median(cpus) / n * 1000:.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
