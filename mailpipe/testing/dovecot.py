"""A private Dovecot POP3 server on 127.0.0.1 for tests and benchmarks."""

from __future__ import annotations

import itertools
import os
import shutil
import ssl
import subprocess
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from mailpipe.testing.lifecycle import Service, free_ports, wait_listening

__all__ = [
    "DEFAULT_MECHANISMS",
    "DOVECOT_BINARY",
    "Dovecot",
    "DovecotError",
    "DovecotUser",
    "dovecot_unavailable_reason",
]

DOVECOT_BINARY = "/usr/sbin/dovecot"
POP3_BINARY = "/usr/lib/dovecot/pop3"
IMAP_BINARY = "/usr/lib/dovecot/imap"
#: Mechanisms offered by default; all work with the ``{PLAIN}`` passwords the
#: controller stores (Dovecot 2.3 derives SCRAM keys from a plaintext password).
#: ``apop`` also makes the greeting carry an RFC 1939 §7 timestamp.
DEFAULT_MECHANISMS: tuple[str, ...] = (
    "plain",
    "login",
    "cram-md5",
    "scram-sha-1",
    "scram-sha-256",
)
_ROOT_MAIL_ID = 5000  # uid/gid owning the mail store when running as root


class DovecotError(RuntimeError):
    """Dovecot could not be started or configured; the message carries its log tail."""


@dataclass(frozen=True, slots=True)
class DovecotUser:
    """A mailbox user of a :class:`Dovecot` instance."""

    name: str
    password: str
    home: Path

    @property
    def maildir(self) -> Path:
        """The user's Maildir (``~/Maildir``)."""
        return self.home / "Maildir"


def _find_binary(binary: str | None) -> str | None:
    if binary is not None:
        return binary if os.access(binary, os.X_OK) else None
    if os.access(DOVECOT_BINARY, os.X_OK):
        return DOVECOT_BINARY
    return shutil.which("dovecot")


def dovecot_unavailable_reason(
    binary: str | None = None, *, imap: bool = False
) -> str | None:
    """Return why Dovecot cannot run here (missing binary, pop3, imap or version), or None."""
    found = _find_binary(binary)
    if found is None:
        return (
            f"Dovecot is not installed ({binary or DOVECOT_BINARY} not found; "
            "apt-get install dovecot-core dovecot-pop3d)"
        )
    if not os.access(POP3_BINARY, os.X_OK):
        return f"Dovecot POP3 is not installed ({POP3_BINARY}; apt-get dovecot-pop3d)"
    try:
        out = subprocess.run(
            [found, "--version"], capture_output=True, text=True, timeout=10, check=True
        ).stdout
    except (OSError, subprocess.SubprocessError) as exc:
        return f"{found} --version failed: {exc}"
    version = out.split()[0] if out.split() else "?"
    if imap and not os.access(IMAP_BINARY, os.X_OK):
        return f"Dovecot IMAP is not installed ({IMAP_BINARY}; apt-get dovecot-imapd)"
    if not version.startswith("2.3."):
        return f"Dovecot {version} is not supported (the generated config is for 2.3)"
    return None


def _check_field(kind: str, value: str) -> None:
    # passwd-file fields are ':'-separated lines.
    if not value or any(c in value for c in ":/\r\n\x00") or value.startswith("."):
        raise ValueError(
            f"{kind} must be non-empty, not start with '.' and hold no ':', '/', "
            f"CR, LF or NUL: {value!r}"
        )


