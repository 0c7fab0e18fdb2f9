"""The ``mailpipe`` command line: arguments and output over a loaded :class:`App`.

What each command does lives in the module named for it (:mod:`mailpipe.service` for
``run``, :mod:`mailpipe.local` for ``process``, :mod:`mailpipe.demo`, ...); this module
parses arguments, loads the config through :func:`mailpipe.app.open_app`, prints and
chooses the exit code.

Exit codes: 0 success; 1 runtime failure (``run --once``: a mailbox could not be
polled; ``process``/``quarantine replay``: a message failed; a message that fails
during ``run`` is retried and quarantined, which is not a failure of the run); 2 usage
or configuration error.
"""

from __future__ import annotations

import asyncio
import gc
import json
import sqlite3
import sys
from pathlib import Path
from typing import Any, NoReturn

import click

from mailpipe import __version__, _imports
from mailpipe.app import App, open_app
from mailpipe.config import MailboxSpec
from mailpipe.errors import ConfigError, MailpipeError, PluginError
from mailpipe.quarantine import QuarantineItem

EXIT_OK, EXIT_FAILURE, EXIT_USAGE = 0, 1, 2


def _fail_config(exc: ConfigError | PluginError) -> NoReturn:
    click.echo(str(exc), err=True)
    sys.exit(EXIT_USAGE)


def _open(config: str) -> App:
    try:
        return open_app(config)
    except (ConfigError, PluginError) as exc:
        _fail_config(exc)


class _Commands(click.Group):
    """The command group; ``mailpipe auth`` (:mod:`mailpipe.oauth.cli`, with the token
    cache and cryptography) is imported only when asked for, never by ``run``."""

    lazy = {"auth": "mailpipe.oauth.cli"}

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted({*super().list_commands(ctx), *self.lazy})

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name in self.lazy and cmd_name not in self.commands:
            import importlib

            command = getattr(importlib.import_module(self.lazy[cmd_name]), cmd_name)
            self.add_command(command, cmd_name)
        return super().get_command(ctx, cmd_name)


@click.group(
    cls=_Commands, context_settings={"help_option_names": ["-h", "--help"]}
)
@click.version_option(__version__, prog_name="mailpipe")
@click.option(
    "--log-format",
    type=click.Choice(["auto", "console", "json"]),
    default="auto",
    show_default=True,
    help="Console on a terminal, JSON lines otherwise (auto).",
)
@click.option(
    "--log-level",
    type=click.Choice(["debug", "info", "warning", "error"]),
    default="info",
    show_default=True,
)
def cli(log_format: str, log_level: str) -> None:
    """mailpipe: mailboxes as reliable data-pipeline sources."""
    # Also here, not only in main(): a script named ``mailpipe`` that calls this group
    # is taken for the command too (its imports pause the collector), and a
    # ``mailpipe run`` that never resumed it would keep every reference cycle.
    _imports.imports_done()
    from mailpipe.logs import configure

    configure(log_format, log_level)  # type: ignore[arg-type]


@cli.command()
@click.argument("config", type=click.Path(dir_okay=False))
def check(config: str) -> None:
    """Validate CONFIG; print every problem and exit 2 when there are any."""
    app = _open(config)
    cfg = app.config
    click.echo(
        f"{config}: OK — {len(cfg.mailboxes)} mailbox(es), "
        f"{len(cfg.pipelines)} pipeline(s): "
        + ", ".join(f"{n} ({len(s)} steps)" for n, s in cfg.pipelines.items())
    )


