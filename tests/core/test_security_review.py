"""Security review: secrets never shown, TLS verified by default, paths never escape."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import os
import socket
import ssl
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import structlog
from pydantic import BaseModel

from mailpipe.app import load_config
from mailpipe.errors import ConfigError, SourceConnectionError
from mailpipe.message import Message, MessageRef
from mailpipe.processor import ProcessorContext
from mailpipe.quarantine import Quarantine
from mailpipe.secrets import MASK, Secret, redact

pytestmark = pytest.mark.timeout(120)

SECRET = "Hunter2-S3cret-Value"


@pytest.fixture(autouse=True)
def _restore_logging() -> Iterator[None]:
    """configure() changes global structlog/logging state: put it back afterwards."""
    config = structlog.get_config()
    root = logging.getLogger()
    handlers = list(root.handlers)
    filters = {h: list(h.filters) for h in handlers}
    httpx_level = logging.getLogger("httpx").level
    yield
    structlog.configure(**config)
    for extra in [h for h in root.handlers if h not in handlers]:
        root.removeHandler(extra)
    for h, fs in filters.items():
        h.filters[:] = fs
    logging.getLogger("httpx").setLevel(httpx_level)


def _options(module: str, cls: str) -> type[BaseModel]:
    mod = __import__(f"mailpipe.plugins.{module}", fromlist=[cls])
    return getattr(mod, cls)  # type: ignore[no-any-return]


SECRET_MODELS: list[tuple[str, str, dict[str, Any]]] = [
    ("pop3.source", "Pop3Options", {"host": "h", "username": "u", "password": SECRET}),
    (
        "pop3.source",
        "Pop3Options",
        {"host": "h", "username": "u", "auth": "xoauth2", "oauth_token": SECRET},
    ),
    (
        "forward.smtp",
        "SmtpForwardOptions",
        {
            "host": "h",
            "envelope_from": "a@b.c",
            "to": ["d@e.f"],
            "username": "u",
            "password": SECRET,
        },
    ),
    (
        "forward.webhook",
        "WebhookForwardOptions",
        {"url": "https://h.example/x", "hmac_secret": SECRET, "bearer_token": SECRET},
    ),
    (
        "forward.nats",
        "NatsForwardOptions",
        {"url": f"nats://u:{SECRET}@127.0.0.1:4222", "subject": "s"},
    ),
    (
        "forward.rabbitmq",
        "RabbitmqForwardOptions",
        {"url": f"amqp://u:{SECRET}@127.0.0.1/", "routing_key": "k"},
    ),
    (
        "forward.redis",
        "RedisForwardOptions",
        {"url": f"redis://:{SECRET}@127.0.0.1:6379/0", "stream": "s"},
    ),
    (
        "store.postgres",
        "PostgresStoreOptions",
        {"dsn": f"postgresql://u:{SECRET}@127.0.0.1/db"},
    ),
]


@pytest.mark.parametrize(
    ("module", "cls", "table"),
    SECRET_MODELS,
    ids=[
        f"{m}:{next(k for k in t if k not in ('host', 'username', 'auth'))}"
        for m, _, t in SECRET_MODELS
    ],
)
def test_secret_options_never_render_the_value(
    module: str, cls: str, table: dict[str, Any]
) -> None:
    model = _options(module, cls).model_validate(table, context={"base_dir": "/"})
    renderings = [
        repr(model),
        str(model),
        str(model.model_dump()),
        str(model.model_dump(mode="json")),
        model.model_dump_json(),
        json.dumps(type(model).model_json_schema()),
    ]
    for text in renderings:
        assert SECRET not in text
    assert any(isinstance(v, Secret) for v in dict(model).values())


def test_url_password_is_redacted_even_when_quoted_alone() -> None:
    Secret(f"postgresql://u:{SECRET}%25x@127.0.0.1/db")
    # libpq quotes just the malformed password token in its error message
    assert redact(f'invalid percent-encoded token: "{SECRET}%25x"') == (
        f'invalid percent-encoded token: "{MASK}"'
    )
    assert redact(f"decoded {SECRET}%x") == f"decoded {MASK}"
    # and any scheme://user:password@ is masked whether known or not
    assert redact("see amqp://guest:guest-pw@rabbit:5672/") == (
        f"see amqp://guest:{MASK}@rabbit:5672/"
    )


# --- logs -----------------------------------------------------------------------


def _fail(password: str) -> None:
    raise ValueError(f"login refused for password {password}")


@pytest.mark.parametrize("fmt", ["json", "console"])
def test_logged_tracebacks_and_fields_are_redacted(fmt: str) -> None:
    from mailpipe.logs import configure

    secret = Secret(SECRET)
    buf = io.StringIO()
    configure(fmt, "debug", stream=buf)  # type: ignore[arg-type]
    log = structlog.get_logger()
    try:
        _fail(secret.get())
    except ValueError as exc:
        log.exception("login_failed", error=exc, detail=str(exc))
        log.error("login_failed_again", exc_info=exc)
    log.info("journal_opened", path=f"postgresql://u:{'pw-unknown-1'}@h/db")
    out = buf.getvalue()
    assert "login refused for password" in out  # the traceback is there...
    assert SECRET not in out  # ...redacted, and no rich frame locals
    assert "pw-unknown-1" not in out
    assert MASK in out


def test_stdlib_logging_records_are_redacted() -> None:
    from mailpipe.logs import configure

    Secret(SECRET)
    buf = io.StringIO()
    configure("json", "info", stream=buf)
    root = logging.getLogger()
    handler = logging.StreamHandler(buf)
    root.addHandler(handler)
    configure("json", "info", stream=buf)  # filters every root handler
    logging.getLogger("some.library").warning("connecting with %s", SECRET)
    logging.getLogger("httpx").info("HTTP Request: POST https://h/hook?token=t0k3n")
    out = buf.getvalue()
    assert "connecting with" in out and SECRET not in out
    assert "t0k3n" not in out


# --- the journal DSN ([state] path) -----------------------------------------------


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "pipeline.toml"
    path.write_text(text)
    return path


def _mailpipe(
    *args: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "mailpipe", "--log-format", "json", *args],
        capture_output=True,
        text=True,
        timeout=90,
        env=env,
    )


MAILBOX = """
[[mailboxes]]
name = "mb"
host = "127.0.0.1"
port = {port}
security = "{security}"
allow_plaintext_password = true
username = "u"
password = "{secret}"
connect_timeout = "3s"
tls_timeout = "3s"
greeting_timeout = "3s"
read_timeout = "3s"

