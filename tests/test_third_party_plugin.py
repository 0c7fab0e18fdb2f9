"""A real third-party distribution, built from docs/plugins.md, installed and used.

The example plugin in the authoring guide is extracted, built with pip into a target
directory, and loaded in a subprocess outside the checkout through the ``mailpipe``
entry-point group, exactly as a user's installed plugin would be.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
GUIDE = ROOT / "docs" / "plugins.md"
FENCE = re.compile(r'^```(\w+) title="([^"]+)"\n(.*?)^```\n', re.MULTILINE | re.DOTALL)


def titled_blocks() -> dict[str, str]:
    """The guide's fenced blocks that carry ``title="FILE"``, by file name."""
    return {m.group(2): m.group(3) for m in FENCE.finditer(GUIDE.read_text())}


def run_python(code: str, *, site: Path, cwd: Path) -> dict[str, object]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MAILPIPE_")}
    env["PYTHONPATH"] = str(site)
    done = subprocess.run(
        [sys.executable, "-P", "-c", textwrap.dedent(code)],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    result: dict[str, object] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


@pytest.fixture(scope="module")
def installed_plugin(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Build the guide's example distribution and pip-install it into a target dir."""
    blocks = titled_blocks()
    src = tmp_path_factory.mktemp("demo-src")
    for name in ("pyproject.toml", "mailpipe_demo_plugin.py"):
        assert name in blocks, f"docs/plugins.md lost its {name} example block"
        (src / name).write_text(blocks[name])
    site = tmp_path_factory.mktemp("demo-site")
    done = subprocess.run(
        [
            sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation",
            "--no-index", "--no-cache-dir", "--disable-pip-version-check", "-q",
            "--target", str(site), str(src),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return site


def test_guide_example_declares_the_entry_point() -> None:
    blocks = titled_blocks()
    assert "[project.entry-points.mailpipe]" in blocks["pyproject.toml"]
    assert 'demo = "mailpipe_demo_plugin"' in blocks["pyproject.toml"]
    assert "@hookimpl" in blocks["mailpipe_demo_plugin.py"]
    assert "def mailpipe_register_processors(register" in blocks["mailpipe_demo_plugin.py"]


def test_installed_plugin_is_discovered_through_entry_points(
    installed_plugin: Path, tmp_path: Path
) -> None:
    assert list(installed_plugin.glob("mailpipe_demo_plugin-0.1.0.dist-info/entry_points.txt"))
    result = run_python(
        """
        import json
        from mailpipe.plugin_manager import describe, load
        pm, registry = load(entry_points=True)
        entry = registry.processors["demo.upper"]
        info = {i.name: i for i in describe(pm, registry)}["demo"]
        _, without = load(entry_points=False)
        print(json.dumps({
            "plugin": entry.plugin,
            "module": entry.cls.__module__,
            "origin": info.origin,
            "version": info.version,
            "processors": list(info.processors),
            "without_entry_points": "demo.upper" in without.processors,
        }))
        """,
        site=installed_plugin,
        cwd=tmp_path,
    )
    assert result == {
        "plugin": "demo",
        "module": "mailpipe_demo_plugin",
        "origin": "mailpipe-demo-plugin",
        "version": "0.1.0",
        "processors": ["demo.upper"],
        "without_entry_points": False,
    }


def test_installed_plugin_can_be_disabled_by_environment(
    installed_plugin: Path, tmp_path: Path
) -> None:
    result = run_python(
        """
        import json, os
        os.environ["MAILPIPE_DISABLE_PLUGINS"] = "demo"
        from mailpipe.plugin_manager import load
        pm, registry = load(entry_points=True)
        print(json.dumps({"loaded": pm.get_plugin("demo") is not None,
                          "registered": "demo.upper" in registry.processors}))
        """,
        site=installed_plugin,
        cwd=tmp_path,
    )
    assert result == {"loaded": False, "registered": False}


def test_installed_plugin_runs_in_a_pipeline(installed_plugin: Path, tmp_path: Path) -> None:
    # The guide's pipeline.toml, loaded by mailpipe's config loader, run by the chain.
    (tmp_path / "pipeline.toml").write_text(titled_blocks()["pipeline.toml"])
    result = run_python(
        """
        import asyncio, json
        from mailpipe import Message
        from mailpipe.chain import Chain
        from mailpipe.app import load_config

        async def main():
            config = load_config("pipeline.toml", entry_points=True)
            chain = Chain(config.pipelines, base_dir=config.base_dir)
            await chain.open()
            try:
                loud = Message.from_bytes(b"Subject: REFUND MY ORDER\\r\\n\\r\\nnow\\r\\n")
                calm = Message.from_bytes(b"Subject: Refund my order\\r\\n\\r\\nthanks\\r\\n")
                short = Message.from_bytes(b"Subject: OK\\r\\n\\r\\nfine\\r\\n")
                results = [await chain.run("default", m) for m in (loud, calm, short)]
            finally:
                await chain.close()
            return {
                "steps": [s.use for s in chain.pipelines["default"]],
                "tags": [sorted(m.tags) for m in (loud, calm, short)],
                "ok": [r.ok for r in results],
                "decisions": [r.decision.disposition.value for r in results],
            }

        print(json.dumps(asyncio.run(main())))
        """,
        site=installed_plugin,
        cwd=tmp_path,
    )
    assert result == {
        "steps": ["demo.upper"],
        "tags": [["shouting"], [], []],
        "ok": [True, True, True],
        "decisions": ["done", "done", "done"],
    }


def test_guide_plugin_test_passes(installed_plugin: Path, tmp_path: Path) -> None:
    # The "Testing a plugin" example in the guide, run as the plugin author would.
    match = re.search(
        r"## Testing a plugin.*?```python\n(.*?)^```", GUIDE.read_text(),
        re.MULTILINE | re.DOTALL,
    )
    assert match, "docs/plugins.md lost its 'Testing a plugin' example"
    code = match.group(1) + textwrap.dedent(
        """
        test_demo_upper_tags_shouting_subjects()
        import json
        print(json.dumps({"ran": True}))
        """
    )
    assert run_python(code, site=installed_plugin, cwd=tmp_path) == {"ran": True}


def test_installed_plugin_disabled_by_config_is_unknown_to_pipelines(
    installed_plugin: Path, tmp_path: Path
) -> None:
    config = '[plugins]\ndisable = ["demo"]\n\n' + titled_blocks()["pipeline.toml"]
    (tmp_path / "pipeline.toml").write_text(config)
    result = run_python(
        """
        import json
        from mailpipe import ConfigError
        from mailpipe.app import load_config
        try:
            load_config("pipeline.toml", entry_points=True)
        except ConfigError as exc:
            print(json.dumps({"error": str(exc)}))
        else:
            print(json.dumps({"error": None}))
        """,
        site=installed_plugin,
        cwd=tmp_path,
    )
    error = str(result["error"])
    assert "pipelines.default.processors[0].use" in error
    assert "unknown processor 'demo.upper'" in error
