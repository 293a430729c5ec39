"""`POST /ingest/webhook`: records pushed over HTTP into `<prefix>.source.webhook`.

The tenant names itself (`X-Tenant` header or `?tenant=`) and proves it (core/webhook.py); a
signature signs one request (ReplayCache). The answer is 202 only once every record is
acknowledged by Kafka; 400 for a body that is not records, 401/403 for the wrong caller or a
replayed signature, 413 above the size limit or for a record Kafka can never take, 429 with
Retry-After while backpressure holds new input (or too many signatures are live), 503 while the
webhook source is disabled or Kafka refuses for now.
"""

from __future__ import annotations

import asyncio
import logging
import math
import secrets
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any

import faust
import orjson
from aiokafka.errors import MessageSizeTooLargeError, RecordListTooLargeError
from aiokafka.record.default_records import DefaultRecordBatchBuilder
from faust.web import Request, Response, View

from ingest_stream.config import Settings
from ingest_stream.core.record import entity_key
from ingest_stream.core.timefmt import format_rfc3339
from ingest_stream.core.webhook import (
    DEFAULT_REPLAY_CAPACITY,
    Claim,
    FramingError,
    Refusal,
    ReplayCache,
    authenticate,
    first_oversized,
    foreign_tenant,
    parse_auth,
    parse_records,
)
from ingest_stream.metrics import Metrics
from ingest_stream.stream.backpressure import BackpressureController

log = logging.getLogger(__name__)
SOURCE = "webhook"
REQUEST_HEADER = "ingest.webhook.request"
TOO_LARGE = (MessageSizeTooLargeError, RecordListTooLargeError)  # the producer's or the broker's limit

Answer = tuple[int, dict[str, Any], dict[str, str]]  # status, document, headers
Message = tuple[bytes | None, bytes]  # key, value


def install_webhook(app: faust.App, settings: Settings, topic: faust.TopicT,
                    controller: BackpressureController, metrics: Metrics,
                    *, replay_capacity: int = DEFAULT_REPLAY_CAPACITY,
                    clock: Callable[[], float] = time.time) -> None:
    auth = parse_auth(settings.sources.webhook_auth)
    replays = ReplayCache(replay_capacity)
    max_message_bytes = int(app.conf.producer_max_request_size)
    health = controller.adapter_health.setdefault(SOURCE, {"last_request_at": None, "last_error": None,
                                                           "accepted_records": 0})
    requests = metrics.webhook_requests
    produced = metrics.adapter_records.labels(SOURCE)
    too_big: Answer = (413, {"error": f"body over {settings.sources.webhook_max_body_bytes} bytes"}, {})

    def answer(view: View, reply: Answer) -> Response:
        status, document, headers = reply
        requests.labels(str(status)).inc()
        if status >= 400:
            health["last_error"] = f"{status}: {document.get('error')}"
        return view.json(document, status=status, headers=headers or None)

    async def read_body(request: Request) -> bytes | None:
        """The body, or None when it is over the limit."""
        declared = request.headers.get("Content-Length")
        if declared and declared.isdigit() and int(declared) > settings.sources.webhook_max_body_bytes:
            return None
        try:
            body = await request.read()
        except Exception:  # aiohttp's own limit, when no Content-Length was sent
            return None
        return body if len(body) <= settings.sources.webhook_max_body_bytes else None

    async def take(tenant: str, body: bytes, content_type: str) -> Answer:
        """The records of an authenticated request into Kafka, or why not."""
        try:
            records = parse_records(body, content_type)
        except FramingError as error:
            return 400, {"error": str(error)}, {}
        other = foreign_tenant(records, tenant)
        if other is not None:
            return 403, {"error": f"record {other} names another tenant"}, {}
        request_id = secrets.token_hex(8)
        headers = [(REQUEST_HEADER, request_id.encode())]
        messages = [_message(tenant, record) for record in records]
        sizes = [DefaultRecordBatchBuilder.estimate_size_in_bytes(k, v, headers) for k, v in messages]
        oversized = first_oversized(sizes, max_message_bytes)
        if oversized is not None:
            return 413, {"error": f"record {oversized} is {sizes[oversized]} bytes as a Kafka message, over "
                                  f"the producer's limit of {max_message_bytes}: it can never be stored "
                                  "(nothing was sent)"}, {}
        if SOURCE in controller.disabled:
            return 503, {"error": "the webhook source is disabled"}, {"Retry-After": "60"}
        wait = controller.input_retry_after(len(records))
        if wait is not None:
            return (429, {"error": f"backpressure: {controller.machine.state.value}"},
                    {"Retry-After": str(max(1, math.ceil(wait)))})
        errors = await _produce(topic, messages, headers)
        stored = sum(error is None for error in errors)
        produced.inc(stored)
        health["accepted_records"] += stored
        if stored < len(records):
            return _not_stored(request_id, errors)
        return 202, {"accepted": len(records), "request_id": request_id}, {}

    @app.page("/ingest/webhook")
    class Webhook(View):
        async def post(self, request: Request) -> Response:
            now_s = clock()
            health["last_request_at"] = format_rfc3339(datetime.fromtimestamp(now_s, UTC))
            body = await read_body(request)
            if body is None:
                return answer(self, too_big)
            caller = authenticate(request.headers.get("X-Tenant") or request.query.get("tenant"),
                                  request.headers, body, auth, now_s=now_s,
                                  window_s=settings.sources.webhook_signature_window_s)
            if isinstance(caller, Refusal):
                return answer(self, (int(caller), {"error": "forbidden: signature outside the replay window"
                                                   if caller is Refusal.FORBIDDEN else "unauthorized"}, {}))
            signed = caller.signed
            claim = Claim.FIRST if signed is None else replays.claim(signed, now_s=now_s)
            if claim is Claim.REPLAYED:
                return answer(self, (403, {"error": "forbidden: this signature was used before"}, {}))
            if claim is Claim.FULL:
                wait = max(1, math.ceil(replays.retry_after_s(now_s=now_s)))
                return answer(self, (429, {"error": "too many signed requests within the signature window"},
                                     {"Retry-After": str(wait)}))
            reply: Answer | None = None
            try:
                reply = await take(caller.tenant, body, request.headers.get("Content-Type", ""))
            finally:
                if signed is not None and (reply is None or reply[0] != 202):
                    replays.release(signed)  # not accepted: the same request may come again
            return answer(self, reply)


