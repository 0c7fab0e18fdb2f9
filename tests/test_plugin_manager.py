"""Plugin manager: built-ins, entry points, blocking, errors naming the plugin, Hooks."""

from __future__ import annotations

import sys
import textwrap
import tomllib
from pathlib import Path
from typing import Any, ClassVar

import pluggy
import pytest
import structlog
from pydantic import BaseModel, ConfigDict

import mailpipe
from mailpipe import PluginError, hookimpl
from mailpipe import plugin_manager as pm_mod
from mailpipe.plugin_manager import (
    BUILTIN_PLUGINS,
    DISABLE_ENV,
    ENTRY_POINT_GROUP,
    Hooks,
    blocked_from_env,
    describe,
    get_plugin_manager,
    load,
)
from mailpipe.registry import collect

ROOT = Path(__file__).resolve().parents[1]
BUILTIN_NAMES = [name for name, _ in BUILTIN_PLUGINS]


def install_entry_point_plugin(
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    *,
    dist: str,
    ep_name: str,
    module: str,
    source: str,
    version: str = "1.2.3",
) -> None:
    """Lay out a real module plus ``*.dist-info`` on sys.path, as pip would install it.

    importlib.metadata scans sys.path on every call, so the plugin manager discovers the
    entry point exactly as for an installed distribution.
    """
    site = tmp_path / f"site-{dist}"
    site.mkdir()
    (site / f"{module}.py").write_text(textwrap.dedent(source))
    info = site / f"{dist.replace('-', '_')}-{version}.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(
        f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n"
    )
    (info / "entry_points.txt").write_text(
        f"[{ENTRY_POINT_GROUP}]\n{ep_name} = {module}\n"
    )
    monkeypatch.syspath_prepend(str(site))
    # Forget the module after the test so the next test imports its own copy.
    monkeypatch.delitem(sys.modules, module, raising=False)


GOOD_PLUGIN = """
from typing import ClassVar
from pydantic import BaseModel, ConfigDict, Field
from mailpipe import hookimpl

class Opts(BaseModel):
    model_config = ConfigDict(extra="forbid")
    tag: str = Field("x", description="tag to add")

class Tagger:
    name: ClassVar[str] = "{proc}"
    Options: ClassVar[type[BaseModel]] = Opts
    commits: ClassVar[bool] = False
    def __init__(self, options, context):
        self.options = options
    def process(self, message):
        message.tags.add(self.options.tag)

@hookimpl
def mailpipe_register_processors(register):
    register(Tagger)
"""


class Opts(BaseModel):
    model_config = ConfigDict(extra="forbid")


def make_processor(proc_name: str) -> type[Any]:
    class Proc:
        name: ClassVar[str] = proc_name
        Options: ClassVar[type[BaseModel]] = Opts
        commits: ClassVar[bool] = False

        def process(self, message: Any) -> None:
            return None

    return Proc


def test_builtin_plugins_match_packages_on_disk() -> None:
    on_disk = sorted(
        p.name
        for p in (ROOT / "plugins").iterdir()
        if p.is_dir() and (p / "__init__.py").exists()
    )
    assert sorted(BUILTIN_NAMES) == on_disk
    for name, dotted in BUILTIN_PLUGINS:
        assert dotted == f"mailpipe.plugins.{name}"


def test_builtins_are_not_declared_as_entry_points() -> None:
    # STYLE 2.4: built-ins go through BUILTIN_PLUGINS only, or they would load twice.
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    eps = pyproject["project"].get("entry-points", {}).get(ENTRY_POINT_GROUP, {})
    assert not set(eps) & set(BUILTIN_NAMES)


def test_get_plugin_manager_registers_every_builtin_by_name() -> None:
    pm = get_plugin_manager(entry_points=False)
    for name, dotted in BUILTIN_PLUGINS:
        plugin = pm.get_plugin(name)
        assert plugin is not None, name
        assert plugin.__name__ == dotted
    assert pm.project_name == "mailpipe"


