"""deploy/prometheus/bastion-rules.yml: valid for promtool, and every alert unit-tested.

``promtool`` comes with Debian's ``prometheus`` package (``.ci/run`` installs it);
without it the two promtool tests skip, naming the package, and the structure
tests still run.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from support.server import REPO_ROOT
from support.timeouts import scaled

DEPLOY = REPO_ROOT / "deploy" / "prometheus"
RULES = DEPLOY / "bastion-rules.yml"
RULE_TESTS = DEPLOY / "bastion-rules.test.yml"


@pytest.fixture(scope="module")
def promtool() -> str:
    found = shutil.which("promtool")
    if found is None:
        pytest.skip("promtool is not installed (`apt-get install -y prometheus`; .ci/run does)")
    return found


def _run(promtool: str, *args: str, cwd: Path = DEPLOY) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [promtool, *args],
        cwd=str(cwd),
        capture_output=True,
        text=True,
        timeout=scaled(60),
        check=False,
    )


def _load(path: Path) -> Any:
    return yaml.safe_load(path.read_text(encoding="utf-8"))


def _rules() -> list[dict[str, Any]]:
    return [rule for group in _load(RULES)["groups"] for rule in group["rules"]]


def _alerts() -> dict[str, dict[str, Any]]:
    return {rule["alert"]: rule for rule in _rules() if "alert" in rule}


def test_promtool_checks_the_rules(promtool: str) -> None:
    result = _run(promtool, "check", "rules", RULES.name)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_promtool_runs_the_unit_tests_of_every_alert(promtool: str) -> None:
    result = _run(promtool, "test", "rules", RULE_TESTS.name)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_every_alert_has_a_test_that_fires_it_and_one_that_does_not() -> None:
    fired: set[str] = set()
    quiet: set[str] = set()
    for case in _load(RULE_TESTS)["tests"]:
        for check in case.get("alert_rule_test", []):
            (fired if check.get("exp_alerts") else quiet).add(check["alertname"])
    alerts = set(_alerts())
    assert not alerts - fired, f"alerts never seen firing: {sorted(alerts - fired)}"
    assert not alerts - quiet, f"alerts never seen quiet: {sorted(alerts - quiet)}"
    assert not (fired | quiet) - alerts, "tests of alerts that no longer exist"


def test_the_issue_s_alerts_are_all_there() -> None:
    assert {
        "BastionDown",
        "BastionNotReady",
        "BastionBusDisconnected",
        "BastionWebhookBacklog",
        "BastionWebhookDeadLetters",
        "BastionSlowConsumers",
        "BastionRefusalSpike",
        "BastionEventLoopLag",
        "BastionRestLatencyHigh",
        "BastionSecurityAlert",
    } <= set(_alerts())


@pytest.mark.parametrize("name", sorted(_alerts()))
def test_each_alert_says_how_bad_and_what_happened(name: str) -> None:
    rule = _alerts()[name]
    severity = rule["labels"]["severity"]
    assert severity in {"warning", "critical", "{{ $labels.severity }}"}
    assert rule["annotations"]["summary"] and rule["annotations"]["description"]
