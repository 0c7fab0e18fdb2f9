"""Version of the mailpipe distribution."""

__version__ = "0.1.0"
