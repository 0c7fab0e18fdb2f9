"""The CLI is argument handling over a typed App: nothing imports it back, no cycle.

Imports are read from the source (module level and inside functions alike), so a
cycle hidden behind a function-level import is found too.
"""

from __future__ import annotations

import ast
import inspect
import subprocess
import sys
import typing
from pathlib import Path

import pluggy
import pytest

import mailpipe
from mailpipe import cli
from mailpipe.app import App
from mailpipe.config import Config

PACKAGE = Path(mailpipe.__file__).resolve().parent

#: The modules of the CLI and of the config it loads; none may sit on an import cycle.
LAYERED = (
    "mailpipe.cli",
    "mailpipe.demo",
    "mailpipe.app",
    "mailpipe.service",
    "mailpipe.local",
    "mailpipe.config",
    "mailpipe.validation",
    "mailpipe.problems",
    "mailpipe.schema",
)


def module_files() -> dict[str, Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = ("mailpipe", *path.relative_to(PACKAGE).with_suffix("").parts)
        name = ".".join(parts).removesuffix(".__init__")
        out[name] = path
    return out


def imported_modules(name: str, path: Path, known: set[str]) -> set[str]:
    """Every module of ``known`` that ``name`` imports, wherever the import stands."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package
                for _ in range(node.level - 1):
                    anchor = anchor.rpartition(".")[0]
                base = f"{anchor}.{base}" if base else anchor
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
    return {m for m in found if m in known and m != name}


def import_graph() -> dict[str, set[str]]:
    files = module_files()
    return {n: imported_modules(n, p, set(files)) for n, p in files.items()}


def reaches(graph: dict[str, set[str]], start: str, goal: str) -> bool:
    seen, todo = set(), list(graph[start])
    while todo:
        node = todo.pop()
        if node == goal:
            return True
        if node not in seen:
            seen.add(node)
            todo.extend(graph[node])
    return False


def test_the_graph_reader_finds_a_function_level_import() -> None:
    # demo imports the testing server inside run_demo(): the reader must see it.
    assert "mailpipe.testing.server" in import_graph()["mailpipe.demo"]


@pytest.mark.parametrize("module", LAYERED)
def test_module_is_on_no_import_cycle(module: str) -> None:
    graph = import_graph()
    assert not reaches(graph, module, module), f"{module} imports itself back"


def test_only_the_entry_point_imports_the_cli() -> None:
    graph = import_graph()
    importers = sorted(n for n, deps in graph.items() if "mailpipe.cli" in deps)
    assert importers == ["mailpipe.__main__"]


@pytest.mark.parametrize(
    "order", [("mailpipe.cli", "mailpipe.demo"), ("mailpipe.demo", "mailpipe.cli")]
)
def test_cli_and_demo_import_in_either_order(order: tuple[str, str]) -> None:
    code = f"import {order[0]}, {order[1]}; import mailpipe.demo as d; d.run_demo"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_app_is_typed() -> None:
    assert typing.get_type_hints(App) == {
        "config": Config,
        "pm": pluggy.PluginManager,
    }
    assert typing.get_type_hints(cli._open)["return"] is App


def test_every_app_parameter_of_the_command_modules_is_an_app() -> None:
    from mailpipe import local, service

    checked = 0
    for module in (cli, service, local):
        for _, func in inspect.getmembers(module, inspect.isfunction):
            if func.__module__ != module.__name__:
                continue
            hints = typing.get_type_hints(func)
            if "app" in inspect.signature(func).parameters:
                assert hints.get("app") is App, f"{module.__name__}.{func.__name__}"
                checked += 1
    assert checked >= 5  # cli: _store, _item, _replay, _mark_seen; service: 2; local: 1
