"""Admin routes on the Faust web server: backpressure overrides and per-source isolation, behind a
bearer token; every attempt (allowed or not) goes to an append-only audit trail operators can read
(`GET /admin/audit`, or the JSONL file in the data directory).
"""

from __future__ import annotations

import logging
from collections import deque
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import faust
import orjson
from faust.web import Request, Response, View

from ingest_stream.config import Settings
from ingest_stream.core.auth import bearer_allows
from ingest_stream.core.backpressure import State
from ingest_stream.core.timefmt import format_rfc3339
from ingest_stream.stream.backpressure import BackpressureController

log = logging.getLogger(__name__)
AUDIT_FILE = "admin-audit.jsonl"
UNAUTHORIZED = 401


class AuditTrail:
    """Admin actions, appended to a JSONL file (kept across restarts) and logged."""

    def __init__(self, path: Path, keep: int = 1000) -> None:
        self.path = path
        self._recent: deque[dict[str, Any]] = deque(maxlen=keep)
        if path.exists():
            with path.open("rb") as lines:
                self._recent.extend(orjson.loads(line) for line in lines if line.strip())

    def record(self, entry: dict[str, Any]) -> None:
        self._recent.append(entry)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("ab") as out:
            out.write(orjson.dumps(entry) + b"\n")
        log.warning("admin %s by %s from %s: %s", entry["action"], entry["who"], entry["remote"],
                    entry["result"])

    def recent(self, limit: int) -> list[dict[str, Any]]:
        return list(self._recent)[-limit:]


def install_admin_routes(app: faust.App, settings: Settings, controller: BackpressureController) -> None:
    audit = AuditTrail(settings.data_dir / AUDIT_FILE)
    if not settings.admin_token:
        log.warning("INGEST_ADMIN_TOKEN is not set: every /admin route answers 401")

    def guarded(view: View, request: Request, action: str, params: dict[str, Any]) -> Response | None:
        """401 (audited) unless the token matches; None when the caller may proceed."""
        if bearer_allows(request.headers.get("Authorization"), settings.admin_token):
            return None
        _audit(audit, request, action, params, "refused: missing or wrong bearer token")
        return view.json({"error": "unauthorized"}, status=UNAUTHORIZED,
                         headers={"WWW-Authenticate": 'Bearer realm="ingest-stream admin"'})

    def override(state: State) -> type[View]:
        class Override(View):
            async def post(self, request: Request) -> Response:
                params: dict[str, Any] = dict(request.query)
                refused = guarded(self, request, state.value, params)
                if refused is not None:
                    return refused
                who = _who(request)
                try:
                    rate = float(request.query["rate"]) if "rate" in request.query else None
                    await controller.override(state, who=who, rate=rate)
                except ValueError as error:
                    _audit(audit, request, state.value, params, f"rejected: {error}")
                    return self.json({"error": str(error)}, status=400)
                _audit(audit, request, state.value, params, "ok")
                return self.json({"backpressure": controller.status()})

        return Override

    app.page("/admin/drain")(override(State.DRAIN))
    app.page("/admin/pause")(override(State.PAUSED))
    app.page("/admin/brownout")(override(State.BROWNOUT))

    @app.page("/admin/resume")
    class Resume(View):
        async def post(self, request: Request) -> Response:
            refused = guarded(self, request, "resume", {})
            if refused is not None:
                return refused
            await controller.resume(who=_who(request))
            _audit(audit, request, "resume", {}, "ok")
            return self.json({"backpressure": controller.status()})

    @app.page("/admin/sources/{source}/{action}")
    class SourceSwitch(View):
        async def post(self, request: Request, source: str, action: str) -> Response:
            name = f"source-{action}"
            refused = guarded(self, request, name, {"source": source})
            if refused is not None:
                return refused
            if action not in ("enable", "disable"):
                return self.json({"error": "action is enable or disable"}, status=404)
            try:
                await controller.set_source_enabled(source, action == "enable")
            except ValueError as error:
                _audit(audit, request, name, {"source": source}, f"rejected: {error}")
                return self.json({"error": str(error)}, status=404)
            _audit(audit, request, name, {"source": source}, "ok")
            return self.json({"adapters": controller.adapters()})

    @app.page("/admin/audit")
    class Audit(View):
        async def get(self, request: Request) -> Response:
            refused = guarded(self, request, "read-audit", {})
            if refused is not None:
                return refused
            limit = int(request.query.get("limit", "100"))
            return self.json({"entries": audit.recent(limit)})


def _who(request: Request) -> str:
    """The operator, as the caller names itself (X-Operator), else the peer address."""
    return request.headers.get("X-Operator") or _peer(request)


def _peer(request: Request) -> str:
    return str(getattr(request, "remote", None) or "unknown")  # aiohttp's; not on Faust's base type


def _audit(audit: AuditTrail, request: Request, action: str, params: dict[str, Any], result: str) -> None:
    audit.record({"at": format_rfc3339(datetime.now(UTC)), "who": _who(request),
                  "remote": _peer(request), "action": action, "params": params,
                  "result": result})
