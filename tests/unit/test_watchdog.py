"""The watchdog's wiring with a stand-in for Faust's consumer (no broker)."""

from types import SimpleNamespace

import pytest
from aiokafka.errors import IllegalStateError
from faust.types import TP

from ingest_stream.config import Settings
from ingest_stream.stream.watchdog import STALL_EXIT_CODE, install_watchdog


class FakeConsumer:
    def __init__(self, source_end: int) -> None:
        self.tps = {TP("src", 0): (10, source_end), TP("sink", 0): (5, 9), TP("changelog", 0): (0, 99)}
        self._committed_offset = {tp: done for tp, (done, _) in self.tps.items()}
        self._read_offset = {TP("src", 0): 9}  # Faust's fetch bookkeeping, logged at a stall
        self._active_partitions = None
        self._paused_partitions = {TP("src", 0)}
        self._unacked_messages = [SimpleNamespace(tp=TP("src", 0))]

    def assignment(self):
        return set(self.tps)

    async def highwaters(self, *tps):
        return {tp: self.tps[tp][1] for tp in tps}

    async def position(self, tp):
        return self.tps[tp][0]


def _install(retrying: bool, source_end: int = 50):
    now = [0.0]
    exits: list[int] = []
    timers = []
    app = SimpleNamespace(consumer=FakeConsumer(source_end), timer=lambda interval: timers.append)
    sink = SimpleNamespace(busy=retrying)
    check = install_watchdog(app, Settings(stall_timeout_s=30), consumed={"src", "sink"},
                             sinks_by_topic={"sink": sink}, acked={}, clock=lambda: now[0],
                             exit_now=exits.append, describe=lambda: {"lanes": {"typesense": "spilling"}})
    return check, now, exits, timers


async def test_a_partition_waiting_without_progress_makes_the_worker_exit(caplog):
    check, now, exits, timers = _install(retrying=False)
    assert timers == [check]
    await check()
    now[0] = 29
    await check()
    assert exits == []
    now[0] = 31
    await check()
    assert exits == [STALL_EXIT_CODE]
    # Where the stalled partition stood, for the post-mortem: its progress and Faust's fetch state.
    assert "stall: src[0] Progress(committed=10, acked=None, end=50) {'read_offset': 9, 'fetched': True, " \
           "'paused': True, 'unacked': 1}" in caplog.text
    assert "stall: the worker's agents and lanes: {'lanes': {'typesense': 'spilling'}}" in caplog.text


async def test_a_sink_that_is_retrying_is_busy_not_stalled():
    check, now, exits, _ = _install(retrying=True, source_end=10)  # only the sink has records waiting
    await check()
    now[0] = 100
    await check()
    assert exits == []


async def test_the_same_sink_not_retrying_is_stalled():
    check, now, exits, _ = _install(retrying=False, source_end=10)
    await check()
    now[0] = 100
    await check()
    assert exits == [STALL_EXIT_CODE]


async def test_acked_records_never_committed_make_the_worker_exit():
    now = [0.0]
    exits: list[int] = []
    consumer = FakeConsumer(source_end=10)
    consumer.tps = {TP("src", 0): (10, 10)}
    consumer._committed_offset = {TP("src", 0): 4}  # the committer is stuck behind a gap
    app = SimpleNamespace(consumer=consumer, timer=lambda interval: lambda f: f)
    check = install_watchdog(app, Settings(stall_timeout_s=30), consumed={"src"}, sinks_by_topic={},
                             acked={TP("src", 0): 10}, clock=lambda: now[0], exit_now=exits.append)
    await check()
    now[0] = 31
    await check()
    assert exits == [STALL_EXIT_CODE]


async def test_ends_read_past_a_short_high_watermark_still_reveal_a_stall():
    """A broker whose high watermark falls short (Tansu) would hide records waiting; the lag
    probe's ends (records read past it) do not."""
    now = [0.0]
    exits: list[int] = []
    app = SimpleNamespace(consumer=FakeConsumer(source_end=10), timer=lambda interval: lambda f: f)
    check = install_watchdog(app, Settings(stall_timeout_s=30), consumed={"src"}, sinks_by_topic={},
                             acked={TP("src", 0): 10}, clock=lambda: now[0], exit_now=exits.append,
                             known_ends=lambda: {("src", 0): 25})
    await check()
    now[0] = 31
    await check()
    assert exits == [STALL_EXIT_CODE]


class RevokingConsumer(FakeConsumer):
    """A rebalance revokes partitions while the check awaits the broker (CI: the worker crashed
    on `position` of a partition it no longer owned)."""

    def __init__(self, revoke_during: str) -> None:
        super().__init__(source_end=50)
        self._committed_offset = {}  # nothing processed yet: the check asks for the position
        self._revoke_during = revoke_during

    async def highwaters(self, *tps):
        ends = await super().highwaters(*tps)
        if self._revoke_during == "highwaters":
            del self.tps[TP("src", 0)]
        return ends

    async def position(self, tp):
        if self._revoke_during == "position" or tp not in self.tps:
            raise IllegalStateError(f"Partition {tp} is not assigned")
        return await super().position(tp)