@cli.command()
@click.argument("config", type=click.Path(dir_okay=False))
@click.option("--once", is_flag=True, help="Poll every mailbox once and exit.")
@click.option("--mailbox", "mailboxes", multiple=True, help="Only these mailboxes.")
def run(config: str, once: bool, mailboxes: tuple[str, ...]) -> None:
    """Run the pipelines of CONFIG until SIGTERM/SIGINT (or once with --once).

    Exits 1 with --once if any mailbox failed.
    """
    from mailpipe.service import run_pipelines

    app = _open(config)
    unknown = [m for m in mailboxes if m not in {x.name for x in app.config.mailboxes}]
    if unknown:
        click.echo(f"unknown mailbox: {', '.join(unknown)}", err=True)
        sys.exit(EXIT_USAGE)
    ok = asyncio.run(run_pipelines(app, once=once, only=mailboxes))
    sys.exit(EXIT_OK if ok else EXIT_FAILURE)


@cli.command()
@click.argument("config", type=click.Path(dir_okay=False))
@click.argument("paths", nargs=-1, required=True, type=click.Path(exists=True))
@click.option(
    "--pipeline", help="Pipeline to run (default: the only one, or 'default')."
)
@click.option("--dry-run", is_flag=True, help="Write nothing; print each decision.")
def process(
    config: str, paths: tuple[str, ...], pipeline: str | None, dry_run: bool
) -> None:
    """Run a pipeline over local .eml files, directories, Maildirs or mbox files."""
    from mailpipe.local import process_files

    app = _open(config)
    names = list(app.config.pipelines)
    if pipeline is None:
        pipeline = names[0] if len(names) == 1 else "default"
    if pipeline not in app.config.pipelines:
        click.echo(
            f"unknown pipeline {pipeline!r}; defined: {', '.join(names) or 'none'}",
            err=True,
        )
        sys.exit(EXIT_USAGE)
    tally = asyncio.run(
        process_files(
            app, [Path(p) for p in paths], pipeline, dry_run=dry_run, emit=_echo_json
        )
    )
    dry = " (dry run)" if dry_run else ""
    click.echo(f"{tally.count} message(s), {tally.failed} failed{dry}", err=True)
    sys.exit(EXIT_FAILURE if tally.failed else EXIT_OK)


def _echo_json(line: dict[str, Any]) -> None:
    click.echo(json.dumps(line, ensure_ascii=False, default=str))


@cli.command()
def plugins() -> None:
    """List plugins: name, origin, version and what each registers."""
    from rich.console import Console
    from rich.table import Table

    from mailpipe.plugin_manager import describe, load

    try:
        pm, registry = load()
    except PluginError as exc:
        _fail_config(exc)
    table = Table("plugin", "origin", "version", "sources", "processors")
    for info in describe(pm, registry):
        table.add_row(
            info.name,
            info.origin,
            info.version,
            ", ".join(info.sources),
            ", ".join(info.processors),
        )
    Console(width=160).print(table)


@cli.command()
@click.argument("config", type=click.Path(dir_okay=False))
@click.option(
    "--timeout", type=float, default=5.0, show_default=True, help="Seconds to wait."
)
def healthcheck(config: str, timeout: float) -> None:
    """Probe the /healthz of a running `mailpipe run CONFIG` (container HEALTHCHECK).

    Exits 0 when it answers 200, or when CONFIG has no [metrics] listen (nothing to
    probe); 1 when it answers otherwise or not at all; 2 when CONFIG cannot be read.
    Reads only the [metrics] table: no plugin is loaded and no secret resolved.
    """
    from mailpipe.config import MetricsConfig, read_toml
    from mailpipe.metrics import probe

    # Exit 1 (not 2) for an unreadable config too: Docker reserves 2 for HEALTHCHECK.
    try:
        data = read_toml(Path(config))
        table = data.get("metrics", {})
        if isinstance(table, dict):  # admin_token: a secret the probe does not need
            table = {k: v for k, v in table.items() if k != "admin_token"}
        metrics = MetricsConfig.model_validate(table)
    except ConfigError as exc:
        click.echo(str(exc), err=True)
        sys.exit(EXIT_FAILURE)
    except ValueError as exc:  # pydantic's ValidationError
        click.echo(f"{config}: [metrics]: {exc}", err=True)
        sys.exit(EXIT_FAILURE)
    healthy, line = probe(metrics.listen, timeout=timeout)
    click.echo(line)
    sys.exit(EXIT_OK if healthy else EXIT_FAILURE)


