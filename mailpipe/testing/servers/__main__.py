"""``python -m mailpipe.testing.servers prepare``: unpack the lab's server packages."""

from __future__ import annotations

import sys

from .packages import EXTRACTED_PACKAGES, cache_dir, prepare


def main(argv: list[str]) -> int:
    """Run the ``prepare`` command; returns the exit status."""
    if argv[1:] != ["prepare"]:
        print("usage: python -m mailpipe.testing.servers prepare", file=sys.stderr)
        return 2
    done = prepare()
    print(
        f"interop packages in {cache_dir()}: unpacked {' '.join(done) or 'none'} "
        f"(all: {' '.join(EXTRACTED_PACKAGES)})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
