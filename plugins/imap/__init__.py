"""Built-in plugin `imap`: the IMAP4 source (registered through the same hooks as third-party plugins)."""
