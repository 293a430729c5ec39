"""The webhook route's wiring with stand-ins for Faust's app, web server and topic (no broker):
a replayed signature is 403, a record Kafka can never take is 413 (never a retryable status), and a
request that was not accepted may be sent again with the same signature."""

import asyncio
import json
from types import SimpleNamespace
from typing import Any

from aiokafka.errors import KafkaTimeoutError, MessageSizeTooLargeError
from faust.exceptions import ProducerSendError
from multidict import CIMultiDict

from ingest_stream.config import Settings, SourceSettings
from ingest_stream.core.webhook import sign
from ingest_stream.metrics import Metrics
from ingest_stream.stream.backpressure import BackpressureController
from ingest_stream.stream.webhook import install_webhook

SECRET = "s-beta"
PRODUCER_LIMIT = 2000


class FakeTopic:
    """Acknowledges every message, unless told to fail: `refuse` raises at send (the producer's
    own check), `fail` fails the delivery (the broker's answer) — of every message, or of the one
    with key `only`."""

    def __init__(self) -> None:
        self.stored: list[tuple[bytes | None, bytes]] = []
        self.refuse: BaseException | None = None
        self.fail: BaseException | None = None
        self.only: bytes | None = None

    async def send(self, *, key: bytes | None, value: bytes, headers: Any) -> asyncio.Future[None]:
        if self.refuse is not None:
            raise self.refuse
        delivery: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        if self.fail is not None and self.only in (None, key):
            delivery.set_exception(self.fail)
        else:
            self.stored.append((key, value))
            delivery.set_result(None)
        return delivery


class FakeWeb:
    def json(self, value: Any, *, content_type: str | None = None, status: int = 200,
             reason: str | None = None, headers: Any = None) -> SimpleNamespace:
        return SimpleNamespace(status=status, body=value, headers=dict(headers or {}))


class FakeRequest:
    def __init__(self, body: bytes, headers: dict[str, str]) -> None:
        self.headers = CIMultiDict({"Content-Length": str(len(body)), **headers})
        self.query: dict[str, str] = {}
        self._body = body

    async def read(self) -> bytes:
        return self._body


class Webhook:
    def __init__(self, *, replay_capacity: int = 100) -> None:
        self.now = 1000.0
        self.topic = FakeTopic()
        views: dict[str, Any] = {}
        app = SimpleNamespace(conf=SimpleNamespace(producer_max_request_size=PRODUCER_LIMIT),
                              page=lambda path: lambda view: views.setdefault(path, view))
        auth = {"beta": {"hmac_secret": SECRET}, "acme": {"token": "t"}}
        settings = Settings(sources=SourceSettings(webhook_auth=json.dumps(auth),
                                                   webhook_signature_window_s=300))
        metrics = Metrics()
        self.controller = BackpressureController(app, settings, metrics, clock=lambda: self.now)
        install_webhook(app, settings, self.topic, self.controller, metrics,
                        replay_capacity=replay_capacity, clock=lambda: self.now)
        self.view = views["/ingest/webhook"](app, FakeWeb())

    async def post(self, body: bytes, *, stamp: str | None = None, **headers: str) -> SimpleNamespace:
        if stamp is not None:
            headers = {"X-Tenant": "beta", "X-Signature": sign(SECRET, stamp, body),
                       "X-Signature-Timestamp": stamp, **headers}
        return await self.view.post(FakeRequest(body, headers))


def records(*sizes: int) -> bytes:
    return json.dumps([{"tenant": "beta", "id": f"r{n}", "attributes": {"text": "x" * size}}
                       for n, size in enumerate(sizes)]).encode()


async def test_a_signature_signs_one_request():
    hook = Webhook()
    body = records(10)
    assert (await hook.post(body, stamp="1000")).status == 202
    hook.now = 1200
    replayed = await hook.post(body, stamp="1000")
    assert replayed.status == 403 and "used before" in replayed.body["error"]
    assert (await hook.post(body, stamp="1200")).status == 202  # signed again: a new request
    hook.now = 1301
    assert (await hook.post(body, stamp="1000")).status == 403  # outside the window now
    assert len(hook.topic.stored) == 2


