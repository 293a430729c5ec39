"""Admin routes on the Faust web server: backpressure overrides and per-source isolation, behind a
bearer token; every attempt (allowed or not) goes to an append-only audit trail operators can read
(`GET /admin/audit`, or the JSONL file in the data directory).

A torn or garbled line in that file (a crash mid-append, an edit by hand) is skipped with a
warning, never a reason not to start; the next entry starts on a line of its own. A query
parameter that is not what the route takes is a 400 with the reason, never a 500.
"""

from __future__ import annotations

import logging
import os
from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
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
BAD_REQUEST = 400
DEFAULT_AUDIT_LIMIT = 100
SKIPPED_LINES_SHOWN = 10


class QueryError(ValueError):
    """A query parameter the route cannot take; the message says which and why."""


@dataclass
class AuditRead:
    """What an audit file held: the last `keep` entries, and the lines that were not entries."""

    entries: deque[dict[str, Any]]
    skipped: int = 0  # lines torn or garbled
    skipped_lines: list[int] = field(default_factory=list)  # the first few of them (1-based)


def read_audit(lines: Iterable[bytes], keep: int) -> AuditRead:
    """The entries of an audit file's lines; a line that is not a JSON object is skipped."""
    read = AuditRead(deque(maxlen=keep))
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            entry = orjson.loads(line)
        except orjson.JSONDecodeError:
            entry = None
        if isinstance(entry, dict):
            read.entries.append(entry)
        else:
            read.skipped += 1
            if len(read.skipped_lines) < SKIPPED_LINES_SHOWN:
                read.skipped_lines.append(number)
    return read


class AuditTrail:
    """Admin actions, appended to a JSONL file (kept across restarts) and logged."""

    def __init__(self, path: Path, keep: int = 1000) -> None:
        self.path = path
        self._recent: deque[dict[str, Any]] = deque(maxlen=keep)
        if path.exists():
            with path.open("rb") as lines:
                read = read_audit(lines, keep)
            self._recent = read.entries
            if read.skipped:
                log.warning("admin audit %s: %d line(s) not read (torn or garbled), skipped: line %s",
                            path, read.skipped, ", ".join(map(str, read.skipped_lines)))

    def record(self, entry: dict[str, Any]) -> None:
        self._recent.append(entry)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a+b") as out:  # appends go to the end whatever was read
            line = orjson.dumps(entry) + b"\n"
            if out.seek(0, os.SEEK_END) > 0:
                out.seek(-1, os.SEEK_END)
                if out.read(1) != b"\n":  # a torn last line: ours starts on a line of its own
                    line = b"\n" + line
            out.write(line)
        log.warning("admin %s by %s from %s: %s", entry["action"], entry["who"], entry["remote"],
                    entry["result"])

    def recent(self, limit: int) -> list[dict[str, Any]]:
        """The last `limit` entries (all kept ones when there are fewer), oldest first."""
        return list(self._recent)[-limit:] if limit > 0 else []


def install_admin_routes(app: faust.App, settings: Settings, controller: BackpressureController,
                         audit: AuditTrail) -> None:
    if not settings.web.admin_token:
        log.warning("INGEST_ADMIN_TOKEN is not set: every /admin route answers 401")

    def guarded(view: View, request: Request, action: str, params: dict[str, Any]) -> Response | None:
        """401 (audited) unless the token matches; None when the caller may proceed."""
        if bearer_allows(request.headers.get("Authorization"), settings.web.admin_token):
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
                    await controller.override(state, who=who, rate=query_rate(request.query))
                except ValueError as error:  # QueryError too
                    _audit(audit, request, state.value, params, f"rejected: {error}")
                    return self.json({"error": str(error)}, status=BAD_REQUEST)
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
            try:
                limit = query_limit(request.query)
            except QueryError as error:
                return self.json({"error": str(error)}, status=BAD_REQUEST)
            return self.json({"entries": audit.recent(limit)})


def query_limit(query: Mapping[str, str]) -> int:
    """`?limit=`: how many audit entries, a whole number from 0 (default 100)."""
    raw = query.get("limit", str(DEFAULT_AUDIT_LIMIT))
    try:
        limit = int(raw)
    except ValueError:
        raise QueryError(f"limit must be a whole number (0 or more), not {_shown(raw)}") from None
    if limit < 0:
        raise QueryError(f"limit must be a whole number (0 or more), not {_shown(raw)}")
    return limit


def query_rate(query: Mapping[str, str]) -> float | None:
    """`?rate=`: a brownout rate, a number (its range is the controller's to check); None when absent."""
    raw = query.get("rate")
    if raw is None:
        return None
    try:
        return float(raw)
    except ValueError:
        raise QueryError(f"rate must be a number within [0, 1], not {_shown(raw)}") from None


def _shown(raw: str, at_most: int = 40) -> str:
    return repr(raw if len(raw) <= at_most else raw[:at_most] + "…")


def _who(request: Request) -> str:
    """The operator, as the caller names itself (X-Operator), else the peer address."""
    return request.headers.get("X-Operator") or _peer(request)


def _peer(request: Request) -> str:
    return str(getattr(request, "remote", None) or "unknown")  # aiohttp's; not on Faust's base type


def _audit(audit: AuditTrail, request: Request, action: str, params: dict[str, Any], result: str) -> None:
    audit.record({"at": format_rfc3339(datetime.now(UTC)), "who": _who(request),
                  "remote": _peer(request), "action": action, "params": params,
                  "result": result})
