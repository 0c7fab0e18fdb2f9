"""What every interop lab server shares: ports, certificates, processes, one user.

A :class:`LabServer` runs one real POP3 implementation on 127.0.0.1 on free ports,
inside a :class:`~mailpipe.testing.servers.sandbox.Sandbox`, with one mailbox user
(:attr:`LabServer.user`). Subclasses say what the server offers (class attributes
``auth_methods``, ``starttls``, ``implicit_tls``, ...), configure it in
:meth:`LabServer._configure` and fill the mailbox in :meth:`LabServer._write_messages`.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Literal

from mailpipe.testing.lifecycle import Service, free_ports, wait_listening

from .packages import missing_apt_packages, staged
from .refclient import ReferenceClient, ServerMessage
from .sandbox import Sandbox, SystemUser, sandbox_unavailable_reason

__all__ = [
    "EVERY_PASSWORD_AUTH",
    "LabServer",
    "LabServerError",
    "LabUser",
    "descendants",
    "make_certificates",
]

Security = Literal["none", "starttls", "tls"]
MAIL_UID = 5100  # the mail user's uid/gid inside every sandbox


#: Every ``auth`` value mailpipe has for a password (XOAUTH2/OAUTHBEARER need a token).
EVERY_PASSWORD_AUTH: tuple[str, ...] = (
    "user",
    "apop",
    "plain",
    "login",
    "cram-md5",
    "scram-sha-1",
    "scram-sha-256",
)


class LabServerError(RuntimeError):
    """A lab server could not be configured or started; carries its log tail."""


@dataclass(frozen=True, slots=True)
class LabUser:
    """The mailbox user: login name, password, APOP secret where the server has one."""

    name: str
    password: str
    apop_secret: str | None = None


def make_certificates(directory: Path, host: str = "127.0.0.1") -> Path:
    """A test CA and a server certificate for ``localhost`` and ``host``.

    Writes ``ca.pem``, ``cert.pem`` (chain), ``key.pem`` and ``combined.pem``
    (cert + key) into ``directory``, world-readable (servers read them after
    dropping privileges); returns the CA path.
    """
    import trustme

    directory.mkdir(parents=True, exist_ok=True)
    ca = trustme.CA(organization_name="mailpipe interop CA")
    cert = ca.issue_cert("localhost", host)
    chain = b"".join(blob.bytes() for blob in cert.cert_chain_pems)
    key = cert.private_key_pem.bytes()
    for name, data in (
        ("ca.pem", ca.cert_pem.bytes()),
        ("cert.pem", chain),
        ("key.pem", key),
        ("combined.pem", chain + key),
    ):
        (directory / name).write_bytes(data)
        (directory / name).chmod(0o644)
    return directory / "ca.pem"


def descendants(root: int, match: str) -> list[int]:
    """PIDs descending from ``root`` whose command line contains ``match``, sorted."""
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            parents[int(entry.name)] = int(stat.rsplit(")", 1)[1].split()[1])
    found, frontier = set(), {root}
    for _ in range(64):  # process trees here are a few levels deep
        frontier = {pid for pid, ppid in parents.items() if ppid in frontier}
        if not frontier:
            break
        found |= frontier
    out = []
    for pid in found:
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ")
        except OSError:
            continue
        if match.encode() in cmd:
            out.append(pid)
    return sorted(out)


class LabServer(Service):
    """One real POP3 server on 127.0.0.1 with one user; a context manager.

    ``pop3_port`` serves plaintext (and STLS when ``starttls``), ``pop3s_port``
    implicit TLS when ``implicit_tls`` (else 0). :meth:`load` replaces the
    mailbox; :meth:`messages` reads it back with the reference client.
    ``base_dir`` (default: a new ``/tmp/mailpipe-<name>-*``) holds configuration,
    certificates, mail and ``server.log``; the caller removes it after :meth:`stop`
    (the ``lab_servers`` fixture does).
    """

    #: Short name used in test ids and ``docs/conformance.md``.
    name: ClassVar[str] = ""
    #: Implementation and version as packaged by Debian 12.
    title: ClassVar[str] = ""
    #: Extracted packages (see :mod:`.packages`) this server runs from.
    packages: ClassVar[tuple[str, ...]] = ()
    #: Installed packages it needs.
    apt_packages: ClassVar[tuple[str, ...]] = ()
    #: mailpipe ``auth`` values the server accepts (``user`` is always there).
    auth_methods: ClassVar[tuple[str, ...]] = ("user",)
    starttls: ClassVar[bool] = False
    implicit_tls: ClassVar[bool] = False
    #: The server sends CAPA (RFC 2449).
    capa: ClassVar[bool] = True
    #: Command-line text of the per-session server process (to kill one mid-RETR).
    session_process: ClassVar[str] = ""
    #: Each connection's :attr:`session_process` ends with its connection (not a
    #: pre-forked worker kept for the next one), so "no such process" means that no
    #: session is still at work on the mailbox (:meth:`wait_sessions_ended`).
    session_ends_with_connection: ClassVar[bool] = False

    def __init__(self, base_dir: str | os.PathLike[str] | None = None) -> None:
        self.base_dir = Path(
            base_dir or tempfile.mkdtemp(prefix=f"mailpipe-{self.name}-")
        ).resolve()
        self.host = "127.0.0.1"
        self.pop3_port = 0
        self.pop3s_port = 0
        self.user = LabUser(
            name="mptest", password="Secr3t-pw", apop_secret="Apop-s3cret"
        )
        self.sandbox = Sandbox(self.base_dir / "sandbox")
        self.mail_user: SystemUser | None = None
        self._proc: subprocess.Popen[bytes] | None = None

    # -- availability ------------------------------------------------------------

    @classmethod
    def unavailable_reason(cls) -> str | None:
        """Why this server cannot run here (not root, missing package), or None."""
        reason = sandbox_unavailable_reason()
        if reason:
            return reason
        absent = [p for p in cls.packages if not staged(p).is_dir()]
        if absent:
            return (
                f"{cls.title}: packages not unpacked ({', '.join(absent)}); run "
                "`python -m mailpipe.testing.servers prepare` as root (.ci/run does)"
            )
        missing = missing_apt_packages(cls.apt_packages)
        if missing:
            return f"{cls.title}: apt packages missing: {' '.join(missing)}"
        return None

    # -- paths -------------------------------------------------------------------

    @property
    def ca_file(self) -> Path:
        """PEM of the CA that signed the server certificate."""
        return self.base_dir / "tls" / "ca.pem"

    @property
    def tls_dir(self) -> Path:
        """``ca.pem``, ``cert.pem``, ``key.pem``, ``combined.pem``."""
        return self.base_dir / "tls"

    @property
    def home(self) -> Path:
        """The mail user's home directory."""
        return self.base_dir / "home"

    @property
    def log_path(self) -> Path:
        """Where the server's stdout and stderr go."""
        return self.base_dir / "server.log"

    def log_text(self) -> str:
        """The server log, for assertion messages."""
        return (
            self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        )

    def port_for(self, security: Security) -> int:
        """The port to use with ``security``."""
        return self.pop3s_port if security == "tls" else self.pop3_port

    # -- lifecycle ---------------------------------------------------------------

    @property
    def running(self) -> bool:
        """True while the sandbox's first process is alive."""
        return self._proc is not None and self._proc.poll() is None

    def start(self) -> None:
        """Configure, start, and wait until every port accepts connections.

        Raises:
            LabServerError: unavailable here, or not listening within 30 s.
        """
        if self.running:
            return
        reason = self.unavailable_reason()
        if reason:
            raise LabServerError(reason)
        self.base_dir.mkdir(parents=True, exist_ok=True)
        self.base_dir.chmod(0o755)
        make_certificates(self.tls_dir, self.host)
        self.home.mkdir(exist_ok=True)
        self.mail_user = self.sandbox.add_user(
            self.user.name, MAIL_UID, home=self.home, password=self.user.password
        )
        os.chown(self.home, MAIL_UID, MAIL_UID)
        self.home.chmod(0o755)
        last = ""
        for _attempt in range(3):  # a probed port may be taken before the bind
            ports = free_ports(self.host, 2)  # distinct
            self.pop3_port = ports[0]
            self.pop3s_port = ports[1] if self.implicit_tls else 0
            argv = self._configure()
            self.sandbox.write()
            with self.log_path.open("ab") as log:
                self._proc = subprocess.Popen(
                    self.sandbox.command(argv),
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                    cwd=self.base_dir,
                )
            ports = [p for p in (self.pop3_port, self.pop3s_port) if p]
            if wait_listening(self._proc, self.host, ports, 30.0):
                self._after_start()
                return
            last = self.log_text()[-3000:]
            self.stop()
        raise LabServerError(f"{self.title} did not start in {self.base_dir}:\n{last}")

    def stop(self) -> None:
        """Kill the sandbox and wait: SIGKILL to the process group, and the kernel
        ends every other process of the PID namespace with its first one."""
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)

    @property
    def pid(self) -> int | None:
        """PID of the process the server's other processes descend from."""
        return self._proc.pid if self.running and self._proc is not None else None

    def server_pids(self, match: str) -> list[int]:
        """PIDs of this server's processes whose command line contains ``match``."""
        root = self.pid
        return [] if root is None else descendants(root, match)

    # -- subclass hooks ----------------------------------------------------------

    def _configure(self) -> list[str]:
        """Write the configuration for the current ports; return the command to run."""
        raise NotImplementedError

    def _after_start(self) -> None:
        """Anything to do once the ports accept connections (e.g. create a mailbox)."""

    def _write_messages(self, messages: Sequence[bytes]) -> list[int]:
        """Add ``messages`` to the (empty) mailbox, in order; return the indexes of
        those the server's delivery refused (they are not in the mailbox)."""
        raise NotImplementedError

    # -- mail ----------------------------------------------------------------------

    def reference(self, security: Security = "none") -> ReferenceClient:
        """A reference client session for :attr:`user` (use with ``with``)."""
        return ReferenceClient(
            self.host,
            self.port_for(security),
            self.user.name,
            self.user.password,
            security=security,
            ca_file=self.ca_file,
        )

    def wait_sessions_ended(self, seconds: float = 15.0) -> None:
        """Wait (at most ``seconds``) until no session process of this server is
        left, on a server whose session processes end with their connections.

        A client that drops its connection (a cut or reset mid-RETR) returns at once,
        while the server's session may still run until it notices. Courier renames
        a message's file as it sends it (``…:2,S``, seen), so a session started
        meanwhile can list a name that vanishes before its RETR ("-ERR Can't open the
        message file - it's gone!", seen once in CI; on an idle machine the cut
        session was gone by the time the client returned). Tests call this before the
        next session whose result they assert.
        """
        if not self.session_ends_with_connection or not self.session_process:
            return
        # The bound is a deadline: each reading walks /proc, tens of ms on the busy
        # machine where the race happens, which a count of readings multiplied.
        deadline = time.monotonic() + seconds
        while pids := self.session_pids():
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(
                    f"{self.name}: session processes still running after {seconds} s: "
                    f"{pids}"
                )
            time.sleep(min(0.05, left))

    def session_pids(self) -> list[int]:
        """PIDs of this server's running session processes: those whose program
        (the first word of the command line) contains :attr:`session_process`; the
        listener that starts them may name it among its arguments (couriertcpd)."""
        out = []
        for pid in self.server_pids(self.session_process):
            try:
                cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
                state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
            except OSError:
                continue  # gone meanwhile
            if state != "Z" and self.session_process.encode() in cmd.split(b"\0")[0]:
                out.append(pid)
        return out

    def clear(self) -> None:
        """Delete every message (through POP3, so the server's indexes agree), once
        any session an earlier client left has ended (:meth:`wait_sessions_ended`)."""
        self.wait_sessions_ended()
        with self.reference() as ref:
            ref.delete_all()

    def load(self, messages: Sequence[bytes]) -> list[int]:
        """Empty the mailbox, then add ``messages`` in order.

        Returns the indexes (into ``messages``) that delivery refused; only a server
        that takes mail through its own delivery agent (Cyrus' LMTP) refuses any.
        """
        self.clear()
        return self._write_messages(messages)

    def messages(self) -> list[ServerMessage]:
        """What the mailbox holds now, read with the reference client."""
        with self.reference() as ref:
            return ref.messages()

    def served(self) -> list[ServerMessage]:
        """The messages as every later session will serve them.

        Some servers rewrite messages on the first session that reads them (GNU
        pop3d adds X-UIDL, X-UID and Status to its mbox); the mailbox is read until
        two readings agree (at most three).
        """
        last = self.messages()
        for _ in range(2):
            again = self.messages()
            if [m.raw for m in again] == [m.raw for m in last]:
                break
            last = again
        return last
