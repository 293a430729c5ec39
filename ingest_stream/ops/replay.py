"""Replays, with their I/O: plans and legal holds kept in compacted topics (shared by every operator,
surviving restarts), planning (time range → offsets per partition, estimate per source), and the
runner that sends a tenant's records of those ranges back to their source topics, throttled, with
`ingest.replay=<plan-id>`, checkpointing its progress so a killed run resumes.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import orjson
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from ingest_stream.config import Settings
from ingest_stream.core.dlq import REPLAY_HEADER, without_origin
from ingest_stream.core.replay import PlanError, PlanStatus, ReplayPlan, new_plan, record_tenant
from ingest_stream.core.timefmt import format_rfc3339
from ingest_stream.core.tokenbucket import TokenBucket
from ingest_stream.ops.kafka_io import CompactedStore

log = logging.getLogger(__name__)
CHECKPOINT_EVERY_S = 1.0
FETCH_WAIT_MS = 500


def now_text() -> str:
    return format_rfc3339(datetime.now(UTC))


class LegalHolds:
    """Tenants whose data must not be replayed. Set and cleared with `replayctl hold`."""

    def __init__(self, settings: Settings) -> None:
        self._store = CompactedStore(settings.kafka_bootstrap, settings.legal_holds_topic)

    async def all(self) -> dict[str, dict[str, Any]]:
        return {tenant: orjson.loads(raw) for tenant, raw in (await self._store.load()).items()}

    async def held(self, tenant: str) -> bool:
        return tenant in await self.all()

    async def set(self, tenant: str, *, reason: str, by: str) -> None:
        await self._store.put(tenant, orjson.dumps({"reason": reason, "set_by": by, "at": now_text()}))

    async def clear(self, tenant: str) -> None:
        await self._store.put(tenant, None)


class Plans:
    def __init__(self, settings: Settings) -> None:
        self._store = CompactedStore(settings.kafka_bootstrap, settings.replay_plans_topic)

    async def all(self) -> list[ReplayPlan]:
        return sorted((ReplayPlan.decode(raw) for raw in (await self._store.load()).values()),
                      key=lambda p: p.created_at)

    async def get(self, plan_id: str) -> ReplayPlan:
        raw = (await self._store.load()).get(plan_id)
        if raw is None:
            raise PlanError(f"no plan {plan_id!r} (replayctl list shows them)")
        return ReplayPlan.decode(raw)

    async def save(self, plan: ReplayPlan) -> None:
        await self._store.put(plan.id, plan.encode())


async def make_plan(settings: Settings, *, tenant: str, from_ms: int, to_ms: int, sources: Sequence[str],
                    throttle: float, progress: Callable[[int], None] = lambda n: None) -> ReplayPlan:
    """Resolve the time range to offsets per partition (offsets_for_times), count the tenant's
    records in it per source, and save the plan (approved at once when small enough)."""
    holds = LegalHolds(settings)
    if await holds.held(tenant):  # before any scanning: fail fast
        raise PlanError(f"tenant {tenant} is under a legal hold: replays are blocked")
    consumer = AIOKafkaConsumer(bootstrap_servers=settings.kafka_bootstrap, group_id=None,
                                enable_auto_commit=False)
    try:
        await consumer.start()
        existing = await consumer.topics()
        starts: dict[str, int] = {}  # "topic:partition" -> offset to start reading from
        for source in sources:
            topic = settings.source_topic(source)
            if topic not in existing:
                continue
            tps = [TopicPartition(topic, p) for p in sorted(consumer.partitions_for_topic(topic) or ())]
            found = await consumer.offsets_for_times({tp: from_ms for tp in tps})
            for tp in tps:
                if found[tp] is not None:  # else nothing at or after --from
                    starts[f"{topic}:{tp.partition}"] = found[tp].offset
        counted = await _count(consumer, starts, tenant=tenant, from_ms=from_ms, to_ms=to_ms,
                               progress=progress)
    finally:
        await consumer.stop()
    plan = new_plan(plan_id=f"rp-{datetime.now(UTC):%Y%m%d%H%M%S}-{secrets.token_hex(3)}", tenant=tenant,
                    from_ms=from_ms, to_ms=to_ms, sources=tuple(sources), throttle=throttle,
                    ranges=counted.ranges, estimate=counted.estimate,
                    approval_threshold=settings.replay_approval_threshold, at=now_text(),
                    held=await holds.held(tenant))
    await Plans(settings).save(plan)
    return plan


@dataclass
class _Counted:
    ranges: dict[str, tuple[int, int]] = field(default_factory=dict)  # exact [start, end)
    estimate: dict[str, int] = field(default_factory=dict)  # the tenant's records per source


async def _count(consumer: AIOKafkaConsumer, starts: dict[str, int], *, tenant: str, from_ms: int,
                 to_ms: int, progress: Callable[[int], None]) -> _Counted:
    """Read each partition from its start once: the exact range [first record at or after
    `from_ms`, first record at or after `to_ms`) and the tenant's records in it, per source.

    offsets_for_times only says where to start reading: some brokers answer it per batch (Tansu
    returns a batch's base offset, even for a time past the batch), so the timestamps decide.
    """
    counted = _Counted()
    scanned = 0
    for key, start in starts.items():
        topic, partition = key.rsplit(":", 1)
        source = topic.rsplit(".", 1)[-1]
        tp = TopicPartition(topic, int(partition))
        consumer.assign([tp])
        consumer.seek(tp, start)
        first: int | None = None
        end: int | None = None
        while end is None:
            batch = (await consumer.getmany(tp, timeout_ms=FETCH_WAIT_MS, max_records=1000)).get(tp, [])
            if not batch:
                break
            scanned += len(batch)
            progress(scanned)
            for record in batch:
                if record.timestamp >= to_ms:
                    end = record.offset
                    break
                if record.timestamp < from_ms:
                    continue
                first = record.offset if first is None else first
                if record_tenant(record.value) == tenant:
                    counted.estimate[source] = counted.estimate.get(source, 0) + 1
            else:
                last = batch[-1].offset + 1
        if first is not None:
            counted.ranges[key] = (first, end if end is not None else last)
    return counted


class Runner:
    """Runs one plan: re-sends the tenant's records of each remaining range to the same topic and
    partition (entity order kept), original headers plus `ingest.replay`, paced by the plan's
    throttle; every second the producer is flushed and then the progress saved."""

    def __init__(self, settings: Settings, plans: Plans, holds: LegalHolds,
                 report: Callable[[ReplayPlan], None] = lambda plan: None) -> None:
        self._settings = settings
        self._plans = plans
        self._holds = holds
        self._report = report

    async def run(self, plan_id: str) -> ReplayPlan:
        plan = await self._plans.get(plan_id)
        plan = plan.start(at=now_text(), held=await self._holds.held(plan.tenant))
        await self._plans.save(plan)
        consumer = AIOKafkaConsumer(bootstrap_servers=self._settings.kafka_bootstrap, group_id=None,
                                    enable_auto_commit=False)
        producer = AIOKafkaProducer(bootstrap_servers=self._settings.kafka_bootstrap, acks="all", linger_ms=5)
        try:
            await consumer.start()
            await producer.start()
            plan = await self._replay(plan, consumer, producer)
        except PlanError as stop:
            plan = plan.failed(str(stop), at=now_text())
            await self._plans.save(plan)
            raise
        finally:
            await producer.stop()
            await consumer.stop()
        return plan

    async def _replay(self, plan: ReplayPlan, consumer: AIOKafkaConsumer, producer: AIOKafkaProducer
                      ) -> ReplayPlan:
        bucket = TokenBucket(plan.throttle, burst=max(1.0, plan.throttle / 10))
        header = (REPLAY_HEADER, plan.id.encode())
        for key, (start, end) in plan.remaining.items():
            topic, partition = key.rsplit(":", 1)
            tp = TopicPartition(topic, int(partition))
            consumer.assign([tp])
            consumer.seek(tp, start)
            position, scanned, replayed = start, 0, 0
            last_checkpoint = time.monotonic()
            while position < end:
                batch = (await consumer.getmany(tp, timeout_ms=FETCH_WAIT_MS, max_records=500)).get(tp, [])
                if not batch:
                    raise PlanError(f"{key}: no records readable at offset {position} (range ends at {end})")
                for record in batch:
                    if record.offset >= end:
                        break
                    position = record.offset + 1
                    scanned += 1
                    if record_tenant(record.value) != plan.tenant:
                        continue
                    await asyncio.sleep(bucket.reserve(time.monotonic()))
                    headers = [(k, bytes(v or b"")) for k, v in without_origin(record.headers)
                               if k != REPLAY_HEADER] + [header]
                    await producer.send(topic, key=record.key, value=record.value, partition=tp.partition,
                                        headers=headers)
                    replayed += 1
                    if time.monotonic() - last_checkpoint >= CHECKPOINT_EVERY_S:
                        plan = await self._checkpoint(plan, producer, key, position, scanned, replayed)
                        scanned = replayed = 0
                        last_checkpoint = time.monotonic()
            plan = await self._checkpoint(plan, producer, key, end, scanned, replayed)
        plan = plan.finished(at=now_text())
        await self._plans.save(plan)
        self._report(plan)
        return plan

    async def _checkpoint(self, plan: ReplayPlan, producer: AIOKafkaProducer, key: str, position: int,
                          scanned: int, replayed: int) -> ReplayPlan:
        """Everything sent so far is acknowledged before the progress that covers it is saved; a
        cancel or a new legal hold stops the run here."""
        await producer.flush()
        latest = await self._plans.get(plan.id)
        if latest.status is PlanStatus.CANCELLED:
            raise PlanError(f"plan {plan.id} was cancelled")
        if await self._holds.held(plan.tenant):
            raise PlanError(f"tenant {plan.tenant} was put under a legal hold: replay stopped")
        plan = plan.advanced({key: position}, scanned=scanned, replayed=replayed, at=now_text())
        await self._plans.save(plan)
        self._report(plan)
        return plan
