"""Faust, batched where it counts: the consumer's drain loop and the agents' batch reads.

Profiled here, Faust's per-record machinery cost more than everything ingest_stream does with a
record. Two places, each replaced by a subclass Faust lets the app plug in; nothing else changes.

1. The consumer's drain loop (`BatchDrainConsumer`, via `IngestApp._new_transport`).

Faust's `Consumer._drain_messages` hands every fetched record to the conductor through
`Service.wait_first(callback(message), suspend_flow.wait())`, which wraps four awaitables in
tasks (the callback, the suspend-flow event, the stopped and crashed events) and cancels three
of them again — per record. Profiled here, that was the largest single cost of consuming.

`BatchDrainConsumer` keeps the same semantics at the granularity of one `getmany()` fetch: the
records of a fetch are delivered in order inside one awaitable raced against `suspend_flow`. When a
rebalance suspends the flow, delivery of the fetch stops (Faust drops the rest of such a fetch
too, and the consumer seeks to the committed offsets afterwards); the read offset only ever advances
for records actually delivered, gaps and `commit_every` are handled as in Faust.

Unlike Faust, records fetched before a seek of their partition are not delivered (see
`IngestConsumerThread`). The flow is not always suspended while a rebalance's seek to the committed
offsets runs (a worker's first assignment never suspends it), so the rest of a fetch from the old
position could still be delivered after the seek. Faust's read offset then jumps past the committed
offset, every re-read record below it is dropped as "already delivered" without an ack, and the
partition never commits again: the worker sits idle with lag on every partition it got (seen here
in about 1 run in 5 of the two-worker rebalance test).

2. The agents' batches (`BatchStream.unacked_batches`, via the `Stream` setting). `noack_take` runs
every record through the stream's generic iterator and a buffering processor (a passive drainer task,
events and futures per record). `unacked_batches` takes the events straight from the channel's queue
with `get_nowait` while there are any, waiting only when it is empty. Per event it keeps what the
iterator does that matters here: events from a previous consumer generation or while the flow is
suspended (a rebalance) are skipped; acking topics track the message as unacked (graceful shutdown
and `stream_wait_empty` wait for these). Faust's Monitor gets only each batch's partitions'
inbound time (its consumer's slow-stream check reads it); its per-event sensors are not called:
ingest_stream's own metrics are the observability.

Unlike Faust, a skipped stale event is not acked. Faust's consumer clears its acked offsets when
partitions are revoked; an event still queued from the old generation and acked after the new
assignment puts its offset back among the acked ones, although the record was never processed. Once
the re-fetched records below it are acked, the commit moves past it before its re-fetched copy is
processed, and a worker killed in that window loses the record. Not acked, it is simply read again:
the new assignment seeks to the committed offsets.
"""

from __future__ import annotations

import asyncio
import time
from collections import defaultdict
from collections.abc import AsyncIterator
from typing import Any

import faust
from faust.transport.consumer import CONSUMER_FETCHING
from faust.transport.drivers import aiokafka as faust_aiokafka
from faust.types import TP, EventT, Message
from faust.types.transports import TransportT


class SeekTaggedRecords(dict[TP, list[Any]]):
    """One fetch's records, with each partition's seek count at the moment the fetch returned."""

    seek_counts: dict[TP, int]


