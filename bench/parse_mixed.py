"""Benchmark: CPU of `parse` alone on bench/run's ``mixed`` messages, as the processor
parses them: a message over the spool threshold (1 MB) from its file (parse_file),
every other one from memory (parse_message). Prints best-of-N CPU seconds of each path.

Usage: python bench/parse_mixed.py [--count N] [--rounds N] [--seed N] [--small]
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import tempfile
import time
from pathlib import Path

from mailpipe.plugins.parse import SpooledPayload, parse_file, parse_message

HERE = Path(__file__).resolve().parent
SPOOL_THRESHOLD = 1_000_000  # the scheduler's default spool_threshold


def make_messages(count: int, seed: int) -> list[bytes]:
    """bench/run.py's ``mixed`` messages 0..count-1 (the same bytes as its corpus)."""
    spec = importlib.util.spec_from_file_location("bench_run", HERE / "run.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_run"] = module
    spec.loader.exec_module(module)
    return [module.make_message("mixed", seed, i) for i in range(count)]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--count", type=int, default=1000)
    ap.add_argument("--rounds", type=int, default=3, help="best of N rounds")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--small", action="store_true", help="100 messages, 1 round (CI)")
    args = ap.parse_args()
    if args.small:
        args.count, args.rounds = 100, 1
    messages = make_messages(args.count, args.seed)
    with tempfile.TemporaryDirectory() as tmp:
        spool = Path(tmp)
        files = []
        for i, raw in enumerate(messages):
            if len(raw) > SPOOL_THRESHOLD:
                path = spool / f"{i}.eml"
                path.write_bytes(raw)
                files.append(path)
        small = [raw for raw in messages if len(raw) <= SPOOL_THRESHOLD]
        parse_message(small[0])  # warm imports and caches
        best_file = best_memory = float("inf")
        for _ in range(args.rounds):
            started = time.process_time()
            for path in files:
                with path.open("rb") as f:
                    _, payloads = parse_file(f, spool_dir=spool)
                for payload in payloads:
                    if isinstance(payload, SpooledPayload):
                        payload.file.close()
            best_file = min(best_file, time.process_time() - started)
            started = time.process_time()
            for raw in small:
                parse_message(raw)
            best_memory = min(best_memory, time.process_time() - started)
    big = sum(len(raw) for raw in messages) - sum(map(len, small))
    print(f"mixed: {len(messages)} messages, seed {args.seed}, best of {args.rounds}")
    print(f"{'path':14}{'messages':>10}{'MB':>8}{'CPU s':>8}{'MB/s':>8}")
    for label, n, octets, cpu in (
        ("parse_file", len(files), big, best_file),
        ("parse_message", len(small), sum(map(len, small)), best_memory),
    ):
        rate = octets / 1e6 / cpu if cpu > 0 else 0.0
        print(f"{label:14}{n:10}{octets / 1e6:8.1f}{cpu:8.3f}{rate:8.1f}")
    total = best_file + best_memory
    print(f"{'both':14}{len(messages):10}{(big + sum(map(len, small))) / 1e6:8.1f}"
          f"{total:8.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