@cli.command()
def schema() -> None:
    """Print the JSON Schema of the config file, plugin options included."""
    from mailpipe.plugin_manager import load
    from mailpipe.schema import json_schema

    try:
        _, registry = load()
    except PluginError as exc:
        _fail_config(exc)
    click.echo(json.dumps(json_schema(registry), indent=2))


# --- status and search ------------------------------------------------------------


#: ``mailpipe status``'s exit code when the journal exists but cannot be read.
EXIT_UNREADABLE = 3


@cli.command()
@click.argument("config", type=click.Path(dir_okay=False))
@click.option("--json", "as_json", is_flag=True, help="One JSON document (for scripts).")
def status(config: str, as_json: bool) -> None:
    """Show each mailbox: health, last success and error, backlog, lock, next poll.

    Reads only: never creates, migrates or locks the journal. Without a journal
    (no run yet) every enabled mailbox is "never polled".

    \b
    Exit codes:
      0  every enabled mailbox is healthy
      1  an enabled mailbox is unhealthy by the rule of /healthz (no success
         within [metrics] unhealthy_after, or never polled; no journal yet)
      2  usage or configuration error
      3  the journal cannot be read (unreachable, not a journal, or another
         schema version: the next `mailpipe run` migrates an older one)
    """
    from mailpipe.journal import JournalError, JournalMissingError
    from mailpipe.secrets import redact
    from mailpipe.status import as_document, collect, error_lines, healthy, rows

    app = _open(config)
    journal = None
    try:
        journal = app.journal(read_only=True)
    except JournalMissingError as exc:
        click.echo(f"{exc}: no mailbox has been polled yet", err=True)
    except JournalError as exc:
        click.echo(f"mailpipe status: {redact(str(exc))}", err=True)
        sys.exit(EXIT_UNREADABLE)
    try:
        statuses = collect(app.config, journal, app.quarantine())
    except JournalError as exc:
        click.echo(f"mailpipe status: {redact(str(exc))}", err=True)
        sys.exit(EXIT_UNREADABLE)
    finally:
        if journal is not None:
            journal.close()
    if as_json:
        click.echo(json.dumps(as_document(statuses), ensure_ascii=False))
    else:
        _print_table(rows(statuses))
        for line in error_lines(statuses):
            click.echo(line)
    sys.exit(EXIT_OK if healthy(statuses) else EXIT_FAILURE)


def _print_table(table: list[list[str]]) -> None:
    from rich.console import Console
    from rich.table import Table

    head, *body = table
    out = Table(*head)
    for row in body:
        out.add_row(*row)
    Console(width=200, soft_wrap=True).print(out)


def _store(app: App, wanted: str | None) -> sqlite3.Connection:
    """The read-only connection to the store.sqlite archive (exit 2 on a bad choice)."""
    from mailpipe.search import StoreChoiceError, open_store, pick_store

    try:
        store = pick_store(app.config, wanted)
    except StoreChoiceError as exc:
        click.echo(str(exc), err=True)
        sys.exit(EXIT_USAGE)
    return open_store(store)


