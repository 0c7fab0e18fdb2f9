"""Built-in plugins, installed as ``mailpipe.plugins`` (never as a bare ``plugins``)."""
