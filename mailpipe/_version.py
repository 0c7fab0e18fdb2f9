"""Version of the mailpipe distribution."""

__version__ = "0.2.0.dev0"