@cli.command()
@click.argument("config", type=click.Path(dir_okay=False))
@click.argument("query", required=False, default="")
@click.option("--from", "sender", help="From name or address contains this.")
@click.option("--since", help="Date, time or age (2025-03-01, 2025-03-01T09:00, 7d).")
@click.option("--mailbox", help="Only this mailbox.")
@click.option("--tag", "tags", multiple=True, help="Has this tag (repeatable: all).")
@click.option("--store", "store", help="store.sqlite step name or path (if several).")
@click.option("--limit", default=50, show_default=True, type=click.IntRange(1))
@click.option("--json", "as_json", is_flag=True, help="JSON lines, one per message.")
def search(
    config: str,
    query: str,
    sender: str | None,
    since: str | None,
    mailbox: str | None,
    tags: tuple[str, ...],
    store: str | None,
    limit: int,
    as_json: bool,
) -> None:
    """Search the store.sqlite archive: full text (FTS5) QUERY and filters.

    QUERY uses FTS5 syntax (words, "phrases", OR, NOT, prefix*); one FTS5 cannot
    parse is searched as plain words. Without QUERY, the newest matching messages.
    """
    from mailpipe.search import parse_since
    from mailpipe.search import search as run_search

    try:
        after = parse_since(since) if since else None
    except ValueError as exc:
        click.echo(str(exc), err=True)
        sys.exit(EXIT_USAGE)
    app = _open(config)
    conn = _store(app, store)
    try:
        hits = run_search(
            conn, query, sender=sender, since=after, mailbox=mailbox, tags=tags,
            limit=limit,
        )
    finally:
        conn.close()
    if as_json:
        for hit in hits:
            click.echo(json.dumps(hit.as_json(), ensure_ascii=False))
    else:
        table = [["key", "date", "from", "subject", "mailbox", "att", "tags"]]
        table += [
            [
                h.key, (h.date or "")[:16].replace("T", " "), h.sender, h.subject or "",
                h.mailbox, str(h.attachments), ",".join(h.tags),
            ]
            for h in hits
        ]
        _print_table(table)
    click.echo(f"{len(hits)} message(s)", err=True)


@cli.command()
@click.argument("config", type=click.Path(dir_okay=False))
@click.argument("key")
@click.option("--store", "store", help="store.sqlite step name or path (if several).")
@click.option("--json", "as_json", is_flag=True, help="The whole record as JSON.")
def show(config: str, key: str, store: str | None, as_json: bool) -> None:
    """Show one stored message (KEY or a unique prefix) with its attachments."""
    from mailpipe.search import KeyLookupError, blob_dirs
    from mailpipe.search import show as record_of

    app = _open(config)
    conn = _store(app, store)
    try:
        doc = record_of(conn, key, blob_dirs=blob_dirs(app.config))
    except KeyLookupError as exc:
        click.echo(str(exc), err=True)
        sys.exit(EXIT_USAGE)
    finally:
        conn.close()
    if as_json:
        click.echo(json.dumps(doc, ensure_ascii=False, indent=2))
        return
    for label, value in _show_lines(doc):
        click.echo(f"{label + ':':<13}{value}")
    for a in doc["attachments"]:
        click.echo(
            f"  [{a['idx']}] {a['filename'] or '(no name)'}  {a['content_type']}  "
            f"{a['size']} bytes  {a['file'] or 'sha256:' + a['sha256']}"
        )
    if doc.get("text"):
        click.echo("")
        click.echo(doc["text"].rstrip("\n"))


def _show_lines(doc: dict[str, Any]) -> list[tuple[str, str]]:
    def addresses(field: str) -> str:
        return ", ".join(
            f"{a.get('name')} <{a.get('address')}>" if a.get("name") else a.get("address") or ""
            for a in doc.get(field) or ()
        )

    lines = [
        ("Key", doc["key"]),
        ("Mailbox", f"{doc.get('mailbox')}  uid {doc.get('uid')}"),
        ("Date", str(doc.get("date") or doc.get("date_raw") or "")),
        ("From", addresses("from_addresses")),
        ("To", addresses("to")),
        ("Cc", addresses("cc")),
        ("Subject", str(doc.get("subject") or "")),
        ("Tags", ", ".join(doc.get("tags") or ()) or "-"),
        ("Attachments", str(len(doc["attachments"]))),
    ]
    return [(label, value) for label, value in lines if value or label == "Subject"]


# --- quarantine -----------------------------------------------------------------


@cli.group()
def quarantine() -> None:
    """Inspect, replay or drop quarantined messages."""


