"""The consumer side: Faust's app, consumer and stream, subclassed to take records in batches.

`BatchDrainConsumer` (with `IngestConsumerThread`) delivers each fetch as one awaitable, straight
into the queue of the stream that reads each partition (`StreamQueue`), and follows seeks exactly;
`BatchStream.unacked_batches` hands the agents batches of events they ack themselves once what the
events caused is durable; `StreamFlowControl` keeps queued records across Faust's second resume.
Why each replaces Faust's own, and the bugs it fixes: docs/design.md ("What we found in Faust…" and
"Fixed: a stall after a rebalance"). The producer side is `producer_batches.py`.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Collection, Iterable, Mapping
from typing import Any, NamedTuple

import faust
from faust.transport.consumer import CONSUMER_FETCHING, ensure_TP
from faust.transport.drivers import aiokafka as faust_aiokafka
from faust.types import TP, AppT, EventT, Message
from faust.types.transports import TransportT
from mode.utils.objects import cached_property
from mode.utils.queues import FlowControlEvent

from ingest_stream import record_reader
from ingest_stream.stream import faust_internals
from ingest_stream.stream.topics import RawBytesSchema


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
        faust_internals.set_fetch_max_wait_ms(consumer, getattr(self.app, "fetch_max_wait_ms", 1500))
        return consumer

    async def on_start(self) -> None:
        await super().on_start()
        seeks = self.seeks

        def count_seek(tp: Any, offset: int) -> None:
            seeks[tp] = Seek(seeks[tp].number + 1 if tp in seeks else 1, offset)

        faust_internals.on_every_seek(self._ensure_consumer(), count_seek)

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

    async def seek_back(self, positions: Mapping[TP, int]) -> None:
        """Seek each partition to its offset in this thread, where it is still assigned."""
        await self.call_thread(self._seek_back, positions)

    async def _seek_back(self, positions: Mapping[TP, int]) -> None:
        consumer = self._ensure_consumer()
        assigned = consumer.assignment()
        for tp, offset in positions.items():
            if tp in assigned:
                consumer.seek(tp, offset)

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
        self._held_topics: Callable[[], Collection[str]] | None = None  # kept out of resumes

    def hold_from_resumes(self, held_topics: Callable[[], Collection[str]]) -> None:
        """From now on, `resume_partitions` leaves the partitions of the topics `held_topics()`
        names paused (backpressure's drain, pause, a disabled source)."""
        self._held_topics = held_topics

    def resume_partitions(self, tps: Iterable[TP]) -> None:
        """Faust's, less the held topics' partitions (`hold_from_resumes`). Faust resumes every
        assigned partition when a rebalance's recovery completes (`faust.tables.recovery`), which
        would undo a drain, pause or disabled source until backpressure's next tick."""
        held_topics = self._held_topics
        if held_topics is None:
            super().resume_partitions(tps)
            return
        held = held_topics()
        super().resume_partitions({tp for tp in tps if tp.topic not in held})

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
        fetcher_should_stop = faust_internals.stop_requested(fetcher)
        try:
            while not (consumer_should_stop() or fetcher_should_stop()):
                self.diag.set_flag(CONSUMER_FETCHING)
                await asyncio.sleep(0)  # a fetch may return at once, in a loop: let others run
                if not self.should_stop:
                    await self.wait_first(self._fetch_and_deliver(timeout=1.0), self.suspend_flow.wait())
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

    async def _fetch_and_deliver(self, timeout: float) -> None:  # noqa: ASYNC109
        """One fetch, delivered (Faust's `getmany`, less its per-record async generator)."""
        records, active_partitions = await self._wait_next_records(timeout)
        if records is None or self.should_stop:
            return
        if not self.flow_active:  # as Faust: suspended during the fetch, back to the committed offsets
            try:
                await self.perform_seek()
            except Exception as exc:
                self.log.warning(f"exception performing seek when flow not active {exc}")
            await self._read_again(records)
            return
        await self._deliver(records, active_partitions)

    async def _read_again(self, records: Mapping[TP, list[Any]]) -> None:
        """Seek back to its first record not delivered each partition of a fetch the drain loop
        dropped, of the topics no stream acks (table changelogs), unless seeked since the fetch.

        Faust drops a fetch that returns while the flow is suspended, or the rest of one when a
        rebalance starts, and seeks only the stream partitions back (to their committed offsets).
        A changelog's records went with it: a recovery that had just seeked its changelog
        partitions and been handed nothing waited for them for good, its streams paused (the
        stall after a double rebalance, docs/design.md)."""
        acks_enabled_for = self.app.topics.acks_enabled_for
        seeks = self._thread.seeks
        fetched_under = self._fetch_seek_counts or {}
        back: dict[TP, int] = {}
        for tp, fetched in records.items():
            seek = seeks.get(tp)
            if acks_enabled_for(tp.topic) or fetched_under.get(tp, 0) != (seek.number if seek else 0):
                continue  # a stream partition (perform_seek), or a seek since the fetch placed it
            if seek is not None and self._read_offset_seeks.get(tp) != seek.number:
                first = next((r.offset for r in fetched if r.offset >= seek.offset), None)  # none handed over
            else:
                read = self._read_offset.get(tp)  # the last handed over
                first = next((r.offset for r in fetched if read is None or r.offset > read), None)
            if first is not None:
                back[tp] = first
        if back:
            await self._thread.seek_back(back)

    async def _deliver(self, records: Mapping[TP, list[Any]], active_partitions: set[TP] | None) -> None:
        """Hand one fetch's records to the streams, in order: each partition's events straight into
        the queue of the one stream that reads it (`StreamQueue`), else through the conductor
        per message (Faust's per-record loop body)."""
        app = self.app
        generation_id = app.consumer_generation_id
        buffered = self._buffered_partitions
        to_message = self._to_message
        callback = self.callback
        read_offsets = self._read_offset
        acks_enabled_for = app.topics.acks_enabled_for
        commit_every = self._commit_every
        seeks = self._thread.seeks
        read_offset_seeks = self._read_offset_seeks
        fetched_under = self._fetch_seek_counts
        flow_control = app.flow_control
        queues: dict[TP, StreamQueue | None] = {}
        await app.producer.buffer.wait_until_ebb()  # as the conductor, once per fetch
        since_yield = 0
        for tp, record in self.scheduler.iterate(records):  # round-robin over topics, as Faust
            if not self.flow_active or app.consumer_generation_id != generation_id:
                # A rebalance: the streams' rest is read again from the committed offsets, the
                # changelogs' from where this fetch stopped.
                await self._read_again(records)
                break
            if active_partitions is not None and tp not in active_partitions and tp not in buffered:
                continue
            since_yield += 1
            if since_yield > 100:  # as Faust: a long fetch must not starve the loop
                await asyncio.sleep(0)
                since_yield = 0
            if not flow_control.is_active() and acks_enabled_for(tp.topic):
                # The streams are not resumed yet (a rebalance's recovery resumes the consumer first):
                # what reaches their queues now is cleared when they resume, and never read again.
                await flow_control.acquire()
            seek = seeks.get(tp)
            if seek is not None:
                if fetched_under is not None and fetched_under.get(tp, 0) != seek.number:
                    continue  # fetched before a seek of its partition: read again from the new position
                if read_offset_seeks.get(tp) != seek.number:  # the first record since the seek
                    read_offset_seeks[tp] = seek.number
                    read_offsets[tp] = seek.offset
            offset = record.offset
            read_offset = read_offsets[tp]
            if read_offset is not None and offset < read_offset:
                continue  # already delivered (Faust logs and drops these too)
            if read_offset and offset - read_offset > 1 and acks_enabled_for(tp.topic):
                await self._add_gap(tp, read_offset + 1, offset)
            if commit_every is not None and self._n_acked >= commit_every:
                self._n_acked = 0
                await self.commit()
            message = to_message(tp, record)
            if tp in queues:
                queue = queues[tp]
            else:
                queue = queues[tp] = StreamQueue.of(app, tp)
                app.monitor.track_tp_end_offset(tp, self.highwater(tp))  # once per fetch, not per record
            if queue is None:
                await callback(message)
            else:
                if not flow_control.is_active():  # as the conductor, whether the topic acks or not
                    await flow_control.acquire()
                waiting = queue.put(message)
                if waiting is not None:
                    await queue.put_when_room(waiting)
            read_offsets[tp] = offset


class StreamQueue:
    """The queue of the one stream that reads a partition, filled as Faust's conductor fills it
    (`ConductorHandler`: a reference on the message, an Event, the queue's pressure callbacks) but
    without its per-message lock, flow-control and producer awaits and decode coroutine: measurable
    per record on the profile of three consumes. Only for partitions whose stream is a raw-bytes
    topic (`RawBytesSchema`: the event is the message's bytes, nothing can fail to decode)."""

    __slots__ = ("_app", "_channel", "_event", "_handler", "_put", "_queue", "_tp")

    def __init__(self, app: AppT, tp: TP, handler: Any, channel: Any) -> None:
        self._app, self._tp, self._handler, self._channel = app, tp, handler, channel
        self._event: Any = app.conf.Event
        self._queue = channel.queue
        self._put = self._queue.put_nowait_enhanced

    @classmethod
    def of(cls, app: AppT, tp: TP) -> StreamQueue | None:
        """The partition's stream queue, or None where the conductor must deliver."""
        found = faust_internals.stream_channel_for(app, tp)
        if found is None or not isinstance(getattr(found[1], "schema", None), RawBytesSchema):
            return None
        return cls(app, tp, *found)

    def put(self, message: Message) -> EventT[Any] | None:
        """Queue the message's event; returns it instead if the queue is full."""
        message.refcount += 1  # the conductor's `incref`: the stream's ack takes it back
        event = self._event(self._app, message.key, message.value, message.headers, message)
        if self._queue.full():
            return event  # type: ignore[no-any-return]
        handler = self._handler
        self._put(event, on_pressure_high=handler.on_pressure_high, on_pressure_drop=handler.on_pressure_drop)
        return None

    async def put_when_room(self, event: EventT[Any]) -> None:
        self._app.sensors.on_topic_buffer_full(self._tp)
        await self._channel.put(event)


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