def _message(tenant: str, record: dict[str, Any]) -> Message:
    record_id = record.get("id")
    key = entity_key(tenant, record_id).encode() if isinstance(record_id, str) else None
    return key, orjson.dumps(record)


async def _produce(topic: faust.TopicT, messages: list[Message],
                   headers: list[tuple[str, bytes]]) -> list[BaseException | None]:
    """Send every message and wait for Kafka's answer to each: None where it was acknowledged,
    else the error."""
    sent: list[Awaitable[Any] | BaseException] = []
    for key, value in messages:
        try:
            sent.append(await topic.send(key=key, value=value, headers=headers))
        except Exception as error:  # refused before it left (the producer's size limit, stopped)
            sent.append(error)
    answers = iter(await asyncio.gather(*(s for s in sent if not isinstance(s, BaseException)),
                                        return_exceptions=True))
    return [s if isinstance(s, BaseException) else _error(next(answers)) for s in sent]


def _error(answer: object) -> BaseException | None:
    return answer if isinstance(answer, BaseException) else None


def _too_large(error: BaseException) -> bool:
    """Kafka's size limits, raised as they are or wrapped by Faust (ProducerSendError)."""
    return isinstance(error, TOO_LARGE) or isinstance(error.__cause__, TOO_LARGE)


def _not_stored(request_id: str, errors: list[BaseException | None]) -> Answer:
    """A 413 when a record can never be stored (resending cannot help), else a 503: send again."""
    failed = [n for n, error in enumerate(errors) if error is not None]
    too_large = [n for n, error in enumerate(errors) if error is not None and _too_large(error)]
    stored = len(errors) - len(failed)
    log.warning("webhook %s: %d of %d record(s) not stored (%d too large): %s", request_id, len(failed),
                len(errors), len(too_large), errors[failed[0]])
    if too_large:
        return 413, {"error": f"record(s) {too_large} are larger than Kafka takes: they can never be stored",
                     "stored": stored, "request_id": request_id}, {}
    return 503, {"error": "records could not be stored; send again", "stored": stored,
                 "request_id": request_id}, {"Retry-After": "5"}
