"""Benchmark: cost per message of the helpdesk processors beside `parse`, over the
corpus (and the reply labelled set).

Each step runs on messages that `parse` already parsed (a fresh copy of the parsed
record per round, so no step sees its own earlier output); the `parse` row is the
parse itself. Best of N rounds; µs per message and the ratio to parse.

Usage: python bench/helpdesk.py [--corpus DIR] [--rounds N] [--small]
"""

from __future__ import annotations

import argparse
import copy
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

import structlog
from mailpipe.plugins.parse import PAYLOADS_KEY, parse_into
from mailpipe.plugins.reply.evaluate import load

from mailpipe.message import Message, MessageRef
from mailpipe.plugin_manager import get_plugin_manager
from mailpipe.processor import ProcessorContext
from mailpipe.registry import collect

ROOT = Path(__file__).resolve().parents[1]
STEPS = ("reply", "ticket", "bounce", "unwrap", "extract")


def default_corpus() -> Path:
    env = os.environ.get("MAILPIPE_CORPUS")
    return Path(env) if env else ROOT.parent / "shared" / "corpus"


def message(raw: bytes) -> Message:
    return Message(ref=MessageRef(mailbox="b", number=1, uid="u", size=len(raw)),
                   data=raw)


def best(rounds: int, fn: Any) -> float:
    out = float("inf")
    for _ in range(rounds):
        started = time.perf_counter()
        fn()
        out = min(out, time.perf_counter() - started)
    return out


def main() -> int:
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.INFO))
    logging.disable(logging.WARNING)  # pypdf's warnings on broken PDFs
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--corpus", type=Path, default=default_corpus())
    ap.add_argument("--rounds", type=int, default=3, help="best of N rounds")
    ap.add_argument("--small", action="store_true", help="50 messages, 1 round (CI)")
    args = ap.parse_args()
    files = sorted(args.corpus.glob("*.eml"))
    if not files:
        print(f"no corpus at {args.corpus}", file=sys.stderr)
        return 2
    raws = [f.read_bytes() for f in files]
    labelled = [r["raw"].encode() for r in load(ROOT / "tests/data/reply/labelled.jsonl")]
    if args.small:
        raws, labelled, args.rounds = raws[:50], labelled[:50], 1
    registry = collect(get_plugin_manager(entry_points=False))
    steps = {name: registry.processor(name) for name in STEPS}
    instances = {n: c(c.Options(), ProcessorContext()) for n, c in steps.items()}
    print("| set | messages | step | µs/message | ratio to parse |")
    print("|---|---|---|---|---|")
    for label, batch in (("corpus", raws), ("reply set", labelled)):
        parsed: list[tuple[bytes, Any, Any]] = []
        for raw in batch:
            m = message(raw)
            parse_into(m)
            parsed.append((raw, m.record, m.meta[PAYLOADS_KEY]))
        t_parse = best(args.rounds, lambda p=parsed: [parse_into(message(r)) for r, _, _ in p])  # type: ignore[misc]

        def fresh(p: list[tuple[bytes, Any, Any]] = parsed) -> list[Message]:
            out = []
            for raw, record, payloads in p:
                m = message(raw)
                m.record = copy.deepcopy(record)
                m.meta[PAYLOADS_KEY] = list(payloads)
                m.meta["parsed_headers_only"] = False
                out.append(m)
            return out

        for step in instances.values():  # warm up: lazy imports are not timed
            step.process(fresh()[0])

        n = len(parsed)
        print(f"| {label} | {n} | parse | {t_parse / n * 1e6:,.0f} | 1.00 |")
        for name, step in instances.items():
            total = float("inf")
            for _ in range(args.rounds):
                batch_msgs = fresh()  # copying is not timed
                started = time.perf_counter()
                for m in batch_msgs:
                    step.process(m)
                total = min(total, time.perf_counter() - started)
            print(f"| {label} | {n} | {name} | {total / n * 1e6:,.0f} | "
                  f"{total / t_parse:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
