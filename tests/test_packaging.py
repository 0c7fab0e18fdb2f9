"""Packaging: plugins/ ships as mailpipe.plugins, never as a bare top-level `plugins`."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

from mailpipe.plugin_manager import BUILTIN_PLUGINS

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())

# Run from outside the checkout with -P (no script dir or cwd on sys.path): only what is
# installed is importable, as for a user.
IMPORT_CHECK = """
import importlib.util, json, sys
import mailpipe, mailpipe.plugins, mailpipe.plugins.pop3
print(json.dumps({
    "mailpipe": mailpipe.__file__,
    "plugins_pkg": mailpipe.plugins.__file__,
    "bare_plugins": importlib.util.find_spec("plugins") is not None,
    "typed": importlib.util.find_spec("mailpipe").submodule_search_locations[0],
}))
"""

IGNORE = shutil.ignore_patterns("__pycache__", "*.pyc", "*.sqlite3*")


def plugin_packages_on_disk() -> list[str]:
    """Dotted names (mailpipe.plugins.X.Y) of every directory under plugins/ with __init__."""
    found = []
    for init in sorted((ROOT / "plugins").rglob("__init__.py")):
        rel = init.parent.relative_to(ROOT / "plugins")
        if "__pycache__" in rel.parts:
            continue
        found.append(".".join(("mailpipe", "plugins", *rel.parts)))
    return found


def mailpipe_packages_on_disk() -> list[str]:
    found = []
    for init in sorted((ROOT / "mailpipe").rglob("__init__.py")):
        rel = init.parent.relative_to(ROOT)
        if "__pycache__" not in rel.parts:
            found.append(".".join(rel.parts))
    return found


def run_outside(python: str, cwd: Path, env: dict[str, str] | None = None) -> dict[str, object]:
    done = subprocess.run(
        [python, "-P", "-c", IMPORT_CHECK],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    result: dict[str, object] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """Build the wheel from a snapshot of the checkout; return (wheel, snapshot).

    The snapshot avoids stale files in the tree's build/ and gives the file-list checks
    the exact sources that went into the wheel.
    """
    base = tmp_path_factory.mktemp("wheel")
    src = base / "src"
    src.mkdir()
    for item in ROOT.iterdir():  # top-level files (pyproject, README, LICENSE) + packages
        if item.is_file():
            shutil.copy2(item, src / item.name)
    for package in ("mailpipe", "plugins"):
        shutil.copytree(ROOT / package, src / package, ignore=IGNORE)
    out = base / "dist"
    done = subprocess.run(
        [
            sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
            "--no-cache-dir", "--disable-pip-version-check", "-q", "-w", str(out), str(src),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    (whl,) = out.glob("mailpipe-*.whl")
    return whl, src


@pytest.fixture(scope="module")
def wheel(built: tuple[Path, Path]) -> Path:
    return built[0]


def test_requires_python_311_and_pep621_metadata() -> None:
    project = PYPROJECT["project"]
    assert project["name"] == "mailpipe"
    assert project["requires-python"] == ">=3.11"
    assert PYPROJECT["build-system"]["build-backend"] == "setuptools.build_meta"
    assert project["scripts"]["mailpipe"] == "mailpipe.cli:main"


def test_every_plugin_package_is_listed_in_setuptools_packages() -> None:
    listed = set(PYPROJECT["tool"]["setuptools"]["packages"])
    missing = [p for p in plugin_packages_on_disk() if p not in listed]
    assert not missing, f"add to [tool.setuptools] packages in pyproject.toml: {missing}"


def test_every_mailpipe_package_is_listed_in_setuptools_packages() -> None:
    listed = set(PYPROJECT["tool"]["setuptools"]["packages"])
    missing = [p for p in mailpipe_packages_on_disk() if p not in listed]
    assert not missing, f"add to [tool.setuptools] packages in pyproject.toml: {missing}"


def test_package_dir_maps_plugins_under_mailpipe() -> None:
    package_dir = PYPROJECT["tool"]["setuptools"]["package-dir"]
    assert package_dir["mailpipe.plugins"] == "plugins"
    listed = PYPROJECT["tool"]["setuptools"]["packages"]
    assert not [p for p in listed if p == "plugins" or p.startswith("plugins.")]


def test_builtin_plugins_are_the_top_level_plugin_packages() -> None:
    top = sorted(p for p in plugin_packages_on_disk() if p.count(".") == 2)
    assert sorted(dotted for _, dotted in BUILTIN_PLUGINS) == top


def test_wheel_contains_only_mailpipe(wheel: Path) -> None:
    names = zipfile.ZipFile(wheel).namelist()
    stray = [
        n for n in names
        if not (n.startswith("mailpipe/") or (n.startswith("mailpipe-") and ".dist-info/" in n))
    ]
    assert not stray, f"files outside mailpipe/ in the wheel: {stray}"
    assert not [n for n in names if n.startswith("plugins/")]


def test_wheel_contains_every_plugin_module(built: tuple[Path, Path]) -> None:
    wheel, src = built
    names = set(zipfile.ZipFile(wheel).namelist())
    expected = [
        "mailpipe/plugins/" + p.relative_to(src / "plugins").as_posix()
        for p in sorted((src / "plugins").rglob("*.py"))
        if "__pycache__" not in p.parts
    ]
    assert expected
    missing = [e for e in expected if e not in names]
    assert not missing, f"plugin modules missing from the wheel: {missing}"


def test_wheel_contains_every_core_module_and_py_typed(built: tuple[Path, Path]) -> None:
    wheel, src = built
    names = set(zipfile.ZipFile(wheel).namelist())
    expected = [
        p.relative_to(src).as_posix()
        for p in sorted((src / "mailpipe").rglob("*.py"))
        if "__pycache__" not in p.parts
    ]
    missing = [e for e in expected if e not in names]
    assert not missing, f"core modules missing from the wheel: {missing}"
    assert "mailpipe/py.typed" in names


def test_wheel_declares_console_script_and_no_builtin_entry_points(wheel: Path) -> None:
    with zipfile.ZipFile(wheel) as zf:
        (ep_name,) = [n for n in zf.namelist() if n.endswith(".dist-info/entry_points.txt")]
        entry_points = zf.read(ep_name).decode()
        (meta_name,) = [n for n in zf.namelist() if n.endswith(".dist-info/METADATA")]
        metadata = zf.read(meta_name).decode()
    assert "mailpipe = mailpipe.cli:main" in entry_points
    assert "[mailpipe]" not in entry_points  # built-ins load via BUILTIN_PLUGINS only
    assert "Requires-Python: >=3.11" in metadata


def test_editable_install_exposes_mailpipe_plugins_not_bare_plugins(tmp_path: Path) -> None:
    result = run_outside(sys.executable, tmp_path)
    assert result["bare_plugins"] is False
    assert Path(str(result["plugins_pkg"])).parent.name in {"plugins"}
    assert Path(str(result["mailpipe"])).parent.name == "mailpipe"


def test_wheel_installed_in_fresh_venv_imports_from_outside_checkout(
    wheel: Path, tmp_path: Path
) -> None:
    venv = tmp_path / "venv"
    # --system-site-packages: dependencies come from this environment, nothing downloads.
    subprocess.run(
        [sys.executable, "-m", "venv", "--without-pip", "--system-site-packages", str(venv)],
        check=True,
        timeout=120,
    )
    python = venv / "bin" / "python"
    done = subprocess.run(
        [
            sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps",
            "--no-index", "--ignore-installed", "--disable-pip-version-check", "-q",
            str(wheel),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    result = run_outside(str(python), tmp_path, env=env)
    site = venv.resolve()
    # The venv's copy wins over the editable checkout of the surrounding environment.
    assert Path(str(result["mailpipe"])).resolve().is_relative_to(site)
    assert Path(str(result["plugins_pkg"])).resolve().is_relative_to(site)
    assert Path(str(result["plugins_pkg"])).parent.name == "plugins"
    assert Path(str(result["plugins_pkg"])).parent.parent.name == "mailpipe"
    assert result["bare_plugins"] is False
    assert (Path(str(result["typed"])) / "py.typed").is_file()
