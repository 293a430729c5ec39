"""Every reach into Faust's and aiokafka's private members, in one place.

Each function below names one thing ingest_stream needs that neither library offers publicly, says
why, and what library behaviour it relies on (checked against faust-streaming 0.15.3 and aiokafka
0.14.0; an upgrade of either should start here). Nothing else in `ingest_stream/` may touch another
object's underscore members (ruff's SLF001 is on everywhere else).

Two other places live on library internals by their nature, and say so:
- `stream/consumer_batches.py` subclasses Faust's consumer, consumer thread, stream and app, and
  plugs them in through Faust's own hooks (`App._new_transport`, `Consumer._new_consumer_thread`,
  `_getmany`, `_drain_messages`, `AIOKafkaConsumerThread._create_worker_consumer`, `_fetch_records`);
  as a subclass it keeps Faust's bookkeeping (read offsets, gaps, committed offsets) through `self`.
  Why each is replaced: docs/design.md ("What we found in Faust, aiokafka, …").
- `record_reader.py` replaces aiokafka's record reader (`MemoryRecords`, read by its fetcher) so
  that header names that are not UTF-8 cannot stop a consumer; that module is aiokafka internals
  throughout, and is used by tools that do not load Faust.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Collection
from typing import Any

import faust
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.partitioner import DefaultPartitioner
from faust.types import TP, AppT

# --- tables ---------------------------------------------------------------------------------------


def table_partition_db(table: faust.types.TableT[Any, Any], partition: int) -> Any:
    """The RocksDB (`rocksdict.Rdict`, raw mode) of one partition of a RocksDB-backed table
    (`Store._db_for_partition`, which opens it on first use). The agents read and write a batch's
    keys there at once (`stream/tables.py: BatchedTableWrites`) rather than per key through the
    table; Faust's recovery writes changelog bytes into the same instance (`apply_changelog_batch`)."""
    return table.data._db_for_partition(partition)  # type: ignore[attr-defined]


# --- the producer ---------------------------------------------------------------------------------


def aiokafka_producer(app: faust.App) -> AIOKafkaProducer:
    """The AIOKafkaProducer inside Faust's producer (`Producer._ensure_producer`: raises `NotReady`
    before the producer service has started). The source agent sends its fan-out through aiokafka's
    batch API (`stream/producer_batches.py`), which Faust's producer does not expose."""
    return app.producer._ensure_producer()  # type: ignore[attr-defined]


async def track_produced_topics(app: faust.App, names: list[str]) -> None:
    """Make the producer's metadata client track every topic this worker writes to.

    aiokafka's send() skips `add_topic` for a topic already in its cached metadata (the first
    fetch asks for all topics). A later refresh asks only for tracked topics, drops the others from
    the cache, and a batch for a dropped topic then waits for a partition leader forever — and
    every flush and offset commit waits behind it (seen here when records trickle in).
    aiokafka's client keeps the tracked topics in `_topics`; `set_topics` replaces them whole.
    """
    producer = app.producer._producer  # type: ignore[attr-defined]  # the AIOKafkaProducer
    client = producer.client
    missing = [name for name in names if name not in client._topics]
    if missing:
        client.set_topics(client._topics | set(missing))
        await client.force_metadata_update()


async def wait_on_metadata(producer: AIOKafkaProducer, topic: str) -> None:
    """Wait until the producer's cluster metadata knows `topic`'s partitions, as `send()` does
    first (`AIOKafkaClient._wait_on_metadata`): `send_batch` does not, and the partitioner needs
    them."""
    await producer.client._wait_on_metadata(topic)


def uses_default_partitioner(producer: AIOKafkaProducer) -> bool:
    """Whether the producer's partitioner (`_partitioner`, from its `partitioner` argument) is
    aiokafka's `DefaultPartitioner` exactly: murmur2 of the key over all partitions, sorted by id,
    which the caller may then compute (and cache) itself."""
    return type(producer._partitioner) is DefaultPartitioner


def partition_for(producer: AIOKafkaProducer, topic: str, key: bytes | None, value: bytes | None) -> int:
    """The partition `send()` would choose for a record of already serialized `key` and `value`
    (`AIOKafkaProducer._partition(topic, partition, key, value, serialized_key, serialized_value)`,
    asking the configured partitioner); `send_batch` takes a partition and chooses none."""
    return int(producer._partition(topic, None, key, value, key, value))


