"""socat as inetd and as a TLS terminator, for servers that have neither built in."""

from __future__ import annotations

from .base import LabServer

__all__ = ["socat_inetd", "socat_tls_front"]


def socat_tls_front(server: LabServer, upstream: str) -> str:
    """A ``socat`` command (shell text) serving implicit TLS on ``pop3s_port``."""
    t = server.tls_dir
    return (
        f"socat OPENSSL-LISTEN:{server.pop3s_port},bind={server.host},reuseaddr,fork,"
        f"cert={t / 'cert.pem'},key={t / 'key.pem'},verify=0 {upstream}"
    )


def socat_inetd(server: LabServer, program: str) -> list[str]:
    """``socat`` running ``program`` per connection on ``pop3_port`` (stdin = socket)."""
    return [
        "socat",
        f"TCP-LISTEN:{server.pop3_port},bind={server.host},reuseaddr,fork",
        f"EXEC:{program},nofork",
    ]
