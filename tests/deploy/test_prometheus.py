"""Alert and recording rules: valid for promtool, and each alert fires when it should and only then
(deploy/prometheus/ingest-rules.test.yml)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
PROMTOOL = ROOT / ".venv" / "bin" / "promtool"
RULES = ROOT / "deploy" / "prometheus" / "ingest-rules.yml"
RUNBOOK = ROOT / "docs" / "runbook.md"
RUNBOOK_ALERTS = {"IngestLagHigh", "IngestLagCritical", "IngestDLQRateHigh", "IngestDLQSpike",
                  "IngestBackpressureStuck", "IngestCircuitBreakerOpen"}


def promtool(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(PROMTOOL), *args], cwd=cwd, capture_output=True, text=True, timeout=120,
                          check=False)


def alerts() -> dict[str, dict]:
    groups = yaml.safe_load(RULES.read_text())["groups"]
    return {rule["alert"]: rule for group in groups for rule in group["rules"] if "alert" in rule}


def test_rules_pass_promtool_check():
    done = promtool("check", "rules", str(RULES))
    assert done.returncode == 0, done.stdout + done.stderr


def test_each_alert_fires_and_stays_quiet_as_its_unit_tests_say():
    done = promtool("test", "rules", "ingest-rules.test.yml", cwd=RULES.parent)
    assert done.returncode == 0, done.stdout + done.stderr
    tested = (RULES.parent / "ingest-rules.test.yml").read_text()
    for name in alerts():
        assert f"alertname: {name}" in tested, f"{name} has no promtool test"


def test_the_runbook_alerts_exist_and_link_a_section_of_our_runbook():
    defined = alerts()
    assert set(defined) >= RUNBOOK_ALERTS | {"IngestConsumerNotCommitting"}
    runbook = RUNBOOK.read_text()
    for name, rule in defined.items():
        url = rule["annotations"]["runbook_url"]
        anchor = url.split("#", 1)[1]
        assert url.startswith("docs/runbook.md#") and f'<a name="{anchor}"></a>' in runbook, name
        assert rule["labels"]["severity"] in ("warning", "critical")
