"""Runs a message through its pipeline: ordered steps, routing, per-step isolation.

The chain is an explicit list from the config, never pluggy's call order. A processor
exception never escapes :meth:`Chain.run`: it is captured in the result, so one bad
message cannot stop the others. Steps already committed for a message (from the journal)
are skipped on a re-run, so a crash between ``store`` and ``forward`` stores nothing twice.

Synchronous processor methods run off the event loop, each step on a thread of its own
(:mod:`mailpipe.worker`), so one CPU-bound message never stalls the other mailboxes;
a message's synchronous calls share its pipeline's ``processing_budget``, past which
the message fails for good (:class:`~mailpipe.errors.BudgetExceeded`, ``final``).
"""

from __future__ import annotations

import asyncio
import inspect
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import structlog

from mailpipe.config import StepSpec
from mailpipe.errors import BudgetExceeded, PluginError, TemporaryFailure
from mailpipe.message import Message
from mailpipe.prerequisites import check_prerequisites
from mailpipe.processor import LATER, Decision, Disposition, ProcessorContext, normalise
from mailpipe.worker import Budget, StepWorker

if TYPE_CHECKING:
    from mailpipe.config import Config

log = structlog.get_logger()

MAX_ROUTES = 16  # a route loop is a config bug; stop it instead of spinning
#: Seconds of synchronous processing per message when no budget is configured
#: (the default of ``[pipelines.NAME] processing_budget``).
DEFAULT_BUDGET = 60.0
#: At most this long (or the budget, if shorter) for each processor's ``close()``.
CLOSE_GRACE = 10.0

#: At most this many calls of ``concurrent`` steps run on their threads at once, over
#: all mailboxes (issue 18 review): a ``processing_budget`` is wall-clock time, so 64
#: polls each parsing on its own thread would share the GIL 64 ways and quarantine
#: healthy messages as runaways. A call waits for a slot before its budget starts, as
#: a serial step's call waits for the step's lock; coroutine methods take no slot.
CPU_SLOTS = max(1, os.cpu_count() or 1)

#: At most this many ``process_nowait`` calls in a row on the event loop without
#: yielding to it (issue 18 review): a chain whose steps all finish there never
#: waits, so a run of such messages would hold the loop, other mailboxes' polls and
#: a SIGTERM's handling, for as long as the run lasts.
NOWAIT_RUN = 32


async def maybe_await(value: Any) -> Any:
    """Await ``value`` if it is awaitable, else return it (datasette's await_me_maybe)."""
    if inspect.isawaitable(value):
        return await value
    return value


@dataclass(slots=True)
class Step:
    """A live chain step: its id (``pipeline/step``), processor instance and flags."""

    id: str
    use: str
    processor: Any
    commits: bool
    idempotent: bool
    header_only: bool
    transparent: bool
    has_prefetch: bool
    has_flush: bool
    lock: asyncio.Lock | None = None
    #: The processor's ``process_nowait`` (see :class:`~mailpipe.processor.Processor`).
    nowait: Callable[[Message], Any] | None = None
    #: For a ``concurrent`` step: the chain's shared slots (see :data:`CPU_SLOTS`).
    slots: asyncio.Semaphore | None = None
    #: The chain's count of on-the-loop calls since it last yielded (shared).
    turns: LoopTurns | None = None
    flush_failures: int = 0  # failed flush() calls so far (see ChainResult.flush_epoch)
    #: One flush at a time, its failure counted before the next starts: a flush that
    #: finds the buffer another mailbox's failed flush just rolled back must see that
    #: failure in :meth:`Chain.flushed` (MP-04: acknowledged only once durable).
    flush_guard: asyncio.Lock = field(default_factory=asyncio.Lock)
    budget: float = DEFAULT_BUDGET  # its pipeline's processing_budget, in seconds
    worker: StepWorker = field(init=False)

    def __post_init__(self) -> None:
        self.worker = StepWorker(self.id, serial=self.lock is not None)

    async def call(self, method: str, *args: Any, budget: Budget | None = None) -> Any:
        """Call the processor's ``method``: a coroutine function on the event loop,
        anything else on the step's worker thread within ``budget`` (an awaitable it
        returns is then awaited on the loop)."""
        if method == "process" and self.nowait is not None and (
            budget is None or budget.left > 0
        ):
            # On the loop when it can be done without waiting (no thread hand-over);
            # never once the budget is spent: the worker refuses to start the call.
            if self.turns is not None and self.turns.due():
                # Before the call, so that a cancellation here has changed nothing.
                await asyncio.sleep(0)
            raw = self.nowait(*args)
            if raw is not LATER:
                if raw is not None and inspect.isawaitable(raw):
                    raise _not_synchronous(self, raw)
                return raw
        fn = getattr(self.processor, method)
        if inspect.iscoroutinefunction(fn):
            return await fn(*args)
        if self.turns is not None:
            self.turns.run = 0  # the hand-over to the thread yields to the loop
        return await maybe_await(await self.worker.call(partial(fn, *args), budget=budget))

    async def gated(self, method: str, *args: Any, budget: Budget | None = None) -> Any:
        """:meth:`call` once the step may run it: a serial step's lock (one call per
        instance at a time), or for a ``concurrent`` step's thread one of the chain's
        :data:`CPU_SLOTS`. The wait is not charged to ``budget``."""
        if self.lock is not None:
            async with self.lock:
                return await self.call(method, *args, budget=budget)
        if self.slots is not None and not inspect.iscoroutinefunction(
            getattr(self.processor, method)
        ):
            async with self.slots:
                return await self.call(method, *args, budget=budget)
        return await self.call(method, *args, budget=budget)


