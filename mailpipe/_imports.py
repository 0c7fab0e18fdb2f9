"""Start-up cost of the ``mailpipe`` command, paid before any of its code runs.

Imported first by ``mailpipe/__init__``, it does two things:

- structlog imports rich (about 40 ms) when it is installed, only to offer rich
  tracebacks. mailpipe never lets a renderer format exceptions (``logs.configure``
  turns them into text first, so that redaction sees them), so that import is pure
  start-up cost for every ``mailpipe run``: structlog is imported here with ``import
  rich`` failing. Nothing is done when structlog or rich is already loaded (rich, once
  imported, works as usual).
- When this interpreter was started as the command (``mailpipe ...`` or ``python -m
  mailpipe ...``: :func:`started_as_the_command`), the cyclic garbage collector is
  paused while the command's modules are imported: they allocate tens of thousands of
  objects that live as long as the process, and the young-generation collections
  that walked them found nothing to free (~10 ms of CPU per start, issue 18).
  :func:`imports_done`, called by :func:`mailpipe.cli.main` (and by the ``cli`` group,
  for a script named ``mailpipe`` that calls it directly), moves them to the
  collector's permanent generation (:func:`gc.freeze`) and resumes collection; the
  few reference cycles the imports left as garbage (about 700 objects) stay
  allocated, once per process. Any other importer (a program or test that imports
  mailpipe) keeps its collector as it was.
- Also only for the command: pydantic looks for its plugins (entry-point group
  ``pydantic``) when the first model is built, parsing the ``entry_points.txt`` of
  every installed distribution (~4 ms of each start with a hundred of them, issue 18).
  :func:`skip_the_empty_pydantic_plugin_search` first searches those files' text, as
  :mod:`mailpipe.plugin_manager` does for its own group; when none declares the group,
  pydantic's search could find nothing, and is skipped.
"""

from __future__ import annotations

import gc
import os
import sys
from pathlib import Path

#: True while this module keeps the collector paused (see the module docstring).
_paused = False


def import_structlog_without_rich() -> None:
    """Import structlog with ``import rich`` failing for the duration."""
    if "structlog" in sys.modules or "rich" in sys.modules:
        return
    sys.modules["rich"] = None  # type: ignore[assignment]  # import rich -> ImportError
    try:
        import structlog  # noqa: F401
    finally:
        del sys.modules["rich"]


def started_as_the_command(argv: list[str] | None = None) -> bool:
    """Whether the interpreter's command line (``sys.orig_argv``) runs the ``mailpipe``
    command: ``python [options] -m mailpipe ...`` or a script named ``mailpipe`` (the
    console script).

    Only an optimisation depends on it: a command line it does not recognise merely
    keeps the collector running during the imports.
    """
    args = iter(sys.orig_argv[1:] if argv is None else argv[1:])
    for arg in args:
        if arg == "-m":
            return next(args, None) == "mailpipe"
        if arg in ("-X", "-W"):  # the interpreter options that take a value
            next(args, None)
        elif arg in ("-c", "-") or not arg.startswith("-"):
            return not arg.startswith("-") and Path(arg).name == "mailpipe"
    return False


def pause_collector_for_the_command() -> None:
    """Pause the cyclic garbage collector if this process is the command and the
    collector is running (:func:`imports_done` resumes it)."""
    global _paused
    if not _paused and gc.isenabled() and started_as_the_command():
        gc.disable()
        _paused = True


def imports_done() -> None:
    """Freeze what the paused imports allocated and resume the collector; does
    nothing when :func:`pause_collector_for_the_command` did not pause it."""
    global _paused
    if _paused:
        gc.freeze()
        gc.enable()
        _paused = False


def skip_the_empty_pydantic_plugin_search() -> None:
    """Leave pydantic with no plugins, without its search, when no installed
    distribution declares the ``pydantic`` entry-point group.

    ``importlib.metadata`` reads a group from a stripped line ``[...]`` of a
    distribution's ``entry_points.txt`` whose text without the brackets is the group
    name, so every file that declares it contains ``[pydantic]``; when none does,
    pydantic's cache of loaded plugins is set to the empty one its own search would
    leave. Nothing is done when a file contains it, when ``PYDANTIC_DISABLE_PLUGINS``
    is set (pydantic's own switch), or when pydantic's loader is not as known (its
    cache missing or already filled): pydantic then searches as usual.
    """
    if os.environ.get("PYDANTIC_DISABLE_PLUGINS") is not None:
        return
    from importlib.metadata import distributions

    from pydantic.plugin import _loader

    if getattr(_loader, "_plugins", {}) is not None:
        return
    if not any("[pydantic]" in (d.read_text("entry_points.txt") or "")
               for d in distributions()):
        _loader._plugins = {}


pause_collector_for_the_command()
import_structlog_without_rich()
if started_as_the_command():
    skip_the_empty_pydantic_plugin_search()
