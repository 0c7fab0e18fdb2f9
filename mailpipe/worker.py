"""A processor's synchronous calls, off the event loop, on threads of its own, in a budget.

One CPU-bound message (a parser on a hostile MIME tree, a store naming thousands of
files) must not stall the other mailboxes, nor a SIGTERM, which all share the event
loop. So the chain hands every synchronous processor method to the step's
:class:`StepWorker`: daemon threads dedicated to that step. A step that is not
``concurrent`` has its calls serialised by the chain, so it keeps to one thread; a
``concurrent`` one (``parse``, ``filter``) gets a thread per call in flight, so one
message's long parse does not hold up another mailbox's.

Why threads of each step's own, and not ``asyncio.to_thread`` or a process pool:

* the GIL makes a pool of threads no faster for CPU-bound Python than one thread;
  what matters is that the loop stays free, which any thread gives;
* processors keep connections and buffers (a SQLite connection, a group transaction)
  that cannot be pickled to another process, and the message itself would have to be
  copied there and back; a process pool fits only pure functions;
* a serialised step keeps all its calls on one thread (open, process, flush and
  close alike) unless a call runs away, so thread-bound libraries keep working;
* the threads are daemon threads of our own: the default executor (``to_thread``) is
  joined when ``asyncio.run`` ends and ``concurrent.futures`` threads when the
  interpreter exits, so a runaway call there would delay the exit without bound.

A thread cannot be killed. When a call runs past its :class:`Budget`, the awaiting
coroutine gets :class:`~mailpipe.errors.BudgetExceeded` (the chain fails that message
permanently: it is quarantined at once and the pipeline moves on). A budget that runs
out before the thread began the call (the thread starved of CPU) abandons nothing:
the call never begins, the thread stays the step's, and the error is not ``final``
(the message is retried, the attempt counted). The thread is
abandoned, never reused: it finishes the call on its own and then exits, and its
result is dropped; the step's next call runs on another thread. At process exit an
abandoned thread still running is stopped with the interpreter (daemon), so a SIGTERM
waits at most for the budget of the message in hand, plus a budget for each step's
``flush()``, plus the close grace of each step.

While an abandoned call of a serial step still runs, the processor may hold its own
locks: a later call that then also runs out of budget raises
:class:`~mailpipe.errors.TemporaryFailure` instead (retried later, no attempt counted),
so innocent messages are not quarantined behind the runaway one. A ``concurrent`` step
shares nothing between calls, so its every overrun is the message's own
(:class:`~mailpipe.errors.BudgetExceeded`). A call is never started once the budget is
spent.
"""

from __future__ import annotations

import asyncio
import contextvars
import itertools
import queue
import threading
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Final, TypeVar, cast

import structlog

from mailpipe.errors import BudgetExceeded, TemporaryFailure

log = structlog.get_logger()

T = TypeVar("T")


#: What a call's waiter holds: the exception it raised (None if none) and its result.
_Outcome = tuple[BaseException | None, Any]


class _Job:
    """One call handed to a thread: run ``fn``, hand its outcome to ``waiter``.

    Exactly one of the thread (:meth:`claim`, the call begins) and the caller
    (:meth:`cancel`, the call must not begin) wins the job's token: ``list.pop`` is
    atomic under the GIL, so no lock is taken per call. The outcome reaches the event
    loop in one ``call_soon_threadsafe`` (one wake-up of the loop per call).
    """

    __slots__ = ("_token", "fn", "loop", "waiter")

    def __init__(
        self,
        fn: Callable[[], Any],
        loop: asyncio.AbstractEventLoop,
        waiter: asyncio.Future[_Outcome],
    ) -> None:
        self.fn = fn
        self.loop = loop
        self.waiter = waiter
        self._token = [None]

    def claim(self) -> bool:
        """Take the token to begin the call; False when the caller cancelled it."""
        try:
            self._token.pop()
        except IndexError:
            return False
        return True

    def cancel(self) -> bool:
        """Take the token so the call never begins; False when it already began."""
        return self.claim()


