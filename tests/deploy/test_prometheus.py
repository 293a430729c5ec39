"""Alert and recording rules: valid for promtool, and each alert fires when it should and only then
(deploy/prometheus/ingest-rules.test.yml)."""

from __future__ import annotations

import subprocess
from pathlib import Path
from urllib.parse import urlsplit

import yaml

ROOT = Path(__file__).resolve().parents[2]
PROMTOOL = ROOT / ".venv" / "bin" / "promtool"
RULES = ROOT / "deploy" / "prometheus" / "ingest-rules.yml"
RUNBOOK = ROOT / "docs" / "runbook.md"
# The alerts the operators' reference runbook (shared/reference/ingest-pipeline-runbook.md) names.
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


def runbook_base() -> str:
    """The one address every alert's runbook_url starts with (the rules file's header: how to change it)."""
    bases = {rule["annotations"]["runbook_url"].split("#", 1)[0] for rule in alerts().values()}
    assert len(bases) == 1, f"runbook_urls of more than one base: {sorted(bases)}"
    return bases.pop()


def test_the_runbook_alerts_exist_and_link_a_section_of_our_runbook():
    defined = alerts()
    assert set(defined) >= RUNBOOK_ALERTS | {"IngestConsumerNotCommitting"}
    runbook = RUNBOOK.read_text()
    for name, rule in defined.items():
        anchor = rule["annotations"]["runbook_url"].split("#", 1)[1]
        assert f'<a name="{anchor}"></a>' in runbook, name
        assert rule["labels"]["severity"] in ("warning", "critical")


def test_runbook_urls_are_absolute_links_to_our_runbook():
    # A relative runbook_url ("docs/runbook.md#…") is no link in Alertmanager, Grafana or a chat message.
    base = urlsplit(runbook_base())
    assert (base.scheme, bool(base.netloc)) == ("https", True), base.geturl()
    assert base.path.endswith("/docs/runbook.md") and not base.query, base.geturl()


def test_every_alert_has_a_description_with_the_value_that_fired_it():
    for name, rule in alerts().items():
        description = rule["annotations"].get("description", "")
        assert "$value" in description, f"{name}: no description with $value"
