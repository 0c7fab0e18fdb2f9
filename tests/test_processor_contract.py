"""The processor/source contract, and every registered built-in class honouring it."""

from __future__ import annotations

import inspect
import re
from pathlib import Path
from typing import Any, ClassVar

import pytest
from pydantic import BaseModel

from mailpipe import Decision, Disposition, Processor, ProcessorContext
from mailpipe.plugin_manager import BUILTIN_PLUGINS, load
from mailpipe.processor import normalise
from mailpipe.source import Source

_, REGISTRY = load(entry_points=False)
PROCESSORS = sorted(REGISTRY.processors)
SOURCES = sorted(REGISTRY.sources)
BUILTIN_NAMES = {name for name, _ in BUILTIN_PLUGINS}


def test_disposition_values_are_the_config_words() -> None:
    assert [d.value for d in Disposition] == ["done", "keep", "quarantine"]
    assert Disposition("keep") is Disposition.KEEP
    assert f"{Disposition.QUARANTINE}" == "quarantine"


@pytest.mark.parametrize(
    "kwargs",
    [{}, {"disposition": Disposition.DONE, "route": "other"}],
    ids=["neither", "both"],
)
def test_decision_needs_exactly_one_of_disposition_or_route(kwargs: Any) -> None:
    with pytest.raises(ValueError, match="exactly one of disposition or route"):
        Decision(**kwargs)


def test_decision_holds_disposition_or_route_with_reason() -> None:
    keep = Decision(disposition=Disposition.KEEP, reason="rule:vip")
    assert (keep.disposition, keep.route, keep.reason) == (Disposition.KEEP, None, "rule:vip")
    route = Decision(route="invoices")
    assert (route.disposition, route.route, route.reason) == (None, "invoices", "")


def test_normalise_none_continues() -> None:
    assert normalise(None, "filter") is None


def test_normalise_disposition_becomes_decision_with_processor_as_reason() -> None:
    assert normalise(Disposition.QUARANTINE, "filter") == Decision(
        disposition=Disposition.QUARANTINE, reason="filter"
    )


def test_normalise_passes_decisions_through() -> None:
    decision = Decision(route="spam", reason="score")
    assert normalise(decision, "filter") is decision


@pytest.mark.parametrize("bad", [True, "done", 0, {"disposition": "done"}], ids=repr)
def test_normalise_rejects_other_values_naming_the_processor(bad: Any) -> None:
    with pytest.raises(TypeError, match=r"processor 'demo\.x' returned .*expected None"):
        normalise(bad, "demo.x")


def test_context_resolve(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ctx = ProcessorContext(base_dir=tmp_path, pipeline="default")
    assert ctx.resolve("mail/inbox") == tmp_path / "mail" / "inbox"
    assert ctx.resolve(Path("/abs/x")) == Path("/abs/x")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert ctx.resolve("~/Maildir") == tmp_path / "home" / "Maildir"
    assert ctx.dry_run is False


def test_context_defaults_to_cwd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert ProcessorContext().resolve("x") == tmp_path / "x"


def test_processor_protocol_is_runtime_checkable() -> None:
    class Minimal:
        name: ClassVar[str] = "m"
        Options: ClassVar[type[BaseModel]] = BaseModel

        def process(self, message: Any) -> None:
            return None

    class NotOne:
        name = "n"

    assert isinstance(Minimal(), Processor)
    assert not isinstance(NotOne(), Processor)


# --- every registered class honours the contract (built-ins as they are written) ------

SNAKE = re.compile(r"^[a-z][a-z0-9_]*$")
NAME = re.compile(r"^[a-z][a-z0-9_]*(\.[a-z][a-z0-9_]*)*$")


def check_options_model(label: str, options: type[BaseModel]) -> None:
    assert options.model_config.get("extra") == "forbid", (
        f"{label}: Options needs model_config = ConfigDict(extra='forbid')"
    )
    for field_name, info in options.model_fields.items():
        assert SNAKE.match(field_name), f"{label}: option {field_name!r} is not snake_case"
        assert info.alias in (None, field_name), f"{label}: {field_name!r} has an alias"
        assert info.description, f"{label}: option {field_name!r} has no Field(description=)"
    options.model_json_schema()  # docs and `mailpipe check` are generated from it


@pytest.mark.parametrize("name", PROCESSORS)
def test_registered_processor_honours_contract(name: str) -> None:
    entry = REGISTRY.processors[name]
    cls = entry.cls
    assert NAME.match(name), f"processor name {name!r}: lowercase, dot-separated"
    assert entry.plugin in BUILTIN_NAMES
    assert name == entry.plugin or name.startswith(f"{entry.plugin}."), (
        f"processor {name!r} should be named after its plugin {entry.plugin!r}"
    )
    assert isinstance(getattr(cls, "commits", None), bool), f"{name}: `commits` bool"
    check_options_model(name, cls.Options)
    params = list(inspect.signature(cls.__init__).parameters)
    assert params[:3] == ["self", "options", "context"], f"{name}: __init__ signature"
    for optional in ("open", "close", "flush", "prefetch"):
        attr = getattr(cls, optional, None)
        assert attr is None or callable(attr), f"{name}: {optional} must be a method"
    if getattr(cls, "header_only", False):
        assert callable(getattr(cls, "prefetch", None)), f"{name}: header_only needs prefetch"


@pytest.mark.parametrize("name", SOURCES)
def test_registered_source_honours_contract(name: str) -> None:
    entry = REGISTRY.sources[name]
    assert NAME.match(name)
    assert entry.plugin in BUILTIN_NAMES
    assert callable(getattr(entry.cls, "session", None))
    check_options_model(name, entry.cls.Options)
    params = list(inspect.signature(entry.cls.__init__).parameters)
    assert params[:3] == ["self", "options", "context"], f"{name}: __init__ signature"


def test_source_protocol_is_runtime_checkable() -> None:
    class Minimal:
        name: ClassVar[str] = "m"
        Options: ClassVar[type[BaseModel]] = BaseModel

        def session(self) -> Any:
            raise NotImplementedError

    assert isinstance(Minimal(), Source)
    assert not isinstance(object(), Source)
