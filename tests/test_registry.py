"""Registry: classes from the registration hooks, contract checks and name clashes."""

from __future__ import annotations

from contextlib import AbstractAsyncContextManager
from typing import Any, ClassVar

import pytest
from pydantic import BaseModel, ConfigDict

from mailpipe import PluginError, hookimpl
from mailpipe.plugin_manager import get_plugin_manager
from mailpipe.registry import Entry, Registry, collect


class Opts(BaseModel):
    model_config = ConfigDict(extra="forbid")


class GoodProcessor:
    name: ClassVar[str] = "t.good"
    Options: ClassVar[type[BaseModel]] = Opts
    commits: ClassVar[bool] = False

    def process(self, message: Any) -> None:
        return None


class GoodSource:
    name: ClassVar[str] = "t.src"
    Options: ClassVar[type[BaseModel]] = Opts

    def session(self) -> AbstractAsyncContextManager[Any]:
        raise NotImplementedError


def test_add_processor_and_look_it_up() -> None:
    reg = Registry()
    reg.add("processor", GoodProcessor, "plug")
    assert reg.processor("t.good") is GoodProcessor
    assert reg.processors["t.good"] == Entry("processor", "t.good", GoodProcessor, "plug")
    assert reg.sources == {}
    with pytest.raises(KeyError):
        reg.processor("t.missing")


def test_add_source_and_look_it_up() -> None:
    reg = Registry()
    reg.add("source", GoodSource, "plug")
    assert reg.source("t.src") is GoodSource
    assert reg.processors == {}
    with pytest.raises(KeyError):
        reg.source("t.good")


def test_processor_and_source_namespaces_are_separate() -> None:
    class SameNameSource(GoodSource):
        name: ClassVar[str] = "t.good"

    reg = Registry()
    reg.add("processor", GoodProcessor, "a")
    reg.add("source", SameNameSource, "b")
    assert reg.processor("t.good") is GoodProcessor
    assert reg.source("t.good") is SameNameSource


@pytest.mark.parametrize("bad_name", [None, "", 42])
def test_add_without_string_name_is_plugin_error(bad_name: Any) -> None:
    cls = type("Nameless", (GoodProcessor,), {"name": bad_name})
    with pytest.raises(PluginError, match=r"plugin 'plug' registered .*Nameless.* `name`"):
        Registry().add("processor", cls, "plug")


@pytest.mark.parametrize("bad_options", [None, dict, Opts()])
def test_add_without_options_model_is_plugin_error(bad_options: Any) -> None:
    cls = type("NoOptions", (GoodProcessor,), {"Options": bad_options})
    with pytest.raises(
        PluginError, match=r"plugin 'plug': processor 't.good' needs an `Options`"
    ):
        Registry().add("processor", cls, "plug")


def test_processor_without_process_is_plugin_error() -> None:
    class NoProcess:
        name: ClassVar[str] = "t.noproc"
        Options: ClassVar[type[BaseModel]] = Opts

    with pytest.raises(PluginError, match=r"processor 't.noproc' has no `process\(\)`"):
        Registry().add("processor", NoProcess, "plug")


def test_source_without_session_is_plugin_error() -> None:
    with pytest.raises(PluginError, match=r"source 't.good' has no `session\(\)`"):
        Registry().add("source", GoodProcessor, "plug")


def test_name_clash_names_both_plugins_and_keeps_the_first() -> None:
    class Other(GoodProcessor):
        pass

    reg = Registry()
    reg.add("processor", GoodProcessor, "first")
    with pytest.raises(PluginError) as info:
        reg.add("processor", Other, "second")
    assert str(info.value) == (
        "plugin 'second' registers processor 't.good', "
        "already registered by plugin 'first'"
    )
    assert reg.processor("t.good") is GoodProcessor


def test_collect_calls_hooks_in_registration_order_so_later_plugins_clash() -> None:
    # Built-ins are registered before entry points, so a third-party plugin that reuses
    # a taken name is the one blamed.
    pm = get_plugin_manager(entry_points=False)

    class Early:
        @hookimpl
        def mailpipe_register_processors(self, register: Any) -> None:
            register(GoodProcessor)

    class Late:
        @hookimpl
        def mailpipe_register_processors(self, register: Any) -> None:
            register(type("Copy", (GoodProcessor,), {}))

    pm.register(Early(), name="early")
    pm.register(Late(), name="late")
    with pytest.raises(PluginError, match=r"^plugin 'late' registers processor 't\.good'"):
        collect(pm)


def test_collect_attributes_each_class_to_its_plugin() -> None:
    pm = get_plugin_manager(entry_points=False)

    class Both:
        @hookimpl
        def mailpipe_register_sources(self, register: Any) -> None:
            register(GoodSource)

        @hookimpl
        def mailpipe_register_processors(self, register: Any) -> None:
            register(GoodProcessor)

    pm.register(Both(), name="both")
    reg = collect(pm)
    assert reg.sources["t.src"].plugin == "both"
    assert reg.sources["t.src"].kind == "source"
    assert reg.processors["t.good"].plugin == "both"
    assert reg.processors["t.good"].kind == "processor"


def test_collect_wraps_exceptions_from_registration_hooks() -> None:
    pm = get_plugin_manager(entry_points=False)

    class Crashing:
        @hookimpl
        def mailpipe_register_processors(self, register: Any) -> None:
            raise KeyError("oops")

    pm.register(Crashing(), name="crashing")
    with pytest.raises(PluginError) as info:
        collect(pm)
    assert str(info.value) == (
        "plugin 'crashing' failed in mailpipe_register_processors: KeyError: 'oops'"
    )
    assert isinstance(info.value.__cause__, KeyError)


