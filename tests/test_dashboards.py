"""The shipped Prometheus alert rules and Grafana dashboard (deploy/prometheus,
deploy/grafana): promtool accepts the rules and its unit tests fire every alert, and
every mailpipe metric they use is one mailpipe/metrics.py exports, or one listed in
PROVIDED_ELSEWHERE and documented as such. promtool comes from Debian's `prometheus`
package (.ci/run installs it): missing, its tests skip, and fail in CI (CI=true)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import yaml

from mailpipe.metrics import MetricsCollector
from mailpipe.quarantine import Quarantine
from mailpipe.testing.pytest_plugin import skip_or_fail

ROOT = Path(__file__).resolve().parents[1]
RULES = ROOT / "deploy" / "prometheus" / "mailpipe-alerts.yml"
RULE_TESTS = ROOT / "deploy" / "prometheus" / "mailpipe-alerts.test.yml"
DASHBOARD = ROOT / "deploy" / "grafana" / "mailpipe-dashboard.json"
README = ROOT / "README.md"

#: Metrics the rules or dashboard use that another feature is to export.
PROVIDED_ELSEWHERE: dict[str, str] = {}  # every metric used is exported now (OAuth too)
_METRIC = re.compile(r"\bmailpipe_[a-z0-9_]+")


def promtool() -> str:
    found = shutil.which("promtool")
    if found is None:
        skip_or_fail("promtool not installed (Debian package prometheus; .ci/run)")
    return found


def rule_exprs() -> dict[str, str]:
    doc = yaml.safe_load(RULES.read_text())
    return {
        rule["alert"]: rule["expr"]
        for group in doc["groups"]
        for rule in group["rules"]
    }


def dashboard_exprs() -> list[str]:
    doc = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in doc["panels"] for t in p["targets"]]
    exprs += [
        v["definition"] for v in doc["templating"]["list"] if v["type"] == "query"
    ]
    return exprs


def exported() -> set[str]:
    """Every sample name the metrics endpoint can export (from its # TYPE lines)."""
    text = MetricsCollector(["m"], unhealthy_after=60).render().decode()
    names: set[str] = set()
    for kind_line in re.findall(r"^# TYPE (\S+) (\S+)$", text, re.M):
        name, kind = kind_line
        names.add(name)
        if kind == "histogram":
            names |= {f"{name}_bucket", f"{name}_sum", f"{name}_count"}
    return names


def test_promtool_accepts_the_rules() -> None:
    done = subprocess.run(
        [promtool(), "check", "rules", str(RULES)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"SUCCESS: {len(rule_exprs())} rules found" in done.stdout


def test_promtool_unit_tests_fire_every_alert() -> None:
    done = subprocess.run(
        [promtool(), "test", "rules", RULE_TESTS.name],
        cwd=RULE_TESTS.parent,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    tests = yaml.safe_load(RULE_TESTS.read_text())["tests"]
    fired = {
        case["alertname"]
        for test in tests
        for case in test["alert_rule_test"]
        if case.get("exp_alerts")
    }
    assert fired == set(rule_exprs())


def test_oauth_alerts_stay_silent_on_realistic_healthy_tokens() -> None:
    """Access tokens live about an hour and are refreshed only when a poll asks: the
    unit tests hold a healthy Google (3599 s, hourly polls) and Microsoft (75 min)
    mailbox, and every alert reading an OAuth metric is checked silent on them."""
    oauth_alerts = {a for a, e in rule_exprs().items() if "mailpipe_oauth_" in e}
    assert oauth_alerts
    tests = yaml.safe_load(RULE_TESTS.read_text())["tests"]
    healthy = [t for t in tests if t["name"].startswith("healthy OAuth tokens")]
    assert len(healthy) == 1
    series = " ".join(s["series"] for s in healthy[0]["input_series"])
    assert 'mailbox="gmail"' in series and 'mailbox="outlook"' in series
    checked = {c["alertname"] for c in healthy[0]["alert_rule_test"]}
    assert oauth_alerts <= checked
    assert not any(c.get("exp_alerts") for c in healthy[0]["alert_rule_test"])
    # the token's expiry alone is no alert (it is normally past between polls)
    assert not any(
        "mailpipe_oauth_token_expiry_timestamp_seconds" in e
        for e in rule_exprs().values()
    )


def test_every_metric_used_is_exported_or_documented_as_elsewhere() -> None:
    used: dict[str, list[str]] = {}
    for alert, expr in rule_exprs().items():
        for name in _METRIC.findall(expr):
            used.setdefault(name, []).append(f"alert {alert}")
    for expr in dashboard_exprs():
        for name in _METRIC.findall(expr):
            used.setdefault(name, []).append("dashboard")
    have = exported()
    missing = {
        n: w for n, w in used.items() if n not in have and n not in PROVIDED_ELSEWHERE
    }
    assert not missing, f"used but not exported by mailpipe/metrics.py: {missing}"
    # the list is not stale: each one is used, and not exported yet
    assert set(PROVIDED_ELSEWHERE) <= set(used)
    assert not set(PROVIDED_ELSEWHERE) & have
    # and documented: in the rules file and the README's Operating section
    operating = (
        README.read_text().split("## Operating mailpipe", 1)[1].split("\n## ", 1)[0]
    )
    operating = " ".join(operating.split())
    for name in PROVIDED_ELSEWHERE:
        assert name in RULES.read_text().split("groups:", 1)[0]
        assert name in operating and "not exported" in operating
    if not PROVIDED_ELSEWHERE:  # nor does any text still say one is missing
        assert "not exported" not in operating
        descriptions = " ".join(
            p.get("description", "") for p in json.loads(DASHBOARD.read_text())["panels"]
        )
        assert "to be exported" not in descriptions
        assert "no such series" not in descriptions
    # and the dashboard shows most of what is exported
    assert len({n for n in used if n in have}) >= 10
    assert "mailpipe_oauth_token_expiry_timestamp_seconds" in have


def test_dashboard_is_portable() -> None:
    doc: dict[str, Any] = json.loads(DASHBOARD.read_text())
    assert doc["uid"] == "mailpipe-overview" and doc["title"] == "mailpipe"
    ids = [p["id"] for p in doc["panels"]]
    assert len(ids) == len(set(ids))
    variables = {v["name"]: v for v in doc["templating"]["list"]}
    assert {"datasource", "job", "mailbox"} <= set(variables)
    # job and mailbox come from a series every enabled mailbox has from the start
    # (not one set only after a successful login: a mailbox failing at login must
    # stay on every panel), and "All" matches any value, not only the listed ones
    for name in ("job", "mailbox"):
        variable = variables[name]
        assert variable["definition"].startswith(
            "label_values(mailpipe_poll_interval_seconds"
        ), variable["definition"]
        assert variable["query"]["query"] == variable["definition"]
        assert variable["includeAll"] and variable["allValue"] == ".*"
    for p in doc["panels"]:
        # no hard-wired datasource: the importer picks one
        assert p["datasource"]["uid"] == "${datasource}", p["title"]
        assert p["targets"] and all(t["expr"] for t in p["targets"]), p["title"]
        assert all('mailbox=~"$mailbox"' in t["expr"] for t in p["targets"]), p["title"]


def test_a_panel_naming_an_alert_plots_what_the_alert_reads() -> None:
    panels = json.loads(DASHBOARD.read_text())["panels"]
    named = 0
    for alert, expr in rule_exprs().items():
        for p in panels:
            if alert in p.get("description", ""):
                named += 1
                plotted = " ".join(t["expr"] for t in p["targets"])
                assert set(_METRIC.findall(expr)) <= set(_METRIC.findall(plotted)), (
                    p["title"], alert
                )
    assert named >= 1  # the poll panel names MailpipeNoPoll


def test_new_gauges_carry_poll_time_interval_and_quarantine(tmp_path: Path) -> None:
    from mailpipe.message import Message, MessageRef

    quarantine = Quarantine(tmp_path / "q")
    raw = b"Subject: x\r\n\r\n" + b"y" * 100
    ref = MessageRef(mailbox="a", number=1, uid="u1", size=len(raw))
    quarantine.put(Message(ref=ref, data=raw), reason="test")
    collector = MetricsCollector(
        ["a", "b"], unhealthy_after=60, intervals={"a": 30.0}, quarantine=quarantine
    )
    collector.mailpipe_session_finished(mailbox="b", summary={"error": None})
    text = collector.render().decode()
    assert 'mailpipe_poll_interval_seconds{mailbox="a"} 30.0' in text
    assert 'mailpipe_quarantine_messages{mailbox="a"} 1.0' in text
    assert f'mailpipe_quarantine_bytes{{mailbox="a"}} {float(len(raw))}' in text
    assert 'mailpipe_quarantine_messages{mailbox="b"} 0.0' in text
    assert re.search(
        r'mailpipe_last_poll_timestamp_seconds\{mailbox="b"\} 1\.\d+e\+09', text
    )
