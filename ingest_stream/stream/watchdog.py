"""The stall watchdog: a timer feeding `core.stall.StallDetector`; on a stall the worker exits hard.

Exiting is the only reliable remedy from inside: a stalled Faust stream does not recover by itself,
and a graceful stop waits for the very streams that are stuck. Nothing is lost — un-acked records
are redelivered after the orchestrator restarts the worker.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import faust
from aiokafka.errors import IllegalStateError

from ingest_stream.config import Settings
from ingest_stream.core.stall import Progress, StallDetector
from ingest_stream.sinks.guarded import GuardedSink
from ingest_stream.stream import faust_internals

log = logging.getLogger(__name__)
STALL_EXIT_CODE = 70  # EX_SOFTWARE


def install_watchdog(app: faust.App, settings: Settings, *, consumed: set[str],
                     sinks_by_topic: Mapping[str, GuardedSink], acked: Mapping[Any, int],
                     detector: StallDetector | None = None,
                     held: Callable[[], set[str]] = set,
                     known_ends: Callable[[], Mapping[tuple[str, int], int]] = dict,
                     describe: Callable[[], Mapping[str, Any]] = dict,
                     clock: Callable[[], float] = time.monotonic,
                     exit_now: Callable[[int], object] = os._exit) -> Callable[[], Awaitable[None]]:
    """Register the watchdog timer; returns the check itself (tests call it directly). The
    detector's `waiting` is what /health/detailed reports; `describe` is logged at a stall."""
    detector = detector or StallDetector(settings.stall_timeout_s)

    async def watch_for_stalls() -> None:
        consumer = app.consumer
        positions: dict[str, Progress] = {}
        busy: set[str] = set()
        on_hold = held()  # not fetched on purpose (drain, pause, a disabled source): not a stall
        tps = [tp for tp in consumer.assignment() if tp.topic in consumed]
        # From the broker, not the fetch cache: a partition that stopped being fetched has none.
        ends = await consumer.highwaters(*tps) if tps else {}
        # The lag probe reads past a broker's high watermark where it falls short (Tansu): its
        # ends see records a stalled partition would otherwise hide.
        probed = known_ends()
        assigned = consumer.assignment()  # a rebalance may have revoked some while highwaters ran
        for tp in tps:
            if tp not in assigned:
                continue
            end = max(ends.get(tp) or 0, probed.get((tp.topic, tp.partition), 0)) or None
            if end is None:
                continue
            committed = faust_internals.committed_offset(consumer, tp)
            done = acked.get(tp)
            if committed is None and done is None:  # nothing processed here yet: as far as fetched
                try:
                    committed = await consumer.position(tp)
                except IllegalStateError:  # revoked by a rebalance meanwhile: no longer ours to watch
                    continue
            key = f"{tp.topic}[{tp.partition}]"
            positions[key] = Progress(committed=committed, acked=done, end=end)
            sink = sinks_by_topic.get(tp.topic)
            if (sink is not None and sink.busy) or tp.topic in on_hold:
                busy.add(key)
        stalled = detector.observe(clock(), positions, busy)
        if stalled:
            log.critical("stall: %s had records waiting and no progress for %.0fs; exiting (%d) so the "
                         "worker is restarted; un-acked records will be redelivered",
                         ", ".join(stalled), settings.stall_timeout_s, STALL_EXIT_CODE)
            for tp in tps:  # where each stalled partition stood, for the post-mortem
                key = f"{tp.topic}[{tp.partition}]"
                if key in stalled:
                    log.critical("stall: %s %s %s", key, positions[key],
                                 faust_internals.fetch_state(consumer, tp))
            log.critical("stall: the worker's agents and lanes: %s", describe())
            log.critical("stall: the consumer thread's aiokafka tasks: %s",
                         faust_internals.consumer_tasks(consumer))
            for line in awaiting_tasks():
                log.critical("stall: task %s", line)
            thread_loop = faust_internals.consumer_thread_loop(consumer)
            for line in awaiting_tasks(thread_loop) if thread_loop is not None else ():
                log.critical("stall: consumer thread task %s", line)
            logging.shutdown()
            sys.stderr.flush()
            exit_now(STALL_EXIT_CODE)

    app.timer(settings.stall_check_interval_s)(watch_for_stalls)
    return watch_for_stalls


def awaiting_tasks(loop: asyncio.AbstractEventLoop | None = None) -> list[str]:
    """Where each task of `loop` (this thread's running one by default) waits: its name and its
    chain of awaits, outermost first. A stalled worker waits somewhere; this says where. (Another
    thread's loop is read without its lock: good enough for a log line just before exiting.)"""
    lines = []
    for task in asyncio.all_tasks(loop):
        chain: list[str] = []
        awaited: Any = task.get_coro()
        while awaited is not None and len(chain) < 12:
            frame = getattr(awaited, "cr_frame", None) or getattr(awaited, "ag_frame", None)
            if frame is not None:
                chain.append(f"{frame.f_code.co_name} ({os.path.basename(frame.f_code.co_filename)}:"
                             f"{frame.f_lineno})")
            awaited = getattr(awaited, "cr_await", None) or getattr(awaited, "ag_await", None)
        lines.append(f"{task.get_name()}: {' > '.join(chain) or repr(task)}")
    return sorted(lines)
