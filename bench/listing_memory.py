"""Benchmark: resident memory per message of a large UIDL + LIST listing (issue 20.6).

Builds the two listing bodies a POP3 client collects for ``--messages`` messages (as
the protocol does: a growing ``bytearray``, then ``bytes`` of it), parses them with
:func:`~mailpipe.plugins.pop3.events.parse_uidl` and
:func:`~mailpipe.plugins.pop3.events.parse_list`, and builds the ``MessageRef`` list
the way ``Pop3Session.list()`` does (uid by number, then ``distinct_uids``). Uids
are 16 characters (Dovecot's ``%08Xu%08Xv``). Reports, per message, the peak RSS
growth (``VmHWM`` after resetting it through ``/proc/self/clear_refs``) and the RSS
still held once only the refs are left.

Usage: python bench/listing_memory.py [--messages N]
"""

from __future__ import annotations

import argparse
import gc
import sys

from mailpipe.plugins.pop3.events import parse_list, parse_uidl

from mailpipe.message import MessageRef, distinct_uids


def status(field: str) -> int:
    """``field`` (VmRSS, VmHWM) of /proc/self/status in octets."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":")) * 1024


def listing(n: int, line: bytes) -> bytes:
    """``n`` lines ``line % (number, number)``, collected as the protocol does."""
    buf = bytearray()
    for number in range(1, n + 1):
        buf += line % (number, number)
    return bytes(buf)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--messages", type=int, default=1_000_000)
    n = ap.parse_args().messages
    gc.collect()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # VmHWM := VmRSS
    start = status("VmRSS")
    uidl = listing(n, b"%d %08X5F3A1B2C\r\n")
    uids = dict(parse_uidl(uidl))
    del uidl
    sizes = parse_list(listing(n, b"%d 2%03d\r\n"))
    refs = [MessageRef(mailbox="box", number=number, uid=uids.get(number, ""), size=size)
            for number, size in sizes]
    del uids, sizes
    refs, _ = distinct_uids(refs)
    gc.collect()
    peak, held = status("VmHWM") - start, status("VmRSS") - start
    ref = refs[n // 2]
    live = (sys.getsizeof(ref) + sys.getsizeof(ref.uid) + sys.getsizeof(ref.number)
            + sys.getsizeof(ref.size) + 8)  # + the list's pointer
    print(f"{n} messages: peak +{peak / n:.0f} B/message ({peak / 2**20:.0f} MiB), "
          f"held +{held / n:.0f} B/message ({held / 2**20:.0f} MiB); "
          f"live objects of one ref {live} B")
    return 0


if __name__ == "__main__":
    sys.exit(main())