def test_get_plugin_manager_is_fresh_per_call() -> None:
    pm1 = get_plugin_manager(entry_points=False)
    pm2 = get_plugin_manager(entry_points=False)
    assert pm1 is not pm2

    class Extra:
        @hookimpl
        def mailpipe_register_processors(self, register: Any) -> None:
            register(make_processor("extra.one"))

    pm1.register(Extra(), name="extra")
    assert pm2.get_plugin("extra") is None
    assert "extra.one" in collect(pm1).processors
    assert "extra.one" not in collect(pm2).processors
    # A third manager built afterwards does not see what was added to the first.
    assert get_plugin_manager(entry_points=False).get_plugin("extra") is None


def test_no_plugin_manager_is_built_at_import_time() -> None:
    module_globals = vars(pm_mod).values()
    assert not any(isinstance(v, pluggy.PluginManager) for v in module_globals)
    assert not any(isinstance(v, pluggy.PluginManager) for v in vars(mailpipe).values())


def test_blocked_argument_skips_builtin() -> None:
    pm = get_plugin_manager(entry_points=False, blocked=["pop3", "filter"])
    assert pm.get_plugin("pop3") is None
    assert pm.get_plugin("filter") is None
    assert pm.is_blocked("pop3")
    assert pm.get_plugin("parse") is not None


def test_blocked_by_environment_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(DISABLE_ENV, " parse , store,, ")
    assert blocked_from_env() == ["parse", "store"]
    pm = get_plugin_manager(entry_points=False)
    assert pm.get_plugin("parse") is None
    assert pm.get_plugin("store") is None
    assert pm.get_plugin("forward") is not None


