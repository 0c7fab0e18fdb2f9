"""The status page at `/` of the metrics listener, in a real browser.

A real `mailpipe run` worker (subprocess) polls the testing kit's POP3 server; two
messages fail and land in quarantine. Debian's Chromium, driven by selenium through
chromedriver, loads the page, is refused with a wrong token, then replays one message
and drops the other with the right one. A screenshot is saved under pytest's tmp
folder, and to docs/img/status-page.png when MAILPIPE_SCREENSHOTS=1 (README).
Without chromium + chromedriver the browser test skips, and fails in CI (CI=true).
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from mailpipe.testing.e2e import failing_forward, write_kit_config
from mailpipe.testing.pytest_plugin import skip_or_fail
from mailpipe.testing.server import Pop3Server

pytestmark = pytest.mark.timeout(300)

TOKEN = "s3cret-Admin-Token-For-Tests-9"
README_SHOT = Path(__file__).resolve().parents[2] / "docs" / "img" / "status-page.png"
CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--window-size=1360,900",
)


def msg(n: int, subject: str, body: str = "") -> bytes:
    return (
        f"From: customer{n}@example.com\r\nTo: support@example.com\r\n"
        f"Message-ID: <m{n}@example.com>\r\nSubject: {subject}\r\n\r\n"
        f"body {n} {body}\r\n"
    ).encode()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def write_config(root: Path, srv: Pop3Server, port: int, *, token: bool = True) -> Path:
    # The forwarder fails on "poison" while the flag file exists: fixing it is
    # deleting the flag, then a replay succeeds.
    flag = root / "broken"
    flag.write_text("x")
    metrics: dict[str, Any] = {"listen": f"127.0.0.1:{port}", "unhealthy_after": "1h"}
    if token:
        metrics["admin_token"] = {"env": "MAILPIPE_TEST_ADMIN_TOKEN"}
    return write_kit_config(
        root,
        host=srv.host,
        port=srv.port,
        ca_file=srv.ca_file,
        mailbox={"max_attempts": 1, "poll_interval": "1h"},
        metrics=metrics,
        processors=[
            {"use": "parse"},
            {"use": "store.jsonl", "path": "var/out.jsonl"},
            markup_forward(root, unless=flag),
        ],
    )


#: Markup a failing step, a quarantine reason or a mailbox error may carry: the page
#: shows it as text (escaped), never as elements.
MARKUP = "<script>alert(1)</script> <img src=x onerror=alert(2)>"


def markup_forward(root: Path, *, unless: Path) -> dict[str, Any]:
    """:func:`failing_forward`, whose refusal says :data:`MARKUP` on stderr (so the
    recent failures carry it)."""
    step = failing_forward(root, unless=unless)
    script = root / "fwd.py"
    script.write_text(
        script.read_text().replace(
            "sys.exit(3 if",
            f"poison = b'poison' in sys.stdin.buffer.read()\n"
            f"if broken and poison: sys.stderr.write({MARKUP!r})\n"
            "sys.exit(3 if",
        ).replace("b'poison' in sys.stdin.buffer.read() else", "poison else")
    )
    return step


def quarantined(root: Path) -> list[Path]:
    return sorted((root / "var" / "quarantine").glob("*/*.json"))


@pytest.fixture
def worker(tmp_path: Path) -> Iterator[tuple[Path, int, Path]]:
    """A running `mailpipe run` with two quarantined messages: (config, port, log)."""
    messages = [
        msg(1, "Printer on floor 3"),
        msg(2, "Invoice 2026-114", "poison"),
        msg(3, "Newsletter", "poison " + "x" * 3000),
    ]
    with Pop3Server(messages, tls="implicit") as srv:
        port = free_port()
        cfg = write_config(tmp_path, srv, port)
        log = tmp_path / "run.log"
        with log.open("wb") as out:
            proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "mailpipe",
                    "--log-format",
                    "json",
                    "run",
                    str(cfg),
                ],
                cwd=tmp_path,
                stdout=out,
                stderr=subprocess.STDOUT,
                env={**os.environ, "MAILPIPE_TEST_ADMIN_TOKEN": TOKEN},
            )
        try:
            for _ in range(600):  # bounded: the first poll quarantines two messages
                if len(quarantined(tmp_path)) == 2 and _status(port, "/healthz") == 200:
                    break
                assert proc.poll() is None, log.read_text()
                time.sleep(0.1)
            else:
                pytest.fail(f"no quarantine after the first poll:\n{log.read_text()}")
            yield cfg, port, log
        finally:
            proc.terminate()
            proc.wait(60)


def _status(port: int, path: str) -> int:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as r:
            return int(r.status)
    except urllib.error.HTTPError as exc:
        return exc.code
    except OSError:
        return 0


def post(
    port: int, data: dict[str, str], headers: dict[str, str] | None = None
) -> tuple[int, str]:
    body = "&".join(f"{k}={urllib.parse.quote(v)}" for k, v in data.items()).encode()
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/",
        data=body,
        headers={
            "Content-Type": "application/x-www-form-urlencoded",
            **(headers or {}),
        },
        method="POST",
    )
    try:
        with urllib.request.urlopen(request, timeout=60) as r:
            return int(r.status), r.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[Any]:
    chromium = shutil.which("chromium")
    driver_path = shutil.which("chromedriver")
    if not (chromium and driver_path):
        missing = "chromium and chromedriver (Debian: chromium chromium-driver)"
        skip_or_fail(f"{missing} not installed (.ci/run installs them)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in CHROMIUM_FLAGS:
        options.add_argument(flag)
    profile = tmp_path / "chromium-profile"
    options.add_argument(f"--user-data-dir={profile}")
    driver = webdriver.Chrome(options=options, service=Service(driver_path))
    try:
        yield driver
    finally:
        driver.quit()


def rows(driver: Any, heading: str) -> list[str]:
    from selenium.webdriver.common.by import By

    table = driver.find_element(
        By.XPATH, f"//h2[text()='{heading}']/following::table[1]"
    )
    return [r.text for r in table.find_elements(By.CSS_SELECTOR, "tbody tr")]


def click(driver: Any, action: str, key: str, token: str) -> str:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.wait import WebDriverWait

    field = driver.find_element(By.NAME, "token")
    field.clear()
    field.send_keys(token)
    button = driver.find_element(By.CSS_SELECTOR, f"button[value='{action}:{key}']")
    button.click()
    # The answer is a new page: wait (bounded) until the old one is gone. While the
    # page is being replaced, Chromium may answer a query about the old node with an
    # inspector error ("Node with given id does not belong to the document") instead
    # of a stale-element error: both mean "not yet", so the waits ignore them.
    from selenium.common.exceptions import WebDriverException

    wait = WebDriverWait(driver, 60, ignored_exceptions=(WebDriverException,))
    wait.until(ec.staleness_of(button))

    def banner_text(d: Any) -> str | bool:
        found = d.find_elements(By.CSS_SELECTOR, "p.banner")
        return str(found[0].text) if found else False

    return str(wait.until(banner_text))


def test_status_page_in_a_browser(
    worker: tuple[Path, int, Path], browser: Any, tmp_path: Path
) -> None:
    from selenium.webdriver.common.by import By

    _cfg, port, log = worker
    url = f"http://127.0.0.1:{port}/"
    browser.get(url)
    assert browser.title == "mailpipe status"
    [mailbox] = rows(browser, "Mailboxes")
    assert mailbox.startswith("support ok")
    failures = rows(browser, "Recent failures")
    assert len(failures) == 2 and all("forward.command" in f for f in failures)
    items = {json.loads(p.read_text())["key"]: p for p in quarantined(tmp_path)}
    listed = rows(browser, "Quarantine")
    assert len(listed) == 2
    assert all("Replay" in r and "Drop" in r and "support" in r for r in listed), listed
    assert any("KiB" in r for r in listed)  # the 3 KB newsletter's size
    assert "2 message(s)" in browser.find_element(By.TAG_NAME, "body").text
    # The inline style is allowed by the CSP (its hash): headers are styled.
    th = browser.find_element(By.TAG_NAME, "th")
    assert th.value_of_css_property("background-color") == "rgba(246, 248, 250, 1)"
    assert not browser.find_elements(By.TAG_NAME, "script")
    # the refusal's markup is shown as text in the recent failures, not run
    assert not browser.find_elements(By.TAG_NAME, "img")
    body = browser.find_element(By.TAG_NAME, "body").text
    assert body.count(MARKUP) == 2, body

    shot = tmp_path / "status-page.png"
    assert browser.save_screenshot(str(shot)) and shot.stat().st_size > 10_000
    if os.environ.get("MAILPIPE_SCREENSHOTS") == "1":
        README_SHOT.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(shot, README_SHOT)

    invoice, newsletter = sorted(
        items, key=lambda k: "Invoice" in items[k].with_suffix(".eml").read_text()
    )[::-1]
    # A wrong token is refused: nothing changes, and the token is not echoed.
    banner = click(browser, "replay", invoice, "not-the-token")
    assert banner == "Refused: wrong or missing admin token."
    assert len(quarantined(tmp_path)) == 2
    assert "not-the-token" not in browser.page_source
    # The right token while the forwarder is still broken: the replay fails, the
    # message stays, and the failure is listed like a poll's (the hooks heard it).
    banner = click(browser, "replay", invoice, TOKEN)
    assert banner.startswith(f"{invoice}: failed in"), banner
    assert len(quarantined(tmp_path)) == 2
    assert len(rows(browser, "Recent failures")) == 3
    # Fix the forwarder, then replay with the token: the message leaves quarantine.
    (tmp_path / "broken").unlink()
    banner = click(browser, "replay", invoice, TOKEN)
    assert banner.startswith(f"{invoice}: replayed"), banner
    assert TOKEN not in browser.page_source
    assert browser.find_element(By.NAME, "token").get_attribute("value") == ""
    assert [json.loads(p.read_text())["key"] for p in quarantined(tmp_path)] == [
        newsletter
    ]
    assert "Invoice 2026-114" in (tmp_path / "var" / "out.jsonl").read_text()
    banner = click(browser, "drop", newsletter, TOKEN)
    assert banner == f"{newsletter}: dropped"
    assert quarantined(tmp_path) == []
    assert "0 message(s)" in browser.find_element(By.TAG_NAME, "body").text
    assert TOKEN not in log.read_text()


def test_status_page_refuses_actions_without_the_token(
    worker: tuple[Path, int, Path], tmp_path: Path
) -> None:
    _cfg, port, log = worker
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=10) as r:
        csp = r.headers["Content-Security-Policy"]
        page = r.read().decode()
    assert csp.startswith("default-src 'none'; style-src 'sha256-")
    assert "form-action 'self'" in csp and "frame-ancestors 'none'" in csp
    assert "<script" not in page and "http://" not in page and "https://" not in page
    assert "<img" not in page
    assert page.count("&lt;script&gt;alert(1)&lt;/script&gt;") == 2  # the 2 failures
    key = json.loads(quarantined(tmp_path)[0].read_text())["key"]
    drop = {"action": f"drop:{key}"}
    assert post(port, drop)[0] == 403  # no token
    assert post(port, {**drop, "token": TOKEN[:-1]})[0] == 403  # near miss
    # the right token, from another site: refused before the token is looked at
    code, _ = post(port, {**drop, "token": TOKEN}, {"Origin": "http://evil.example"})
    assert code == 403
    code, _ = post(port, {**drop, "token": TOKEN}, {"Sec-Fetch-Site": "cross-site"})
    assert code == 403
    assert len(quarantined(tmp_path)) == 2
    # a script may send the token in a header
    code, page = post(port, drop, {"X-Mailpipe-Admin-Token": TOKEN})
    assert code == 200 and f"{key}: dropped" in page and TOKEN not in page
    assert len(quarantined(tmp_path)) == 1
    assert TOKEN not in log.read_text()


async def test_status_page_without_admin_token_is_read_only(tmp_path: Path) -> None:
    from mailpipe.app import open_app
    from mailpipe.metrics import MetricsCollector, MetricsServer
    from mailpipe.status_page import StatusPage

    with Pop3Server([], tls="implicit") as srv:
        cfg = write_config(tmp_path, srv, free_port(), token=False)
    app = open_app(cfg)
    item = tmp_path / "var" / "quarantine" / "support" / "k1.json"
    item.parent.mkdir(parents=True)
    (item.with_suffix(".eml")).write_bytes(msg(9, "held"))
    item.write_text(
        json.dumps(
            {
                "key": "k1",
                "mailbox": "support",
                "uid": "u1",
                "reason": f"rule held {MARKUP}",
                "size": 77,
                "eml": str(item.with_suffix(".eml")),
            }
        )
    )
    journal = app.journal()
    journal.record_poll(
        "support", owner="w:1", error=f"login refused {MARKUP}", error_type="X"
    )
    journal.close()
    collector = MetricsCollector(["support"], unhealthy_after=3600)
    server = MetricsServer(
        collector, "127.0.0.1", 0, page=StatusPage(app, collector, token=None)
    )
    await server.start()
    try:
        port = server.port
        page = await asyncio.to_thread(
            lambda: urllib.request.urlopen(f"http://127.0.0.1:{port}/").read().decode()
        )
        assert "rule held" in page and "77 bytes" in page
        assert "<form" not in page and "Read-only" in page
        assert "support: last error" in page  # the journal's poll record
        # the reason and the mailbox's error are text, not markup
        assert "<script" not in page and "<img" not in page
        assert page.count("&lt;script&gt;alert(1)&lt;/script&gt;") == 2, page
        assert "login refused &lt;script&gt;" in page
        code, body = await asyncio.to_thread(
            post, port, {"action": "drop:k1", "token": "anything"}
        )
        assert code == 403 and "read-only" in body
        assert item.exists()
    finally:
        await server.stop()


async def test_status_page_answers_bad_requests_and_keeps_serving(
    tmp_path: Path,
) -> None:
    from mailpipe.app import open_app
    from mailpipe.metrics import MAX_BODY, MetricsCollector, MetricsServer
    from mailpipe.secrets import Secret
    from mailpipe.status_page import StatusPage

    with Pop3Server([], tls="implicit") as srv:
        cfg = write_config(tmp_path, srv, free_port(), token=False)
    app = open_app(cfg)
    collector = MetricsCollector(["support"], unhealthy_after=3600)
    page = StatusPage(app, collector, token=Secret(TOKEN))
    server = MetricsServer(collector, "127.0.0.1", 0, page=page)
    await server.start()

    async def raw(request: bytes) -> int:
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        writer.write(request)
        await writer.drain()
        data = await asyncio.wait_for(reader.read(), 30)
        writer.close()
        return int(data.split()[1])

    try:
        fields = "&".join(f"f{n}=x" for n in range(20)).encode()
        post_head = b"POST / HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: %d\r\n\r\n"
        assert await raw(post_head % len(fields) + fields) == 400
        assert await raw(post_head % (MAX_BODY + 1)) == 413
        assert await raw(b"PUT / HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n") == 405
        assert await raw(b"GET /nope HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n") == 404
        form = f"token={TOKEN}&action=explode:k".encode()
        assert await raw(post_head % len(form) + form) == 400
        form = f"token={TOKEN}&action=drop:nothing-here".encode()
        assert await raw(post_head % len(form) + form) == 404
        # a Content-Length that is not ASCII digits ('²' passes str.isdigit()),
        # and a header line over asyncio's 64 KiB line limit: 400, not silence
        for length in ("²", "-1", "1e3", "+5", "0x10"):
            head = f"POST / HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: {length}\r\n\r\n"
            assert await raw(head.encode("latin-1")) == 400, length
        huge = b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Big: " + b"a" * 70_000 + b"\r\n\r\n"
        assert await raw(huge) == 400
        assert await raw(b"GET /" + b"a" * 70_000 + b" HTTP/1.1\r\n\r\n") == 400
        assert await raw(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n") == 200
    finally:
        await server.stop()


async def test_status_page_answers_only_to_addresses_and_known_names(
    tmp_path: Path,
) -> None:
    """DNS rebinding: a page on evil.example that re-points its name at 127.0.0.1
    reaches the listener with `Host: evil.example`. `/` answers 421 to a Host that
    is not an IP address, localhost, the listen host or one of `[metrics] hosts`;
    /metrics and /healthz answer whatever name Prometheus scrapes them by."""
    from mailpipe.app import open_app
    from mailpipe.metrics import MetricsCollector, MetricsServer
    from mailpipe.status_page import StatusPage

    with Pop3Server([], tls="implicit") as srv:
        cfg = write_config(tmp_path, srv, free_port(), token=False)
    cfg.write_text(
        cfg.read_text().replace(
            "[metrics]\n", '[metrics]\nhosts = ["status.example.org"]\n'
        )
    )
    app = open_app(cfg)
    assert app.config.model.metrics.hosts == ["status.example.org"]
    collector = MetricsCollector(["support"], unhealthy_after=3600)
    page = StatusPage(app, collector, token=None)
    server = MetricsServer(
        collector, "127.0.0.1", 0, page=page, hosts=app.config.model.metrics.hosts
    )
    await server.start()
    port = server.port

    async def status(method: str, path: str, host: str | None) -> int:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        head = f"{method} {path} HTTP/1.1\r\n"
        if host is not None:
            head += f"Host: {host}\r\n"
        writer.write((head + "Content-Length: 0\r\n\r\n").encode())
        await writer.drain()
        data = await asyncio.wait_for(reader.read(), 30)
        writer.close()
        return int(data.split()[1])

    try:
        for host in (
            f"127.0.0.1:{port}", "127.0.0.1", f"localhost:{port}", f"[::1]:{port}",
            f"10.1.2.3:{port}", f"STATUS.example.org:{port}", "status.example.org",
        ):
            assert await status("GET", "/", host) == 200, host
        refused: tuple[str | None, ...] = (
            f"evil.example:{port}", "evil.example", "localhost.evil.example",
            f"127.0.0.1.nip.io:{port}", "", None,
        )
        for bad in refused:
            assert await status("GET", "/", bad) == 421, bad
            assert await status("POST", "/", bad) == 421, bad
        for path in ("/metrics", "/healthz"):
            assert await status("GET", path, f"evil.example:{port}") == 200, path
    finally:
        await server.stop()


def test_metrics_hosts_must_be_host_names(tmp_path: Path) -> None:
    from mailpipe.testing.e2e import run_cli

    cfg = tmp_path / "pipeline.toml"
    cfg.write_text('[metrics]\nhosts = ["status.example.org", "bad name:80"]\n')
    check = run_cli("check", str(cfg), cwd=tmp_path)
    out = check.stdout + check.stderr
    assert check.returncode == 2, out
    assert "metrics.hosts" in out and "bad name:80" in out, out


def test_healthcheck_does_not_resolve_the_admin_token(tmp_path: Path) -> None:
    from mailpipe.testing.e2e import run_cli

    cfg = tmp_path / "pipeline.toml"
    cfg.write_text('[metrics]\nadmin_token = { env = "MAILPIPE_TEST_UNSET_TOKEN" }\n')
    env_free = run_cli("healthcheck", str(cfg), cwd=tmp_path)
    assert env_free.returncode == 0, env_free.stderr  # the probe needs no token
    check = run_cli("check", str(cfg), cwd=tmp_path)
    assert check.returncode == 2
    assert "metrics.admin_token: environment variable MAILPIPE_TEST_UNSET_TOKEN" in (
        check.stdout + check.stderr
    )


def test_worker_exports_the_next_poll_it_plans(
    worker: tuple[Path, int, Path]
) -> None:
    """`mailpipe run` exports when the scheduler plans the next poll (poll_interval
    1h here), read from the journal's poll record at each scrape (MailpipeNoPoll)."""
    _cfg, port, _log = worker
    # the scheduler records the plan just after the poll's hooks: scrape until then
    for _ in range(300):  # bounded
        url = f"http://127.0.0.1:{port}/metrics"
        with urllib.request.urlopen(url, timeout=10) as r:
            text = r.read().decode()
        found = [
            x for x in text.splitlines()
            if x.startswith('mailpipe_next_poll_timestamp_seconds{mailbox="support"}')
        ]
        if found:
            break
        time.sleep(0.1)
    [line] = found
    planned = float(line.split()[-1])
    [polled] = [
        float(x.split()[-1]) for x in text.splitlines()
        if x.startswith('mailpipe_last_poll_timestamp_seconds{mailbox="support"}')
    ]
    # one poll interval (1h, jitter at most a tenth of it) after the poll
    assert 3000 < planned - polled < 4000, (planned, polled)