class LoopTurns:
    """How many ``process_nowait`` calls ran on the loop since the chain last
    yielded to it; shared by the steps of a chain (see :data:`NOWAIT_RUN`)."""

    __slots__ = ("run",)

    def __init__(self) -> None:
        self.run = 0

    def due(self) -> bool:
        """Count one more call; True (and the count restarts) when the caller must
        yield to the loop before making it."""
        self.run += 1
        if self.run <= NOWAIT_RUN:
            return False
        self.run = 1
        return True


@dataclass(slots=True)
class ChainResult:
    """What happened to one message in the chain.

    ``decision`` is final (``on_complete`` applied when nobody decided). ``committed``
    lists step ids whose side effects are durable, ``pending`` those waiting for
    ``flush()`` (group commit). On failure ``error`` is set, ``failed_step`` names the
    step and ``temporary`` says whether it was a :class:`TemporaryFailure`; ``final``
    says that the message must not be retried at all (a step ran past the
    ``processing_budget`` and was abandoned: its outcome is unknown, a retry could
    repeat its side effect and would cost the budget again): quarantine it now. A
    budget that ran out before the step's thread began the call is not ``final``
    (see :class:`~mailpipe.errors.BudgetExceeded`).
    """

    decision: Decision | None = None
    committed: list[str] = field(default_factory=list)
    pending: list[str] = field(default_factory=list)
    error: BaseException | None = None
    failed_step: str = ""
    temporary: bool = False
    final: bool = False
    #: ``Step.flush_failures`` of each pending step when it ran: a flush failure since
    #: (whichever mailbox's group commit saw it) may have rolled this write back.
    flush_epoch: dict[str, int] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        """True when the chain finished without an exception."""
        return self.error is None


