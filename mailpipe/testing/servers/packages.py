"""Debian packages of the interop servers: what to install, what to extract, where.

Courier, Cyrus, solid-pop3d and popa3d Conflict with ``dovecot-pop3d`` (they all
provide ``pop3-server``; ``cyrus-imapd`` likewise Conflicts with ``dovecot-imapd`` as an
``imap-server``), so they are never installed: :func:`prepare` fetches them
with ``apt-get download`` and unpacks each with ``dpkg-deb -x`` into
``<cache>/stage/<package>``, where the fixtures run them from. Their libraries and
tools (authlib, SASL, socat, ...) do not conflict and are installed with apt
(:data:`APT_PACKAGES`; ``.ci/run`` installs them). The cache survives test runs:
:func:`prepare` does nothing for a package already staged.

``python -m mailpipe.testing.servers prepare`` runs :func:`prepare` (as root). The
module needs only the standard library, so ``.ci/run`` runs this file directly before
mailpipe is installed: ``python3 mailpipe/testing/servers/packages.py apt-packages``
prints :data:`APT_PACKAGES`, ``... prepare`` unpacks.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

__all__ = [
    "APT_PACKAGES",
    "CYRUS_LIBRARIES",
    "EXTRACTED_PACKAGES",
    "cache_dir",
    "main",
    "missing_apt_packages",
    "prepare",
    "staged",
]

#: Unpacked, never installed (they Conflict with dovecot-pop3d or dovecot-imapd).
EXTRACTED_PACKAGES: tuple[str, ...] = (
    "courier-pop",
    "cyrus-common",
    "cyrus-imapd",
    "cyrus-pop3d",
    "popa3d",
    "solid-pop3d",
)

#: Installed with apt for Cyrus: sasl2-bin and cyrus-common's libraries.
CYRUS_LIBRARIES: tuple[str, ...] = (
    "sasl2-bin",
    "libsasl2-modules",
    "libclamav12",
    "libical3",
    "libzephyr4",
    "libxapian30",
    "libjansson4",
    "libpq5",
    "libwrap0",
    "libicu72",
)

#: Installed with apt: the extracted servers' libraries and helpers, GNU pop3d itself.
APT_PACKAGES: tuple[str, ...] = (
    # Courier: authdaemond, userdb tools, couriertcpd/couriertls, libcourier-unicode.
    "courier-authlib",
    "courier-authlib-userdb",
    "courier-base",
    "libcourier-unicode4",
    # Cyrus: saslpasswd2 and the libraries cyrus-common links against.
    *CYRUS_LIBRARIES,
    # GNU Mailutils pop3d (no Conflicts) and popauth.
    "mailutils-pop3d",
    # solid-pop3d's library; socat runs solid-pop3d and popa3d inetd-style.
    "liblockfile1",
    "socat",
    "util-linux",
)

_ENV = "MAILPIPE_INTEROP_CACHE"


def cache_dir() -> Path:
    """Where packages are downloaded and unpacked: ``$MAILPIPE_INTEROP_CACHE``, else
    ``/var/cache/mailpipe-interop`` for root, else ``~/.cache/mailpipe-interop``.

    The unpacked binaries are executed by unprivileged server processes, so the
    directory and its parents must be traversable by every user (``/root`` is not).
    """
    env = os.environ.get(_ENV)
    if env:
        return Path(env)
    if os.geteuid() == 0:
        return Path("/var/cache/mailpipe-interop")
    return Path.home() / ".cache" / "mailpipe-interop"


def staged(package: str) -> Path:
    """The root of ``package``'s unpacked tree (may not exist yet)."""
    return cache_dir() / "stage" / package


def missing_apt_packages(packages: tuple[str, ...] = APT_PACKAGES) -> list[str]:
    """Those of ``packages`` that dpkg does not report as installed."""
    missing = []
    for pkg in packages:
        res = subprocess.run(
            ["dpkg-query", "-W", "-f=${db:Status-Status}", pkg],
            capture_output=True,
            text=True,
            check=False,
        )
        if res.stdout.strip() != "installed":
            missing.append(pkg)
    return missing


def prepare(packages: tuple[str, ...] = EXTRACTED_PACKAGES) -> list[str]:
    """Download and unpack every package of ``packages`` not yet staged.

    Returns the packages unpacked by this call. Each is unpacked into a temporary
    directory and renamed into place, so a half-unpacked tree is never used.

    Raises:
        subprocess.CalledProcessError: ``apt-get download`` or ``dpkg-deb`` failed.
    """
    stage = cache_dir() / "stage"
    debs = cache_dir() / "debs"
    todo = [p for p in packages if not staged(p).is_dir()]
    if not todo:
        return []
    for d in (cache_dir(), stage, debs):
        d.mkdir(parents=True, exist_ok=True)
        d.chmod(0o755)
    subprocess.run(
        ["apt-get", "download", "-q", "-o", "APT::Sandbox::User=root", *todo],
        cwd=debs,
        check=True,
    )
    for pkg in todo:
        found = sorted(debs.glob(f"{pkg}_*.deb"))
        if not found:
            raise FileNotFoundError(f"apt-get download left no {pkg}_*.deb in {debs}")
        tmp = Path(tempfile.mkdtemp(prefix=f".{pkg}-", dir=stage))
        subprocess.run(["dpkg-deb", "-x", str(found[-1]), str(tmp)], check=True)
        tmp.chmod(0o755)
        if staged(pkg).exists():  # raced with another prepare
            shutil.rmtree(tmp)
        else:
            tmp.rename(staged(pkg))
    return todo


def main(argv: list[str]) -> int:
    """``apt-packages`` (print them, one line) or ``prepare``; returns the exit status."""
    if argv[1:] == ["apt-packages"]:
        print(" ".join(APT_PACKAGES))
        return 0
    if argv[1:] == ["prepare"]:
        done = prepare()
        print(
            f"interop packages in {cache_dir()}: unpacked {' '.join(done) or 'none'} "
            f"(all: {' '.join(EXTRACTED_PACKAGES)})"
        )
        return 0
    print(f"usage: {argv[0]} apt-packages|prepare", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv))
