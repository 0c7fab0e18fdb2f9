"""``mailpipe demo``: the example pipeline against a bundled sample mailbox, offline.

The demo starts the testing kit's POP3 server on 127.0.0.1 with implicit TLS (a
throw-away CA, verified like any real certificate), serving a Maildir under the demo
folder that is seeded once from the bundled samples. It then runs the pipeline of
``pipeline.example.toml`` (shipped as package data, identical to the file at the
repository root) with only the connection keys and paths changed. A second run finds
the mailbox empty and writes nothing twice.
"""

from __future__ import annotations

import asyncio
import shutil
import tomllib
from importlib import resources
from pathlib import Path
from typing import Any

import click

DEMO_USER = "support@example.com"
DEMO_PASSWORD = "demo-password-change-me"  # the example's examples/support.password


def sample_messages() -> list[tuple[str, bytes]]:
    """Return the bundled sample mailbox as (file name, bytes), in order."""
    folder = resources.files("mailpipe") / "samples"
    return sorted(
        (p.name, p.read_bytes()) for p in folder.iterdir() if p.name.endswith(".eml")
    )


def example_toml() -> str:
    """Return the text of the bundled ``pipeline.example.toml``."""
    return (
        resources.files("mailpipe") / "samples" / "pipeline.example.toml"
    ).read_text()


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return str(value)
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return (
            "{ "
            + ", ".join(f"{_key(k)} = {_toml_value(v)}" for k, v in value.items())
            + " }"
        )
    raise TypeError(type(value).__name__)


def _key(k: str) -> str:
    return k if k.replace("_", "").replace("-", "").isalnum() else _toml_value(k)


def dump_toml(data: dict[str, Any]) -> str:
    """Serialise the subset of TOML the example uses (tables, arrays of tables)."""
    lines: list[str] = []
    for name, value in data.items():
        if isinstance(value, dict) and name != "pipelines":
            lines.append(f"[{name}]")
            lines += [f"{_key(k)} = {_toml_value(v)}" for k, v in value.items()]
            lines.append("")
        elif (
            isinstance(value, list)
            and value
            and all(isinstance(v, dict) for v in value)
        ):
            for item in value:
                lines.append(f"[[{name}]]")
                lines += [f"{_key(k)} = {_toml_value(v)}" for k, v in item.items()]
                lines.append("")
        elif name == "pipelines":
            for pname, pipe in value.items():
                lines.append(f"[pipelines.{_key(pname)}]")
                for k, v in pipe.items():
                    if k == "processors":
                        lines.append("processors = [")
                        lines += [f"  {_toml_value(p)}," for p in v]
                        lines.append("]")
                    else:
                        lines.append(f"{_key(k)} = {_toml_value(v)}")
                lines.append("")
        else:
            lines.append(f"{_key(name)} = {_toml_value(value)}")
    return "\n".join(lines)


def write_demo_config(directory: Path, *, port: int, ca_file: Path) -> Path:
    """Write ``<directory>/pipeline.toml``: the example, pointed at the demo server."""
    data = tomllib.loads(example_toml())
    (directory / "support.password").write_text(DEMO_PASSWORD + "\n")
    shutil.copyfile(ca_file, directory / "demo-ca.pem")
    for mailbox in data["mailboxes"]:
        mailbox.update(
            host="127.0.0.1",
            port=port,
            security="tls",
            ca_file="demo-ca.pem",
            username=DEMO_USER,
            password={"file": "support.password"},
            poll_interval="5s",
        )
    path = directory / "pipeline.toml"
    header = (
        "# Written by `mailpipe demo` from pipeline.example.toml: only the mailbox\n"
        "# connection keys differ. Run it yourself with:\n"
        f"#   mailpipe run {path} --once\n\n"
    )
    path.write_text(header + dump_toml(data))
    return path


def _seed_maildir(maildir: Path) -> bool:
    if maildir.exists():
        return False
    for sub in ("tmp", "new", "cur"):
        (maildir / sub).mkdir(parents=True)
    for name, data in sample_messages():
        # The file name's stem is the UIDL (the testing server's Maildir convention).
        (maildir / "new" / f"demo-{name.removesuffix('.eml')}").write_bytes(data)
    return True


def run_demo(directory: Path, *, reset: bool = False) -> int:
    """Run the demo in ``directory``; return the process exit code."""
    from mailpipe.testing.server import Pop3Server

    if reset and directory.exists():
        shutil.rmtree(directory)
    directory.mkdir(parents=True, exist_ok=True)
    maildir = directory / "server-mailbox"
    seeded = _seed_maildir(maildir)
    click.echo(
        f"mailpipe demo: POP3 server with implicit TLS on 127.0.0.1, mailbox {maildir}"
        + (" (seeded with the sample messages)" if seeded else " (already processed)"),
        err=True,
    )
    with Pop3Server(
        maildir=maildir, users={DEMO_USER: DEMO_PASSWORD}, tls="implicit"
    ) as server:
        config = write_demo_config(directory, port=server.port, ca_file=server.ca_file)
        code = _run_pipeline(config)
    _print_next_steps(directory, config)
    return code


def _run_pipeline(config: Path) -> int:
    from mailpipe.app import open_app
    from mailpipe.service import run_pipelines

    ok = asyncio.run(run_pipelines(open_app(config), once=True))
    return 0 if ok else 1


def _example_key(config: Path) -> str:
    """The key of the demo's invoice message, for the `mailpipe show` advice."""
    from mailpipe.app import open_app
    from mailpipe.search import open_store, pick_store, search

    try:
        conn = open_store(pick_store(open_app(config).config))
    except Exception:  # nothing stored: the advice shows a placeholder
        return "KEY"
    try:
        hits = search(conn, "invoice", limit=1)
    finally:
        conn.close()
    return hits[0].key[:12] if hits else "KEY"


def _print_next_steps(directory: Path, config: Path) -> None:
    var = directory / "var"
    click.echo(
        f"""
Look at the results:
  mailpipe search {config} printer
  mailpipe search {config} --tag customer --since 2026-11-01 --json
  mailpipe show {config} {_example_key(config)}
  ls -R {var / "attachments"}
  head -c 600 {var / "records.jsonl"}
  mailpipe status {config}
  mailpipe state list {config}
  mailpipe quarantine list {config}
Run it again (idempotent: nothing is processed twice): mailpipe demo
Start afresh: mailpipe demo --reset
"""
    )
