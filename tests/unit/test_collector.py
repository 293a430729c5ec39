"""The worker's collector settings: start-up objects frozen and fewer collections, or Python's own."""

from __future__ import annotations

import gc
from collections.abc import Iterator

import pytest

from ingest_stream.collector import WORKER_THRESHOLDS, tune_collector
from ingest_stream.config import Settings


@pytest.fixture
def restored_collector() -> Iterator[None]:
    thresholds = gc.get_threshold()
    yield
    gc.unfreeze()
    gc.set_threshold(*thresholds)


@pytest.mark.usefixtures("restored_collector")
def test_tuned_freezes_what_is_alive_and_collects_less_often() -> None:
    alive = object(), [1, 2]  # a tracked container alive at the call
    frozen = tune_collector(True)
    # Frozen objects can still be freed (another thread's, a previous test's): the count only falls.
    assert frozen is not None and 0 < gc.get_freeze_count() <= frozen
    assert gc.get_threshold() == WORKER_THRESHOLDS
    assert not any(item is alive for item in gc.get_objects())  # frozen: out of every generation
    created_after = [alive]
    assert any(item is created_after for item in gc.get_objects())


@pytest.mark.usefixtures("restored_collector")
def test_untuned_leaves_pythons_collector_alone() -> None:
    thresholds = gc.get_threshold()
    assert tune_collector(False) is None
    assert gc.get_threshold() == thresholds and gc.get_freeze_count() == 0


def test_on_by_default_and_off_by_setting() -> None:
    assert Settings().gc_tuned
    assert not Settings.from_env({"INGEST_GC_TUNED": "false"}).gc_tuned
