"""A third-party source, built from docs/plugins.md, installed, and held to the contract.

The guide's ``mailpipe-dirsource`` distribution is extracted, built with pip into a
target directory and (1) run through the source contract suite in this process,
(2) used by ``mailpipe run`` in a subprocess through the ``mailpipe`` entry-point
group, with ``acknowledge = { move = ... }`` — which the built-in POP3 source refuses
at config time — and (3) shown to wake the scheduler by push: with a one-hour poll
interval, a message dropped after the first poll is processed at once.
"""

from __future__ import annotations

import importlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from mailpipe.source import Ack, AckKind, SourceContext
from mailpipe.testing.contract import SourceContract
from tests.test_third_party_plugin import titled_blocks

MESSAGE = b"From: a@example.org\r\nSubject: %d\r\nMessage-ID: <%d@example.org>\r\n\r\nbody\r\n"


@pytest.fixture(scope="module")
def dirsource_site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    blocks = titled_blocks()
    src = tmp_path_factory.mktemp("dirsource-src")
    (src / "pyproject.toml").write_text(blocks["dirsource/pyproject.toml"])
    (src / "mailpipe_dirsource.py").write_text(blocks["mailpipe_dirsource.py"])
    site = tmp_path_factory.mktemp("dirsource-site")
    done = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation",
         "--no-index", "--no-cache-dir", "--disable-pip-version-check", "-q",
         "--target", str(site), str(src)],
        capture_output=True, text=True, timeout=300, check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return site


@pytest.fixture(scope="module")
def dirsource(dirsource_site: Path) -> Iterator[Any]:
    sys.path.insert(0, str(dirsource_site))
    try:
        yield importlib.import_module("mailpipe_dirsource")
    finally:
        sys.path.remove(str(dirsource_site))
        sys.modules.pop("mailpipe_dirsource", None)


class DirMailbox:
    def __init__(self, module: Any, root: Path) -> None:
        self.module = module
        self.root = root
        (root / "inbox").mkdir(parents=True)
        self.count = 0

    def source(self) -> Any:
        options = self.module.DirOptions(path=self.root)
        return self.module.DirSource(options, SourceContext(base_dir=self.root,
                                                            mailbox="dir"))

    def deliver(self, data: bytes) -> None:
        self.count += 1
        (self.root / "inbox" / f"{self.count:06d}.eml").write_bytes(data)

    def remaining(self) -> list[bytes]:
        flagged = self.root / ".flagged"
        return [p.read_bytes() for p in sorted((self.root / "inbox").glob("*.eml"))
                if not (flagged / p.name).exists()]

    def acknowledged(self, ack: Ack) -> list[bytes]:
        if ack.kind is AckKind.MOVE:
            return [p.read_bytes() for p in sorted((self.root / str(ack.target)).glob("*"))]
        if ack.kind is AckKind.FLAG:
            return [(self.root / "inbox" / p.name).read_bytes()
                    for p in sorted((self.root / ".flagged").glob("*"))]
        return []


class TestThirdPartySourceContract(SourceContract):
    @pytest.fixture
    def contract_mailbox(self, dirsource: Any, tmp_path: Path) -> DirMailbox:
        return DirMailbox(dirsource, tmp_path / "mail")


def _config(tmp_path: Path, **mailbox: str) -> Path:
    extra = "".join(f"{k} = {v}\n" for k, v in mailbox.items())
    path = tmp_path / "pipeline.toml"
    path.write_text(
        '[state]\npath = "journal.sqlite3"\n\n'
        '[[mailboxes]]\nname = "dir"\nsource = "dirsource"\npath = "mail"\n' + extra +
        '\n[pipelines.default]\nprocessors = [{ use = "store.maildir", path = "out" }]\n'
    )
    (tmp_path / "mail" / "inbox").mkdir(parents=True, exist_ok=True)
    return path