class Chain:
    """Every pipeline of a config, instantiated: ``run(pipeline, message)``."""

    def __init__(
        self,
        pipelines: dict[str, list[StepSpec]],
        *,
        base_dir: Path,
        on_complete: dict[str, str] | None = None,
        budgets: dict[str, float] | None = None,
        dry_run: bool = False,
        config_path: str = "pipelines",
    ) -> None:
        # Each step's prerequisites (a class's ``requires``) are met before it runs
        # anything: a ConfigError naming the step, for the file ``config_path``.
        check_prerequisites(pipelines, path=config_path)
        self._on_complete = on_complete or {}
        self._budgets = budgets or {}
        self.pipelines: dict[str, list[Step]] = {}
        slots = asyncio.Semaphore(CPU_SLOTS)  # shared by every concurrent step
        turns = LoopTurns()  # shared by every step with a process_nowait
        for pname, specs in pipelines.items():
            ctx = ProcessorContext(base_dir=base_dir, pipeline=pname, dry_run=dry_run)
            steps = []
            for spec in specs:
                proc = spec.cls(spec.options, ctx)
                steps.append(
                    Step(
                        id=f"{pname}/{spec.step}",
                        use=spec.use,
                        processor=proc,
                        commits=bool(getattr(proc, "commits", False)),
                        idempotent=bool(getattr(proc, "idempotent", False)),
                        header_only=bool(getattr(proc, "header_only", False)),
                        transparent=bool(getattr(proc, "transparent", False)),
                        has_prefetch=callable(getattr(proc, "prefetch", None)),
                        has_flush=callable(getattr(proc, "flush", None)),
                        nowait=_nowait(proc, f"{pname}/{spec.step}", spec.use),
                        turns=turns,
                        # One call at a time per instance unless it says it is safe:
                        # mailboxes run concurrently, and a shared connection (SMTP,
                        # a database) must not interleave two messages.
                        lock=None
                        if getattr(proc, "concurrent", False)
                        else asyncio.Lock(),
                        slots=slots if getattr(proc, "concurrent", False) else None,
                        budget=self._budget(pname),
                    )
                )
            self.pipelines[pname] = steps
        self._opened: list[Step] = []
        self._by_id = {step.id: step for step in self._all()}

    @classmethod
    def from_config(cls, config: Config, *, dry_run: bool = False) -> Chain:
        """The chain of ``config``: its pipelines, ``on_complete`` and budgets."""
        models = config.model.pipelines
        return cls(
            config.pipelines,
            base_dir=config.base_dir,
            on_complete={n: p.on_complete for n, p in models.items()},
            budgets={n: p.processing_budget for n, p in models.items()},
            dry_run=dry_run,
            config_path=str(config.path),
        )

    def _budget(self, pipeline: str) -> float:
        return self._budgets.get(pipeline, DEFAULT_BUDGET)

    def _all(self) -> Iterable[Step]:
        for steps in self.pipelines.values():
            yield from steps

    async def open(self) -> None:
        """Call every processor's optional ``open()``; close what opened on failure."""
        for step in self._all():
            if callable(getattr(step.processor, "open", None)):
                try:
                    await step.call("open")
                except BaseException:
                    await self.close()
                    raise
            self._opened.append(step)

    async def close(self) -> None:
        """Call ``close()`` on every opened processor; errors are logged, not raised.

        A synchronous ``close()`` gets at most :data:`CLOSE_GRACE` seconds (or the
        budget, if shorter), so a call stuck behind a runaway one cannot hold up a
        shutdown; then the step's worker thread is let go.
        """
        for step in reversed(self._opened):
            if callable(getattr(step.processor, "close", None)):
                grace = Budget(min(step.budget, CLOSE_GRACE), name="close grace")
                try:
                    await step.call("close", budget=grace)
                except Exception as exc:
                    log.warning("processor_close_failed", step=step.id, error=repr(exc))
        self._opened.clear()
        for step in self._all():
            step.worker.shutdown()

    async def flush(self) -> None:
        """Make pending group commits durable (``flush()`` on every processor with one).

        Raises whatever a processor's flush raises, :class:`BudgetExceeded` too when
        a synchronous flush runs past the budget: the engine then issues no DELE.
        """
        for step in self._all():
            if step.has_flush:
                budget = Budget(step.budget)
                async with step.flush_guard:
                    try:
                        if step.lock is not None:  # never interleaved with a process()
                            async with step.lock:
                                await step.call("flush", budget=budget)
                        else:
                            await step.call("flush", budget=budget)
                    except BaseException:
                        step.flush_failures += 1
                        raise

    def flushed(self, result: ChainResult) -> bool:
        """True unless a flush of one of ``result``'s pending steps failed since it ran.

        Processor instances are shared by every mailbox: a failed group commit that
        another mailbox's ``flush()`` saw may have dropped this message's write too,
        and a later successful flush then proves nothing for it (DELE only after
        durability).
        """
        by_id = self._by_id
        return all(
            step_id in by_id
            and by_id[step_id].flush_failures == result.flush_epoch.get(step_id)
            for step_id in result.pending
        )

    def can_prefetch(self, pipeline: str) -> bool:
        """True when the first step that may decide is header-only (see prefetch)."""
        for step in self.pipelines.get(pipeline, []):
            if step.transparent:
                continue
            return step.has_prefetch and step.header_only and not step.commits
        return False

    async def prefetch(self, pipeline: str, message: Message) -> Decision | None:
        """Decide on headers alone (``message.headers_only``); None means download it.

        Only the first step that may decide is asked: ``transparent`` steps (which never
        decide nor change what later steps see, like ``parse``) are passed over; any
        other step without ``prefetch``, with side effects, or whose ``prefetch`` cannot
        decide (None) means "download and run the whole chain". Asking a later step
        after an undecided one would let it override a rule that needed the body.
        A route or an exception also means download.
        """
        for step in self.pipelines.get(pipeline, []):
            if step.transparent:
                continue
            if step.commits or not step.has_prefetch:
                return None
            try:
                # Serialised per instance like process(), or in a CPU slot.
                raw = await step.gated("prefetch", message, budget=Budget(step.budget))
                result = normalise(raw, step.use)
            except BaseException as exc:
                if not _processor_failure(exc):
                    raise
                log.warning("prefetch_failed", step=step.id, error=repr(exc))
                return None
            return None if result is None or result.route else result
        return None

    async def run(
        self,
        pipeline: str,
        message: Message,
        *,
        done_steps: Iterable[str] = (),
        on_commit: Callable[[str], None] | None = None,
    ) -> ChainResult:
        """Run ``message`` through ``pipeline`` (and routes); never raises for a
        processor's exception.

        ``on_commit(step_id)`` is called right after a step that commits, is not
        ``idempotent`` and has no ``flush()`` succeeds, before the next step runs: the
        engine journals it durably at once, so a crash later in the chain never
        repeats a side effect that the outside world would see twice (a mail sent, a
        webhook posted). Idempotent steps are journaled with the group commit.

        The synchronous steps share ``pipeline``'s ``processing_budget``; a step past
        it fails the message with ``final`` set (see :class:`ChainResult`).
        """
        result = ChainResult()
        budget = Budget(self._budget(pipeline))
        skip = set(done_steps)
        current = pipeline
        for _ in range(MAX_ROUTES):
            steps = self.pipelines.get(current)
            if steps is None:
                result.error = KeyError(f"route to unknown pipeline {current!r}")
                result.failed_step = current
                return result
            routed = False
            for step in steps:
                if step.id in skip:
                    log.debug("step_skipped", step=step.id, uid=message.ref.uid)
                    continue
                epoch = step.flush_failures  # before process() can buffer a write
                try:
                    raw = await step.gated("process", message, budget=budget)
                except BaseException as exc:
                    if not _processor_failure(exc):
                        raise
                    result.error = exc
                    result.failed_step = step.id
                    result.temporary = isinstance(exc, TemporaryFailure)
                    result.final = isinstance(exc, BudgetExceeded) and exc.final
                    return result
                # process() returned: its side effect happened. Record the commit
                # before judging the return value, so that a bad return value can
                # never make a sent mail be sent again on the retry.
                if step.commits:
                    if step.has_flush:
                        result.pending.append(step.id)
                        result.flush_epoch[step.id] = epoch
                    else:
                        result.committed.append(step.id)
                    if on_commit and not (step.has_flush or step.idempotent):
                        on_commit(step.id)
                try:
                    decision = normalise(raw, step.use)
                except Exception as exc:
                    result.error = exc
                    result.failed_step = step.id
                    return result
                if decision is None:
                    continue
                if decision.route is not None:
                    current = decision.route
                    routed = True
                    break
                result.decision = decision
                return result
            if not routed:
                final = self._on_complete.get(current, "done")
                result.decision = Decision(
                    disposition=Disposition(final), reason="on_complete"
                )
                return result
        result.error = RuntimeError(f"more than {MAX_ROUTES} routes; is there a loop?")
        result.failed_step = current
        return result


