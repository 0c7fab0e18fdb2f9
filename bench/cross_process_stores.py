"""What cross-process idempotency costs the file stores (issue 16, point 1).

Run: ``python bench/cross_process_stores.py [--count 2000] [--group 100] [--dir DIR]
[--before REV]``. For store.maildir, store.mbox and store.jsonl, on N small messages
(default 2,000), three cases each, for this tree ("now") and for the stores as they
were at git revision REV (default ``main``; "before", loaded from ``git show``):

- ``write``: one instance writes every message (durable, flushed every ``--group``).
- ``recheck``: a second instance that opened before those writes processes every
  message again (the takeover of a dead worker's mailbox): each key must be found as
  stored by another process. "before" rewrites them (its count of duplicates shows it).
- ``alternate``: two instances on the same files take turns, message by message (two
  workers sharing one store).

Prints one table; nothing is asserted. ``--small`` runs 200 messages (for CI);
``--before ''`` measures only this tree (no git needed).
"""

from __future__ import annotations

import argparse
import collections
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import types
from collections.abc import Callable
from pathlib import Path
from typing import Any

import structlog
from mailpipe.plugins.store import maildir, mbox

from mailpipe import Message, ProcessorContext

sys.path.insert(0, str(Path(__file__).parent))
from store_throughput import small_messages

STORES = ("maildir", "mbox", "jsonl")


def before_module(name: str, rev: str) -> types.ModuleType:
    """The store module ``name`` as it was at git revision ``rev``."""
    root = Path(__file__).resolve().parent.parent
    source = subprocess.run(
        ["git", "show", f"{rev}:plugins/store/{name}.py"],
        cwd=root, check=True, capture_output=True, text=True,
    ).stdout
    spec = importlib.util.spec_from_loader(f"mailpipe.plugins.store._{name}_before",
                                           loader=None)
    assert spec is not None
    module = importlib.util.module_from_spec(spec)
    module.__package__ = "mailpipe.plugins.store"
    sys.modules[spec.name] = module  # dataclasses look their module up
    exec(compile(source, f"{rev}:{name}.py", "exec"), module.__dict__)
    return module


def factory(module: types.ModuleType, kind: str, base: Path) -> Callable[[], Any]:
    ctx = ProcessorContext(base_dir=base)
    if kind == "maildir":
        return lambda: module.MaildirStore(module.MaildirOptions(path=Path("Maildir")),
                                           ctx)
    if kind == "mbox":
        return lambda: module.MboxStore(module.MboxOptions(path=Path("m.mbox")), ctx)
    return lambda: module.JsonlStore(module.JsonlOptions(path=Path("m.jsonl")), ctx)


def stored(kind: str, base: Path) -> collections.Counter[str]:
    if kind == "maildir":
        return collections.Counter(
            maildir.key_of(n) for sub in ("new", "cur")
            for n in os.listdir(base / "Maildir" / sub)
        )
    if kind == "mbox":
        return collections.Counter(e.key for e in mbox.scan(base / "m.mbox")[0])
    lines = (base / "m.jsonl").read_text().splitlines()
    return collections.Counter(json.loads(line)["key"] for line in lines)


def feed(stores: list[Any], messages: list[Message], group: int) -> float:
    """Process messages[i] with stores[i % len(stores)], flushing every ``group``."""
    for s in stores:
        getattr(s, "open", lambda: None)()
    started = time.perf_counter()
    for i, m in enumerate(messages, 1):
        stores[i % len(stores)].process(m)
        if i % group == 0:
            for s in stores:
                getattr(s, "flush", lambda: None)()
    for s in stores:
        getattr(s, "flush", lambda: None)()
    elapsed = time.perf_counter() - started
    for s in stores:
        s.close()
    return elapsed


def case(make: Callable[[], Any], name: str, messages: list[Message],
         group: int) -> float:
    if name == "write":
        return feed([make()], messages, group)
    if name == "recheck":
        second = make()
        getattr(second, "open", lambda: None)()  # opens before the first one writes
        feed([make()], messages, group)
        return feed([second], messages, group)
    return feed([make(), make()], messages, group)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=2000)
    parser.add_argument("--group", type=int, default=100)
    parser.add_argument("--dir", type=Path, default=None)
    parser.add_argument("--before", default="main")
    parser.add_argument("--small", action="store_true", help="200 messages")
    args = parser.parse_args()
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(40))
    count = 200 if args.small else args.count
    messages = small_messages(count)
    now: dict[str, types.ModuleType] = {"maildir": maildir, "mbox": mbox,
           "jsonl": sys.modules["mailpipe.plugins.store.jsonl"]}
    modules: dict[str, dict[str, types.ModuleType]] = {"now": now}
    if args.before:
        modules["before"] = {k: before_module(k, args.before) for k in STORES}
    root = Path(tempfile.mkdtemp(prefix="mailpipe-bench-", dir=args.dir))
    rows = []
    try:
        for kind in STORES:
            for name in ("write", "recheck", "alternate"):
                for version in modules:
                    base = root / f"{kind}-{name}-{version}"
                    base.mkdir()
                    make = factory(modules[version][kind], kind, base)
                    elapsed = case(make, name, messages, args.group)
                    extra = sum(stored(kind, base).values()) - count
                    rows.append((kind, name, version, elapsed, extra))
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print(f"{count} messages, {sum(m.size for m in messages) // count} octets each "
          f"on average, flush every {args.group}; 'before' = {args.before}")
    print("| store | case | version | seconds | msg/s | µs/message | duplicates |")
    print("|---|---|---|---:|---:|---:|---:|")
    for kind, name, version, elapsed, extra in rows:
        print(f"| store.{kind} | {name} | {version} | {elapsed:.2f} | "
              f"{count / elapsed:.0f} | {elapsed / count * 1e6:.0f} | {extra} |")


if __name__ == "__main__":
    main()
