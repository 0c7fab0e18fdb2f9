"""``python -m mailpipe``: the command line."""

from mailpipe.cli import main

main()
