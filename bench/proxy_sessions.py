"""Per-session timings from a ``bench/proxy.py --log`` file (``bench/run --proxy-log``).

``python bench/proxy_sessions.py FILE`` prints one line per POP3 session seen by the
proxy, in order: when it started (seconds after the first line), how long it lasted
(greeting to the server's close), the retrieval phase (the first RETR sent to QUIT
sent), the time from QUIT sent to its reply, and the turnarounds (a client chunk that
follows a server chunk: each one is a point where the client waited for the server, or
the server for the client). The proxy logs only a chunk's first octets, so commands
are not counted; a RETR or QUIT is seen when a chunk starts with it.

Sessions are told apart by the greeting, so the file must hold sequential sessions
(bench/run runs its clients one after another). Wall times carry the machine's load;
the turnaround count does not.
"""

from __future__ import annotations

import argparse
import ast
import sys
from dataclasses import dataclass


@dataclass
class Session:
    start: float
    end: float = 0.0
    first_retr: float | None = None
    quit_sent: float | None = None
    quit_reply: float | None = None
    turnarounds: int = 0
    last: str = "<"


def parse(lines: list[str]) -> list[Session]:
    sessions: list[Session] = []
    for line in lines:
        t_text, direction, _octets, data_text = line.rstrip("\n").split(" ", 3)
        t, data = float(t_text), ast.literal_eval(data_text)
        if direction == "<" and data.startswith(b"+OK") and b"ready" in data[:80]:
            sessions.append(Session(start=t))
        if not sessions:
            continue
        s = sessions[-1]
        s.end = t
        if direction == ">":
            if s.last == "<":
                s.turnarounds += 1
            if b"RETR " in data and s.first_retr is None:
                s.first_retr = t
            if data.startswith(b"QUIT") or b"\r\nQUIT\r\n" in data:
                s.quit_sent = t
        elif s.quit_sent is not None and s.quit_reply is None and data:
            s.quit_reply = t
        s.last = direction
    return sessions


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("log", help="a bench/proxy.py --log file")
    a = ap.parse_args()
    with open(a.log) as f:
        sessions = parse(f.readlines())
    if not sessions:
        print("no session found", file=sys.stderr)
        return 1
    t0 = sessions[0].start
    print("| # | start s | session s | first RETR → QUIT sent s | QUIT → reply s "
          "| turnarounds |")
    print("|---:|---:|---:|---:|---:|---:|")
    for i, s in enumerate(sessions, 1):
        phase = (f"{s.quit_sent - s.first_retr:.3f}"
                 if s.first_retr is not None and s.quit_sent is not None else "-")
        quit_wait = (f"{s.quit_reply - s.quit_sent:.3f}"
                     if s.quit_reply is not None and s.quit_sent is not None else "-")
        print(f"| {i} | {s.start - t0:.3f} | {s.end - s.start:.3f} | {phase} | "
              f"{quit_wait} | {s.turnarounds} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
