"""The worker's read-only web views: health, metrics, the operator page and what it shows.

`/` (and `/operator/state`, what it shows), `/ingest/audit`, `/kpis`, `/checkpoints[/<tenant>/
<source>]` and `/dedupe/stats` answer from state the worker keeps (core/audit.py counters, its own
table partitions): no topic is read on a request. Each worker answers for the partitions it holds
and says which; `ingest-stream checkpoints` / `dedupe-stats` read every partition from the
changelogs.

With INGEST_VIEWER_TOKEN set, those views need HTTP Basic with the token as the password, and
`/health/detailed` (which probes and load balancers call without it) hides tenant ids and error
text from callers without it.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from importlib import resources
from typing import TYPE_CHECKING, Any

import faust
from faust.web import Request, Response, View
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from ingest_stream.config import SOURCES
from ingest_stream.core.audit import WINDOW_MINUTES
from ingest_stream.core.auth import basic_allows
from ingest_stream.core.checkpoints import checkpoint_rows, dedupe_row

if TYPE_CHECKING:
    from ingest_stream.stream.app import Pipeline

UNAUTHORIZED = 401
BAD_REQUEST = 400
NOT_FOUND = 404
HIDDEN = "hidden"
RECENT_ADMIN_ACTIONS = 10
PAGE = resources.files("ingest_stream.stream").joinpath("operator.html").read_bytes()


def install_views(app: faust.App, pipeline: Pipeline) -> None:
    settings = pipeline.settings

    def viewer(request: Request) -> bool:
        """The caller may see tenants and errors: no viewer token is set, or it gave it."""
        return not settings.web.viewer_token or basic_allows(request.headers.get("Authorization"),
                                                         settings.web.viewer_token)

    def refusal(view: View) -> Response:
        return view.json({"error": "unauthorized: HTTP Basic with INGEST_VIEWER_TOKEN as the password"},
                         status=UNAUTHORIZED, headers={"WWW-Authenticate": 'Basic realm="ingest-stream"'})

    def for_viewers(answer: Callable[[View, Request], Response]) -> type[View]:
        class Guarded(View):
            async def get(self, request: Request, **parts: str) -> Response:
                if not viewer(request):
                    return refusal(self)
                try:
                    return answer(self, request, **parts)
                except ValueError as error:  # a query parameter the view cannot take
                    return self.json({"error": str(error)}, status=BAD_REQUEST)

        return Guarded

    @app.page("/health")
    class Health(View):
        async def get(self, request: Request) -> Response:
            return self.json({"status": "ok"})

    @app.page("/health/ready")
    class Ready(View):
        """Readiness (Kubernetes): the worker consumes (joined its group, no rebalance or table
        recovery under way). Liveness stays /health. A down sink does not make it unready: its
        agent holds, the sources go on (the webhook keeps taking records into Kafka), and every
        worker unready at once would stall rollouts and node drains behind the PodDisruptionBudget;
        /health/detailed and the circuit alerts say which sink is down."""

        async def get(self, request: Request) -> Response:
            waiting = not_ready(app, pipeline)
            return self.json({"ready": not waiting, "waiting_for": waiting}, status=503 if waiting else 200)

    @app.page("/health/detailed")
    class HealthDetailed(View):
        async def get(self, request: Request) -> Response:
            detail = detailed_health(pipeline)
            return self.json(detail if viewer(request) else redacted(detail))

    @app.page("/metrics")
    class MetricsView(View):
        async def get(self, request: Request) -> Response:
            return self.bytes(generate_latest(pipeline.metrics.registry),
                              content_type=CONTENT_TYPE_LATEST.split(";")[0])

    def page(view: View, request: Request) -> Response:
        return view.bytes(PAGE, content_type="text/html", headers={
            "Cache-Control": "no-store",
            # Everything the page needs is in it and on this worker: no CDN, no other origin.
            "Content-Security-Policy": "default-src 'self'; script-src 'unsafe-inline'; "
                                       "style-src 'unsafe-inline'; connect-src 'self'"})

    def audit(view: View, request: Request) -> Response:
        minutes = query_minutes(request.query)
        rows = pipeline.audit.audit(now_s=time.time(), minutes=minutes,
                                    tenant=request.query.get("tenant"), source=request.query.get("source"))
        return view.json({"worker": held(app, pipeline), "window_minutes": minutes,
                          "rows": rows})

    def kpis(view: View, request: Request) -> Response:
        return view.json({"worker": held(app, pipeline),
                          **pipeline.audit.kpis(now_s=time.time(), minutes=query_minutes(request.query))})

    def checkpoints(view: View, request: Request, tenant: str | None = None,
                    source: str | None = None) -> Response:
        if source is not None and source not in SOURCES:
            return view.json({"error": f"unknown source {source!r}; known: {', '.join(SOURCES)}"},
                             status=NOT_FOUND)
        tenant = tenant or request.query.get("tenant")
        source = source or request.query.get("source")
        rows = []
        for name, tables in pipeline.tables.items():
            if source is None or name == source:
                rows += checkpoint_rows(tables.checkpoints.data.items(), tenant=tenant)
        return view.json({"worker": held(app, pipeline), "checkpoints": rows})

    def dedupe_stats(view: View, request: Request) -> Response:
        evicted = evicted_by_source(pipeline)
        now_ms = int(time.time() * 1000)
        rows = [dedupe_row(name, tables.dedupe.data.values(), evicted=evicted.get(name, 0),
                           ttl_s=settings.dedupe_ttl_s, now_ms=now_ms)
                for name, tables in pipeline.tables.items()]
        return view.json({"worker": held(app, pipeline), "sources": rows,
                          "evicted_counts": "since this worker started"})

    def state(view: View, request: Request) -> Response:
        """Everything the operator page shows, in one answer (one refresh, one consistent view)."""
        now_s = time.time()
        actions = [{key: entry.get(key) for key in ("at", "who", "action", "params", "result")}
                   for entry in reversed(pipeline.admin_actions.recent(RECENT_ADMIN_ACTIONS))]
        return view.json({"worker": held(app, pipeline), "health": detailed_health(pipeline),
                          "kpis": pipeline.audit.kpis(now_s=now_s), "admin_actions": actions})

    app.page("/")(for_viewers(page))
    app.page("/operator/state")(for_viewers(state))
    app.page("/ingest/audit")(for_viewers(audit))
    app.page("/kpis")(for_viewers(kpis))
    app.page("/checkpoints")(for_viewers(checkpoints))
    app.page("/checkpoints/{tenant}/{source}")(for_viewers(checkpoints))
    app.page("/dedupe/stats")(for_viewers(dedupe_stats))


def query_minutes(query: Mapping[str, str]) -> int:
    """`?minutes=`: the window, 1 to 60 (default 60)."""
    raw = query.get("minutes", str(WINDOW_MINUTES))
    if not (raw.isascii() and raw.isdigit()) or not 1 <= int(raw) <= WINDOW_MINUTES:
        raise ValueError(f"minutes must be a whole number from 1 to {WINDOW_MINUTES}, not {raw[:40]!r}")
    return int(raw)


def held(app: faust.App, pipeline: Pipeline) -> dict[str, Any]:
    """Which source-topic partitions this worker holds: what its tables and audit answer for."""
    topics = {pipeline.settings.source_topic(source): source for source in SOURCES}
    owned: dict[str, list[int]] = {}
    for tp in app.assignor.assigned_actives():
        if tp.topic in topics:
            owned.setdefault(topics[tp.topic], []).append(tp.partition)
    return {"id": app.conf.id, "web_port": pipeline.settings.web.port,
            "partitions": {source: sorted(parts) for source, parts in sorted(owned.items())}}


def evicted_by_source(pipeline: Pipeline) -> dict[str, int]:
    evicted: dict[str, int] = {}
    for metric in pipeline.metrics.dedupe_evicted.collect():
        for sample in metric.samples:
            if sample.name.endswith("_total"):
                evicted[sample.labels["source"]] = int(sample.value)
    return evicted


def redacted(detail: Any) -> Any:
    """`/health/detailed` for a caller without the viewer token: tenant ids and error text hidden
    (reasons, states, times and counts stay)."""
    if isinstance(detail, dict):
        return {key: HIDDEN if key in ("tenant", "error") and value is not None
                else HIDDEN if key == "last_error" and isinstance(value, str)
                else redacted(value) for key, value in detail.items()}
    if isinstance(detail, list):
        return [redacted(item) for item in detail]
    return detail


def not_ready(app: faust.App, pipeline: Pipeline) -> list[str]:
    """What keeps the worker from consuming: joining its group, a rebalance, table recovery.
    Empty when ready."""
    waiting = []
    if not pipeline.consuming:
        waiting.append("joining the consumer group")
    if getattr(app, "rebalancing", False):
        waiting.append("a rebalance")
    if getattr(app, "in_recovery", False):
        waiting.append("table recovery")
    return waiting


def detailed_health(pipeline: Pipeline) -> dict[str, Any]:
    """What an operator needs at a glance: each sink's circuit and last error, partitions waiting
    without progress (the watchdog restarts the worker at `stall_timeout_s`), dead letters."""
    sinks = {name: {**sink.health(), "lane": pipeline.lanes[name].status()}
             for name, sink in pipeline.sinks.items()}
    timeout_s = pipeline.settings.stall_timeout_s
    waiting = {key: round(seconds, 1) for key, seconds in pipeline.stalls.waiting.items()}
    dlq: dict[str, float] = {}
    for metric in pipeline.metrics.dlq.collect():
        for sample in metric.samples:
            if sample.name.endswith("_total"):
                reason = sample.labels["reason"]
                dlq[reason] = dlq.get(reason, 0) + sample.value
    degraded = any(s["circuit"] != "closed" for s in sinks.values()) or any(
        seconds >= timeout_s / 2 for seconds in waiting.values())
    backpressure = pipeline.backpressure.status()
    degraded = degraded or backpressure["state"] != "normal"
    return {
        "status": "degraded" if degraded else "ok",
        "adapters": pipeline.backpressure.adapters(),
        "backpressure": backpressure,
        "sinks": sinks,
        "stalls": {"timeout_s": timeout_s, "waiting_without_progress_s": waiting},
        "dlq": {"since_start_by_reason": {k: int(v) for k, v in sorted(dlq.items())},
                "last_hour_by_reason": pipeline.audit.letters_by_reason(now_s=time.time())},
    }