def test_blocked_environment_variable_unset_blocks_nothing(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv(DISABLE_ENV, raising=False)
    assert blocked_from_env() == []
    pm = get_plugin_manager(entry_points=False)
    assert sorted(n for n, _ in pm.list_name_plugin()) == sorted(BUILTIN_NAMES)


def test_entry_point_plugin_is_loaded_and_registers(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    install_entry_point_plugin(
        monkeypatch,
        tmp_path,
        dist="mp-test-good",
        ep_name="goodplug",
        module="mp_test_goodplug",
        source=GOOD_PLUGIN.replace("{proc}", "good.tag"),
    )
    pm, registry = load(entry_points=True)
    assert pm.get_plugin("goodplug") is sys.modules["mp_test_goodplug"]
    assert registry.processors["good.tag"].plugin == "goodplug"
    # entry_points=False ignores it.
    _, registry2 = load(entry_points=False)
    assert "good.tag" not in registry2.processors


def test_entry_point_plugin_blocked_by_argument_and_env(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    install_entry_point_plugin(
        monkeypatch,
        tmp_path,
        dist="mp-test-blk",
        ep_name="blkplug",
        module="mp_test_blkplug",
        source=GOOD_PLUGIN.replace("{proc}", "blk.tag"),
    )
    pm, registry = load(entry_points=True, blocked=["blkplug"])
    assert pm.get_plugin("blkplug") is None
    assert "blk.tag" not in registry.processors
    assert "mp_test_blkplug" not in sys.modules  # blocked plugins are not even imported

    monkeypatch.setenv(DISABLE_ENV, "blkplug")
    pm, registry = load(entry_points=True)
    assert pm.get_plugin("blkplug") is None
    assert "blk.tag" not in registry.processors


def test_misspelled_hookimpl_is_plugin_error_naming_plugin(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    install_entry_point_plugin(
        monkeypatch,
        tmp_path,
        dist="mp-test-typo",
        ep_name="typoplug",
        module="mp_test_typoplug",
        source="""
            from mailpipe import hookimpl

            @hookimpl
            def mailpipe_regster_processors(register):
                pass
        """,
    )
    with pytest.raises(PluginError) as info:
        get_plugin_manager(entry_points=True)
    message = str(info.value)
    assert "typoplug" in message
    assert "mailpipe_regster_processors" in message


def test_misspelled_hookimpl_in_builtin_is_plugin_error(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    # Fault injection: a broken built-in, via a module put on sys.path for this test.
    (tmp_path / "mp_test_bad_builtin.py").write_text(
        "from mailpipe import hookimpl\n\n"
        "@hookimpl\n"
        "def mailpipe_sesion_started(mailbox):\n"
        "    pass\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "mp_test_bad_builtin", raising=False)
    monkeypatch.setattr(
        pm_mod, "BUILTIN_PLUGINS", (*BUILTIN_PLUGINS, ("badbuiltin", "mp_test_bad_builtin"))
    )
    with pytest.raises(PluginError, match="badbuiltin") as info:
        get_plugin_manager(entry_points=False)
    assert "mailpipe_sesion_started" in str(info.value)


def test_import_failure_of_entry_point_is_plugin_error(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    install_entry_point_plugin(
        monkeypatch,
        tmp_path,
        dist="mp-test-broken",
        ep_name="brokenplug",
        module="mp_test_brokenplug",
        source="""
            import mp_test_this_module_does_not_exist  # noqa: F401
        """,
    )
    with pytest.raises(PluginError) as info:
        get_plugin_manager(entry_points=True)
    message = str(info.value)
    assert 'error importing plugin "brokenplug"' in message
    assert "mp_test_this_module_does_not_exist" in message
    assert isinstance(info.value.__cause__, ImportError)


def test_import_failure_of_builtin_is_plugin_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(
        pm_mod, "BUILTIN_PLUGINS", (*BUILTIN_PLUGINS, ("ghost", "mailpipe.plugins.ghost"))
    )
    with pytest.raises(PluginError, match='error importing plugin "ghost"'):
        get_plugin_manager(entry_points=False)


def test_syntax_error_in_plugin_is_plugin_error(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    install_entry_point_plugin(
        monkeypatch,
        tmp_path,
        dist="mp-test-syntax",
        ep_name="syntaxplug",
        module="mp_test_syntaxplug",
        source="def broken(:\n",
    )
    with pytest.raises(PluginError, match='error importing plugin "syntaxplug"'):
        get_plugin_manager(entry_points=True)


def test_name_clash_between_entry_point_plugins_names_both(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    for ep, module in (("alphaplug", "mp_test_alpha"), ("betaplug", "mp_test_beta")):
        install_entry_point_plugin(
            monkeypatch,
            tmp_path,
            dist=f"mp-test-{ep}",
            ep_name=ep,
            module=module,
            source=GOOD_PLUGIN.replace("{proc}", "clash.tag"),
        )
    with pytest.raises(PluginError) as info:
        load(entry_points=True)
    message = str(info.value)
    assert "alphaplug" in message
    assert "betaplug" in message
    assert "clash.tag" in message


def test_name_clash_with_inline_plugins_names_both() -> None:
    pm = get_plugin_manager(entry_points=False)

    class First:
        @hookimpl
        def mailpipe_register_processors(self, register: Any) -> None:
            register(make_processor("dup.step"))

    class Second:
        @hookimpl
        def mailpipe_register_processors(self, register: Any) -> None:
            register(make_processor("dup.step"))

    pm.register(First(), name="first")
    pm.register(Second(), name="second")
    with pytest.raises(PluginError, match=r"'second'.*'dup\.step'.*'first'"):
        collect(pm)


def test_describe_lists_builtins_and_entry_point_distribution(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    install_entry_point_plugin(
        monkeypatch,
        tmp_path,
        dist="mp-test-desc",
        ep_name="descplug",
        module="mp_test_descplug",
        source=GOOD_PLUGIN.replace("{proc}", "desc.tag"),
        version="4.5.6",
    )
    pm, registry = load(entry_points=True)

    class Inline:
        @hookimpl
        def mailpipe_register_processors(self, register: Any) -> None:
            register(make_processor("inline.b"))
            register(make_processor("inline.a"))

    pm.register(Inline(), name="inline")
    registry = collect(pm)
    infos = {info.name: info for info in describe(pm, registry)}

    assert set(BUILTIN_NAMES) <= set(infos)
    for name in BUILTIN_NAMES:
        assert infos[name].origin == "builtin"
        assert infos[name].version == mailpipe.__version__
    desc = infos["descplug"]
    assert (desc.origin, desc.version) == ("mp-test-desc", "4.5.6")
    assert desc.processors == ("desc.tag",)
    assert desc.sources == ()
    assert infos["inline"].origin == "registered"
    assert infos["inline"].processors == ("inline.a", "inline.b")  # sorted
    # Every registered processor is attributed to exactly one described plugin.
    listed = [p for info in infos.values() for p in info.processors]
    assert sorted(listed) == sorted(registry.processors)
    # The origin is what pluggy recorded for this manager (list_plugin_distinfo): the
    # same module registered by code on another manager is "registered" there, and
    # nothing remembered from the first manager leaks into the second.
    assert [pm.get_name(p) for p, _ in pm.list_plugin_distinfo()] == ["descplug"]
    other = get_plugin_manager(entry_points=False)
    other.register(sys.modules["mp_test_descplug"], name="descplug")
    info = {i.name: i for i in describe(other, collect(other))}["descplug"]
    assert (info.origin, info.version) == ("registered", "?")


def test_hooks_facade_swallows_and_logs_event_hook_errors() -> None:
    pm = get_plugin_manager(entry_points=False)

    class Exploding:
        @hookimpl
        def mailpipe_message_done(self, mailbox: str) -> None:
            raise RuntimeError(f"observer broke on {mailbox}")

    pm.register(Exploding(), name="exploding")
    with structlog.testing.capture_logs() as logs:
        Hooks(pm).message_done(mailbox="inbox", uid="u1", key="k1", disposition="done")
    failures = [e for e in logs if e["event"] == "hook_failed"]
    assert len(failures) == 1
    assert failures[0]["hook"] == "mailpipe_message_done"
    assert failures[0]["error"] == "RuntimeError: observer broke on inbox"
    assert failures[0]["log_level"] == "warning"


def test_hooks_facade_passes_keyword_arguments_to_implementations() -> None:
    pm = get_plugin_manager(entry_points=False)
    seen: list[tuple[str, dict[str, Any]]] = []

    class Recorder:
        @hookimpl
        def mailpipe_session_started(self, mailbox: str, count: int, octets: int) -> None:
            seen.append(("started", {"mailbox": mailbox, "count": count, "octets": octets}))

        @hookimpl
        def mailpipe_message_failed(self, processor: str, attempts: int) -> None:
            # pluggy passes the subset of arguments an implementation names.
            seen.append(("failed", {"processor": processor, "attempts": attempts}))

    pm.register(Recorder(), name="recorder")
    hooks = Hooks(pm)
    with structlog.testing.capture_logs() as logs:
        hooks.session_started(mailbox="inbox", count=3, octets=1200)
        hooks.message_failed(
            mailbox="inbox", uid="u", key="k", processor="store.sqlite",
            error="OSError: disk full", attempts=2,
        )
    assert seen == [
        ("started", {"mailbox": "inbox", "count": 3, "octets": 1200}),
        ("failed", {"processor": "store.sqlite", "attempts": 2}),
    ]
    assert logs == []


def test_plugin_host_modules_keep_no_mutable_module_state() -> None:
    # Everything a plugin manager learns lives on it (fresh per call, STYLE 2.4): no
    # module-level dict, list or set that one manager could leak into the next.
    from mailpipe import registry as registry_mod

    for module in (pm_mod, registry_mod):
        state = {
            name
            for name, value in vars(module).items()
            if not name.startswith("__") and isinstance(value, dict | list | set)
        }
        assert state == set(), f"{module.__name__} keeps module state: {state}"



def test_entry_points_are_parsed_only_when_a_distribution_declares_the_group(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Issue 18: without a distribution declaring [mailpipe], no entry_points.txt is
    parsed at start-up; with one, its plugin is found as before."""
    import importlib.metadata

    real = importlib.metadata.entry_points
    calls: list[str] = []

    def counted(**kwargs: Any) -> Any:
        calls.append(kwargs["group"])
        return real(**kwargs)

    monkeypatch.setattr(importlib.metadata, "entry_points", counted)
    get_plugin_manager(entry_points=True)
    assert calls == []
    install_entry_point_plugin(
        monkeypatch, tmp_path, dist="mp-declared", ep_name="declared",
        module="mp_declared", source=GOOD_PLUGIN.format(proc="declared.tag"),
    )
    assert get_plugin_manager(entry_points=True).has_plugin("declared")
    assert calls == [ENTRY_POINT_GROUP]
