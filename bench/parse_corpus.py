"""Benchmark: parse over the corpus (messages/s, MB/s) beside a stdlib-only baseline.

Baseline: ``BytesParser(policy=default).parsebytes(raw)`` plus ``get_body()``. The parse
processor's target is to stay within 2x of it while doing its extra work (every header
decoded, addresses, charsets, attachments hashed, uuencode/TNEF expanded).

Usage: python bench/parse_corpus.py [--corpus DIR] [--rounds N] [--small]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable
from email import policy
from email.parser import BytesParser
from pathlib import Path

from mailpipe.plugins.parse import parse_message


def default_corpus() -> Path:
    env = os.environ.get("MAILPIPE_CORPUS")
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[2] / "shared" / "corpus"


def baseline(raw: bytes) -> None:
    msg = BytesParser(policy=policy.default).parsebytes(raw)
    try:
        msg.get_body()  # type: ignore[attr-defined]
    except Exception:
        pass  # the stdlib raises on some real mail; the baseline only times it


def ours(raw: bytes) -> None:
    parse_message(raw)


def run(
    fn: Callable[[bytes], None], corpus: list[bytes], rounds: int
) -> tuple[float, float]:
    """Best wall seconds and best CPU seconds (this process) of ``rounds`` passes."""
    best = best_cpu = float("inf")
    for _ in range(rounds):
        started, cpu = time.perf_counter(), time.process_time()
        for raw in corpus:
            fn(raw)
        best = min(best, time.perf_counter() - started)
        best_cpu = min(best_cpu, time.process_time() - cpu)
    return best, best_cpu


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--corpus", type=Path, default=default_corpus())
    ap.add_argument("--rounds", type=int, default=3, help="best of N rounds")
    ap.add_argument("--small", action="store_true", help="50 messages, 1 round (CI)")
    args = ap.parse_args()
    files = sorted(args.corpus.glob("*.eml"))
    if not files:
        print(f"no corpus at {args.corpus}; nothing to measure")
        return 0
    if args.small:
        files, args.rounds = files[:50], 1
    corpus = [f.read_bytes() for f in files]
    n, octets = len(corpus), sum(map(len, corpus))
    ours(corpus[0])  # warm imports and caches
    baseline(corpus[0])
    results = [
        ("stdlib baseline", run(baseline, corpus, args.rounds)),
        ("mailpipe parse", run(ours, corpus, args.rounds)),
    ]
    base = results[0][1][0]
    print(f"corpus: {n} messages, {octets / 1e6:.2f} MB, best of {args.rounds}")
    print(f"{'':18}{'seconds':>10}{'msg/s':>10}{'MB/s':>8}{'x base':>8}{'CPU s':>8}")
    for label, (secs, cpu) in results:
        print(
            f"{label:18}{secs:10.3f}{n / secs:10.0f}{octets / 1e6 / secs:8.2f}"
            f"{secs / base:8.2f}{cpu:8.3f}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
