"""(b) A bare Faust pass-through: one agent, batches taken and sent on, no state. How fast Faust
itself moves records on this broker. Run as a worker: `python -m bench.faust_pass worker`."""

from __future__ import annotations

import os

import faust

BOOTSTRAP = os.environ["BENCH_BOOTSTRAP"]
SOURCE, TARGET = os.environ["BENCH_SOURCE"], os.environ["BENCH_TARGET"]

app = faust.App("bench-faust-pass", broker=f"kafka://{BOOTSTRAP}", web_port=int(os.environ["BENCH_WEB_PORT"]),
                datadir=os.environ["BENCH_DATA_DIR"], producer_linger=0.005, topic_partitions=4,
                broker_session_timeout=6, broker_heartbeat_interval=1.5)
source = app.topic(SOURCE, key_type=bytes, value_type=bytes, key_serializer="raw", value_serializer="raw")
target = app.topic(TARGET, key_type=bytes, value_type=bytes, key_serializer="raw", value_serializer="raw")


@app.agent(source)
async def passthrough(stream: faust.StreamT) -> None:
    async for values in stream.take(1000, within=0.05):
        for value in values:
            await target.send(value=value)


if __name__ == "__main__":
    app.main()
