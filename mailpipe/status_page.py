"""The status page at ``/`` of the metrics listener: mailboxes, failures, quarantine.

Theory of operation
-------------------
``GET /`` renders one self-contained HTML page on the server: no JavaScript, no
external asset, one inline style block allowed by its hash in a strict
Content-Security-Policy (``default-src 'none'``). It shows what ``mailpipe status``
shows (:func:`mailpipe.status.collect` over a read-only journal, so the rule of
``/healthz`` judges each mailbox), this worker's recent failures (failed polls and
failed messages, redacted, from :class:`~mailpipe.metrics.MetricsCollector`) and the
quarantine with each message's reason and size.

Actions: with ``[metrics] admin_token`` set, each quarantined message has *replay*
and *drop* buttons in a form that also asks for the token. ``POST /`` performs one
action when, and only when, the token matches (``hmac.compare_digest``); without
``admin_token`` the page is read-only and every POST is refused (403). The token is
what defeats cross-site request forgery: another site cannot know it, and it is
never echoed (the token field is always rendered empty, the token is never logged).
As a second guard, a request a browser marks as cross-site (``Sec-Fetch-Site``) or
whose ``Origin`` is not this listener is refused before the token is looked at. The
token may also come in an ``X-Mailpipe-Admin-Token`` header (scripts).
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
from datetime import UTC, datetime
from html import escape
from typing import TYPE_CHECKING, Final
from urllib.parse import parse_qs

import structlog

from mailpipe.metrics import Response
from mailpipe.secrets import redact

if TYPE_CHECKING:
    from mailpipe.app import App
    from mailpipe.metrics import MetricsCollector, Request
    from mailpipe.quarantine import QuarantineItem
    from mailpipe.secrets import Secret
    from mailpipe.status import MailboxStatus

log = structlog.get_logger()

TOKEN_HEADER: Final = "x-mailpipe-admin-token"

STYLE: Final = """
body{font:14px/1.4 system-ui,sans-serif;margin:1.5rem;color:#1b1f24;background:#fff}
h1{font-size:1.4rem;margin:0 0 .3rem}h2{font-size:1.1rem;margin:1.6rem 0 .4rem}
table{border-collapse:collapse;width:100%}th,td{text-align:left;padding:.3rem .5rem;
border-bottom:1px solid #d0d7de;vertical-align:top}th{background:#f6f8fa}
.bad{color:#b42318;font-weight:600}.ok{color:#1a7f37;font-weight:600}
.muted{color:#59636e}.banner{padding:.6rem .8rem;border-radius:4px;margin:1rem 0}
.done{background:#dafbe1}.refused{background:#ffebe9}
code{font:12px ui-monospace,monospace}button{margin-right:.3rem}
.token{margin:.5rem 0 1rem}
"""
_STYLE_HASH: Final = base64.b64encode(hashlib.sha256(STYLE.encode()).digest()).decode()

#: The Content-Security-Policy of every page: nothing but the inline style above.
CSP: Final = (
    f"default-src 'none'; style-src 'sha256-{_STYLE_HASH}'; form-action 'self'; "
    "frame-ancestors 'none'; base-uri 'none'"
)
HEADERS: Final = (
    ("Content-Security-Policy", CSP),
    ("X-Content-Type-Options", "nosniff"),
    ("X-Frame-Options", "DENY"),
    ("Referrer-Policy", "same-origin"),
    ("Cache-Control", "no-store"),
)


class StatusPage:
    """Renders ``GET /`` and performs the quarantine actions of ``POST /``.

    :param app: the loaded config (journal, quarantine, pipelines for replay).
    :param collector: this worker's metrics (recent failures, ``/healthz``).
    :param token: ``[metrics] admin_token``; None makes the page read-only.
    """

    def __init__(
        self, app: App, collector: MetricsCollector, *, token: Secret | None
    ) -> None:
        self.app = app
        self.collector = collector
        self.token = token
        self._actions = asyncio.Lock()  # one replay or drop at a time

    async def get(self) -> Response:
        """Return the page."""
        return await self._page("200 OK")

    async def post(self, request: Request) -> Response:
        """Perform the action the form names, if allowed; return the page again."""
        if self.token is None:
            return await self._page(
                "403 Forbidden",
                "Refused: this page is read-only ([metrics] admin_token is not set).",
                ok=False,
            )
        if _cross_site(request):
            return await self._page(
                "403 Forbidden", "Refused: cross-site request.", ok=False
            )
        try:
            form = parse_qs(request.body.decode("utf-8", "replace"), max_num_fields=10)
        except ValueError:  # more fields than a form of this page has
            return await self._page("400 Bad Request", "Malformed form.", ok=False)
        given = (form.get("token") or [""])[0] or request.headers.get(TOKEN_HEADER, "")
        # Constant-time: the comparison takes as long for a near miss as for nonsense.
        if not given or not hmac.compare_digest(
            given.encode(), self.token.get().encode()
        ):
            log.warning("status_page_refused", reason="wrong or missing admin token")
            return await self._page(
                "403 Forbidden", "Refused: wrong or missing admin token.", ok=False
            )
        action, _, key = (form.get("action") or [""])[0].partition(":")
        if action not in ("replay", "drop"):
            return await self._page(
                "400 Bad Request", "Unknown action: expected replay or drop.", ok=False
            )
        async with self._actions:
            quarantine = self.app.quarantine()
            item = next((i for i in quarantine.list() if i.key == key), None)
            if item is None:
                return await self._page(
                    "404 Not Found", f"No quarantined message {key}.", ok=False
                )
            outcome = await self._act(action, item)
        log.info("status_page_action", action=action, key=key, outcome=outcome)
        return await self._page("200 OK", f"{key}: {outcome}")

    async def _act(self, action: str, item: QuarantineItem) -> str:
        quarantine = self.app.quarantine()
        if action == "drop":
            quarantine.drop(item)
            return "dropped"
        from mailpipe.plugin_manager import Hooks
        from mailpipe.replay import replay

        journal = await asyncio.to_thread(self.app.journal)
        # With the hooks, a replay is seen like a poll's message (metrics, failures).
        hooks = Hooks(self.app.pm)
        results = await replay(self.app.config, journal, quarantine, [item], hooks)
        return redact(results[0][1])

    async def _page(
        self, status: str, banner: str = "", *, ok: bool = True
    ) -> Response:
        html = await asyncio.to_thread(self._render, banner, ok)
        return Response(status, "text/html; charset=utf-8", html.encode(), HEADERS)

    def _render(self, banner: str, ok: bool) -> str:
        from mailpipe.journal import JournalError, JournalMissingError
        from mailpipe.status import collect, error_lines, rows

        now = datetime.now(UTC)
        quarantine = self.app.quarantine()
        statuses: list[MailboxStatus] = []
        problem = ""
        journal = None
        try:
            journal = self.app.journal(read_only=True)
            statuses = collect(self.app.config, journal, quarantine, now=now)
        except JournalMissingError:
            statuses = collect(self.app.config, None, quarantine, now=now)
        except JournalError as exc:
            problem = redact(str(exc))
        finally:
            if journal is not None:
                journal.close()
        healthy, detail = self.collector.health()
        parts = [
            "<!doctype html><html lang=en><head><meta charset=utf-8>",
            "<meta name=viewport content='width=device-width'>",
            "<title>mailpipe status</title>",
            f"<style>{STYLE}</style></head><body>",
            "<h1>mailpipe status</h1>",
            f"<p class=muted>{escape(now.isoformat(timespec='seconds'))} · this worker: "
            + (
                "<span class=ok>healthy</span>"
                if healthy
                else "<span class=bad>unhealthy</span> (no success in time: "
                + escape(", ".join(detail["stale"]))
                + ")"
            )
            + " · <a href='/metrics'>metrics</a> · <a href='/healthz'>healthz</a></p>",
        ]
        if banner:
            kind = "done" if ok else "refused"
            parts.append(f"<p class='banner {kind}' role=status>{escape(banner)}</p>")
        parts.append("<h2>Mailboxes</h2>")
        if problem:
            parts.append(
                f"<p class=bad>The journal cannot be read: {escape(problem)}</p>"
            )
        else:
            parts.append(_table(rows(statuses), bad_column=1))
            parts += [
                f"<p><code>{escape(line)}</code></p>" for line in error_lines(statuses)
            ]
        parts.append(self._failures())
        parts.append(self._quarantine(quarantine.list()))
        parts.append("</body></html>")
        return "\n".join(parts)

    def _failures(self) -> str:
        failures = list(self.collector.failures)[::-1]
        if not failures:
            return "<h2>Recent failures</h2><p class=muted>None since this worker started.</p>"
        table = [["time", "mailbox", "where", "error"]] + [
            [
                datetime.fromtimestamp(f.at, UTC).isoformat(timespec="seconds"),
                f.mailbox,
                f.where,
                f"{f.kind}: {f.error}",
            ]
            for f in failures
        ]
        return "<h2>Recent failures</h2>" + _table(table)

    def _quarantine(self, items: list[QuarantineItem]) -> str:
        total = sum(i.size for i in items)
        head = f"<h2>Quarantine</h2><p>{len(items)} message(s), {_size(total)}</p>"
        if not items:
            return head
        actions = self.token is not None
        header = ["key", "mailbox", "uid", "since", "attempts", "size", "reason"]
        out = [head]
        if actions:
            out.append(
                "<form method=post action='/'><p class=token><label>Admin token "
                "<input type=password name=token autocomplete=off required></label>"
                "</p>"
            )
        else:
            out.append(
                "<p class=muted>Read-only: set <code>[metrics] admin_token</code> "
                "to replay or drop messages here.</p>"
            )
        out.append("<table><thead><tr>")
        out += [
            f"<th>{escape(h)}</th>" for h in header + (["action"] if actions else [])
        ]
        out.append("</tr></thead><tbody>")
        for i in items:
            cells = [
                f"<code title='{escape(i.key)}'>{escape(i.key[:16])}</code>",
                escape(i.mailbox),
                f"<code>{escape(i.uid)}</code>",
                escape(i.quarantined_at),
                str(i.attempts),
                _size(i.size),
                escape(redact(i.reason)),
            ]
            if actions:
                key = escape(i.key, quote=True)
                cells.append(
                    f"<button name=action value='replay:{key}'>Replay</button>"
                    f"<button name=action value='drop:{key}'>Drop</button>"
                )
            out.append("<tr>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
        out.append("</tbody></table>")
        if actions:
            out.append("</form>")
        return "".join(out)


def _cross_site(request: Request) -> bool:
    """True when the browser says another site sent this request."""
    site = request.headers.get("sec-fetch-site")
    if site is not None and site not in ("same-origin", "none"):
        return True
    # "null" is what a browser sends when a referrer policy hides the origin: no
    # evidence either way (the token still decides).
    origin = request.headers.get("origin")
    host = request.headers.get("host")
    if origin is not None and origin != "null" and host is not None:
        return origin.split("://", 1)[-1] != host
    return False


def _table(table: list[list[str]], *, bad_column: int | None = None) -> str:
    head, *body = table
    out = ["<table><thead><tr>"]
    out += [f"<th>{escape(h)}</th>" for h in head]
    out.append("</tr></thead><tbody>")
    for row in body:
        cells = []
        for n, cell in enumerate(row):
            css = ""
            if n == bad_column:
                css = {"ok": " class=ok"}.get(cell, "")
                if cell.startswith("UNHEALTHY"):
                    css = " class=bad"
            cells.append(f"<td{css}>{escape(cell)}</td>")
        out.append("<tr>" + "".join(cells) + "</tr>")
    out.append("</tbody></table>")
    return "".join(out)


def _size(n: int) -> str:
    if n < 1024:
        return f"{n} bytes"
    if n < 1024 * 1024:
        return f"{n / 1024:.1f} KiB"
    return f"{n / 1024 / 1024:.1f} MiB"
