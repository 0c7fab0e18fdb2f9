"""A processor's ``requires``: what must come before it, checked with the key named."""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any, ClassVar

import pytest
from click.testing import CliRunner
from pydantic import BaseModel, ConfigDict

from mailpipe import ConfigError, hookimpl
from mailpipe.app import open_app
from mailpipe.chain import Chain
from mailpipe.cli import cli
from mailpipe.plugin_manager import get_plugin_manager
from mailpipe.prerequisites import prerequisite_problems, requirements
from mailpipe.registry import collect
from mailpipe.validation import validate_config

MAILBOX = """
[[mailboxes]]
name = "support"
host = "127.0.0.1"
username = "u"
password = "p"
pipeline = "tickets"
"""

FILTER = '{ use = "filter", rules = [{ when = { mailing_list = true }, then = "keep" }] }'


def write(tmp_path: Path, steps: str) -> Path:
    path = tmp_path / "pipeline.toml"
    path.write_text(f"{MAILBOX}\n[pipelines.tickets]\nprocessors = [{steps}]\n")
    return path


def test_filter_declares_that_it_needs_parse() -> None:
    from mailpipe.plugins.filter import FilterProcessor

    assert requirements(FilterProcessor) == ("parse",)


def test_filter_without_parse_is_a_config_error_naming_the_step(tmp_path: Path) -> None:
    path = write(tmp_path, f'{FILTER}, {{ use = "store.jsonl", path = "o.jsonl" }}')
    with pytest.raises(ConfigError) as info:
        open_app(path, entry_points=False)
    assert str(info.value) == (
        f"{path}: 1 problem\n"
        "  pipelines.tickets.processors[0].use: 'filter' needs 'parse' before it in "
        "this pipeline; add { use = \"parse\" } as an earlier step"
    )


def test_parse_after_filter_says_move_it_up(tmp_path: Path) -> None:
    path = write(tmp_path, f'{{ use = "store.jsonl", path = "o" }}, {FILTER}, '
                           '{ use = "parse" }')
    with pytest.raises(ConfigError) as info:
        open_app(path, entry_points=False)
    (problem,) = info.value.problems
    assert problem.loc == "pipelines.tickets.processors[1].use"
    assert problem.msg == (
        "'filter' needs 'parse' before it in this pipeline; "
        "move it (processors[2]) before this step"
    )


def test_parse_before_filter_is_accepted(tmp_path: Path) -> None:
    app = open_app(write(tmp_path, f'{{ use = "parse" }}, {FILTER}'), entry_points=False)
    assert [s.use for s in app.config.pipelines["tickets"]] == ["parse", "filter"]
    assert Chain.from_config(app.config).pipelines["tickets"][1].use == "filter"


def test_mailpipe_check_reports_it_and_exits_2(tmp_path: Path) -> None:
    path = write(tmp_path, FILTER)
    result = CliRunner().invoke(cli, ["check", str(path)])
    assert result.exit_code == 2
    assert "pipelines.tickets.processors[0].use: 'filter' needs 'parse'" in result.output


def test_the_chain_builder_refuses_an_unmet_prerequisite(tmp_path: Path) -> None:
    # A chain built without open_app (tests, embedding code) is checked too.
    path = write(tmp_path, FILTER)
    config = validate_config(
        tomllib.loads(path.read_text()), path=path,
        registry=collect(get_plugin_manager(entry_points=False)),
    )
    with pytest.raises(ConfigError, match=r"processors\[0\]\.use: 'filter' needs"):
        Chain.from_config(config)
    with pytest.raises(ConfigError, match=r"^pipelines: 1 problem"):
        Chain(config.pipelines, base_dir=tmp_path)