@quarantine.command("list")
@click.argument("config", type=click.Path(dir_okay=False))
def quarantine_list(config: str) -> None:
    """List quarantined messages."""
    app = _open(config)
    items = app.quarantine().list()
    for item in items:
        click.echo(
            f"{item.key}  {item.mailbox}  {item.uid}  {item.quarantined_at}  {item.reason}"
        )
    click.echo(f"{len(items)} quarantined message(s)", err=True)


def _item(app: App, key: str) -> QuarantineItem:
    item = app.quarantine().get(key)
    if item is None:
        click.echo(
            f"no quarantined message with key {key!r} (or it is ambiguous)", err=True
        )
        sys.exit(EXIT_USAGE)
    return item


@quarantine.command("show")
@click.argument("config", type=click.Path(dir_okay=False))
@click.argument("key")
def quarantine_show(config: str, key: str) -> None:
    """Show one quarantined message's sidecar and headers."""
    from dataclasses import asdict

    app = _open(config)
    item = _item(app, key)
    click.echo(json.dumps(asdict(item), indent=2, ensure_ascii=False))
    raw = Path(item.eml).read_bytes()
    head = raw.split(b"\r\n\r\n", 1)[0].split(b"\n\n", 1)[0]
    click.echo(head.decode("utf-8", "replace"))


@quarantine.command("drop")
@click.argument("config", type=click.Path(dir_okay=False))
@click.argument("key")
def quarantine_drop(config: str, key: str) -> None:
    """Delete a quarantined message for good."""
    app = _open(config)
    item = _item(app, key)
    app.quarantine().drop(item)
    click.echo(f"dropped {item.key}")


@quarantine.command("replay")
@click.argument("config", type=click.Path(dir_okay=False))
@click.argument("keys", nargs=-1)
@click.option(
    "--all", "replay_all", is_flag=True, help="Replay every quarantined message."
)
def quarantine_replay(config: str, keys: tuple[str, ...], replay_all: bool) -> None:
    """Run quarantined messages through their mailbox's pipeline again.

    A message that now succeeds leaves the quarantine; its journal entry is updated so
    a server copy that was kept is deleted per the mailbox policy.
    """
    app = _open(config)
    code = asyncio.run(_replay(app, keys, replay_all))
    sys.exit(code)


async def _replay(app: App, keys: tuple[str, ...], replay_all: bool) -> int:
    from mailpipe.replay import replay

    q = app.quarantine()
    items = q.list() if replay_all else [_item(app, k) for k in keys]
    if not items:
        click.echo("nothing to replay", err=True)
        return EXIT_OK
    from mailpipe.plugin_manager import Hooks

    results = await replay(app.config, app.journal(), q, items, Hooks(app.pm))
    failed = 0
    for item, outcome in results:
        click.echo(f"{item.key}  {outcome}")
        failed += outcome.startswith("failed")
    return EXIT_FAILURE if failed else EXIT_OK


# --- state ----------------------------------------------------------------------


@cli.group()
def state() -> None:
    """Inspect or change the journal (delivery state)."""


@state.command("list")
@click.argument("config", type=click.Path(dir_okay=False))
@click.option("--mailbox", default=None)
@click.option(
    "--status", default=None, help="pending, committed, kept, quarantined, deleted"
)
@click.option("--limit", default=100, show_default=True)
def state_list(
    config: str, mailbox: str | None, status: str | None, limit: int
) -> None:
    """List journal entries, newest first."""
    from mailpipe.journal.base import Status

    app = _open(config)
    try:
        st = Status(status) if status else None
    except ValueError:
        click.echo(
            f"unknown status {status!r}; accepted: {', '.join(s.value for s in Status)}",
            err=True,
        )
        sys.exit(EXIT_USAGE)
    journal = app.journal()
    try:
        for e in journal.list(mailbox, st, limit):
            click.echo(
                f"{e.mailbox}  {e.uid}  {e.status}  attempts={e.attempts}  "
                f"delete_due={e.delete_due}  steps={','.join(e.steps) or '-'}"
                + (f"  error={e.last_error}" if e.last_error else "")
            )
    finally:
        journal.close()


