"""Verified TLS by default for PostgreSQL connections (journal and store.postgres)."""

from __future__ import annotations

import ipaddress
import os

_LOCAL_NAMES = {"", "localhost"}


def _is_local(host: str) -> bool:
    if host in _LOCAL_NAMES or host.startswith("/"):  # Unix socket directory
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def secure_dsn(dsn: str) -> str:
    """Return ``dsn`` with ``sslmode=verify-full`` (system CAs) added for remote hosts.

    libpq's default ``sslmode=prefer`` neither verifies the certificate nor refuses a
    plaintext fallback. Unless the DSN or ``PGSSLMODE`` chooses a mode explicitly, a
    host that is not loopback or a Unix socket gets ``verify-full`` with the system
    trust store (``sslrootcert=system``, libpq 16+). Loopback stays as configured.
    """
    from psycopg.conninfo import conninfo_to_dict, make_conninfo

    params = conninfo_to_dict(dsn)
    if "sslmode" in params or os.environ.get("PGSSLMODE"):
        return dsn
    hosts = str(params.get("host") or os.environ.get("PGHOST") or "").split(",")
    if all(_is_local(h.strip()) for h in hosts):
        return dsn
    extra = {"sslmode": "verify-full"}
    if "sslrootcert" not in params and not os.environ.get("PGSSLROOTCERT"):
        extra["sslrootcert"] = "system"
    return make_conninfo(dsn, **extra)