class IngestConsumerThread(faust_aiokafka.AIOKafkaConsumerThread):
    """Faust's consumer thread with two changes.

    Faust hard-codes `fetch_max_wait_ms=1500`. A broker that holds a fetch for its whole max wait even
    when records arrive meanwhile (Tansu here: 132 ms p50 per hop at 500 ms, 9 ms at 10) adds that to
    every hop, and a record makes two (source topic, then sink topic). Real Kafka answers as soon as
    `fetch_min_bytes` is there; a shorter wait only costs idle fetches.

    Seeks are counted per partition, and each fetch is tagged with the counts it was fetched under
    (`SeekTaggedRecords`). A fetch hands its records to the main loop as a whole and they are
    delivered one by one; a seek landing in between (after a rebalance Faust seeks every partition to
    its committed offset, and the flow may already be running) leaves the rest of that fetch from the
    old position. The drain loop uses the tags to drop those: aiokafka reads them again from the new
    position. Counted here, in the thread that fetches and seeks, the tag is exact.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.seek_counts: defaultdict[TP, int] = defaultdict(int)

    def _create_worker_consumer(self, transport: Any) -> Any:
        consumer = super()._create_worker_consumer(transport)
        consumer._fetch_max_wait_ms = getattr(self.app, "fetch_max_wait_ms", 1500)  # read at start()
        return consumer

    async def on_start(self) -> None:
        await super().on_start()
        fetcher = self._ensure_consumer()._fetcher  # every seek (seek, seek_to_committed) ends in seek_to
        seek_to = fetcher.seek_to
        seek_counts = self.seek_counts

        def counted_seek_to(tp: Any, offset: int) -> None:
            seek_counts[tp] += 1
            seek_to(tp, offset)

        fetcher.seek_to = counted_seek_to

    async def _fetch_records(self, *args: Any, **kwargs: Any) -> SeekTaggedRecords:
        records = SeekTaggedRecords(await super()._fetch_records(*args, **kwargs))
        seek_counts = self.seek_counts
        records.seek_counts = {tp: seek_counts[tp] for tp in records}  # no await since the fetch returned
        return records


class BatchDrainConsumer(faust_aiokafka.Consumer):
    _thread: IngestConsumerThread

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._fetch_seek_counts: dict[TP, int] | None = None  # the tags of the fetch being delivered

    def _new_consumer_thread(self) -> faust_aiokafka.AIOKafkaConsumerThread:
        return IngestConsumerThread(self, loop=self.loop, beacon=self.beacon)

    async def _getmany(self, active_partitions: set[TP] | None, timeout: float) -> Any:  # noqa: ASYNC109
        records = await super()._getmany(active_partitions, timeout)
        self._fetch_seek_counts = getattr(records, "seek_counts", None)
        return records

    async def _drain_messages(self, fetcher: Any) -> None:
        consumer_should_stop = self._stopped.is_set
        fetcher_should_stop = fetcher._stopped.is_set
        try:
            while not (consumer_should_stop() or fetcher_should_stop()):
                self.diag.set_flag(CONSUMER_FETCHING)
                fetched = self.getmany(timeout=1.0)
                await asyncio.sleep(0)  # getmany may return at once, in a loop: let others run
                if not self.should_stop:
                    await self.wait_first(self._deliver(fetched), self.suspend_flow.wait())
                self.diag.unset_flag(CONSUMER_FETCHING)
        except self.consumer_stopped_errors:
            if self.transport.app.should_stop:
                self.log.info("Broker stopped consumer, shutting down...")
                return
            raise
        except asyncio.CancelledError:
            if self.transport.app.should_stop:
                self.log.info("Consumer shutting down for user cancel.")
                return
            raise
        except Exception as exc:
            self.log.exception("Drain messages raised: %r", exc)
            raise
        finally:
            self.diag.unset_flag(CONSUMER_FETCHING)

    async def _deliver(self, fetched: AsyncIterator[tuple[TP, Message]]) -> None:
        """Hand one fetch's records to the conductor, in order (Faust's per-record loop body)."""
        callback = self.callback
        read_offsets = self._read_offset
        acks_enabled_for = self.app.topics.acks_enabled_for
        commit_every = self._commit_every
        seek_counts = self._thread.seek_counts
        since_yield = 0
        async for tp, message in fetched:
            since_yield += 1
            if since_yield > 100:  # as Faust: a long fetch must not starve the loop
                await asyncio.sleep(0)
                since_yield = 0
            fetched_under = self._fetch_seek_counts
            if fetched_under is not None and fetched_under.get(tp, 0) != seek_counts.get(tp, 0):
                continue  # fetched before a seek of its partition: read again from the new position
            offset = message.offset
            read_offset = read_offsets[tp]
            if read_offset is not None and offset < read_offset:
                continue  # already delivered (Faust logs and drops these too)
            if read_offset and offset - read_offset > 1 and acks_enabled_for(message.topic):
                await self._add_gap(tp, read_offset + 1, offset)
            if commit_every is not None and self._n_acked >= commit_every:
                self._n_acked = 0
                await self.commit()
            await callback(message)
            read_offsets[tp] = offset


class BatchDrainTransport(faust_aiokafka.Transport):
    Consumer = BatchDrainConsumer


class BatchStream(faust.Stream):  # type: ignore[type-arg]
    async def unacked_batches(self, max_: int, within_s: float) -> AsyncIterator[list[EventT[Any]]]:
        """Batches of up to `max_` events, each yielded at most `within_s` after its first event.
        The events are not acked: the caller acks each once what it caused is durable."""
        self._finalized = True
        self.enable_acks = False
        started_by_us = await self.maybe_start()
        queue = self.channel.queue  # type: ignore[attr-defined]
        app = self.app
        acking_topics = app.topics.acking_topics
        track_unacked = app.consumer.unacked.add
        on_message_in = self._on_message_in
        # Faust's consumer logs "Stream has not started processing TP" every few seconds once a
        # lagging partition has no inbound time after 5 minutes; Faust's iterator sets it per event.
        inbound_time = app.monitor.stream_inbound_time  # Faust creates its monitor on first use
        try:
            while not self.should_stop:
                events: list[EventT[Any]] = []
                deadline = 0.0
                while len(events) < max_:
                    if not queue.empty():
                        event = queue.get_nowait()
                    else:
                        if not events:
                            event = await queue.get()
                        else:
                            remaining = deadline - time.monotonic()
                            if remaining <= 0:
                                break
                            try:
                                event = await asyncio.wait_for(queue.get(), remaining)
                            except TimeoutError:
                                break
                    message = event.message
                    if (not app.flow_control.is_active()
                            or message.generation_id != app.consumer_generation_id):
                        continue  # stale (a rebalance): skipped, and unlike Faust not acked
                    if message.topic in acking_topics and not message.tracked:
                        message.tracked = True
                        track_unacked(message)
                        on_message_in(message.tp, message.offset, message)
                    if not events:
                        deadline = time.monotonic() + within_s
                    events.append(event)
                if events:
                    self.events_total += len(events)
                    now = time.monotonic()
                    for tp in {event.message.tp for event in events}:
                        inbound_time[tp] = now
                    yield events
        except StopAsyncIteration:
            return  # the channel was stopped (worker shutdown): thrown into waiting getters, as in Faust
        finally:
            self._channel_stop_iteration(self.channel)
            if started_by_us:
                await self.stop()
                self.service_reset()


class IngestApp(faust.App):
    """faust.App whose consumer drains fetches in batches (see the module docstring)."""

    def __init__(self, *args: Any, fetch_max_wait_ms: int = 1500, **kwargs: Any) -> None:
        self.fetch_max_wait_ms = fetch_max_wait_ms
        super().__init__(*args, **kwargs)

    def _new_transport(self) -> TransportT:
        return BatchDrainTransport(self.conf.broker_consumer, self)