def _env(site: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MAILPIPE_")}
    env["PYTHONPATH"] = str(site)
    return env


def _stored(tmp_path: Path) -> list[bytes]:
    out = tmp_path / "out"
    return sorted(p.read_bytes() for sub in ("new", "cur") if (out / sub).is_dir()
                  for p in (out / sub).iterdir())


def test_installed_source_runs_with_move_acknowledgement(
    dirsource_site: Path, tmp_path: Path
) -> None:
    config = _config(tmp_path, acknowledge='{ move = "Done" }')
    for n in (1, 2):
        (tmp_path / "mail" / "inbox" / f"{n}.eml").write_bytes(MESSAGE % (n, n))
    done = subprocess.run(
        [sys.executable, "-m", "mailpipe", "run", "--once", str(config)],
        cwd=tmp_path, env=_env(dirsource_site), capture_output=True, text=True,
        timeout=120, check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert _stored(tmp_path) == [MESSAGE % (1, 1), MESSAGE % (2, 2)]
    assert list((tmp_path / "mail" / "inbox").glob("*.eml")) == []
    assert sorted(p.name for p in (tmp_path / "mail" / "Done").iterdir()) == ["1.eml", "2.eml"]


def test_pop3_refuses_what_the_dirsource_accepts(dirsource_site: Path, tmp_path: Path) -> None:
    # MP-04: the acknowledgement is validated against the chosen source at load time.
    path = tmp_path / "pop3.toml"
    path.write_text(
        '[[mailboxes]]\nname = "p"\nhost = "127.0.0.1"\nusername = "u"\npassword = "p"\n'
        'acknowledge = { move = "Done" }\n'
        '[pipelines.default]\nprocessors = [{ use = "parse" }]\n'
    )
    done = subprocess.run(
        [sys.executable, "-m", "mailpipe", "check", str(path)], cwd=tmp_path,
        env=_env(dirsource_site), capture_output=True, text=True, timeout=120, check=False,
    )
    assert done.returncode == 2
    assert ("mailboxes[0].acknowledge: source 'pop3' cannot acknowledge with 'move'; "
            "it supports: delete") in done.stdout + done.stderr


def _wait_for(predicate: Any, what: str, proc: subprocess.Popen[str]) -> None:
    for _ in range(600):  # bounded: 60 s at most
        if predicate():
            return
        if proc.poll() is not None:
            raise AssertionError(f"mailpipe run exited {proc.returncode} before {what}")
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def test_push_wakes_the_scheduler_before_the_poll_interval(
    dirsource_site: Path, tmp_path: Path
) -> None:
    config = _config(tmp_path, poll_interval='"1h"')
    inbox = tmp_path / "mail" / "inbox"
    (inbox / "1.eml").write_bytes(MESSAGE % (1, 1))
    proc = subprocess.Popen(
        [sys.executable, "-m", "mailpipe", "run", str(config)], cwd=tmp_path,
        env=_env(dirsource_site), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        _wait_for(lambda: len(_stored(tmp_path)) == 1 and not any(inbox.iterdir()),
                  "the first poll", proc)
        # The next timed poll is an hour away: only a push can bring this one in.
        (inbox / "2.eml").write_bytes(MESSAGE % (2, 2))
        _wait_for(lambda: len(_stored(tmp_path)) == 2, "the pushed message", proc)
        assert not any(inbox.iterdir())
    finally:
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, out
    assert "mailbox_woken" in out


@pytest.mark.parametrize(
    ("line", "key"),
    [('on_quarantine = { move = "Errors" }', "on_quarantine"),
     ('acknowledge = { flag = "$Done" }', "acknowledge")],
)
def test_pop3_refuses_every_acknowledgement_it_cannot_perform(
    tmp_path: Path, line: str, key: str
) -> None:
    import tomllib

    from mailpipe.errors import ConfigError
    from mailpipe.plugin_manager import load
    from mailpipe.validation import validate_config
    data = tomllib.loads(
        '[[mailboxes]]\nname = "p"\nhost = "127.0.0.1"\nusername = "u"\npassword = "p"\n'
        f'{line}\n[pipelines.default]\nprocessors = [{{ use = "parse" }}]\n'
    )
    with pytest.raises(ConfigError) as caught:
        validate_config(data, path=tmp_path / "p.toml", registry=load(entry_points=False)[1])
    assert f"mailboxes[0].{key}: source 'pop3' cannot acknowledge with" in str(caught.value)
