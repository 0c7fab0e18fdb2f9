"""Packaging and release artifacts.

plugins/ ships as mailpipe.plugins, never as a bare top-level `plugins`; the sdist and
the wheel are built as the Containerfile builds them, pass `twine check`, and the
wheel installed in a fresh virtual environment runs (one build, one venv, shared by
every test here through the module-scoped ``release`` fixture).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tomllib
import zipfile
from dataclasses import dataclass
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


CONTAINERFILE = ROOT / "Containerfile"
# The build stage's command and the runtime stage's install, as the Containerfile has
# them; the release fixture below replays both (tests/test_deploy.py lints the file).
BUILD_COMMAND = "python -m build --outdir /dist ."
INSTALL_COMMAND = 'python -m pip install --no-cache-dir "$1[${EXTRAS}]"'


def containerfile_stages() -> list[list[str]]:
    """The Containerfile's instructions, continuation lines joined, one list a stage."""
    text = re.sub(r"\\\n\s*", " ", CONTAINERFILE.read_text())
    stages: list[list[str]] = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("FROM "):
            stages.append([])
        if stages:
            stages[-1].append(line)
    return stages


@dataclass(frozen=True)
class Release:
    """What the Containerfile's stages make, replayed here: dist/ and a fresh venv."""

    src: Path  # the files the build stage copies, and nothing else
    sdist: Path
    wheel: Path
    venv: Path  # a venv without site packages, the wheel installed as the image does
    extras: str
    build_log: str  # what python -m build printed

    def bin(self, name: str) -> str:
        return str(self.venv / "bin" / name)


def _clean_env() -> dict[str, str]:
    """This environment without what would leak the checkout or this venv in."""
    drop = {"PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME"}
    return {k: v for k, v in os.environ.items() if k not in drop}


@pytest.fixture(scope="module")
def release(tmp_path_factory: pytest.TempPathFactory) -> Release:
    """Build as the Containerfile does; install as its runtime stage does. Once.

    The build stage's COPY sources are copied to a snapshot (so a file the build needs
    but the Containerfile leaves out fails here too), ``python -m build`` makes the
    sdist and the wheel from it (isolated: setuptools comes from the index, as in the
    image), and the wheel with the image's extras goes into a fresh virtual
    environment that sees neither this one nor the checkout.
    """
    build_stage, runtime_stage = containerfile_stages()
    assert f"RUN {BUILD_COMMAND}" in build_stage
    assert any(INSTALL_COMMAND in step for step in runtime_stage)
    (extras,) = [
        step.removeprefix("ARG EXTRAS=") for step in runtime_stage
        if step.startswith("ARG EXTRAS=")
    ]
    base = tmp_path_factory.mktemp("release")
    src = base / "src"
    src.mkdir()
    for step in build_stage:
        words = step.split()
        if words[0] != "COPY" or any(w.startswith("--from") for w in words):
            continue
        for name in words[1:-1]:
            if (ROOT / name).is_dir():
                shutil.copytree(ROOT / name, src / name, ignore=IGNORE)
            else:
                shutil.copy2(ROOT / name, src / name)
    dist = base / "dist"
    done = subprocess.run(
        [sys.executable, "-m", "build", "--outdir", str(dist), str(src)],
        capture_output=True, text=True, timeout=600, check=False, env=_clean_env(),
    )
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    build_log = done.stdout + done.stderr
    (sdist,) = dist.glob("mailpipe-*.tar.gz")
    (whl,) = dist.glob("mailpipe-*.whl")
    venv = base / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    done = subprocess.run(
        [
            str(venv / "bin" / "python"), "-m", "pip", "install", "-q",
            "--disable-pip-version-check", f"{whl}[{extras}]",
        ],
        capture_output=True, text=True, timeout=900, check=False, env=_clean_env(),
    )
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    return Release(
        src=src, sdist=sdist, wheel=whl, venv=venv, extras=extras,
        build_log=build_log,
    )


@pytest.fixture(scope="module")
def built(release: Release) -> tuple[Path, Path]:
    """(wheel, the sources it was built from)."""
    return release.wheel, release.src


@pytest.fixture(scope="module")
def wheel(release: Release) -> Path:
    return release.wheel


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
    release: Release, tmp_path: Path
) -> None:
    result = run_outside(release.bin("python"), tmp_path, env=_clean_env())
    site = release.venv.resolve()
    # The venv's copy, never the editable checkout of the surrounding environment.
    assert Path(str(result["mailpipe"])).resolve().is_relative_to(site)
    assert Path(str(result["plugins_pkg"])).resolve().is_relative_to(site)
    assert Path(str(result["plugins_pkg"])).parent.name == "plugins"
    assert Path(str(result["plugins_pkg"])).parent.parent.name == "mailpipe"
    assert result["bare_plugins"] is False
    assert (Path(str(result["typed"])) / "py.typed").is_file()


# --- release artifacts (issue 22.1) --------------------------------------------------


@pytest.mark.slow
def test_build_makes_an_sdist_and_a_wheel_of_the_one_version(release: Release) -> None:
    from mailpipe import __version__

    assert PYPROJECT["tool"]["setuptools"]["dynamic"]["version"] == {
        "attr": "mailpipe._version.__version__"
    }
    assert release.sdist.name == f"mailpipe-{__version__}.tar.gz"
    assert release.wheel.name == f"mailpipe-{__version__}-py3-none-any.whl"
    # e.g. a data folder setuptools sees as a package missing from `packages`
    assert "would be ignored" not in release.build_log, release.build_log[-3000:]


@pytest.mark.slow
def test_twine_check_passes(release: Release) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "twine", "check", "--strict",
         str(release.sdist), str(release.wheel)],
        capture_output=True, text=True, timeout=300, check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.count("PASSED") == 2, done.stdout


@pytest.mark.slow
def test_wheel_and_sdist_carry_plugins_samples_and_py_typed(release: Release) -> None:
    samples = sorted(p.name for p in (ROOT / "mailpipe" / "samples").iterdir())
    assert "pipeline.example.toml" in samples and len(samples) > 5
    names = set(zipfile.ZipFile(release.wheel).namelist())
    for name in samples:
        assert f"mailpipe/samples/{name}" in names
    assert "mailpipe/py.typed" in names
    for _, dotted in BUILTIN_PLUGINS:
        assert dotted.replace(".", "/") + "/__init__.py" in names
    with tarfile.open(release.sdist) as tar:
        members = {m.name.split("/", 1)[1] for m in tar.getmembers() if "/" in m.name}
    for name in samples:
        assert f"mailpipe/samples/{name}" in members
    assert {"mailpipe/py.typed", "plugins/pop3/__init__.py", "README.md"} <= members


def _installed(release: Release, *args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [release.bin("mailpipe"), *args],
        cwd=cwd, capture_output=True, text=True, timeout=300, check=False,
        env={**_clean_env(), "NO_COLOR": "1", "COLUMNS": "160"},
    )


@pytest.mark.slow
def test_installed_wheel_runs_version_plugins_and_demo(
    release: Release, tmp_path: Path
) -> None:
    from mailpipe import __version__

    done = _installed(release, "--version", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"mailpipe, version {__version__}"

    done = _installed(release, "plugins", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    for name, _ in BUILTIN_PLUGINS:
        assert name in done.stdout, (name, done.stdout)

    done = _installed(release, "demo", cwd=tmp_path)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert (tmp_path / "mailpipe-demo").is_dir()
    # The image's HEALTHCHECK command exists in the installed wheel.
    done = _installed(release, "healthcheck", "--help", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
