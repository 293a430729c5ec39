"""Reading the provisioned Grafana dashboards: their PromQL and the metrics it names."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

DASHBOARDS = Path(__file__).resolve().parents[2] / "deploy" / "grafana" / "dashboards"
VARIABLES = {"$tenant": "acme-corp", "$source": "kafka", "$job": "ingest-stream",
             "$instance": "worker-1:8080", "$__rate_interval": "5m"}
_METRIC = re.compile(r"\b(ingest_[a-z0-9_]+)")
# A series selector: a metric name (ours, or the process collector's) and its matchers, if any.
_SELECTOR = re.compile(r"\b((?:ingest|process)_[a-z0-9_]+)(?:\{([^}]*)\})?")
# A link into Grafana as the runbooks write it: /d/<uid>[/<slug>][?viewPanel=<id>], after "$GRAFANA"
# or a Markdown link's "(", with the panel's quoted title or the link's text before it when there is one.
DASHBOARD_LINK = re.compile(
    r'(?:\[(?P<text>[^\]]+)\]\(|"(?P<title>[^"]+)" \(`)?(?:\$GRAFANA)?'
    r"/d/(?P<uid>[A-Za-z0-9_-]+)(?:/[a-z0-9-]+)?(?:\?viewPanel=(?:panel-)?(?P<panel>\d+))?")
_SUFFIXES = ("_bucket", "_count", "_sum")


def dashboards() -> dict[Path, dict[str, Any]]:
    return {path: json.loads(path.read_text()) for path in sorted(DASHBOARDS.glob("*.json"))}


def expressions(dashboard: dict[str, Any]) -> list[str]:
    return [target["expr"] for panel in dashboard["panels"] for target in panel.get("targets", [])]


def concrete(expr: str) -> str:
    """The expression with dashboard variables filled in, as Prometheus would receive it."""
    for name, value in VARIABLES.items():
        expr = expr.replace(name, value)
    return expr


def metric_families(expr: str) -> set[str]:
    """Metric names an expression reads, without histogram series suffixes."""
    names = set()
    for name in _METRIC.findall(expr):
        for suffix in _SUFFIXES:
            if name.endswith(suffix):
                name = name[: -len(suffix)]
        names.add(name)
    return names


def exposed_families(exposition: str) -> set[str]:
    """Families in a /metrics text: counters are exposed as <name>_total, as the queries use them."""
    families = set()
    for line in exposition.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(" ", 3)
            families.add(name + "_total" if kind == "counter" and not name.endswith("_total") else name)
    return families


def selectors(expr: str) -> list[tuple[str, str]]:
    """(metric, matchers) of each series selector in an expression; matchers "" when it has none."""
    return [(m.group(1), m.group(2) or "") for m in _SELECTOR.finditer(expr)]


def variables(dashboard: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {v["name"]: v for v in dashboard["templating"]["list"]}


def by_uid() -> dict[str, dict[str, Any]]:
    return {d["uid"]: d for d in dashboards().values()}


def resolve(link: re.Match[str]) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """The dashboard and panel a DASHBOARD_LINK match opens; AssertionError when Grafana would not find it."""
    found = by_uid()
    uid = link.group("uid")
    assert uid in found, f"{link.group(0)}: no dashboard with uid {uid!r} (provisioned: {sorted(found)})"
    dashboard = found[uid]
    named = link.group("text") or link.group("title")
    if link.group("panel") is None:
        assert named in (None, dashboard["title"]), f"{link.group(0)}: its title is {dashboard['title']!r}"
        return dashboard, None
    panels = {p["id"]: p for p in dashboard["panels"]}
    panel = panels.get(int(link.group("panel")))
    assert panel is not None, f"{link.group(0)}: dashboard {uid} has no panel {link.group('panel')}"
    assert named in (None, panel["title"]), f"{link.group(0)}: panel {panel['id']} is {panel['title']!r}"
    return dashboard, panel
