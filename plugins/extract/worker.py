"""A reader run in a child process, bounded from outside: the child caps its own
address space (``RLIMIT_AS``) before it reads a byte, and the parent kills it when
the time limit passes. Used for PDF, whose reader (pypdf) can inflate and tokenize
one content stream without a check the budget could make.

Protocol: ``python -m mailpipe.plugins.extract.worker FORMAT MAX_CHARS TIMEOUT
MAX_MEMORY``, the attachment's bytes on stdin, one JSON object on stdout:
``{"text": ..., "truncated": ...}`` or ``{"error": ...}``. A fresh interpreter per
attachment (no fork of a threaded parent, no re-import of the caller's main module,
no memory carried from one attachment to the next)."""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
from typing import Final

from .formats import FORMATS, ExtractError, extract_here

#: The default address-space cap of the child (the interpreter and pypdf take ~70 MiB).
DEFAULT_MAX_MEMORY: Final = 256 * 2**20
#: The least cap accepted: the interpreter, mailpipe and pypdf take ~70 MiB of
#: address space before a PDF is read, so below this little is left for it.
MIN_MAX_MEMORY: Final = 128 * 2**20


def run_in_child(fmt_name: str, data: bytes, *, max_chars: int, timeout: float,
                 max_memory: int) -> tuple[str, bool]:
    """(text, truncated) of ``data`` read by a child process limited to
    ``max_memory`` octets of address space and killed after ``timeout`` seconds;
    raises ExtractError (only) when it gives no text."""
    command = [sys.executable, "-m", __name__, fmt_name, str(max_chars), repr(timeout),
               str(max_memory)]
    # the child imports the mailpipe this process imported, wherever it was found
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    try:
        done = subprocess.run(command, input=data, capture_output=True, timeout=timeout,
                              env=env, check=False)
    except subprocess.TimeoutExpired as exc:  # run() killed and reaped the child
        raise ExtractError("time limit reached (the reader process was killed)") from exc
    except OSError as exc:
        raise ExtractError(f"the reader process could not start: {exc}") from exc
    try:
        answer = json.loads(done.stdout)
    except ValueError:
        answer = None
    if not isinstance(answer, dict) or not ("error" in answer or "text" in answer):
        tail = done.stderr.decode("utf-8", "replace").strip().splitlines()[-1:] or [""]
        raise ExtractError(f"the reader process ended with status {done.returncode} "
                           f"and no answer {tail[0][:200]!r}")
    if "error" in answer:
        raise ExtractError(str(answer["error"]))
    return str(answer["text"]), bool(answer.get("truncated"))


def _memory(cap: int) -> str:
    return f"memory limit reached (max_memory, {cap} octets)"


def main(argv: list[str]) -> int:
    """The child: cap the address space, read stdin, answer on stdout."""
    fmt_name, max_chars, timeout, max_memory = argv
    cap = int(max_memory)
    resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
    fmt = next(f for f in FORMATS if f.name == fmt_name)
    answer: dict[str, object]
    try:
        text, truncated = extract_here(fmt, sys.stdin.buffer.read(),
                                       max_chars=int(max_chars), timeout=float(timeout))
        answer = {"text": text, "truncated": truncated}
    except ExtractError as exc:
        answer = {"error": _memory(cap) if isinstance(exc.__cause__, MemoryError)
                  else str(exc)}
    except MemoryError:  # raised outside the reader (reading stdin)
        answer = {"error": _memory(cap)}
    sys.stdout.write(json.dumps(answer))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
