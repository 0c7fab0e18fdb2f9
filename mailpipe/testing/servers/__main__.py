"""``python -m mailpipe.testing.servers prepare``: unpack the lab's server packages."""

from __future__ import annotations

import sys

from .packages import main

if __name__ == "__main__":
    sys.exit(main(["python -m mailpipe.testing.servers", *sys.argv[1:]]))