class Dovecot(Service):
    """A private Dovecot 2.3 POP3 server whose every file lives under ``base_dir``.

    Plaintext POP3 with STLS listens on ``pop3_port`` and implicit TLS on
    ``pop3s_port``, both on 127.0.0.1 and on free ports. The certificate comes from
    a test CA made with trustme; ``ca_file`` is its PEM. Each user has a one-line
    passwd-file with a ``{PLAIN}`` password (so ``add_user`` takes effect at once,
    also while running); mail is ``maildir:~/Maildir``. The system ``/etc/dovecot`` is
    never read. Use it as a context manager::

        with Dovecot(tmp_dir) as d:
            alice = d.add_user("alice", "secret")
            d.deliver(alice, b"Subject: hi\\r\\n\\r\\nbody\\r\\n")
            poplib.POP3(d.host, d.pop3_port)

    ``base_dir`` and its parents must be traversable by the mail uid (5000 when run
    as root, else the current user), so prefer a directory under ``/tmp`` over
    pytest's private ``tmp_path``. ``stop()`` terminates exactly the master process
    this object started.

    For fast tests failed logins are not slowed down: ``auth_failure_delay`` is 0 and
    the per-IP ``auth_penalty`` is off unless enabled. ``lock_session=True`` sets ``pop3_lock_session``: a second session of the same
    user then waits about 10 s (Dovecot 2.3, not configurable) and gets
    ``-ERR [IN-USE]``; the fake :class:`~mailpipe.testing.Pop3Server` answers at once.
    """

    def __init__(
        self,
        base_dir: str | os.PathLike[str],
        *,
        host: str = "127.0.0.1",
        auth_mechanisms: Sequence[str] = DEFAULT_MECHANISMS,
        lock_session: bool = False,
        auth_failure_delay: float = 0.0,
        auth_penalty: bool = False,
        extra_config: str = "",
        binary: str | None = None,
        start_timeout: float = 20.0,
        imap: bool = False,
    ) -> None:
        self.base_dir = Path(base_dir).resolve()
        self.host = host
        self.auth_mechanisms = tuple(m.lower() for m in auth_mechanisms)
        self.lock_session = lock_session
        self.auth_failure_delay = auth_failure_delay
        self.auth_penalty = auth_penalty
        self.extra_config = extra_config
        self.binary = binary
        self.start_timeout = start_timeout
        self.pop3_port = 0
        self.pop3s_port = 0
        self.imap = imap
        self.imap_port = 0
        self.imaps_port = 0
        self._proc: subprocess.Popen[bytes] | None = None
        self._users: dict[str, DovecotUser] = {}
        self._lock = threading.Lock()
        self._serial = itertools.count(1)
        self._last_stamp = (0, 0)
        if os.geteuid() == 0:
            self.mail_uid = self.mail_gid = _ROOT_MAIL_ID
        else:
            self.mail_uid, self.mail_gid = os.getuid(), os.getgid()

    # -- paths ---------------------------------------------------------------

    @property
    def config_path(self) -> Path:
        """The generated ``dovecot.conf``."""
        return self.base_dir / "dovecot.conf"

    @property
    def log_path(self) -> Path:
        """Dovecot's error log."""
        return self.base_dir / "log" / "dovecot.log"

    @property
    def info_log_path(self) -> Path:
        """Dovecot's info log (a ``Disconnected: Logged out ...`` line per session)."""
        return self.base_dir / "log" / "dovecot.info.log"

    @property
    def ca_file(self) -> Path:
        """PEM of the test CA that signed the server certificate (for ``cafile=``)."""
        return self.base_dir / "ssl" / "ca.pem"

    @property
    def pid(self) -> int | None:
        """PID of the master process while it runs."""
        return self._proc.pid if self.running and self._proc is not None else None

    @property
    def running(self) -> bool:
        """True while the master process this object started is alive."""
        return self._proc is not None and self._proc.poll() is None

    def ssl_context(self) -> ssl.SSLContext:
        """A verifying client context trusting only :attr:`ca_file`."""
        return ssl.create_default_context(cafile=str(self.ca_file))

    def log_text(self) -> str:
        """The error and info logs, for assertion messages and debugging."""
        parts = []
        for p in (
            self.base_dir / "log" / "startup.log",
            self.log_path,
            self.info_log_path,
        ):
            if p.exists():
                parts.append(p.read_text(errors="replace"))
        return "".join(parts)

    # -- lifecycle -----------------------------------------------------------

    def start(self) -> None:
        """Write the config, start Dovecot in the foreground, wait for both ports.

        Raises:
            DovecotError: base_dir is unreachable for the mail uid, Dovecot is
                unavailable, or it did not start listening in time.
        """
        if self.running:
            return
        self._check_traversable()
        reason = dovecot_unavailable_reason(self.binary, imap=self.imap)
        if reason is not None:
            raise DovecotError(reason)
        binary = _find_binary(self.binary)
        assert binary is not None
        self._prepare_dirs()
        self._make_certificates()
        last_error = ""
        for _attempt in range(3):  # a free port may be taken between probe and bind
            ports = free_ports(self.host, 4 if self.imap else 2)  # distinct
            self.pop3_port, self.pop3s_port = ports[0], ports[1]
            if self.imap:
                self.imap_port, self.imaps_port = ports[2], ports[3]
            self.config_path.write_text(self._config())
            startup_log = self.base_dir / "log" / "startup.log"
            with startup_log.open("ab") as out:
                self._proc = subprocess.Popen(
                    [binary, "-F", "-c", str(self.config_path)],
                    stdin=subprocess.DEVNULL,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                )
            if self._wait_listening():
                return
            last_error = self.log_text()[-3000:]
            self._terminate()
            if "in use" not in last_error:
                break
        raise DovecotError(
            f"Dovecot did not start (base {self.base_dir}):\n{last_error}"
        )

    def stop(self) -> None:
        """Terminate the Dovecot master (which ends its children) and wait for it."""
        self._terminate()

    def _terminate(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)

    def _wait_listening(self) -> bool:
        ports: tuple[int, ...] = (self.pop3_port, self.pop3s_port)
        if self.imap:
            ports += (self.imap_port, self.imaps_port)
        return wait_listening(self._proc, self.host, ports, self.start_timeout)

    def _check_traversable(self) -> None:
        # Dovecot's mail processes run as the mail uid and must reach each home.
        if os.geteuid() != 0:
            return
        for parent in self.base_dir.parents:
            if parent.exists() and not parent.stat().st_mode & 0o001:
                raise DovecotError(
                    f"{parent} is not traversable by the mail uid {self.mail_uid}; "
                    "choose a base_dir under /tmp (e.g. tempfile.mkdtemp())"
                )

    def _prepare_dirs(self) -> None:
        for sub in ("", "run", "state", "log", "mail", "passwd.d"):
            d = self.base_dir / sub
            d.mkdir(parents=True, exist_ok=True)
            d.chmod(0o755)
        ssl_dir = self.base_dir / "ssl"
        ssl_dir.mkdir(exist_ok=True)
        ssl_dir.chmod(0o755)

    def _make_certificates(self) -> None:
        if self.ca_file.exists():
            return
        import trustme

        ca = trustme.CA(organization_name="mailpipe test CA")
        cert = ca.issue_cert("localhost", self.host)
        ssl_dir = self.base_dir / "ssl"
        cert.private_key_pem.write_to_path(str(ssl_dir / "key.pem"))
        (ssl_dir / "key.pem").chmod(0o600)
        chain = b"".join(blob.bytes() for blob in cert.cert_chain_pems)
        (ssl_dir / "cert.pem").write_bytes(chain)
        ca.cert_pem.write_to_path(str(self.ca_file))

    def _config(self) -> str:
        b = self.base_dir
        dh = "/usr/share/dovecot/dh.pem"
        lines = [
            "# Generated by mailpipe.testing.dovecot: a private test instance.",
            f"instance_name = mailpipe-test-{os.getpid()}-{id(self):x}",
            f"base_dir = {b}/run",
            f"state_dir = {b}/state",
            f"log_path = {b}/log/dovecot.log",
            f"info_log_path = {b}/log/dovecot.info.log",
            f"debug_log_path = {b}/log/dovecot.debug.log",
            f"protocols = pop3{' imap' if self.imap else ''}",
            f"listen = {self.host}",
            "disable_plaintext_auth = no",
            f"auth_mechanisms = {' '.join(self.auth_mechanisms)}",
            f"auth_failure_delay = {int(self.auth_failure_delay * 1000)} msecs",
            "ssl = yes",
            f"ssl_cert = <{b}/ssl/cert.pem",
            f"ssl_key = <{b}/ssl/key.pem",
            f"ssl_dh = <{dh}" if os.path.exists(dh) else "",
            f"first_valid_uid = {self.mail_uid}",
            f"first_valid_gid = {self.mail_gid}",
            "passdb {",
            "  driver = passwd-file",
            f"  args = scheme=PLAIN username_format=%u {b}/passwd.d/%u",
            "}",
            "userdb {",
            "  driver = passwd-file",
            f"  args = username_format=%u {b}/passwd.d/%u",
            "}",
            "mail_location = maildir:~/Maildir",
            "service pop3-login {",
            "  inet_listener pop3 {",
            f"    address = {self.host}",
            f"    port = {self.pop3_port}",
            "  }",
            "  inet_listener pop3s {",
            f"    address = {self.host}",
            f"    port = {self.pop3s_port}",
            "    ssl = yes",
            "  }",
        ]
        rootless = os.geteuid() != 0
        if rootless:  # chroot needs root
            lines.append("  chroot =")
        lines.append("}")
        if self.imap:
            lines += [
                # Every ID a client sends is logged ("ID sent: name=…"), so tests can
                # check what mailpipe tells the server about itself (IC-14, IS-15).
                "imap_id_log = *",
                "service imap-login {",
                "  inet_listener imap {",
                f"    address = {self.host}",
                f"    port = {self.imap_port}",
                "  }",
                "  inet_listener imaps {",
                f"    address = {self.host}",
                f"    port = {self.imaps_port}",
                "    ssl = yes",
                "  }",
                *(["  chroot ="] if rootless else []),
                "}",
                # "/" as the hierarchy separator (Maildir++ keeps "." on disk), so
                # folder names read like most servers' ("Support/Escalations").
                "namespace inbox {",
                "  inbox = yes",
                "  separator = /",
                "}",
                "protocol imap {",
                "  mail_max_userip_connections = 100",
                "}",
            ]
        lines += ["service anvil {"]
        if rootless:
            lines.append("  chroot =")
        if not self.auth_penalty:
            # Dovecot's documented switch-off for the per-IP failed-auth penalty,
            # which would otherwise slow every later login from 127.0.0.1 by seconds.
            lines += ["  unix_listener anvil-auth-penalty {", "    mode = 0", "  }"]
        lines += [
            "}",
            "protocol pop3 {",
            "  pop3_uidl_format = %08Xu%08Xv",
            f"  pop3_lock_session = {'yes' if self.lock_session else 'no'}",
            "  mail_max_userip_connections = 100",
            "}",
        ]
        if rootless:
            import grp
            import pwd

            user = pwd.getpwuid(os.getuid()).pw_name
            group = grp.getgrgid(os.getgid()).gr_name
            lines += [
                f"default_login_user = {user}",
                f"default_internal_user = {user}",
                f"default_internal_group = {group}",
            ]
        lines.append(self.extra_config)
        return "\n".join(lines) + "\n"

    # -- users and mail ------------------------------------------------------

    def _write_passwd(self, user: DovecotUser) -> None:
        # One passwd-file per user (the path has %u): a new user is visible at once,
        # whereas a shared file is re-read at most once a second.
        line = f"{user.name}:{{PLAIN}}{user.password}:{self.mail_uid}:{self.mail_gid}"
        path = self.base_dir / "passwd.d" / user.name
        tmp = path.with_name(f".{user.name}.tmp")
        tmp.write_text(f"{line}::{user.home}::\n")
        tmp.chmod(0o644)
        os.replace(tmp, path)

    def add_user(
        self, name: str | None = None, password: str | None = None
    ) -> DovecotUser:
        """Create a user with an empty Maildir; usable at once, also while running.

        ``name`` defaults to a fresh ``userN``, ``password`` to ``pass-<name>``.

        Raises:
            ValueError: the name exists, or a field holds ``:``, ``/`` or a line break.
        """
        with self._lock:
            if name is None:
                name = f"user{next(self._serial)}"
                while name in self._users:
                    name = f"user{next(self._serial)}"
            if password is None:
                password = f"pass-{name}"
            _check_field("user name", name)
            _check_field("password", password)
            if name in self._users:
                raise ValueError(f"user {name!r} already exists")
            user = DovecotUser(
                name=name, password=password, home=self.base_dir / "mail" / name
            )
            for sub in ("cur", "new", "tmp"):
                (user.maildir / sub).mkdir(parents=True, exist_ok=True)
            for d in (
                user.home,
                user.maildir,
                *(user.maildir / s for s in ("cur", "new", "tmp")),
            ):
                self._own(d)
                d.chmod(0o700)
            self._write_passwd(user)
            self._users[name] = user
            return user

    @property
    def users(self) -> dict[str, DovecotUser]:
        """The users created so far, by name."""
        return dict(self._users)

    def _user(self, user: DovecotUser | str) -> DovecotUser:
        name = user if isinstance(user, str) else user.name
        try:
            return self._users[name]
        except KeyError:
            raise KeyError(f"no such Dovecot user {name!r}") from None

    def _own(self, path: Path) -> None:
        if os.geteuid() == 0:
            os.chown(path, self.mail_uid, self.mail_gid)

    def _stamp(self) -> tuple[int, int]:
        # Strictly increasing (seconds, microseconds): Dovecot assigns UIDs to new/
        # files in file-name time order, so message numbers follow delivery order.
        now = time.time_ns() // 1000
        stamp = divmod(now, 1_000_000)
        if stamp <= self._last_stamp:
            sec, usec = self._last_stamp
            stamp = (sec + 1, 0) if usec >= 999_999 else (sec, usec + 1)
        self._last_stamp = stamp
        return stamp

    def deliver(self, user: DovecotUser | str, data: bytes) -> Path:
        """Write one message into the user's ``Maildir/new`` atomically (tmp/ → new/).

        The bytes are stored as given (CRLF or LF); Dovecot serves LF lines as CRLF.
        Returns the delivered file's path.
        """
        u = self._user(user)
        with self._lock:
            sec, usec = self._stamp()
            name = f"{sec}.M{usec:06d}P{os.getpid()}Q{next(self._serial)}.mailpipe-test"
        tmp = u.maildir / "tmp" / name
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        tmp.chmod(0o600)
        self._own(tmp)
        final = u.maildir / "new" / name
        os.rename(tmp, final)
        return final

    def message_paths(self, user: DovecotUser | str) -> list[Path]:
        """Files of the messages still in the mailbox (new/, cur/), in delivery order."""
        u = self._user(user)
        paths = [p for sub in ("new", "cur") for p in (u.maildir / sub).iterdir()]
        return sorted(paths, key=lambda p: p.name.split(":", 1)[0])

    def messages(self, user: DovecotUser | str) -> list[bytes]:
        """Contents of the messages still in the mailbox, in delivery order.

        A Dovecot process may still be expunging, or moving a file from new/ to cur/
        (a session ended by a killed client finishes its command), while this reads:
        a file that vanishes between the listing and its read makes the whole read
        start again (bounded), so the result is one consistent view, never a message
        missing because it was being renamed.
        """
        for _ in range(49):
            try:
                return [p.read_bytes() for p in self.message_paths(user)]
            except FileNotFoundError:
                time.sleep(0.05)
        return [p.read_bytes() for p in self.message_paths(user)]

    def mailbox_count(self, user: DovecotUser | str) -> int:
        """Number of messages still in the mailbox (deleted ones go at QUIT)."""
        return len(self.message_paths(user))

    def clear(self, user: DovecotUser | str) -> None:
        """Remove every message of a user (not while a session of theirs is open)."""
        for p in self.message_paths(user):
            p.unlink(missing_ok=True)

    def imap_messages(
        self, user: DovecotUser | str, folder: str = "INBOX"
    ) -> list[tuple[bytes, str]]:
        """(raw bytes, flags) of every message in ``folder`` (its wire name), read over
        implicit TLS with ``BODY.PEEK[]`` by stdlib ``imaplib`` (an independent
        client); ``[]`` when the folder does not exist. Needs ``imap=True``."""
        from mailpipe.testing.imap_reference import folder_messages, logged_in

        u = self._user(user)
        with logged_in(self.host, self.imaps_port, self.ca_file, u.name, u.password) as c:
            return folder_messages(c, folder)
