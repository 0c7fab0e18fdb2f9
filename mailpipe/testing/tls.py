"""TLS material of the fake POP3 server: one test CA and localhost certificate per
process (trustme), written to a temporary folder removed at exit."""

from __future__ import annotations

import atexit
import functools
import shutil
import ssl
import tempfile
import threading
from pathlib import Path
from typing import Any

_TLS_LOCK = threading.Lock()


def tls_material() -> tuple[Path, Any]:
    """The CA's PEM file and the ``trustme`` server certificate (made on first use)."""
    with _TLS_LOCK:  # the server thread and the test may ask first at the same time
        return _make_tls_material()


@functools.lru_cache(maxsize=1)
def _make_tls_material() -> tuple[Path, Any]:
    import trustme

    directory = tempfile.mkdtemp(prefix="mailpipe-pop3-ca-")
    atexit.register(shutil.rmtree, directory, ignore_errors=True)
    ca = trustme.CA(organization_name="mailpipe fake POP3 CA")
    cert = ca.issue_cert("localhost", "127.0.0.1")
    ca_file = Path(directory) / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    return ca_file, cert


def server_context() -> ssl.SSLContext:
    """A server-side context presenting the certificate for localhost/127.0.0.1."""
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    tls_material()[1].configure_cert(ctx)
    return ctx


def client_context() -> ssl.SSLContext:
    """A verifying client context that trusts the test CA only."""
    return ssl.create_default_context(cafile=str(tls_material()[0]))