def _nowait(processor: Any, step: str, use: str) -> Callable[[Message], Any] | None:
    """The processor's synchronous ``process_nowait``, if it has one.

    Raises :class:`~mailpipe.errors.PluginError` naming the step when it is not
    synchronous (a coroutine or async generator function, or an object whose
    ``__call__`` is one): its result would be a coroutine nobody awaits, the work
    never done while the message went on as handled (issue 18 review).
    """
    fn = getattr(processor, "process_nowait", None)
    if fn is None:
        return None
    call = inspect.getattr_static(type(fn), "__call__", None)  # a callable object's
    if not callable(fn) or _asynchronous(fn) or _asynchronous(call):
        raise PluginError(
            f"step {step!r} (use = {use!r}): {type(processor).__qualname__}."
            "process_nowait must be a synchronous method (see mailpipe.Processor); "
            "work that awaits belongs in process()"
        )
    return fn  # type: ignore[no-any-return]


def _asynchronous(fn: Any) -> bool:
    return inspect.iscoroutinefunction(fn) or inspect.isasyncgenfunction(fn)


def _not_synchronous(step: Step, raw: Any) -> TypeError:
    """The error of a message whose ``process_nowait`` returned an awaitable: a
    failure of that message (never a success, nor a commit), the awaitable closed
    unrun so that none of its work happens later."""
    close = getattr(raw, "close", None)
    if callable(close):
        close()
    return TypeError(
        f"processor {step.use!r} (step {step.id!r}): process_nowait returned "
        f"{type(raw).__name__}, an awaitable; it must be synchronous (see "
        "mailpipe.Processor)"
    )


def _processor_failure(exc: BaseException) -> bool:
    """True when ``exc`` is the processor's own failure, to be isolated to its message.

    Every exception is, and so is a BaseException a processor raises by itself
    (``SystemExit`` from a library, a stray ``GeneratorExit``, a ``CancelledError``
    nobody asked for): re-raising those would abort the session on every poll, for
    ever ("bad input never stops the pipeline"). ``KeyboardInterrupt`` and a
    cancellation of the running task (shutdown) still propagate.
    """
    if isinstance(exc, Exception):
        return True
    if isinstance(exc, KeyboardInterrupt):
        return False
    if isinstance(exc, asyncio.CancelledError):
        task = asyncio.current_task()
        return task is not None and task.cancelling() == 0
    return True
