"""`POST /ingest/webhook`: records pushed over HTTP into `<prefix>.source.webhook`.

The tenant names itself (`X-Tenant` header or `?tenant=`) and proves it (core/webhook.py). The
answer is 202 only once every record is acknowledged by Kafka; 400 for a body that is not
records, 401/403 for the wrong caller, 413 above the size limit, 429 with Retry-After while
backpressure holds new input, 503 while the webhook source is disabled or Kafka refuses.
"""

from __future__ import annotations

import asyncio
import logging
import math
import secrets
import time
from datetime import UTC, datetime
from typing import Any

import faust
import orjson
from faust.web import Request, Response, View

from ingest_stream.config import Settings
from ingest_stream.core.record import entity_key
from ingest_stream.core.timefmt import format_rfc3339
from ingest_stream.core.webhook import FramingError, authenticate, foreign_tenant, parse_auth, parse_records
from ingest_stream.metrics import Metrics
from ingest_stream.stream.backpressure import BackpressureController

log = logging.getLogger(__name__)
SOURCE = "webhook"
REQUEST_HEADER = "ingest.webhook.request"


def install_webhook(app: faust.App, settings: Settings, topic: faust.TopicT,
                    controller: BackpressureController, metrics: Metrics) -> None:
    auth = parse_auth(settings.webhook_auth)
    health = controller.adapter_health.setdefault(SOURCE, {"last_request_at": None, "last_error": None,
                                                           "accepted_records": 0})
    requests = metrics.webhook_requests
    produced = metrics.adapter_records.labels(SOURCE)

    def answer(view: View, status: int, document: dict[str, Any], **headers: str) -> Response:
        requests.labels(str(status)).inc()
        if status >= 400:
            health["last_error"] = f"{status}: {document.get('error')}"
        return view.json(document, status=status, headers=headers or None)

    @app.page("/ingest/webhook")
    class Webhook(View):
        async def post(self, request: Request) -> Response:
            health["last_request_at"] = format_rfc3339(datetime.now(UTC))
            tenant = request.headers.get("X-Tenant") or request.query.get("tenant")
            declared = request.headers.get("Content-Length")
            if declared and declared.isdigit() and int(declared) > settings.webhook_max_body_bytes:
                return answer(self, 413, {"error": f"body over {settings.webhook_max_body_bytes} bytes"})
            try:
                body = await request.read()
            except Exception:  # aiohttp's own limit, when no Content-Length was sent
                return answer(self, 413, {"error": f"body over {settings.webhook_max_body_bytes} bytes"})
            if len(body) > settings.webhook_max_body_bytes:
                return answer(self, 413, {"error": f"body over {settings.webhook_max_body_bytes} bytes"})
            refusal = authenticate(tenant, request.headers, body, auth, now_s=time.time(),
                                   window_s=settings.webhook_signature_window_s)
            if refusal is not None:
                return answer(self, int(refusal), {"error": "forbidden: signature outside the replay window"
                                                   if refusal == 403 else "unauthorized"})
            assert tenant is not None
            try:
                records = parse_records(body, request.headers.get("Content-Type", ""))
            except FramingError as error:
                return answer(self, 400, {"error": str(error)})
            other = foreign_tenant(records, tenant)
            if other is not None:
                return answer(self, 403, {"error": f"record {other} names another tenant"})
            if SOURCE in controller.disabled:
                return answer(self, 503, {"error": "the webhook source is disabled"}, **{"Retry-After": "60"})
            wait = controller.input_retry_after(len(records))
            if wait is not None:
                return answer(self, 429, {"error": f"backpressure: {controller.machine.state.value}"},
                              **{"Retry-After": str(max(1, math.ceil(wait)))})
            request_id = secrets.token_hex(8)
            try:
                await _produce(topic, records, tenant, request_id)
            except Exception as error:  # the broker refused or timed out: nothing is promised
                log.warning("webhook %s: %d record(s) not stored: %s", request_id, len(records), error)
                return answer(self, 503, {"error": "records could not be stored; send again"},
                              **{"Retry-After": "5"})
            produced.inc(len(records))
            health["accepted_records"] += len(records)
            return answer(self, 202, {"accepted": len(records), "request_id": request_id})


async def _produce(topic: faust.TopicT, records: list[dict[str, Any]], tenant: str, request_id: str) -> None:
    """Send every record and wait until Kafka acknowledged each one."""
    headers = [(REQUEST_HEADER, request_id.encode())]
    deliveries = []
    for record in records:
        record_id = record.get("id")
        key = entity_key(tenant, record_id).encode() if isinstance(record_id, str) else None
        deliveries.append(await topic.send(key=key, value=orjson.dumps(record), headers=headers))
    await asyncio.gather(*deliveries)
