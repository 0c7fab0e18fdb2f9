"""forward.command target that kills mailpipe itself on some messages.

Usage: python killer_sink.py LOG N[,N...]

Reads the raw message on stdin. For ``Subject: delivery N`` with N listed, appends
"<number> kill" to LOG and sends SIGKILL to its parent (the mailpipe process running
the chain), as a crash, the OOM killer or a parser that had to be killed would end
it. Otherwise appends "<number> ok" and exits 0.
"""

import os
import re
import signal
import sys


def main(argv: list[str]) -> int:
    log, killers = argv[1], {int(n) for n in argv[2].split(",") if n}
    head = sys.stdin.buffer.read().split(b"\r\n\r\n", 1)[0]
    m = re.search(rb"^Subject: delivery (\d+)\r?$", head, re.M)
    number = int(m.group(1)) if m else -1
    kill = number in killers
    with open(log, "a") as f:
        f.write(f"{number} {'kill' if kill else 'ok'}\n")
    if kill:
        os.kill(os.getppid(), signal.SIGKILL)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
