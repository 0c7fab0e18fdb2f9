"""store.sqlite's writer process, the parent's side (issue 18).

With ``group_commit`` and ``writer = "process"`` the store hands each chunk of prepared
rows, as a program of :mod:`._sqlite_writes`, to one child process that writes it in a
transaction of its own while the chain goes on with the next messages: the SQLite work
(statements, FTS5 indexing, the WAL's fsync) runs on another core and outside this
interpreter's GIL, and ``flush()`` waits only for what is still being written.

Contract of :class:`WriterProcess`:

- :meth:`~WriterProcess.submit` queues a program and returns its sequence number at
  once; a sender thread writes it to the child's stdin. The child runs programs in
  submission order, each committed (durable) or rolled back as a whole.
- :meth:`~WriterProcess.wait` returns a program's outcome (``None``: committed; else the
  error, rebuilt by :func:`rebuild`) once it and every earlier program are answered;
  :meth:`~WriterProcess.wait_all` returns the outcomes of every unanswered program.
  Outcomes read while waiting for another program are kept until asked for.
- At most ``max_pending`` octets of programs are unanswered: ``submit`` first reads
  answers (waits) until the new one fits (memory bound, with the store's MAX_HELD).
- The child's death (killed, out of memory, a crash) fails every unanswered program with
  a :class:`~mailpipe.errors.TemporaryFailure`; the next ``submit`` starts a new child.
  The parent's death closes the child's stdin: the child finishes the program it has
  read in full and exits (a program cut short is never run).
- :meth:`~WriterProcess.close` waits for every answer, ends the child and returns the
  outcomes not yet asked for.

The child is ``python -I -S`` running :mod:`._sqlite_writes` as a script: the standard
library only, no site-packages, no mailpipe import, so it starts in a few milliseconds
of CPU. It is started at the first ``submit``, never by ``open()``.

Not thread-safe: the store calls it under its own lock.
"""

from __future__ import annotations

import queue
import select
import sqlite3
import subprocess
import sys
import threading
from collections.abc import Sequence
from typing import IO, Any, Final

from mailpipe.errors import TemporaryFailure

from . import _sqlite_writes
from ._sqlite_writes import Op, frame, read_frame

#: How long close() waits for the child to exit after its stdin is closed (it has
#: answered everything by then) before killing it.
EXIT_TIMEOUT: Final = 10.0


def rebuild(info: Sequence[Any]) -> BaseException:
    """The exception the child described (:func:`._sqlite_writes.describe`): an sqlite3
    error of the same class with its text, error name and code (so the store classifies
    it as it would in-process), anything else a TemporaryFailure naming it."""
    module, name, text, errorname, errorcode = info
    cls = getattr(sqlite3, name, None) if module == "sqlite3" else None
    if isinstance(cls, type) and issubclass(cls, sqlite3.Error):
        exc = cls(text)
        exc.sqlite_errorname = errorname
        exc.sqlite_errorcode = errorcode
        return exc
    return TemporaryFailure(f"store.sqlite writer process: {name}: {text}")