def test_collect_propagates_plugin_error_unchanged() -> None:
    pm = get_plugin_manager(entry_points=False)

    class Bad:
        @hookimpl
        def mailpipe_register_sources(self, register: Any) -> None:
            register(GoodProcessor)  # a processor handed to the sources hook

    pm.register(Bad(), name="bad")
    with pytest.raises(PluginError, match=r"^plugin 'bad': source 't.good' has no"):
        collect(pm)


def test_collect_is_fresh_per_call() -> None:
    pm = get_plugin_manager(entry_points=False)
    first, second = collect(pm), collect(pm)
    assert first is not second
    assert first.processors == second.processors
    assert first.sources == second.sources


def test_builtin_lazy_tables_match_their_modules() -> None:
    """store and forward name their processors without importing them: the tables must
    say what each module's PROCESSORS holds."""
    import importlib

    import mailpipe.plugins.forward as forward
    import mailpipe.plugins.store as store

    for package in (store, forward):
        declared = {
            name: f"{package.__name__}.{target}"
            for name, target in package.PROCESSORS.items()
        }
        found = {}
        for module in package.MODULES:
            mod = importlib.import_module(f"{package.__name__}.{module}")
            for cls in mod.PROCESSORS:
                found[cls.name] = f"{mod.__name__}:{cls.__name__}"
        assert declared == found


def test_a_lazy_entry_is_checked_when_first_used() -> None:
    from mailpipe.errors import PluginError

    reg = Registry()
    reg.add_lazy("processor", "t.good", f"{__name__}:GoodProcessor", "plug")
    reg.add_lazy("processor", "t.missing", f"{__name__}:NoSuchClass", "plug")
    reg.add_lazy("processor", "t.renamed", f"{__name__}:GoodProcessor", "plug")
    assert reg.processor("t.good") is GoodProcessor
    assert reg.processors["t.good"] == Entry("processor", "t.good", GoodProcessor, "plug")
    with pytest.raises(PluginError, match=r"plugin 'plug'.*t\.missing.*NoSuchClass"):
        reg.processor("t.missing")
    with pytest.raises(PluginError, match=r"whose name is 't\.good'"):
        reg.processor("t.renamed")
    with pytest.raises(PluginError, match="already registered"):
        reg.add_lazy("processor", "t.good", f"{__name__}:GoodProcessor", "other")
    with pytest.raises(PluginError, match="module:Class"):
        reg.add_lazy("processor", "t.bad", "no-colon", "plug")



class _RecordingRegister:
    """A ``register`` that records which door each class came through."""

    def __init__(self) -> None:
        self.eager: list[type[Any]] = []
        self.lazy_names: list[tuple[str, str]] = []

    def __call__(self, cls: type[Any], /) -> None:
        self.eager.append(cls)

    def lazy(self, name: str, target: str) -> None:
        self.lazy_names.append((name, target))


def test_every_builtin_registers_through_the_public_lazy_helper() -> None:
    import importlib

    from mailpipe.plugin_manager import BUILTIN_PLUGINS

    for plugin, dotted in BUILTIN_PLUGINS:
        module = importlib.import_module(dotted)
        register = _RecordingRegister()
        for hook in ("mailpipe_register_sources", "mailpipe_register_processors"):
            fn = getattr(module, hook, None)
            if fn is not None:
                fn(register=register)
        assert register.eager == [], f"{plugin} registers eagerly"
        assert register.lazy_names, f"{plugin} registers nothing"
        for _name, target in register.lazy_names:
            assert target.startswith(f"{dotted}."), (plugin, target)


def test_loading_the_plugins_imports_no_builtin_implementation() -> None:
    # What register.lazy promises: building the registry imports no processor or
    # source module; a configuration's first use does (checked in a fresh process).
    import json
    import subprocess
    import sys

    code = (
        "import json, sys\n"
        "from mailpipe.plugin_manager import load\n"
        "_, reg = load(entry_points=False)\n"
        "names = sorted(reg.sources) + sorted(reg.processors)\n"
        "before = sorted(m for m in sys.modules if m.startswith('mailpipe.plugins.'))\n"
        "reg.source('pop3'); reg.processor('filter')\n"
        "after = sorted(m for m in sys.modules if m.startswith('mailpipe.plugins.'))\n"
        "print(json.dumps({'names': names, 'before': before, 'after': after}))\n"
    )
    done = subprocess.run(
        [sys.executable, "-P", "-c", code],
        capture_output=True, text=True, timeout=120, check=True,
    )
    result = json.loads(done.stdout)
    assert {"pop3", "parse", "filter", "store.jsonl", "forward.webhook"} <= set(
        result["names"]
    )
    packages = {f"mailpipe.plugins.{n}" for n in (
        "pop3", "imap", "parse", "filter", "store", "forward",
        "reply", "ticket", "bounce", "loopguard", "unwrap", "extract",
    )}
    assert set(result["before"]) == packages
    assert "mailpipe.plugins.pop3.source" in result["after"]
    assert "mailpipe.plugins.filter.processor" in result["after"]


@pytest.mark.parametrize("bad", ["parse", ["parse"], ("parse", ""), (1,)])
def test_requires_must_be_a_tuple_of_processor_names(bad: Any) -> None:
    cls = type("NeedsParse", (GoodProcessor,), {"requires": bad})
    with pytest.raises(PluginError, match=r"processor 't.good': `requires` must be"):
        Registry().add("processor", cls, "plug")
    ok = type("NeedsParse", (GoodProcessor,), {"requires": ("parse",)})
    Registry().add("processor", ok, "plug")
