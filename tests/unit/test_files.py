import gzip

import pytest

from ingest_stream.core.files import FileCheckpoint, Plan, plan_for, read_lines


def test_plans_for_new_done_partial_appended_and_replaced_files():
    assert plan_for(None, version="e1", size=10) == (Plan.READ, 0)
    done = FileCheckpoint("e1", 10, 5, done=True)
    assert plan_for(done, version="e1", size=10) == (Plan.SKIP, 5)
    partial = FileCheckpoint("e1", 10, 3)
    assert plan_for(partial, version="e1", size=10) == (Plan.READ, 3)  # resume after a crash
    assert plan_for(done, version="e2", size=25) == (Plan.READ, 5)  # it grew: the new lines only
    assert plan_for(done, version="e2", size=4) == (Plan.RESTART, 0)  # replaced by something shorter


def test_checkpoints_round_trip():
    cp = FileCheckpoint("e", 7, 2, done=True)
    assert FileCheckpoint.decode(cp.encode()) == cp


async def chunks_of(data: bytes, size: int):
    for start in range(0, len(data), size):
        yield data[start:start + size]


@pytest.mark.parametrize("chunk", [1, 3, 7, 1024])
async def test_lines_come_out_whole_whatever_the_chunking(chunk):
    data = b'{"a": 1}\n{"b": 2}\r\n\n{"c": 3}'
    lines = [line async for line in read_lines(chunks_of(data, chunk), gzipped=False)]
    assert lines == [b'{"a": 1}', b'{"b": 2}', b"", b'{"c": 3}']


@pytest.mark.parametrize("chunk", [5, 64])
async def test_gzip_is_inflated_on_the_fly(chunk):
    data = gzip.compress(b"".join(b'{"n": %d}\n' % i for i in range(100)))
    lines = [line async for line in read_lines(chunks_of(data, chunk), gzipped=True)]
    assert lines == [b'{"n": %d}' % i for i in range(100)]