@state.command("forget")
@click.argument("config", type=click.Path(dir_okay=False))
@click.argument("mailbox")
@click.argument("uids", nargs=-1)
def state_forget(config: str, mailbox: str, uids: tuple[str, ...]) -> None:
    """Forget journal entries (all of MAILBOX without UIDS): they will be processed again."""
    app = _open(config)
    journal = app.journal()
    try:
        from mailpipe.ledger import forget

        n = forget(journal, mailbox, list(uids) if uids else None)
    finally:
        journal.close()
    click.echo(f"forgot {n} entr{'y' if n == 1 else 'ies'}")


@state.command("mark-seen")
@click.argument("config", type=click.Path(dir_okay=False))
@click.argument("mailbox")
def state_mark_seen(config: str, mailbox: str) -> None:
    """Adopt MAILBOX: record the mail already in it as seen, without processing it."""
    app = _open(config)
    try:
        spec = app.config.mailbox(mailbox)
    except KeyError:
        click.echo(f"unknown mailbox {mailbox!r}", err=True)
        sys.exit(EXIT_USAGE)
    try:
        n, total = asyncio.run(_mark_seen(app, spec))
    except MailpipeError as exc:
        click.echo(f"mark-seen failed: {exc}", err=True)
        sys.exit(EXIT_FAILURE)
    click.echo(f"marked {n} new of {total} message(s) as seen in {mailbox}")


async def _mark_seen(app: App, spec: MailboxSpec) -> tuple[int, int]:
    from mailpipe.engine import make_source
    from mailpipe.ledger import adopt_seen
    from mailpipe.source import facts_of

    journal = app.journal()
    try:
        async with make_source(spec, app.config).session() as session:
            refs = await session.list()
            if not facts_of(session).stable_ids:
                raise MailpipeError(
                    "the server offers no UIDL; mark-seen needs stable ids"
                )
            n = await adopt_seen(journal, spec.name, session, refs)
        return n, len(refs)
    finally:
        journal.close()


@cli.command()
@click.option(
    "--dir",
    "directory",
    default="mailpipe-demo",
    show_default=True,
    type=click.Path(file_okay=False),
)
@click.option("--reset", is_flag=True, help="Delete the demo folder first.")
def demo(directory: str, reset: bool) -> None:
    """Run the example pipeline against a bundled sample mailbox (offline)."""
    from mailpipe.demo import run_demo

    sys.exit(run_demo(Path(directory), reset=reset))


def main() -> None:
    """Console-script entry point (also ``python -m mailpipe``).

    It resumes the cyclic garbage collector that :mod:`mailpipe._imports` paused while
    the command was imported, those objects frozen. However the command ends, what
    the process still holds is frozen too (:func:`gc.freeze`) on the way out: the
    interpreter's final full collections then skip the ~40,000 objects of the
    imported modules, the plugins and the validated config, which cost more CPU
    (~35 ms) than ``run --once`` spends polling an empty mailbox (issue 18). Nothing
    depends on those collections: journal, store and quarantine writes are committed
    before their acknowledgement and files are closed explicitly; ``atexit`` handlers
    (logging's flush) still run. Only this entry point does it, never an in-process
    caller of :data:`cli` (tests, ``CliRunner``).
    """
    _imports.imports_done()  # the collector, paused while the command was imported
    try:
        cli.main(prog_name="mailpipe", standalone_mode=True)
    except KeyboardInterrupt:  # pragma: no cover - interactive
        sys.exit(130)
    except MailpipeError as exc:  # e.g. the journal is unreachable: no traceback
        from mailpipe.secrets import redact

        click.echo(f"mailpipe: {type(exc).__name__}: {redact(str(exc))}", err=True)
        sys.exit(EXIT_FAILURE)
    finally:
        gc.freeze()