def partitions_for_topic(producer: AIOKafkaProducer, topic: str) -> Collection[int]:
    """The partition ids of `topic` in the producer's cluster metadata (`_metadata`, which is
    `client.cluster`; a set, in no order), known once `wait_on_metadata` returned."""
    partitions: Collection[int] = producer._metadata.partitions_for_topic(topic)
    return partitions


# --- the consumer ---------------------------------------------------------------------------------


def set_fetch_max_wait_ms(consumer: AIOKafkaConsumer, wait_ms: int) -> None:
    """Override the `fetch_max_wait_ms=1500` that Faust hard-codes when it creates the
    AIOKafkaConsumer (`AIOKafkaConsumerThread._create_worker_consumer`). aiokafka keeps it in
    `_fetch_max_wait_ms` and hands it to its Fetcher in `start()`, so this must run before that.
    Why a shorter wait (a broker that holds every fetch for its whole max wait): `IngestConsumerThread`."""
    consumer._fetch_max_wait_ms = wait_ms


def on_every_seek(consumer: AIOKafkaConsumer, seen: Callable[[Any, int], None]) -> None:
    """Call `seen(tp, offset)` at every seek of the started `consumer`, before it takes effect.

    Every seek to an offset (aiokafka's `seek` and `seek_to_committed`) ends in its Fetcher's
    `seek_to(tp, offset)` (`AIOKafkaConsumer._fetcher`, created in `start()`), which is wrapped
    here; it runs in the consumer thread that fetches. `IngestConsumerThread` counts seeks with it
    so the drain loop can follow them exactly (docs/design.md, the stall after a rebalance)."""
    fetcher = consumer._fetcher
    seek_to = fetcher.seek_to

    def seek_to_seen(tp: Any, offset: int) -> None:
        seen(tp, offset)
        seek_to(tp, offset)

    fetcher.seek_to = seek_to_seen


def stop_requested(service: Any) -> Callable[[], bool]:
    """A check of whether `stop()` was called on a mode `Service` (Faust's consumer Fetcher): its
    `_stopped` event, as Faust's own `Consumer._drain_messages` checks it (`should_stop` would also
    answer True for a crashed service, which the drain loop does not look at)."""
    is_set: Callable[[], bool] = service._stopped.is_set
    return is_set


def committed_offset(consumer: Any, tp: TP) -> int | None:
    """The offset Faust's consumer last committed for `tp` (its `_committed_offset`, updated on
    each commit and on a rebalance's seek to the committed offsets), or None. Unlike aiokafka's
    `committed()` it asks no broker, and unlike the acks it stops moving when commits stop (a gap
    the committer cannot pass): the stall watchdog watches it."""
    offset: int | None = consumer._committed_offset.get(tp)
    return offset


def fetch_state(consumer: Any, tp: TP) -> dict[str, Any]:
    """What Faust's consumer holds for `tp` besides its commits, for a stall's log line: the last
    offset delivered to the streams (`_read_offset`), whether the partition is fetched (`_active_
    partitions`, None: all) or paused, and how many of its records are taken, not acked yet."""
    active = consumer._active_partitions
    unacked = sum(1 for message in consumer._unacked_messages if message.tp == tp)
    return {"read_offset": consumer._read_offset.get(tp), "fetched": active is None or tp in active,
            "paused": tp in consumer._paused_partitions, "unacked": unacked}


def consumer_thread_loop(consumer: Any) -> asyncio.AbstractEventLoop | None:
    """The event loop of the thread Faust's aiokafka consumer runs in (mode's `ServiceThread`)."""
    loop: asyncio.AbstractEventLoop | None = getattr(getattr(consumer, "_thread", None), "thread_loop", None)
    return loop


def consumer_tasks(consumer: Any) -> dict[str, str]:
    """The state of the background tasks of the aiokafka consumer in Faust's consumer thread: its
    fetcher's routine and its group coordinator's. Without a running fetch routine, `getmany`
    waits for records that are never fetched."""
    aio = getattr(getattr(consumer, "_thread", None), "_consumer", None)
    if aio is None:
        return {}
    tasks = {"fetch": getattr(getattr(aio, "_fetcher", None), "_fetch_task", None)}
    coordinator = getattr(aio, "_coordinator", None)
    for name in ("coordination", "heartbeat"):
        tasks[name] = getattr(coordinator, f"_{name}_task", None)
    return {name: _task_state(task) for name, task in tasks.items()}


