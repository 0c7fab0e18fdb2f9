"""Testing kit: a fault-injecting POP3 server, fixtures and fakes for mailpipe users."""
