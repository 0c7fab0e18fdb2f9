"""What must come before a step: each processor's ``requires``, checked in its pipeline.

A processor class may declare ``requires: ClassVar[tuple[str, ...]]``, the ``use``
names of processors that must run before it (``filter`` reads the record that
``parse`` makes, so it declares ``("parse",)``). The requirement holds when an
earlier step of the same pipeline uses that name. It is a property of the written
chain, so it is checked when the chain is built and when a configuration is opened,
never discovered while mail is flowing; a pipeline reached by a ``route`` declares its
own prerequisites too (the route may be taken from more than one place).
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

from mailpipe.errors import ConfigError, Problem

if TYPE_CHECKING:
    from mailpipe.config import StepSpec

_PLAIN = re.compile(r"^[A-Za-z0-9_-]+$")


def requirements(cls: type) -> tuple[str, ...]:
    """The ``use`` names ``cls`` declares it needs before it (none when undeclared);
    the registry checked the declaration when the class was registered."""
    return tuple(getattr(cls, "requires", ()))


def prerequisite_problems(
    pipelines: Mapping[str, Sequence[StepSpec]],
) -> list[Problem]:
    """One :class:`Problem` per step whose ``requires`` is not met before it.

    The problem names the step's key (``pipelines.NAME.processors[I].use``), what it
    needs and how to fix it: add the missing step earlier, or move it up when the
    pipeline has it later.
    """
    problems: list[Problem] = []
    for pname, steps in pipelines.items():
        where = json.dumps(pname) if not _PLAIN.match(pname) else pname
        for position, spec in enumerate(steps):
            before = {s.use for s in steps[:position]}
            for needed in requirements(spec.cls):
                if needed in before:
                    continue
                later = [s.index for s in steps[position + 1 :] if s.use == needed]
                fix = (
                    f"move it (processors[{later[0]}]) before this step"
                    if later
                    else f'add {{ use = "{needed}" }} as an earlier step'
                )
                problems.append(
                    Problem(
                        f"pipelines.{where}.processors[{spec.index}].use",
                        f"{spec.use!r} needs {needed!r} before it in this pipeline; "
                        + fix,
                    )
                )
    return problems


def check_prerequisites(
    pipelines: Mapping[str, Sequence[StepSpec]], *, path: str
) -> None:
    """Raise :class:`~mailpipe.errors.ConfigError` (for the file ``path``) listing
    every unmet prerequisite of :func:`prerequisite_problems`; return when none."""
    problems = prerequisite_problems(pipelines)
    if problems:
        raise ConfigError(path, problems)
