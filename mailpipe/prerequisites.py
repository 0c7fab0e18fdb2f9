"""What must come before a step: each processor's ``requires``, checked in its pipeline.

A processor class may declare ``requires: ClassVar[tuple[str, ...]]``, the ``use``
names of processors that must run before it (``filter`` reads the record that
``parse`` makes, so it declares ``("parse",)``). The requirement holds when an
earlier step of the same pipeline uses that name. It is a property of the written
chain, so it is checked when the chain is built and when a configuration is opened,
never discovered while mail is flowing; a pipeline reached by a ``route`` declares its
own prerequisites too (the route may be taken from more than one place).

A class may also depend on its options: ``requires_for(options)``, a classmethod,
returns ``(option key path, use name)`` pairs (a ``filter`` rule on ``bounce_status``
reads what ``bounce`` sets: ``("rules[0].when.bounce_status", "bounce")``); each is
checked the same way and a problem names that option's key.
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


def option_requirements(cls: type, options: object) -> list[tuple[str, str]]:
    """``(option key path, use name)`` pairs ``cls.requires_for(options)`` gives
    (none when the class has no such classmethod)."""
    requires_for = getattr(cls, "requires_for", None)
    return list(requires_for(options)) if callable(requires_for) else []


def _fix(steps: Sequence[StepSpec], position: int, needed: str) -> str:
    later = [s.index for s in steps[position + 1 :] if s.use == needed]
    if later:
        return f"move it (processors[{later[0]}]) before this step"
    return f'add {{ use = "{needed}" }} as an earlier step'


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
            at = f"pipelines.{where}.processors[{spec.index}]"
            for needed in requirements(spec.cls):
                if needed not in before:
                    problems.append(Problem(
                        f"{at}.use",
                        f"{spec.use!r} needs {needed!r} before it in this pipeline; "
                        + _fix(steps, position, needed),
                    ))
            for key, needed in option_requirements(spec.cls, spec.options):
                if needed not in before:
                    name = key.rpartition(".")[2]
                    problems.append(Problem(
                        f"{at}.{key}",
                        f"{spec.use} key {name!r} reads what the {needed!r} step sets, "
                        f"and no {needed!r} step comes before it in this pipeline; "
                        + _fix(steps, position, needed),
                    ))
    return problems


def check_prerequisites(
    pipelines: Mapping[str, Sequence[StepSpec]], *, path: str
) -> None:
    """Raise :class:`~mailpipe.errors.ConfigError` (for the file ``path``) listing
    every unmet prerequisite of :func:`prerequisite_problems`; return when none."""
    problems = prerequisite_problems(pipelines)
    if problems:
        raise ConfigError(path, problems)