@pytest.mark.parametrize("revoke_during", ["highwaters", "position"])
async def test_a_partition_revoked_while_the_check_runs_is_skipped_not_a_crash(revoke_during: str):
    now = [0.0]
    exits: list[int] = []
    app = SimpleNamespace(consumer=RevokingConsumer(revoke_during), timer=lambda interval: lambda f: f)
    check = install_watchdog(app, Settings(stall_timeout_s=30), consumed={"src"}, sinks_by_topic={},
                             acked={}, clock=lambda: now[0], exit_now=exits.append)
    await check()
    now[0] = 31
    await check()  # the revoked partition is not watched, so it cannot look stalled either
    assert exits == []


async def test_the_agents_in_flight_state_names_the_oldest_batch_and_whether_it_settled():
    import asyncio
    from collections import deque

    from ingest_stream.stream.app import _in_flight_state

    def event(partition: int) -> SimpleNamespace:
        return SimpleNamespace(message=SimpleNamespace(topic="src", partition=partition))

    waiting: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    settled: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    settled.set_result(None)
    batches = deque([(waiting, [event(2), event(3), event(2)]), (settled, [event(0)])])
    assert _in_flight_state(batches) == {"batches": 2, "records": 4, "oldest_settled": False,
                                         "oldest_partitions": ["src[2]", "src[3]"]}


async def test_the_recovery_state_names_changelog_records_a_recovery_still_waits_for(tmp_path):
    """On Faust's real app (no broker): what a stall logs of the table recovery. A recovery whose
    highwater is one past the offset it read waits for that record, with every stream paused."""
    from ingest_stream.stream.app import create_app
    from ingest_stream.stream.faust_internals import recovery_state

    app = create_app(Settings.from_env({"INGEST_DATA_DIR": str(tmp_path), "INGEST_ADMIN_TOKEN": "t"}))
    recovery = app.tables.recovery
    waiting, done = TP("it-dedupe-kafka-changelog", 0), TP("it-dedupe-kafka-changelog", 2)
    recovery.active_highwaters.update({waiting: 302, done: 302})
    recovery.active_offsets.update({waiting: 301, done: 452})  # past a short highwater: not waited for
    assert recovery_state(app) == {"in_recovery": False,
                                   "changelog_records_waited_for": {"it-dedupe-kafka-changelog[0]": 1},
                                   "changelog_fetch": {}, "flow_active": False}  # not started: no client


async def test_a_stall_says_where_each_task_waits():
    import asyncio

    from ingest_stream.stream.watchdog import awaiting_tasks

    never = asyncio.Event()

    async def waits_for_a_changelog_record() -> None:
        await never.wait()

    task = asyncio.create_task(waits_for_a_changelog_record(), name="recovery")
    await asyncio.sleep(0)
    try:
        line = next(line for line in awaiting_tasks() if line.startswith("recovery: "))
        assert line.startswith("recovery: waits_for_a_changelog_record (test_watchdog.py:")
        assert "> wait (locks.py:" in line  # down to the Event it waits on
    finally:
        task.cancel()


async def test_the_consumer_threads_aiokafka_tasks_say_whether_they_still_run():
    import asyncio

    from ingest_stream.stream.faust_internals import consumer_tasks

    loop = asyncio.get_running_loop()
    cancelled, running = loop.create_future(), loop.create_future()
    cancelled.cancel()
    failed = loop.create_future()
    failed.set_exception(RuntimeError("boom"))
    aio = SimpleNamespace(_fetcher=SimpleNamespace(_fetch_task=cancelled),
                          _coordinator=SimpleNamespace(_coordination_task=running, _heartbeat_task=failed))
    consumer = SimpleNamespace(_thread=SimpleNamespace(_consumer=aio))
    assert consumer_tasks(consumer) == {"fetch": "cancelled", "coordination": "running",
                                        "heartbeat": "failed: RuntimeError('boom')"}
    assert consumer_tasks(SimpleNamespace()) == {}
    running.cancel()


def test_fetch_positions_say_where_aiokafka_reads_a_partition_and_which_seek_the_drain_loop_follows():
    from ingest_stream.stream.faust_internals import fetch_positions

    changelog, other = TP("it-dedupe-kafka-changelog", 0), TP("it-dedupe-kafka-changelog", 1)
    states = {changelog: SimpleNamespace(_position=303, paused=False)}
    aio = SimpleNamespace(
        _subscription=SimpleNamespace(subscription=SimpleNamespace(
            assignment=SimpleNamespace(state_value=states.get))),
        _fetcher=SimpleNamespace(_records={changelog: SimpleNamespace()}))
    consumer = SimpleNamespace(_thread=SimpleNamespace(_consumer=aio, seeks={changelog: (3, 301)}),
                               _read_offset_seeks={changelog: 2})
    assert fetch_positions(consumer, [changelog, other]) == {
        "it-dedupe-kafka-changelog[0]": {"position": 303, "paused": False, "buffered": "SimpleNamespace",
                                         "seek": (3, 301), "read_offset_seek": 2},
        "it-dedupe-kafka-changelog[1]": {"position": None, "paused": None, "buffered": None, "seek": None,
                                         "read_offset_seek": None}}
