"""`ingest-stream dev`: the whole pipeline on one machine — embedded servers, a worker, a demo producer."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
from pathlib import Path

import orjson

from ingest_stream.config import Settings
from ingest_stream.ops.devstack import DevStack, free_port, port_open
from ingest_stream.ops.produce import produce, synthetic_records


def _port(preferred: int) -> int:
    return preferred if not port_open(preferred) else free_port()


def run_dev(root: Path, *, demo_rate: float) -> int:
    defaults = Settings()
    stack = DevStack(
        root,
        broker_port=_port(int(defaults.kafka_bootstrap.rsplit(":", 1)[1])),
        postgres_port=_port(5432),
        bolt_port=_port(7687),
        typesense_port=_port(8108),
    )
    print(f"starting the embedded stack under {stack.root} ...", flush=True)
    # `kill` (SIGTERM: a terminal closing, a supervisor) stops the servers and the worker as
    # Ctrl-C does; by default it ended this process at once and left every server running.
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        stack.start()  # stops what it started if one server fails
    except KeyboardInterrupt:
        return 130
    worker: subprocess.Popen[bytes] | None = None
    try:
        web_port = _port(defaults.web.port)
        # An admin token of its own, unless one is set, so the admin routes can be tried.
        env = {"INGEST_ADMIN_TOKEN": DEV_ADMIN_TOKEN, "INGEST_WEBHOOK_AUTH": DEV_WEBHOOK_AUTH,
               **os.environ, **stack.settings_env(),
               "INGEST_WEB_PORT": str(web_port), "INGEST_DATA_DIR": str(stack.root / "worker-data")}
        worker = subprocess.Popen([sys.executable, "-m", "ingest_stream.cli", "worker"], env=env)
        settings = Settings.from_env(env)
        print(_banner(stack, settings), flush=True)
        asyncio.run(_demo_producer(settings, demo_rate, worker))
    except KeyboardInterrupt:
        pass
    finally:
        print("\nstopping ...", flush=True)
        if worker is not None and worker.poll() is None:
            worker.send_signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                worker.wait(30)
            if worker.poll() is None:
                worker.kill()
        stack.stop()
        print("stopped.", flush=True)
    return (worker.returncode if worker is not None else 130) or 0


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


DEV_ADMIN_TOKEN = "dev-admin-token"
DEV_WEBHOOK_AUTH = ('{"tenant-0": {"token": "dev-webhook-token"}, '
                    '"tenant-1": {"hmac_secret": "dev-webhook-secret"}}')


async def _demo_producer(settings: Settings, rate: float, worker: subprocess.Popen[bytes]) -> None:
    """A trickle of synthetic records until Ctrl-C (or until the worker exits)."""
    values = (orjson.dumps(r) for r in synthetic_records(10**9, entities=200, stamp_now=True))
    while worker.poll() is None:
        batch = [next(values) for _ in range(max(1, int(rate)))]
        await produce(settings, batch, topic=settings.source_topic("kafka"), progress_every=10**9)
        await asyncio.sleep(1)


def _banner(stack: DevStack, settings: Settings) -> str:
    return "\n".join([
        "ingest-stream dev is up (Ctrl-C stops everything):",
        f"  kafka      {stack.kafka_bootstrap}   source topic {settings.source_topic('kafka')}",
        f"  postgres   {stack.postgres_dsn}",
        f"  graph      {stack.neo4j_uri} (FalkorDB over Bolt)",
        f"  typesense  {stack.typesense_url}  (api key {stack.typesense_api_key})",
        f"  worker     http://127.0.0.1:{settings.web.port}/  (operator page)  /health/detailed  /metrics",
        f"  admin      curl -X POST -H 'Authorization: Bearer {settings.web.admin_token}' "
        f"http://127.0.0.1:{settings.web.port}/admin/drain   (then /admin/resume)",
        f"  webhook    curl -X POST -H 'X-Tenant: tenant-0' -H 'Authorization: Bearer dev-webhook-token' "
        f"-d @records.json http://127.0.0.1:{settings.web.port}/ingest/webhook",
        "  tools      .venv/bin/ingest-stream lag · .venv/bin/dlqtriage summary · .venv/bin/replayctl list",
        "  to point other commands at this stack:",
        *(f"    export {k}={v!r}" for k, v in stack.settings_env().items()),
    ])
