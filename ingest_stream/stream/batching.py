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

Unlike Faust, the drain loop follows seeks exactly (`IngestConsumerThread` counts them and tags each
fetch). After a rebalance Faust seeks every partition to its committed offset, but its recovery
resumes the consumer's flow before that and resumes the streams only after, and its bookkeeping
went wrong in four ways, all seen here (in about 1 run in 5 of the two-worker rebalance test):
- the rest of a fetch from the old position was still delivered after the seek, moving the read
  offset past the committed one;
- Faust resets the read offsets only once every partition is seeked, so records fetched from a
  partition seeked early were compared with its old read offset;
- partitions without a committed offset are not seeked at all;
- records of stream partitions delivered before the streams resume go to queues that Faust clears
  when they resume, and Faust resumes them twice (before reading the changelogs, again after the
  seek): the second resume cleared records delivered after their seek.
Each way records were never processed and never read again: the partition never committed again
(or, with the read offset put back later, a gap counted as acked covered them). Here a record
fetched before a seek of its partition is dropped (aiokafka reads it again from the new position),
the first record fetched after a seek resets the read offset to where the seek went, partitions
without a commit are seeked to their start, records of acking topics wait for the streams to
resume before they are delivered, and resuming streams that run already clears nothing
(`StreamFlowControl`).

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
the new assignment seeks every partition to its committed offset (`BatchDrainConsumer.perform_seek`).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, NamedTuple

import faust
from faust.transport.consumer import CONSUMER_FETCHING, ensure_TP
from faust.transport.drivers import aiokafka as faust_aiokafka
from faust.types import TP, EventT, Message
from faust.types.transports import TransportT
from mode.utils.objects import cached_property
from mode.utils.queues import FlowControlEvent

from ingest_stream import record_reader


class SeekTaggedRecords(dict[TP, list[Any]]):
    """One fetch's records, with each partition's seek count at the moment the fetch returned."""

    seek_counts: dict[TP, int]


class Seek(NamedTuple):
    number: int  # seeks of the partition so far
    offset: int  # where the last one went


class IngestConsumerThread(faust_aiokafka.AIOKafkaConsumerThread):
    """Faust's consumer thread with two changes.

    Faust hard-codes `fetch_max_wait_ms=1500`. A broker that holds a fetch for its whole max wait even
    when records arrive meanwhile (Tansu here: 132 ms p50 per hop at 500 ms, 9 ms at 10) adds that to
    every hop, and a record makes two (source topic, then sink topic). Real Kafka answers as soon as
    `fetch_min_bytes` is there; a shorter wait only costs idle fetches.

    Seeks are counted per partition (`seeks`: the count and where the last one went), and each
    fetch is tagged with the counts it was fetched under (`SeekTaggedRecords`). Counted here, in the
    thread that fetches and seeks, the tag is exact. The drain loop uses both (`BatchDrainConsumer`).
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.seeks: dict[TP, Seek] = {}  # read from the main thread: entries are replaced whole

    def _create_worker_consumer(self, transport: Any) -> Any:
        record_reader.install()  # no record's header names can stop the fetcher
        consumer = super()._create_worker_consumer(transport)
        consumer._fetch_max_wait_ms = getattr(self.app, "fetch_max_wait_ms", 1500)  # read at start()
        return consumer

    async def on_start(self) -> None:
        await super().on_start()
        fetcher = self._ensure_consumer()._fetcher  # every seek (seek, seek_to_committed) ends in seek_to
        seek_to = fetcher.seek_to
        seeks = self.seeks

        def counted_seek_to(tp: Any, offset: int) -> None:
            seeks[tp] = Seek(seeks[tp].number + 1 if tp in seeks else 1, offset)
            seek_to(tp, offset)

        fetcher.seek_to = counted_seek_to

    async def seek_to_start(self, partitions: list[Any]) -> None:
        """Seek to offset 0 in this thread (aiokafka is not thread-safe); where retention has
        removed it, aiokafka's out-of-range reset (`earliest`) takes over."""
        await self.call_thread(self._seek_to_start, partitions)

    async def _seek_to_start(self, partitions: list[Any]) -> None:
        consumer = self._ensure_consumer()
        assigned = consumer.assignment()
        for tp in partitions:
            if tp in assigned:  # a rebalance may have taken it meanwhile
                consumer.seek(tp, 0)

    async def _fetch_records(self, *args: Any, **kwargs: Any) -> SeekTaggedRecords:
        records = SeekTaggedRecords(await super()._fetch_records(*args, **kwargs))
        seeks = self.seeks
        records.seek_counts = {tp: seeks[tp].number if tp in seeks else 0  # no await since the fetch
                               for tp in records}
        return records


