"""Runs a message through its pipeline: ordered steps, routing, per-step isolation.

The chain is an explicit list from the config, never pluggy's call order. A processor
exception never escapes :meth:`Chain.run`: it is captured in the result, so one bad
message cannot stop the others. Steps already committed for a message (from the journal)
are skipped on a re-run, so a crash between ``store`` and ``forward`` stores nothing twice.
"""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import structlog

from mailpipe.config import StepSpec
from mailpipe.errors import TemporaryFailure
from mailpipe.message import Message
from mailpipe.processor import Decision, Disposition, ProcessorContext, normalise

log = structlog.get_logger()

MAX_ROUTES = 16  # a route loop is a config bug; stop it instead of spinning


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
    flush_failures: int = 0  # failed flush() calls so far (see ChainResult.flush_epoch)


@dataclass(slots=True)
class ChainResult:
    """What happened to one message in the chain.

    ``decision`` is final (``on_complete`` applied when nobody decided). ``committed``
    lists step ids whose side effects are durable, ``pending`` those waiting for
    ``flush()`` (group commit). On failure ``error`` is set, ``failed_step`` names the
    step and ``temporary`` says whether it was a :class:`TemporaryFailure`.
    """

    decision: Decision | None = None
    committed: list[str] = field(default_factory=list)
    pending: list[str] = field(default_factory=list)
    error: BaseException | None = None
    failed_step: str = ""
    temporary: bool = False
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
        dry_run: bool = False,
    ) -> None:
        self._on_complete = on_complete or {}
        self.pipelines: dict[str, list[Step]] = {}
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
                        # One call at a time per instance unless it says it is safe:
                        # mailboxes run concurrently, and a shared connection (SMTP,
                        # a database) must not interleave two messages.
                        lock=None
                        if getattr(proc, "concurrent", False)
                        else asyncio.Lock(),
                    )
                )
            self.pipelines[pname] = steps
        self._opened: list[Step] = []

    def _all(self) -> Iterable[Step]:
        for steps in self.pipelines.values():
            yield from steps

    async def open(self) -> None:
        """Call every processor's optional ``open()``; close what opened on failure."""
        for step in self._all():
            fn = getattr(step.processor, "open", None)
            if callable(fn):
                try:
                    await maybe_await(fn())
                except BaseException:
                    await self.close()
                    raise
            self._opened.append(step)

    async def close(self) -> None:
        """Call ``close()`` on every opened processor; errors are logged, not raised."""
        for step in reversed(self._opened):
            fn = getattr(step.processor, "close", None)
            if callable(fn):
                try:
                    await maybe_await(fn())
                except Exception as exc:
                    log.warning("processor_close_failed", step=step.id, error=repr(exc))
        self._opened.clear()

    async def flush(self) -> None:
        """Make pending group commits durable (``flush()`` on every processor with one).

        Raises whatever a processor's flush raises: the engine then issues no DELE.
        """
        for step in self._all():
            if step.has_flush:
                try:
                    if step.lock is not None:  # never interleaved with a process()
                        async with step.lock:
                            await maybe_await(step.processor.flush())
                    else:
                        await maybe_await(step.processor.flush())
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
        by_id = {step.id: step for step in self._all()}
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
                result = normalise(
                    await maybe_await(step.processor.prefetch(message)), step.use
                )
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
        """
        result = ChainResult()
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
                    if step.lock is not None:
                        async with step.lock:
                            raw = await maybe_await(step.processor.process(message))
                    else:
                        raw = await maybe_await(step.processor.process(message))
                except BaseException as exc:
                    if not _processor_failure(exc):
                        raise
                    result.error = exc
                    result.failed_step = step.id
                    result.temporary = isinstance(exc, TemporaryFailure)
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