class Opts(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Enricher:
    """A third-party step that needs two others before it."""

    name: ClassVar[str] = "t.enrich"
    Options: ClassVar[type[BaseModel]] = Opts
    commits: ClassVar[bool] = False
    requires: ClassVar[tuple[str, ...]] = ("parse", "t.lookup")

    def __init__(self, options: Opts, context: Any) -> None:
        self.options = options

    def process(self, message: Any) -> None:
        return None


class Lookup(Enricher):
    name: ClassVar[str] = "t.lookup"
    requires: ClassVar[tuple[str, ...]] = ()


def test_third_party_prerequisites_are_checked_in_every_pipeline(
    tmp_path: Path,
) -> None:
    class Plugin:
        @hookimpl
        def mailpipe_register_processors(self, register: Any) -> None:
            register(Enricher)
            register(Lookup)

    pm = get_plugin_manager(entry_points=False)
    pm.register(Plugin(), name="third")
    data = {
        "pipelines": {
            "ok": {"processors": [{"use": "parse"}, {"use": "t.lookup"},
                                  {"use": "t.enrich"}]},
            "a.b": {"processors": [{"use": "t.lookup"}, {"use": "t.enrich"}]},
        }
    }
    config = validate_config(data, path=tmp_path / "p.toml", registry=collect(pm))
    problems = prerequisite_problems(config.pipelines)
    assert [(p.loc, p.msg) for p in problems] == [
        (
            'pipelines."a.b".processors[1].use',
            "'t.enrich' needs 'parse' before it in this pipeline; "
            'add { use = "parse" } as an earlier step',
        )
    ]


HELPDESK_KEYS = [  # (condition, the step whose field it reads)
    ('{ reply = "printer" }', "reply"),
    ('{ ticket = "1234" }', "ticket"),
    ("{ is_reply = true }", "ticket"),
    ("{ bounce = true }", "bounce"),
    ('{ bounce_status = "5.*" }', "bounce"),
    ('{ envelope = "smime-*" }', "unwrap"),
    ('{ attachment_text = "invoice" }', "extract"),
]


@pytest.mark.parametrize(("when", "step"), HELPDESK_KEYS)
def test_filter_rule_on_a_helpdesk_key_needs_its_step(
    tmp_path: Path, when: str, step: str
) -> None:
    key = when.strip("{} ").split(" ")[0]
    rule = f'{{ use = "filter", rules = [{{ when = {when}, then = "keep" }}] }}'
    path = write(tmp_path, f'{{ use = "parse" }}, {rule}')
    with pytest.raises(ConfigError) as info:
        open_app(path, entry_points=False)
    (problem,) = info.value.problems
    assert problem.loc == f"pipelines.tickets.processors[1].rules[0].when.{key}"
    assert problem.msg == (
        f"filter key {key!r} reads what the {step!r} step sets, and no {step!r} step "
        f'comes before it in this pipeline; add {{ use = "{step}" }} as an earlier step'
    )
    accepted = write(tmp_path, f'{{ use = "parse" }}, {{ use = "{step}" }}, {rule}')
    assert open_app(accepted, entry_points=False).config.pipelines["tickets"]


def test_nested_helpdesk_keys_are_found_and_a_later_step_is_named(tmp_path: Path) -> None:
    rules = ('{ use = "filter", rules = [{ when = { mailing_list = true }, then = "keep" }, '
             '{ when = { any = [{ subject = "x" }, { not = { bounce_status = "5.*" } }] }, '
             'then = "keep" }] }')
    path = write(tmp_path, f'{{ use = "parse" }}, {rules}, {{ use = "bounce" }}')
    with pytest.raises(ConfigError) as info:
        open_app(path, entry_points=False)
    (problem,) = info.value.problems
    assert problem.loc == ("pipelines.tickets.processors[1].rules[1].when.any[1].not."
                           "bounce_status")
    assert problem.msg.endswith("move it (processors[2]) before this step")


def test_mailpipe_check_names_the_helpdesk_key(tmp_path: Path) -> None:
    rule = '{ use = "filter", rules = [{ when = { is_reply = true }, then = "keep" }] }'
    result = CliRunner().invoke(cli, ["check", str(write(tmp_path, f'{{ use = "parse" }}, {rule}'))])
    assert result.exit_code == 2
    assert "processors[1].rules[0].when.is_reply: filter key 'is_reply'" in result.output