class BatchDrainConsumer(faust_aiokafka.Consumer):
    _thread: IngestConsumerThread

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._fetch_seek_counts: dict[TP, int] | None = None  # the tags of the fetch being delivered
        self._read_offset_seeks: dict[TP, int] = {}  # the seek count each read offset was reset at

    def _new_consumer_thread(self) -> faust_aiokafka.AIOKafkaConsumerThread:
        return IngestConsumerThread(self, loop=self.loop, beacon=self.beacon)

    async def _getmany(self, active_partitions: set[TP] | None, timeout: float) -> Any:  # noqa: ASYNC109
        records = await super()._getmany(active_partitions, timeout)
        self._fetch_seek_counts = getattr(records, "seek_counts", None)
        return records

    async def perform_seek(self) -> None:
        """Faust's seek to the committed offsets, with two changes. The flow may be running
        meanwhile (Faust's recovery resumes it first), and what it delivers is discarded by streams
        not yet resumed: every partition must be read again from its committed position.

        - A partition without a committed offset is seeked to its start too (aiokafka seeks only to
          positive committed offsets), where `earliest` would begin it. Not seeked, the records
          discarded meanwhile were never read again and the partition never committed.
        - Read offsets are not set here: `_deliver` resets each at the first record fetched after
          its partition's seek. Set once every partition is seeked (Faust), a partition seeked early
          whose re-read records were already delivered had its read offset put back, and the next
          record opened a gap (which counts as acked) over records still in flight.
        """
        committed = await self.seek_to_committed()
        # Only partitions whose records our streams ack: changelogs are never committed, and
        # recovery reads them from its own offsets.
        acking = self.app.topics.acks_enabled_for
        uncommitted = [tp for tp, offset in committed.items() if not offset and acking(tp.topic)]
        if self.app.conf.consumer_auto_offset_reset == "earliest":
            await self._thread.seek_to_start(uncommitted)
        else:
            for tp in uncommitted:
                self._read_offset[ensure_TP(tp)] = None  # as Faust: nothing to compare against
        self._committed_offset.update({ensure_TP(tp): offset for tp, offset in committed.items() if offset})

    async def on_partitions_revoked(self, revoked: set[TP]) -> None:
        """Faust forgets the read offsets of revoked partitions; their last seek is forgotten too,
        or a partition assigned here again would have its read offset put back to an old target."""
        seeks = self._thread.seeks
        for tp in revoked:
            seek = seeks.get(tp)
            if seek is not None:
                self._read_offset_seeks[tp] = seek.number
        await super().on_partitions_revoked(revoked)

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
        seeks = self._thread.seeks
        read_offset_seeks = self._read_offset_seeks
        flow_control = self.app.flow_control
        since_yield = 0
        async for tp, message in fetched:
            since_yield += 1
            if since_yield > 100:  # as Faust: a long fetch must not starve the loop
                await asyncio.sleep(0)
                since_yield = 0
            if not flow_control.is_active() and acks_enabled_for(message.topic):
                # The streams are not resumed yet (a rebalance's recovery resumes the consumer first):
                # what reaches their queues now is cleared when they resume, and never read again.
                await flow_control.acquire()
            seek = seeks.get(tp)
            if seek is not None:
                fetched_under = self._fetch_seek_counts
                if fetched_under is not None and fetched_under.get(tp, 0) != seek.number:
                    continue  # fetched before a seek of its partition: read again from the new position
                if read_offset_seeks.get(tp) != seek.number:  # the first record since the seek
                    read_offset_seeks[tp] = seek.number
                    read_offsets[tp] = seek.offset
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
    async def unacked_batches(self, max_: int, within_s: float,
                              before_waiting: Callable[[], Awaitable[None]] | None = None,
                              ) -> AsyncIterator[list[EventT[Any]]]:
        """Batches of up to `max_` events, each yielded at most `within_s` after its first event.
        The events are not acked: the caller acks each once what it caused is durable.
        `before_waiting` is awaited whenever the stream has nothing and is about to wait for it."""
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
                            if before_waiting is not None:
                                await before_waiting()
                                if not queue.empty():
                                    continue
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


    def ack_batch(self, events: list[EventT[Any]]) -> dict[TP, int]:
        """Ack a batch's events (their offsets become committable); returns, per partition, one
        past the highest offset acked. Faust's `Stream.ack` per event is a coroutine plus a stream
        sensor call; as in `unacked_batches`, only the message-level Monitor bookkeeping is kept."""
        on_message_out = self._on_message_out
        acked: dict[TP, int] = {}
        for event in events:
            message = event.message
            if event.ack():
                on_message_out(message.tp, message.offset, message)
            acked[message.tp] = message.offset + 1  # a partition's events arrive in offset order
        return acked


class StreamFlowControl(FlowControlEvent):
    """Faust's flow control of the streams, whose `resume` clears their queues only when it resumes
    them. Faust resumes twice in a rebalance's recovery (before reading the changelogs, and again
    after seeking the stream partitions); each resume clears every stream queue, so the second one
    threw away records delivered in between, after their partition's seek: never read again, and
    the partition never committed past them."""

    def resume(self) -> None:
        if not self.is_active():
            super().resume()


class IngestApp(faust.App):
    """faust.App whose consumer drains fetches in batches (see the module docstring)."""

    def __init__(self, *args: Any, fetch_max_wait_ms: int = 1500, **kwargs: Any) -> None:
        self.fetch_max_wait_ms = fetch_max_wait_ms
        super().__init__(*args, **kwargs)

    @cached_property
    def flow_control(self) -> FlowControlEvent:
        return StreamFlowControl(loop=self.loop)

    def _new_transport(self) -> TransportT:
        return BatchDrainTransport(self.conf.broker_consumer, self)