class WriterProcess:
    """One child process writing programs to the database at ``path`` (see the module
    docstring for the contract)."""

    def __init__(self, path: str, busy_timeout: float, max_pending: int) -> None:
        self.path = path
        self.busy_timeout = busy_timeout
        self.max_pending = max_pending
        self._proc: subprocess.Popen[bytes] | None = None
        self._replies: IO[bytes] | None = None
        self._sender: threading.Thread | None = None
        self._outbox: queue.SimpleQueue[tuple[bytes, bytes] | None] = (
            queue.SimpleQueue()
        )
        self._seq = 0
        self._pending: dict[int, int] = {}  # seq -> octets, unanswered
        self._pending_octets = 0
        self._outcomes: dict[int, BaseException | None] = {}

    @property
    def pid(self) -> int | None:
        """The running child's process id (None before the first submit)."""
        return self._proc.pid if self._proc is not None else None

    def submit(self, program: Sequence[Op], octets: int) -> int:
        """Queue ``program`` (``octets``: what it holds, for the memory bound) and
        return its sequence number. Raises (a TemporaryFailure) when no child can be
        started; the program is then not pending (nothing waits for its answer)."""
        if self._proc is not None and self._proc.poll() is not None:
            self._reap()  # (it died since: not with this program)
        if self._proc is None:
            self._start()
        self._drain()
        while self._pending and self._pending_octets + octets > self.max_pending:
            self._read_one()
        parts = frame((self._seq + 1, list(program)))
        if self._proc is None:  # (the child died while we read its answers)
            self._start()  # (before the program is pending: it may raise)
        self._seq += 1
        seq = self._seq
        self._pending[seq] = octets
        self._pending_octets += octets
        self._outbox.put(parts)
        return seq

    def wait(self, seq: int) -> BaseException | None:
        """The outcome of program ``seq`` (None: committed), once answered."""
        while seq in self._pending:
            self._read_one()
        return self._outcomes.pop(seq, None)

    def wait_all(self) -> dict[int, BaseException | None]:
        """The outcomes of every program not yet asked for, once all are answered."""
        while self._pending:
            self._read_one()
        outcomes, self._outcomes = self._outcomes, {}
        return outcomes

    def close(self) -> dict[int, BaseException | None]:
        """Wait for every answer, end the child; the outcomes not yet asked for."""
        outcomes = self.wait_all()
        self._stop()
        return outcomes

    # -- the child -----------------------------------------------------------------

    def _start(self) -> None:
        if not sys.executable:
            raise TemporaryFailure(
                "store.sqlite: no Python interpreter to start the writer process "
                "(sys.executable is empty); set writer = \"thread\""
            )
        try:
            proc = subprocess.Popen(  # (our own interpreter and module)
                [sys.executable, "-I", "-S", _sqlite_writes.__file__, self.path,
                 repr(float(self.busy_timeout))],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                bufsize=0,
            )
        except OSError as exc:  # (no process or descriptor left: the environment)
            raise TemporaryFailure(
                f"store.sqlite {self.path}: the writer process could not start: {exc} "
                '(retried; writer = "thread" writes in the step\'s thread instead)'
            ) from exc
        assert proc.stdin is not None and proc.stdout is not None
        self._proc = proc
        self._replies = proc.stdout
        self._outbox = queue.SimpleQueue()
        self._sender = threading.Thread(
            target=_send_frames,
            args=(proc.stdin, self._outbox),
            name=f"store.sqlite-writer-{proc.pid}",
            daemon=True,
        )
        self._sender.start()

    def _read_one(self) -> None:
        """Read one answer (blocking); at the child's end, fail every pending program."""
        assert self._replies is not None
        reply = read_frame(self._replies)
        if reply is None:
            self._died()
            return
        seq, error = reply
        octets = self._pending.pop(seq, 0)
        self._pending_octets -= octets
        self._outcomes[seq] = rebuild(error) if error is not None else None

    def _reap(self) -> None:
        """The child has exited: read the answers it gave, then its end (which fails
        what it had not answered)."""
        while self._proc is not None:
            self._read_one()

    def _drain(self) -> None:
        """Read the answers already there (frames are small and written whole).
        poll(), not select(): the pipe's descriptor may be past FD_SETSIZE."""
        replies = self._replies
        if replies is None:
            return
        poller = select.poll()
        poller.register(replies, select.POLLIN)
        while self._pending and self._replies is replies and poller.poll(0):
            self._read_one()

    def _died(self) -> None:
        code = self._stop()
        failure = TemporaryFailure(
            f"store.sqlite writer process ended (exit status {code}) before answering"
        )
        for seq in self._pending:
            self._outcomes[seq] = failure
        self._pending.clear()
        self._pending_octets = 0

    def _stop(self) -> int | None:
        proc, self._proc = self._proc, None
        if proc is None:
            return None
        self._outbox.put(None)  # the sender closes the child's stdin
        if self._sender is not None:
            self._sender.join(EXIT_TIMEOUT)
        try:
            code = proc.wait(EXIT_TIMEOUT)
        except subprocess.TimeoutExpired:
            proc.kill()
            code = proc.wait()
        if self._replies is not None:
            self._replies.close()
            self._replies = None
        return code


def _send_frames(
    stdin: IO[bytes], outbox: queue.SimpleQueue[tuple[bytes, bytes] | None]
) -> None:
    """The sender thread: write each frame to the child's stdin, in order; at
    ``None`` (or when the child is gone) close it."""
    try:
        while (parts := outbox.get()) is not None:
            for part in parts:
                view = memoryview(part)
                while view:
                    written = stdin.write(view)
                    view = view[written or 0 :]
    except OSError:
        pass  # the child is gone: its answers' end fails what is pending
    finally:
        try:
            stdin.close()
        except OSError:
            pass

