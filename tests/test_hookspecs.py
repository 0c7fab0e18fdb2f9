"""Hook specifications: documented, prefixed, typed facade, and a test_hook_* for each."""

from __future__ import annotations

import ast
import inspect
import re
from pathlib import Path
from typing import Any, ClassVar

import pluggy
import pytest
import structlog
from pydantic import BaseModel, ConfigDict

from mailpipe import hookspecs
from mailpipe.plugin_manager import Hooks, get_plugin_manager
from mailpipe.registry import collect

TESTS = Path(__file__).resolve().parent


def hook_functions() -> dict[str, Any]:
    """Every function in mailpipe.hookspecs marked with the mailpipe hookspec marker."""
    return {
        name: fn
        for name, fn in vars(hookspecs).items()
        if inspect.isfunction(fn) and hasattr(fn, "mailpipe_spec")
    }


HOOKS = sorted(hook_functions())
EVENT_HOOKS = [h for h in HOOKS if not h.startswith("mailpipe_register_")]


def test_hookspecs_exist_and_include_the_documented_set() -> None:
    assert set(HOOKS) >= {
        "mailpipe_register_sources",
        "mailpipe_register_processors",
        "mailpipe_session_started",
        "mailpipe_session_finished",
        "mailpipe_message_done",
        "mailpipe_message_failed",
        "mailpipe_message_quarantined",
    }


def test_every_public_function_in_hookspecs_is_a_hookspec() -> None:
    public = {
        name
        for name, fn in vars(hookspecs).items()
        if inspect.isfunction(fn) and fn.__module__ == hookspecs.__name__
    }
    assert public == set(HOOKS)


@pytest.mark.parametrize("hook", HOOKS)
def test_hookspec_is_mailpipe_prefixed(hook: str) -> None:
    assert hook.startswith("mailpipe_")


@pytest.mark.parametrize("hook", HOOKS)
def test_hookspec_documents_each_argname(hook: str) -> None:
    fn = hook_functions()[hook]
    doc = inspect.getdoc(fn)
    assert doc, f"{hook} has no docstring"
    summary = doc.splitlines()[0]
    assert summary.endswith("."), f"{hook}: the summary line should be a sentence"
    for arg in inspect.signature(fn).parameters:
        assert f":param {arg}:" in doc, f"{hook} does not document {arg!r}"


def test_hookspecs_are_registered_on_every_plugin_manager() -> None:
    pm = get_plugin_manager(entry_points=False)
    for hook in HOOKS:
        caller = getattr(pm.hook, hook)
        assert caller.has_spec(), hook
        # No hook needs a single answer (STYLE 2.3); registration hooks are all called.
        assert not caller.spec.opts.get("firstresult"), hook
        assert list(caller.spec.argnames) == list(
            inspect.signature(hook_functions()[hook]).parameters
        )


def test_markers_use_the_mailpipe_project_name() -> None:
    assert isinstance(hookspecs.hookspec, pluggy.HookspecMarker)
    assert isinstance(hookspecs.hookimpl, pluggy.HookimplMarker)
    assert hookspecs.hookspec.project_name == "mailpipe"
    assert hookspecs.hookimpl.project_name == "mailpipe"


@pytest.mark.parametrize("hook", EVENT_HOOKS)
def test_hooks_facade_has_a_method_per_event_hook(hook: str) -> None:
    method = getattr(Hooks, hook.removeprefix("mailpipe_"), None)
    assert callable(method), f"Hooks has no method for {hook}"
    params = inspect.signature(method).parameters
    facade_args = [n for n, p in params.items() if p.kind is p.KEYWORD_ONLY]
    spec_args = list(inspect.signature(hook_functions()[hook]).parameters)
    assert facade_args == spec_args


def all_test_names() -> set[str]:
    names: set[str] = set()
    for path in TESTS.rglob("test_*.py"):
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                names.add(node.name)
    return names


@pytest.mark.parametrize("hook", HOOKS)
def test_every_hook_has_a_test(hook: str) -> None:
    # datasette's rule: a hook without a test_hook_<name> is a hook nobody exercised.
    wanted = f"test_hook_{hook}"
    names = all_test_names()
    assert any(n == wanted or n.startswith(f"{wanted}_") for n in names), (
        f"no test named {wanted} under tests/"
    )


# --- test_hook_*: each hook exercised through a real plugin manager ------------------