async def test_a_bearer_token_is_not_a_signature_and_may_be_sent_again():
    hook = Webhook()
    for _ in range(2):
        answer = await hook.post(records(10), **{"X-Tenant": "acme", "Authorization": "Bearer t"})
        assert answer.status == 403 and "another tenant" in answer.body["error"]  # acme posting beta's
    body = json.dumps({"tenant": "acme", "id": "a"}).encode()
    for _ in range(2):
        assert (await hook.post(body, **{"X-Tenant": "acme", "Authorization": "Bearer t"})).status == 202


async def test_when_too_many_signatures_are_live_a_new_one_waits_and_none_is_forgotten():
    hook = Webhook(replay_capacity=1)
    assert (await hook.post(records(1), stamp="1000")).status == 202
    hook.now = 1100
    full = await hook.post(records(2), stamp="1100")
    assert full.status == 429 and int(full.headers["Retry-After"]) == 200
    assert (await hook.post(records(1), stamp="1000")).status == 403  # still a replay
    hook.now = 1301
    assert (await hook.post(records(2), stamp="1100")).status == 202


async def test_a_record_over_the_producer_limit_is_413_and_nothing_is_sent():
    hook = Webhook()
    answer = await hook.post(records(10, PRODUCER_LIMIT), stamp="1000")
    assert answer.status == 413
    assert "record 1" in answer.body["error"] and str(PRODUCER_LIMIT) in answer.body["error"]
    assert "Retry-After" not in answer.headers
    assert hook.topic.stored == []
    again = await hook.post(records(10, PRODUCER_LIMIT), stamp="1000")  # released: still 413, not 403
    assert again.status == 413
    assert (await hook.post(records(10, PRODUCER_LIMIT - 200), stamp="1000")).status == 202


def wrapped_by_faust(error: BaseException) -> ProducerSendError:
    try:
        raise ProducerSendError(f"Error while sending: {error!r}") from error
    except ProducerSendError as wrapped:
        return wrapped


async def test_the_producer_refusing_a_record_as_too_large_is_413_never_send_again():
    hook = Webhook()
    hook.topic.refuse = wrapped_by_faust(MessageSizeTooLargeError())
    answer = await hook.post(records(10), stamp="1000")
    assert answer.status == 413 and "never be stored" in answer.body["error"]
    assert answer.body["stored"] == 0 and "Retry-After" not in answer.headers


async def test_the_broker_refusing_one_record_as_too_large_is_413_and_says_what_was_stored():
    hook = Webhook()
    hook.topic.fail, hook.topic.only = MessageSizeTooLargeError(), b"beta:r1"
    answer = await hook.post(records(10, 20, 30), stamp="1000")
    assert answer.status == 413 and "[1]" in answer.body["error"] and answer.body["stored"] == 2
    assert [key for key, _ in hook.topic.stored] == [b"beta:r0", b"beta:r2"]


async def test_kafka_refusing_for_now_is_503_and_the_same_signed_request_may_come_again():
    hook = Webhook()
    body = records(10, 20)
    hook.topic.fail = KafkaTimeoutError()
    answer = await hook.post(body, stamp="1000")
    assert answer.status == 503 and answer.headers["Retry-After"] == "5" and answer.body["stored"] == 0
    hook.topic.fail = None
    hook.now = 1005
    assert (await hook.post(body, stamp="1000")).status == 202
    assert len(hook.topic.stored) == 2


async def test_a_disabled_source_or_backpressure_releases_the_signature_too():
    hook = Webhook()
    body = records(10)
    hook.controller.disabled.add("webhook")
    assert (await hook.post(body, stamp="1000")).status == 503
    hook.controller.disabled.clear()
    assert (await hook.post(body, stamp="1000")).status == 202
