"""A processor's synchronous calls, off the event loop, on a thread of its own, in a budget.

One CPU-bound message (a parser on a hostile MIME tree, a store naming thousands of
files) must not stall the other mailboxes, nor a SIGTERM, which all share the event
loop. So the chain hands every synchronous processor method to a :class:`StepWorker`:
one dedicated daemon thread per chain step, which runs that step's calls one at a time,
in order.

Why a thread per step, and not ``asyncio.to_thread`` or a process pool:

* the GIL makes a pool of threads no faster for CPU-bound Python than one thread;
  what matters is that the loop stays free, which any thread gives;
* processors keep connections and buffers (a SQLite connection, a group transaction)
  that cannot be pickled to another process, and the message itself would have to be
  copied there and back; a process pool fits only pure functions;
* one thread per step keeps a processor's calls on one thread (open, process, flush
  and close alike) unless a call runs away, so thread-bound libraries keep working;
* the threads are daemon threads of our own: the default executor (``to_thread``) is
  joined when ``asyncio.run`` ends and ``concurrent.futures`` threads when the
  interpreter exits, so a runaway call there would delay the exit without bound.

A thread cannot be killed. When a call runs past its :class:`Budget`, the awaiting
coroutine gets :class:`~mailpipe.errors.BudgetExceeded` (the chain fails that message
permanently: it is quarantined at once and the pipeline moves on). The thread is
abandoned, never reused: it finishes the call on its own and then exits, and its
result is dropped; the step's next call runs on a new thread. At process exit an
abandoned thread still running is stopped with the interpreter (daemon), so a SIGTERM
waits at most for the budget of the message in hand plus the close grace.

While an abandoned call of a step still runs, the processor may hold its own locks: a
later call that then also runs out of budget raises
:class:`~mailpipe.errors.TemporaryFailure` instead (retried later, no attempt counted),
so innocent messages are not quarantined behind the runaway one.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextvars
import itertools
import queue
import threading
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any, TypeVar

import structlog

from mailpipe.errors import BudgetExceeded, TemporaryFailure

log = structlog.get_logger()

T = TypeVar("T")

_Job = tuple[
    Callable[[], Any],
    "concurrent.futures.Future[Any]",
    asyncio.AbstractEventLoop,
    "asyncio.Future[None]",
]


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
    """One daemon thread taking jobs from its own queue until told to stop."""

    def __init__(self, name: str) -> None:
        self.queue: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self.retired = False
        self.thread = threading.Thread(target=self._run, name=name, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.retired:
            job = self.queue.get()
            if job is None:
                return
            fn, future, loop, started = job
            if not future.set_running_or_notify_cancel():
                continue  # the caller gave up before the call began
            try:
                loop.call_soon_threadsafe(_resolve, started)
            except RuntimeError:  # the loop is closed: nobody waits any more
                return
            try:
                result = fn()
            except BaseException as exc:
                future.set_exception(exc)
            else:
                future.set_result(result)


def _resolve(started: asyncio.Future[None]) -> None:
    if not started.done():
        started.set_result(None)


class StepWorker:
    """Runs one step's synchronous calls on its dedicated thread (see the module doc)."""

    _ids = itertools.count(1)

    def __init__(self, name: str) -> None:
        self.name = name
        self._thread: _Thread | None = None
        self._abandoned: list[_Thread] = []

    @property
    def abandoned(self) -> int:
        """How many abandoned calls of this step are still running."""
        self._abandoned = [t for t in self._abandoned if t.thread.is_alive()]
        return len(self._abandoned)

    async def call(self, fn: Callable[[], T], *, budget: Budget | None = None) -> T:
        """Run ``fn()`` on the worker thread and return its result (or raise its error).

        The budget runs from the moment the thread starts the call (waiting behind
        another call does not count) and ``budget.left`` is reduced by the time
        taken. Past it, :class:`BudgetExceeded` is raised and the thread abandoned;
        :class:`TemporaryFailure` instead when an earlier abandoned call of this step
        was still running when this one began. Cancelling the caller before the call
        starts skips it; after, the call runs to its end unawaited.
        """
        loop = asyncio.get_running_loop()
        if self._thread is None:
            self._thread = self._new_thread()
        future: concurrent.futures.Future[T] = concurrent.futures.Future()
        started: asyncio.Future[None] = loop.create_future()
        in_context = contextvars.copy_context().run  # log fields bound by the caller
        self._thread.queue.put((partial(in_context, fn), future, loop, started))
        try:
            await started
        except asyncio.CancelledError:
            future.cancel()
            raise
        busy = self.abandoned > 0
        began = time.monotonic()
        wrapped = asyncio.wrap_future(future)
        try:
            if budget is None:
                return await wrapped
            try:
                return await asyncio.wait_for(wrapped, max(budget.left, 0.0))
            except TimeoutError:
                self._abandon()
                if busy:
                    raise TemporaryFailure(
                        f"{self.name} ran out of its {budget.name} while an earlier "
                        "call that exceeded it was still running; retried later"
                    ) from None
                raise BudgetExceeded(
                    f"{self.name} exceeded the {budget.name} of {budget.seconds:g} s; "
                    "the call was abandoned (its thread finishes on its own)",
                    processor=self.name,
                ) from None
        finally:
            if budget is not None:
                budget.left -= time.monotonic() - began

    def _new_thread(self) -> _Thread:
        thread = _Thread(f"mailpipe-step-{next(self._ids)}:{self.name}")
        # A worker dropped without shutdown() (a chain never closed) lets its idle
        # thread go too.
        weakref.finalize(self, thread.queue.put, None)
        return thread

    def _abandon(self) -> None:
        """Leave the current thread to its runaway call; queued calls move on."""
        old = self._thread
        if old is None:
            return
        old.retired = True
        self._abandoned.append(old)
        self._thread = new = self._new_thread()
        while True:
            try:
                job = old.queue.get_nowait()
            except queue.Empty:
                break
            if job is not None:
                new.queue.put(job)
        old.queue.put(None)
        log.warning("step_call_abandoned", step=self.name, thread=old.thread.name)

    def shutdown(self) -> None:
        """Let the idle thread exit (an abandoned one still finishes on its own)."""
        if self._thread is not None:
            self._thread.queue.put(None)  # after any call already queued
            self._thread = None