class Opts(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Recorder:
    """An inline plugin implementing every event hook, recording the calls."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, dict[str, Any]]] = []

    @hookspecs.hookimpl
    def mailpipe_session_started(self, mailbox: str, count: int, octets: int) -> None:
        self.calls.append(
            ("session_started", {"mailbox": mailbox, "count": count, "octets": octets})
        )

    @hookspecs.hookimpl
    def mailpipe_session_finished(self, mailbox: str, summary: dict[str, Any]) -> None:
        self.calls.append(("session_finished", {"mailbox": mailbox, "summary": summary}))

    @hookspecs.hookimpl
    def mailpipe_message_done(
        self, mailbox: str, uid: str, key: str, disposition: str
    ) -> None:
        self.calls.append(
            (
                "message_done",
                {"mailbox": mailbox, "uid": uid, "key": key, "disposition": disposition},
            )
        )

    @hookspecs.hookimpl
    def mailpipe_message_failed(
        self, mailbox: str, uid: str, key: str, processor: str, error: str, attempts: int
    ) -> None:
        self.calls.append(
            (
                "message_failed",
                {
                    "mailbox": mailbox, "uid": uid, "key": key, "processor": processor,
                    "error": error, "attempts": attempts,
                },
            )
        )

    @hookspecs.hookimpl
    def mailpipe_message_quarantined(
        self, mailbox: str, uid: str, key: str, reason: str, path: str
    ) -> None:
        self.calls.append(
            (
                "message_quarantined",
                {"mailbox": mailbox, "uid": uid, "key": key, "reason": reason, "path": path},
            )
        )


@pytest.fixture
def recorded() -> tuple[Hooks, Recorder]:
    pm = get_plugin_manager(entry_points=False)
    recorder = Recorder()
    pm.register(recorder, name="recorder")
    return Hooks(pm), recorder


def test_hook_mailpipe_register_sources() -> None:
    class Src:
        name: ClassVar[str] = "hooktest.src"
        Options: ClassVar[type[BaseModel]] = Opts

        def session(self) -> Any:
            raise NotImplementedError

    class Plugin:
        @hookspecs.hookimpl
        def mailpipe_register_sources(self, register: Any) -> None:
            register(Src)

    pm = get_plugin_manager(entry_points=False)
    pm.register(Plugin(), name="hooktest")
    registry = collect(pm)
    assert registry.source("hooktest.src") is Src
    assert registry.sources["hooktest.src"].plugin == "hooktest"
    assert "hooktest.src" not in registry.processors


def test_hook_mailpipe_register_processors() -> None:
    class Proc:
        name: ClassVar[str] = "hooktest.proc"
        Options: ClassVar[type[BaseModel]] = Opts
        commits: ClassVar[bool] = False

        def process(self, message: Any) -> None:
            return None

    class Plugin:
        @hookspecs.hookimpl
        def mailpipe_register_processors(self, register: Any) -> None:
            register(Proc)

    pm = get_plugin_manager(entry_points=False)
    pm.register(Plugin(), name="hooktest")
    registry = collect(pm)
    assert registry.processor("hooktest.proc") is Proc
    assert registry.processors["hooktest.proc"].plugin == "hooktest"


def test_hook_mailpipe_session_started(recorded: tuple[Hooks, Recorder]) -> None:
    hooks, rec = recorded
    hooks.session_started(mailbox="inbox", count=2, octets=4096)
    assert rec.calls == [("session_started", {"mailbox": "inbox", "count": 2, "octets": 4096})]


def test_hook_mailpipe_session_finished(recorded: tuple[Hooks, Recorder]) -> None:
    hooks, rec = recorded
    summary = {"retrieved": 2, "deleted": 2, "committed": True, "error": None}
    hooks.session_finished(mailbox="inbox", summary=summary)
    assert rec.calls == [("session_finished", {"mailbox": "inbox", "summary": summary})]


def test_hook_mailpipe_message_done(recorded: tuple[Hooks, Recorder]) -> None:
    hooks, rec = recorded
    hooks.message_done(mailbox="inbox", uid="u1", key="k1", disposition="keep")
    assert rec.calls == [
        ("message_done", {"mailbox": "inbox", "uid": "u1", "key": "k1", "disposition": "keep"})
    ]


def test_hook_mailpipe_message_failed(recorded: tuple[Hooks, Recorder]) -> None:
    hooks, rec = recorded
    hooks.message_failed(
        mailbox="inbox", uid="u1", key="k1", processor="forward.smtp",
        error="TemporaryFailure: 451 try later", attempts=1,
    )
    assert rec.calls == [
        (
            "message_failed",
            {
                "mailbox": "inbox", "uid": "u1", "key": "k1", "processor": "forward.smtp",
                "error": "TemporaryFailure: 451 try later", "attempts": 1,
            },
        )
    ]


def test_hook_mailpipe_message_quarantined(recorded: tuple[Hooks, Recorder]) -> None:
    hooks, rec = recorded
    with structlog.testing.capture_logs() as logs:
        hooks.message_quarantined(
            mailbox="inbox", uid="u1", key="k1", reason="max_attempts", path="/q/k1.eml"
        )
    assert rec.calls == [
        (
            "message_quarantined",
            {
                "mailbox": "inbox", "uid": "u1", "key": "k1", "reason": "max_attempts",
                "path": "/q/k1.eml",
            },
        )
    ]
    assert logs == []


# --- docs/plugins.md's hook table is the hookspecs, exactly --------------------------

GUIDE = TESTS.parent / "docs" / "plugins.md"
ROW = re.compile(r"^\| `(mailpipe_\w+)` \| (.+?) \| (.+?) \|$", re.MULTILINE)


def guide_hook_table() -> dict[str, tuple[str, list[str]]]:
    """hook -> (when, [arguments]) from the table under "## Event hooks"."""
    text = GUIDE.read_text()
    section = text[text.index("## Event hooks") :]
    section = section[: section.index("\n## ", 1)]
    return {
        m.group(1): (m.group(2), re.findall(r"`(\w+)`", m.group(3)))
        for m in ROW.finditer(section)
    }


def test_guide_hook_table_lists_exactly_the_hookspecs() -> None:
    table = guide_hook_table()
    assert sorted(table) == HOOKS
    for hook, (_when, args) in table.items():
        spec_args = list(inspect.signature(hook_functions()[hook]).parameters)
        assert args == spec_args, f"docs/plugins.md lists {args} for {hook}"


@pytest.mark.parametrize("hook", EVENT_HOOKS)
def test_guide_says_when_each_event_hook_fires_as_its_spec_does(hook: str) -> None:
    doc = inspect.getdoc(hook_functions()[hook]) or ""
    summary = doc.splitlines()[0].replace("``", "`")
    assert guide_hook_table()[hook][0] == summary


def test_hookspec_session_finished_documents_every_summary_key() -> None:
    from mailpipe.ledger import Summary

    doc = inspect.getdoc(hookspecs.mailpipe_session_finished) or ""
    for key in Summary(mailbox="m").as_dict():
        assert f"``{key}``" in doc, f"mailpipe_session_finished omits summary[{key!r}]"