[pipelines.default]
processors = [{{ use = "parse" }}]
"""


@pytest.mark.parametrize("command", [["state", "list"], ["run", "--once"]])
def test_journal_dsn_password_never_printed(tmp_path: Path, command: list[str]) -> None:
    # A malformed percent-escape makes libpq quote the password token; a dead port
    # makes the connection fail. Either way: exit 1, one line, no password.
    pw = "JournalPw%zz42"
    text = f'[state]\npath = "postgresql://bob:{pw}@127.0.0.1:1/db"\n' + MAILBOX.format(
        port=1, security="tls", secret=SECRET
    )
    done = _mailpipe(*command, str(_write(tmp_path, text)))
    assert done.returncode == 1, done.stderr
    out = done.stdout + done.stderr
    assert "JournalPw" not in out and SECRET not in out
    assert "JournalError" in out and "Traceback" not in out


@pytest.mark.parametrize("pw", [SECRET, "pw", "'two words'", 'pa\\"ss\\\\w0rd'])
def test_a_libpq_dsn_as_journal_path_is_refused_with_a_hint(
    tmp_path: Path, pw: str
) -> None:
    # Issue 20 item 8: it was used as a SQLite file name, and a file named with the
    # password was created and logged.
    text = f'[state]\npath = "host=db.example user=mp password={pw} dbname=mail"\n'
    text += MAILBOX.format(port=1, security="tls", secret=SECRET)
    cfg = _write(tmp_path, text)
    for command in (["check"], ["state", "list"], ["run", "--once"]):
        done = _mailpipe(*command, str(cfg))
        assert done.returncode == 2, done.stderr
        out = done.stdout + done.stderr
        assert "state.path: a libpq 'key=value' connection string" in out
        assert "postgresql://USER:PASSWORD@HOST" in out
        shown = pw.strip("'").replace("\\\\", "\\")  # as TOML reads it
        assert shown not in out.replace(f"password={MASK}", "")
        assert "ss\\" not in out and "w0rd" not in out
        assert "Traceback" not in out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pipeline.toml"]


def test_webhook_credential_headers_never_render_or_log() -> None:
    options = _options("forward.webhook", "WebhookForwardOptions").model_validate(
        {"url": "https://h.example/x", "headers": {"X-Api-Key": SECRET + "-hdr"}}
    )
    assert SECRET not in repr(options) and SECRET not in str(options)
    assert redact(f"sent X-Api-Key: {SECRET}-hdr") == f"sent X-Api-Key: {MASK}"


def test_a_sqlite_path_with_an_equals_sign_is_still_a_path(tmp_path: Path) -> None:
    cfg = load_config(_write(tmp_path, '[state]\npath = "var/a=b.sqlite3"\n'))
    assert cfg.model.state.path == "var/a=b.sqlite3"


def test_journal_dsn_may_come_from_a_secret_table(tmp_path: Path) -> None:
    os.environ["MP_REVIEW_JOURNAL"] = "var/from-env.sqlite3"
    try:
        text = '[state]\npath = { env = "MP_REVIEW_JOURNAL" }\n' + MAILBOX.format(
            port=1, security="tls", secret=SECRET
        )
        cfg = load_config(_write(tmp_path, text))
    finally:
        del os.environ["MP_REVIEW_JOURNAL"]
    assert cfg.model.state.path == "var/from-env.sqlite3"
    assert "from-env" not in repr(cfg.model)


# --- ConfigError never echoes a secret ------------------------------------------


@pytest.mark.parametrize(
    "text",
    [
        # duplicate names: phase 1 used to echo the whole file as the "value"
        f'[[mailboxes]]\nname = "a"\npassword = "{SECRET}"\nhost = "h"\nusername = "u"\n'
        f'[[mailboxes]]\nname = "a"\npassword = "{SECRET}"\nhost = "h"\nusername = "u"\n'
        "[pipelines.default]\n",
        # [mailboxes] as a table instead of an array of tables
        f'[mailboxes]\npassword = "{SECRET}"\nname = "a"\n[pipelines.default]\n',
        # a bad pipeline name with an inline SMTP password inside
        '[pipelines."bad name"]\nprocessors = [{ use = "forward.smtp", password = '
        f'"{SECRET}", host = "h", envelope_from = "a@b.c", to = ["x@y.z"] }}]\n',
        # a cross-field error whose pydantic input is the whole processor table
        '[pipelines.default]\nprocessors = [{ use = "forward.smtp", password = '
        f'"{SECRET}", host = "h", envelope_from = "a@b.c", to = ["x@y.z"] }}]\n',
        # a postgres DSN whose table has an unknown key next to it
        f'[pipelines.default]\nprocessors = [{{ use = "store.postgres", dsn = '
        f'"postgresql://u:{SECRET}@h/db", tabel = "x" }}]\n',
        # the journal URL with a wrong type next to it
        f'[state]\npath = "postgresql://u:{SECRET}@h/db"\nextra = 1\n',
        # issue 20 item 8: a webhook header table is echoed whole; its values are
        # credentials whatever the header is called
        '[pipelines.default]\nprocessors = [{ use = "forward.webhook", url = '
        f'"https://h.example/x", headers = {{ Authorization = "Bearer {SECRET}" }} }}]\n',
        '[pipelines.default]\nprocessors = [{ use = "forward.webhook", url = '
        f'"https://h.example/x", headers = {{ X-Api-Key = "{SECRET}", '
        'X-Bad = "a\\nb" } }]\n',
        '[pipelines.default]\nprocessors = [{ use = "forward.webhook", url = '
        f'"https://h.example/x", headers = {{ X-Custom = "{SECRET}", '
        'Content-Type = "text/plain" } }]\n',
        # a libpq key=value DSN is refused, and its password not echoed
        f'[state]\npath = "host=db user=mp password={SECRET} dbname=mail"\n',
    ],
    ids=[
        "duplicate-names",
        "table-not-array",
        "pipeline-name",
        "cross-field",
        "postgres-dsn",
        "state-url",
        "webhook-authorization-header",
        "webhook-api-key-header",
        "webhook-custom-header",
        "state-libpq-dsn",
    ],
)
def test_config_error_never_shows_a_secret(tmp_path: Path, text: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(_write(tmp_path, text))
    report = str(info.value)
    assert SECRET not in report and SECRET not in repr(info.value)
    assert info.value.problems  # and it did report something


# --- TLS ------------------------------------------------------------------------


def test_every_client_context_verifies_by_default(tmp_path: Path) -> None:
    from mailpipe.plugins.forward._retry import client_tls_context
    from mailpipe.plugins.pop3.client import make_ssl_context

    for ctx in (make_ssl_context(), client_tls_context(None, verify=True)):
        assert ctx.verify_mode == ssl.CERT_REQUIRED and ctx.check_hostname
    # The forwarders build theirs from tls_verify, which defaults to true.
    ctx_ = ProcessorContext(pipeline="p", base_dir=tmp_path)
    smtp = _options("forward.smtp", "SmtpForwardOptions").model_validate(
        {"host": "h", "envelope_from": "a@b.c", "to": ["d@e.f"]}
    )
    hook = _options("forward.webhook", "WebhookForwardOptions").model_validate(
        {"url": "https://h.example/x"}
    )
    pop = _options("pop3.source", "Pop3Options").model_validate(
        {"host": "h", "username": "u", "password": "p"}
    )
    assert smtp.security == "starttls" and smtp.tls_verify  # type: ignore[attr-defined]
    assert hook.tls_verify  # type: ignore[attr-defined]
    assert pop.security == "tls" and pop.tls_verify  # type: ignore[attr-defined]
    from mailpipe.plugins.forward.smtp import SmtpForwardProcessor
    from mailpipe.plugins.forward.webhook import WebhookForwardProcessor

    s = SmtpForwardProcessor(smtp, ctx_)  # type: ignore[arg-type]
    assert s._tls is not None and s._tls.verify_mode == ssl.CERT_REQUIRED
    w = WebhookForwardProcessor(hook, ctx_)  # type: ignore[arg-type]
    assert w._tls.verify_mode == ssl.CERT_REQUIRED and w._tls.check_hostname


def test_rediss_urls_verify_certificate_and_host_name() -> None:
    import redis.asyncio as redis  # in the test extra: a missing one must fail

    client = redis.from_url("rediss://127.0.0.1:6380/0")
    kwargs = client.connection_pool.connection_kwargs
    assert kwargs.get("ssl_cert_reqs", "required") == "required"
    conn = client.connection_pool.make_connection()
    assert conn.ssl_context.cert_reqs == ssl.CERT_REQUIRED
    assert conn.ssl_context.check_hostname is True


def test_plaintext_pop3_refused_without_explicit_consent(tmp_path: Path) -> None:
    text = MAILBOX.format(port=110, security="none", secret=SECRET).replace(
        "allow_plaintext_password = true\n", ""
    )
    with pytest.raises(ConfigError) as info:
        load_config(_write(tmp_path, text))
    assert "mailboxes[0].allow_plaintext_password" in str(info.value)


async def test_default_pop3_config_rejects_an_untrusted_certificate() -> None:
    from mailpipe.plugins.pop3.source import Pop3Options, Pop3Source

    from mailpipe.testing.server import Pop3Server

    async with Pop3Server([b"Subject: x\r\n\r\nbody\r\n"], tls="implicit") as srv:
        opts = Pop3Options.model_validate(
            {
                "host": "localhost",
                "port": srv.port,
                "username": "user",
                "password": "pass",
                "tls_timeout": 5,
            }
        )
        with pytest.raises(SourceConnectionError, match="not trusted"):
            async with asyncio.timeout(30), Pop3Source(opts).session():
                pass  # pragma: no cover - never reached
        assert "PASS" not in str(srv.transcript)


# --- paths ------------------------------------------------------------------------


HOSTILE_NAMES = [
    "../../../etc/passwd",
    "/etc/passwd",
    "..\\..\\boot.ini",
    "C:\\Windows\\x.dll",
    "a\x00b.txt",
    "evil\x00/../../x",
    "..",
    ".",
    "",
    " . ",
    "CON",
    "nul.txt",
    "COM1.tar.gz",
    "lpt9",
    "x" * 1000 + ".pdf",
    "é" * 300 + ".txt",
    "report.pdf" + "\u202e" + "exe.txt",
    "a:b|c?.txt",
    "x." + "y" * 100,
]


@pytest.mark.parametrize("name", HOSTILE_NAMES, ids=range(len(HOSTILE_NAMES)))
def test_safe_filename_stays_a_plain_portable_name(name: str) -> None:
    from mailpipe.plugins.store.attachments import safe_filename

    out = safe_filename(name, fallback="attachment-1.bin")
    assert out and out not in (".", "..") and "/" not in out and "\\" not in out
    assert "\x00" not in out and "\u202e" not in out
    assert len(out.encode()) <= 255
    assert out.split(".")[0].upper() not in {"CON", "NUL", "COM1", "LPT9"}
    assert not out.startswith(".") and not out.endswith((".", " "))


def _message_with_attachment(filename: str) -> Message:
    raw = (
        "From: a@b.c\r\nSubject: x\r\nMIME-Version: 1.0\r\n"
        'Content-Type: multipart/mixed; boundary="B"\r\n\r\n--B\r\n'
        "Content-Type: text/plain\r\n\r\nhi\r\n--B\r\n"
        "Content-Type: application/octet-stream\r\n"
        f'Content-Disposition: attachment; filename="{filename}"\r\n'
        "Content-Transfer-Encoding: base64\r\n\r\nSEFDS0VE\r\n--B--\r\n"
    ).encode()
    ref = MessageRef(mailbox="mb", number=1, uid="u1", size=len(raw))
    return Message(ref=ref, data=raw)


@pytest.mark.parametrize(
    "filename", ["../../escaped.txt", "/tmp/abs.txt", "..", "sub/../../x.txt"]
)
def test_attachment_store_never_writes_outside_its_dir(
    tmp_path: Path, filename: str
) -> None:
    from mailpipe.plugins.store.attachments import AttachmentsOptions, AttachmentsStore

    root = tmp_path / "att"
    outside = tmp_path / "outside.txt"
    outside.write_text("untouched")
    ctx = ProcessorContext(pipeline="p", base_dir=tmp_path)
    store = AttachmentsStore(
        AttachmentsOptions(dir=Path("att"), extract_names=True), ctx
    )
    msg = _message_with_attachment(filename)
    # A symlink planted where the extracted name lands must be replaced, not followed.
    folder = root / "by-message" / msg.key
    folder.mkdir(parents=True)
    for guess in ("escaped.txt", "abs.txt", "x.txt"):
        (folder / guess).symlink_to(outside)
    store.process(msg)
    before = {p for p in tmp_path.rglob("*")}
    assert all(p in (outside, root) or root in p.parents for p in before)
    assert outside.read_text() == "untouched"
    files = [p for p in folder.iterdir()]
    assert any(p.read_bytes() == b"HACKED" for p in files)


def test_quarantine_keeps_dot_mailbox_names_inside(tmp_path: Path) -> None:
    q = Quarantine(tmp_path / "q")
    for mailbox in ("..", ".", "../..", "/etc"):
        raw = b"Subject: x\r\n\r\nbody\r\n"
        msg = Message(
            ref=MessageRef(mailbox=mailbox, number=1, uid="u", size=len(raw)), data=raw
        )
        eml = q.put(msg, reason="test")
        assert (tmp_path / "q") in eml.resolve().parents
    assert not list(tmp_path.glob("*.eml"))


def test_quarantine_does_not_write_through_a_planted_symlink(tmp_path: Path) -> None:
    q = Quarantine(tmp_path / "q")
    raw = b"Subject: x\r\n\r\nbody\r\n"
    msg = Message(
        ref=MessageRef(mailbox="mb", number=1, uid="u", size=len(raw)), data=raw
    )
    victim = tmp_path / "victim"
    victim.write_text("keep me")
    folder = tmp_path / "q" / "mb"
    folder.mkdir(parents=True)
    (folder / f".{msg.key}.eml.tmp").symlink_to(victim)
    q.put(msg, reason="test")
    assert victim.read_text() == "keep me"
    assert (folder / f"{msg.key}.eml").read_bytes() == raw


@pytest.mark.parametrize("name", ["..", "."])
def test_dot_mailbox_names_are_a_config_error(tmp_path: Path, name: str) -> None:
    text = MAILBOX.format(port=995, security="tls", secret=SECRET).replace(
        'name = "mb"', f'name = "{name}"'
    )
    with pytest.raises(ConfigError) as info:
        load_config(_write(tmp_path, text))
    assert "mailboxes[0].name: a mailbox name cannot be '.' or '..'" in str(info.value)


# --- dead and hostile servers -------------------------------------------------------


class _Hostile:
    """A TCP server on 127.0.0.1 that answers each connection with ``behaviour``."""

    def __init__(self, behaviour: str) -> None:
        self.behaviour = behaviour
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.sock.settimeout(0.2)
        self.port = self.sock.getsockname()[1]
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)

    def _serve(self) -> None:
        while not self.stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            with conn:
                conn.settimeout(5)
                try:
                    if self.behaviour == "garbage":
                        conn.sendall(b"\x00\xff\xfe\x1b[31mHELLO NOT POP3\r\n")
                    elif self.behaviour == "endless":
                        for _ in range(64):  # 4 MiB without a line end, bounded
                            conn.sendall(b"+OK " + b"A" * 65536)
                    elif self.behaviour == "plaintext":
                        conn.sendall(b"+OK POP3 ready\r\n")
                    conn.recv(4096)
                except OSError:
                    pass

    def __enter__(self) -> _Hostile:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join(timeout=10)
        self.sock.close()


@pytest.mark.parametrize(
    ("behaviour", "security", "expect"),
    [
        ("refused", "tls", "connect to 127.0.0.1"),
        ("garbage", "none", "not a POP3 greeting"),
        ("endless", "none", "too long"),
        ("plaintext", "tls", "TLS handshake"),
    ],
)
def test_run_once_against_a_hostile_server_exits_1_cleanly(
    tmp_path: Path, behaviour: str, security: str, expect: str
) -> None:
    if behaviour == "refused":
        probe = socket.create_server(("127.0.0.1", 0))
        port = probe.getsockname()[1]
        probe.close()  # nothing listens there any more
        text = MAILBOX.format(port=port, security=security, secret=SECRET)
        done = _mailpipe("run", "--once", str(_write(tmp_path, text)))
    else:
        with _Hostile(behaviour) as srv:
            text = MAILBOX.format(port=srv.port, security=security, secret=SECRET)
            done = _mailpipe("run", "--once", str(_write(tmp_path, text)))
    out = done.stdout + done.stderr
    assert done.returncode == 1, out
    assert expect in out
    assert "Traceback" not in out and SECRET not in out
    assert "\x1b[31m" not in out  # server text never reaches a terminal raw


def test_scheduler_backs_off_on_failures_and_never_spins() -> None:
    import random

    from mailpipe.plugins.pop3.protocol import RemoteProtocolError

    from mailpipe.config import SchedulerConfig
    from mailpipe.errors import AuthenticationError, SourceTimeoutError
    from mailpipe.scheduler import next_delay

    sched = SchedulerConfig()
    rng = random.Random(7)
    for error in (
        SourceConnectionError("x"),
        SourceTimeoutError("x"),
        RemoteProtocolError("garbage"),
        RuntimeError("boom"),
    ):
        delays = [
            next_delay(sched, interval=60, jitter=0.1, failures=n, error=error, rng=rng)
            for n in range(1, 15)
        ]
        assert all(d >= 0.8 * sched.backoff_initial for d in delays)
        assert (
            delays[-1] >= 0.8 * sched.backoff_max and max(delays) <= sched.backoff_max
        )
        assert delays[4] > delays[0]  # it grows
    auth = next_delay(
        sched,
        interval=60,
        jitter=0.1,
        failures=1,
        error=AuthenticationError("no"),
        rng=rng,
    )
    assert auth == sched.backoff_auth
