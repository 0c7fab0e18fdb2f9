"""forward.command target for the delivery proofs: logs each message, fails some.

Usage: python delivery_sink.py LOG [FAIL_EVERY FIXED_MARKER]

Reads the raw message on stdin and appends "<key> ok|fail <number>" to LOG. With
FAIL_EVERY, a message whose subject is "delivery N" with N % FAIL_EVERY == 0 fails (exit
1, a permanent failure for forward.command) until the file FIXED_MARKER exists.
"""

import os
import re
import sys


def main(argv: list[str]) -> int:
    log = argv[1]
    fail_every = int(argv[2]) if len(argv) > 2 else 0
    fixed = argv[3] if len(argv) > 3 else ""
    raw = sys.stdin.buffer.read()
    head = raw.split(b"\r\n\r\n", 1)[0]
    m = re.search(rb"^Subject: delivery (\d+)\r?$", head, re.M)
    number = int(m.group(1)) if m else -1
    failing = (
        bool(fail_every) and number % fail_every == 0 and not os.path.exists(fixed)
    )
    key = os.environ.get("MAILPIPE_KEY", "?")
    with open(log, "a") as f:
        f.write(f"{key} {'fail' if failing else 'ok'} {number}\n")
    if failing:
        sys.stderr.write(f"refusing message {number}\n")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