def _task_state(task: asyncio.Future[Any] | None) -> str:
    if task is None:
        return "none"
    if not task.done():
        return "running"
    if task.cancelled():
        return "cancelled"
    error = task.exception()
    return f"failed: {error!r}" if error is not None else "finished"


def recovery_state(app: faust.App) -> dict[str, Any]:
    """Faust's table recovery as a stall's log line: in recovery or not, the changelog records each
    active partition still waits for (highwater less offset, when above 0), and whether the
    streams' flow is on. A recovery that waits for records that never come leaves every stream
    partition paused: the worker is idle with lag."""
    recovery = app.tables.recovery  # type: ignore[attr-defined]
    waited = {tp: n for tp, n in recovery.active_remaining().items() if n > 0}
    return {"in_recovery": recovery.in_recovery,
            "changelog_records_waited_for": {f"{tp.topic}[{tp.partition}]": n for tp, n in waited.items()},
            "changelog_fetch": fetch_positions(app.consumer, list(waited)),
            "flow_active": app.flow_control.is_active()}


def fetch_positions(consumer: Any, tps: Collection[TP]) -> dict[str, dict[str, Any]]:
    """Where aiokafka (in Faust's consumer thread) fetches each of `tps` from, whether it holds
    records of it not handed over yet, whether it pauses it, and the seeks the drain loop follows
    (`IngestConsumerThread.seeks`, `BatchDrainConsumer._read_offset_seeks`). Read from another
    thread without a lock: for a log line."""
    thread = getattr(consumer, "_thread", None)
    aio = getattr(thread, "_consumer", None)
    if aio is None:
        return {}
    subscription = aio._subscription.subscription
    assignment = subscription.assignment if subscription is not None else None
    buffered = getattr(getattr(aio, "_fetcher", None), "_records", {})  # created by start()
    seeks = getattr(thread, "seeks", {})
    read_offset_seeks = getattr(consumer, "_read_offset_seeks", {})
    positions = {}
    for tp in tps:
        state = assignment.state_value(tp) if assignment is not None else None
        positions[f"{tp.topic}[{tp.partition}]"] = {
            "position": getattr(state, "_position", None), "paused": getattr(state, "paused", None),
            "buffered": type(buffered[tp]).__name__ if tp in buffered else None,
            "seek": tuple(seeks[tp]) if tp in seeks else None, "read_offset_seek": read_offset_seeks.get(tp)}
    return positions


def stream_channel_for(app: AppT, tp: TP) -> tuple[Any, Any] | None:
    """The conductor's handler for `tp` and the one channel (an agent's stream) it delivers to, or
    None where the conductor must deliver itself: its index is being rebuilt (`_tp_to_callback_lock`
    held: a resubscription), `tp` has no handler, the handler is not Faust's compiled
    `ConductorHandler` (its `channels`, `on_pressure_high`, `on_pressure_drop`), or it delivers to
    no channel or to several. The drain loop then puts `tp`'s events straight into that channel's
    queue, as the handler would (`BatchDrainConsumer._deliver`)."""
    conductor: Any = app.topics
    if conductor._tp_to_callback_lock.locked():
        return None
    handler = conductor._tp_to_callback.get(tp)
    channels = getattr(handler, "channels", None)
    if channels is None or len(channels) != 1 or not hasattr(handler, "on_pressure_drop"):
        return None
    (channel,) = channels
    return handler, channel


async def pause_in_client(consumer: Any, held: Collection[str]) -> None:
    """Pause, in aiokafka's own client, every assigned partition of the `held` topics, and resume
    the others it holds paused.

    Faust's pause only stops it asking for a partition's records; aiokafka still fetches and
    buffers them, and they were seen delivered. aiokafka's own pause stops the fetch and drops
    the buffer (re-fetched from the position on resume). That client lives in Faust's consumer
    thread (`Consumer._thread`, whose `_ensure_consumer()` is the AIOKafkaConsumer), and aiokafka
    is not thread-safe, so the call goes there (`call_thread`). A consumer without a thread (not
    Faust's aiokafka driver) has nothing to pause."""
    thread = getattr(consumer, "_thread", None)
    if thread is None:
        return

    async def set_paused() -> None:
        client = thread._ensure_consumer()
        wanted = {tp for tp in client.assignment() if tp.topic in held}
        if wanted:
            client.pause(*wanted)
        resumed = client.paused() - wanted
        if resumed:
            client.resume(*resumed)

    await thread.call_thread(set_paused)
