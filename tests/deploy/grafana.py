"""Reading the provisioned Grafana dashboards: their PromQL and the metrics it names."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

DASHBOARDS = Path(__file__).resolve().parents[2] / "deploy" / "grafana" / "dashboards"
VARIABLES = {"$tenant": "acme-corp", "$source": "kafka", "$__rate_interval": "5m"}
_METRIC = re.compile(r"\b(ingest_[a-z0-9_]+)")
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