def _deliver(waiter: asyncio.Future[_Outcome], error: BaseException | None, result: Any) -> None:
    """On the loop: the call's outcome, unless the caller stopped waiting (budget
    expired, cancelled).

    The outcome is the waiter's *result* even when the call raised: the caller raises
    it in its own frame. A future's exception would be thrown into the awaiting task's
    coroutine, and a thrown ``GeneratorExit`` closes the coroutines it passes instead
    of reaching the chain's isolation of the processor's failure.
    """
    if not waiter.done():
        waiter.set_result((error, result))


def _expire(waiter: asyncio.Future[_Outcome]) -> None:
    """On the loop: the call ran past its budget."""
    if not waiter.done():
        waiter.set_result((_EXPIRED, None))


class _Expired(Exception):
    """The budget of the call in hand ran out (internal to :meth:`StepWorker.call`)."""


_EXPIRED: Final = _Expired()


@dataclass(slots=True)
class Budget:
    """Time left for one message's synchronous calls (``seconds`` was the whole)."""

    seconds: float
    left: float = field(default=-1.0)
    name: str = "processing_budget"

    def __post_init__(self) -> None:
        if self.left < 0:
            self.left = self.seconds


class _Thread:
    """One daemon thread running the jobs put on its queue until told to stop."""

    def __init__(self, name: str) -> None:
        self.queue: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self.thread = threading.Thread(target=self._run, name=name, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while True:
            job = self.queue.get()
            if job is None:
                return
            if not job.claim():
                continue  # the caller gave up before the call began
            error: BaseException | None = None
            result: Any = None
            try:
                result = job.fn()
            except BaseException as exc:
                error = exc
            try:
                job.loop.call_soon_threadsafe(_deliver, job.waiter, error, result)
            except RuntimeError:  # the loop is closed: nobody waits any more
                return
            del job, error, result  # hold no message past its call

    def stop(self) -> None:
        """Exit after the job in hand, if any."""
        self.queue.put(None)


class StepWorker:
    """Runs one step's synchronous calls on threads of its own (see the module doc).

    A call takes an idle thread of the step, or starts one when all are busy (only
    a step declared ``concurrent`` has several calls at once, so any other keeps
    one thread); the thread is idle again when the call returns, abandoned when
    it runs past its budget.
    """

    _ids = itertools.count(1)

    def __init__(self, name: str, *, serial: bool = True) -> None:
        self.name = name
        # Serial steps (not ``concurrent``) run one call at a time: a call that starts
        # while an abandoned one still runs may have waited behind it. Concurrent
        # steps share nothing between calls, so each overrun is the message's own.
        self.serial = serial
        self._idle: list[_Thread] = []
        self._abandoned: list[_Thread] = []

    @property
    def abandoned(self) -> int:
        """How many abandoned calls of this step are still running."""
        self._abandoned = [t for t in self._abandoned if t.thread.is_alive()]
        return len(self._abandoned)

    async def call(self, fn: Callable[[], T], *, budget: Budget | None = None) -> T:
        """Run ``fn()`` on a thread of the step and return its result (or raise).

        The budget runs from the moment the call is handed to the thread, which is
        idle then (an idle thread of the step's, or a new one: the call begins at
        once), and ``budget.left`` is reduced by the time taken. Past it,
        :class:`BudgetExceeded` is raised and the thread abandoned;
        :class:`TemporaryFailure` instead when an earlier abandoned call of this
        step was still running when this one was handed over. When the thread had
        not begun the call (starved), it never will and is not abandoned; the
        ``BudgetExceeded`` then says "not started" and is not ``final``. A caller cancelled
        while the call runs leaves it to finish unawaited on its thread; one
        cancelled before the call began keeps it from beginning.

        The loop is woken once per call, by its outcome (or by the budget's timer).
        """
        if budget is not None and budget.left <= 0:
            # Spent by earlier steps: never start a call that would be abandoned at
            # once while its side effect goes on (review of issue 20 item 4).
            raise BudgetExceeded(
                f"{self.name} not started: the {budget.name} of {budget.seconds:g} s "
                "was spent by earlier steps",
                processor=self.name,
            )
        loop = asyncio.get_running_loop()
        busy = self.serial and bool(self._abandoned) and self.abandoned > 0
        thread = self._idle.pop() if self._idle else self._new_thread()
        waiter: asyncio.Future[_Outcome] = loop.create_future()
        in_context = contextvars.copy_context().run  # log fields bound by the caller
        job = _Job(partial(in_context, fn), loop, waiter)
        timer = None if budget is None else loop.call_later(budget.left, _expire, waiter)
        began = time.monotonic()
        thread.queue.put(job)
        reuse = False
        error: BaseException | None = None
        try:
            error, result = await waiter
            if error is None:
                reuse = True
                return cast(T, result)
            if error is _EXPIRED:
                assert budget is not None
                if job.cancel():  # not begun yet (a starved thread): it never will
                    reuse = True  # the thread skips the job: idle, nothing to abandon
                    raise self._not_begun(budget, busy=busy)
                self._abandon(thread)
                if busy:
                    raise TemporaryFailure(
                        f"{self.name} ran out of its {budget.name} while an earlier "
                        "call that exceeded it was still running; retried later"
                    )
                raise BudgetExceeded(
                    f"{self.name} exceeded the {budget.name} of {budget.seconds:g} s; "
                    "the call was abandoned (its thread finishes on its own)",
                    processor=self.name,
                )
            # The call itself raised an Exception: its thread is free again. Not
            # after a BaseException (SystemExit, a CancelledError of its own...).
            reuse = isinstance(error, Exception)
            raise error
        except asyncio.CancelledError:
            job.cancel()  # skipped if not begun; else it finishes unawaited
            raise
        finally:
            # A raised error's traceback holds this frame, and the waiter (also held by
            # the job) holds the error: keep no cycle past the call, or the message in
            # the processor's frames lives on until the cyclic collector runs.
            error = None
            del job, waiter
            if timer is not None:
                timer.cancel()
            if budget is not None:
                budget.left -= time.monotonic() - began
            if reuse:
                self._idle.append(thread)
            elif thread not in self._abandoned:
                thread.stop()

    def _not_begun(self, budget: Budget, *, busy: bool) -> Exception:
        """The error of a call whose budget ran out before its thread began it
        (issue 18 review): nothing of it ran and no thread is abandoned. Behind an
        abandoned call of a serial step, :class:`TemporaryFailure` as for a call that
        began; else :class:`BudgetExceeded`, not ``final``: the message is retried,
        the attempt counted."""
        log.warning("step_call_not_started", step=self.name, budget=budget.seconds)
        if busy:
            return TemporaryFailure(
                f"{self.name} not started: its {budget.name} ran out while an earlier "
                "call that exceeded it was still running; retried later"
            )
        return BudgetExceeded(
            f"{self.name} not started: the {budget.name} of {budget.seconds:g} s ran "
            "out before the step's thread could begin the call; retried",
            processor=self.name,
            final=False,
        )

    def _new_thread(self) -> _Thread:
        thread = _Thread(f"mailpipe-step-{next(self._ids)}:{self.name}")
        # A worker dropped without shutdown() (a chain never closed) lets its idle
        # threads go too.
        weakref.finalize(self, thread.stop)
        return thread

    def _abandon(self, thread: _Thread) -> None:
        """Leave ``thread`` to its runaway call: it exits when the call ends."""
        thread.stop()
        self._abandoned.append(thread)
        log.warning("step_call_abandoned", step=self.name, thread=thread.thread.name)

    def shutdown(self) -> None:
        """Let the idle threads exit (an abandoned one still finishes on its own)."""
        while self._idle:
            self._idle.pop().stop()
