"""Test harness: worker processes, an independent Kafka client, and readers for the three sinks.

Nothing here uses the product's own Kafka or sink code paths to *check* results: Kafka is read with
confluent-kafka (librdkafka), the sinks with their drivers and plain queries.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import asyncpg
import typesense
from confluent_kafka import Consumer, KafkaException, Producer, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic
from neo4j import AsyncDriver, AsyncGraphDatabase
from typesense.exceptions import ObjectNotFound

from ingest_stream.ops.devstack import DevStack, free_port
from ingest_stream.stream.watchdog import STALL_EXIT_CODE

T = TypeVar("T")
PROJECT_ROOT = Path(__file__).resolve().parents[2]


def eventually(check: Callable[[], T], *, timeout_s: float, interval_s: float = 0.5,
               context: Callable[[], str] | None = None) -> T:
    """Re-run `check` (which asserts) until it passes or the deadline passes; then raise its error."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            return check()
        except (AssertionError, KafkaException) as error:
            if time.monotonic() >= deadline:
                # The error again after the context: CI shows only the last lines of a run.
                extra = f"\n--- context ---\n{context()}\n--- not true: {error}" if context else ""
                raise AssertionError(f"not true after {timeout_s:.0f}s: {error}{extra}") from error
        time.sleep(interval_s)


def assert_equal(actual: object, expected: object, what: str = "") -> None:
    """For `eventually(lambda: assert_equal(…))`: a check that reads as one, and whose failure
    says in one line what differs (CI shows only the last lines of a run)."""
    if actual != expected:
        raise AssertionError(f"{what + ': ' if what else ''}{describe_difference(actual, expected)}")


def describe_difference(actual: object, expected: object, examples: int = 3) -> str:
    """Missing / extra / differing entries of two mappings or sets, with a few examples each."""
    if isinstance(actual, dict) and isinstance(expected, dict):
        missing = [k for k in expected if k not in actual]
        extra = [k for k in actual if k not in expected]
        differ = [k for k in expected if k in actual and actual[k] != expected[k]]
        parts = [f"{len(missing)} missing {missing[:examples]}", f"{len(extra)} extra {extra[:examples]}",
                 f"{len(differ)} differ " + str([(k, actual[k], expected[k]) for k in differ[:examples]])]
        return f"{len(actual)} entries, expected {len(expected)}: " + "; ".join(parts)
    if isinstance(actual, set | frozenset) and isinstance(expected, set | frozenset):
        missing_items, extra_items = sorted(expected - actual, key=repr), sorted(actual - expected, key=repr)
        return (f"{len(actual)} entries, expected {len(expected)}: {len(missing_items)} missing "
                f"{missing_items[:examples]}; {len(extra_items)} extra {extra_items[:examples]}")
    return f"{actual!r:.300} != {expected!r:.300}"


# --- the worker -----------------------------------------------------------------------------
@dataclass
class WorkerProcess:
    env: dict[str, str]
    log_path: Path
    process: subprocess.Popen[bytes] | None = None
    exits: list[int] = field(default_factory=list)  # exit codes seen by the supervisor
    # The command and folder it runs in: the checkout's, unless a test runs an installed copy.
    argv: list[str] = field(default_factory=lambda: [sys.executable, "-m", "ingest_stream.cli", "worker"])
    cwd: Path = PROJECT_ROOT
    _supervisor: threading.Thread | None = None
    _stopping: bool = False
    _killed: bool = False  # by the test itself: the test restarts it, not the supervisor
    _lifecycle: threading.RLock = field(default_factory=threading.RLock)

    def supervise(self, restart_on: tuple[int, ...] = (STALL_EXIT_CODE,)) -> None:
        """Act as an orchestrator: restart the worker when it exits with one of these codes (not
        after the test's own `kill`)."""
        def watch() -> None:
            while not self._stopping:
                with self._lifecycle:
                    if (self.process is not None and self.process.poll() is not None
                            and not (self._stopping or self._killed)):
                        self.exits.append(self.process.returncode)
                        if self.process.returncode not in restart_on:
                            return
                        try:
                            self.start()
                        except AssertionError:  # not healthy: the test sees it (exits, progress)
                            self.exits.append(-1)
                            return
                time.sleep(0.5)  # a supervisor's polling interval

        self._supervisor = threading.Thread(target=watch, daemon=True)
        self._supervisor.start()

    @property
    def web_port(self) -> int:
        return int(self.env["INGEST_WEB_PORT"])

    def start(self) -> None:
        with self._lifecycle:
            assert self.process is None or self.process.poll() is not None, "already running"
            with self.log_path.open("ab") as log:
                log.write(f"\n===== worker start {time.strftime('%X')} =====\n".encode())
                log.flush()
                self.process = subprocess.Popen(
                    self.argv, env={**os.environ, **self.env}, stdout=log, stderr=subprocess.STDOUT,
                    cwd=self.cwd, start_new_session=True)
            self._killed = False
            eventually(self._healthy, timeout_s=60, context=self.log_tail)

    def _healthy(self) -> None:
        assert self.process is not None and self.process.poll() is None, "worker exited"
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.web_port}/health", timeout=1) as r:
                assert r.status == 200
        except OSError as exc:
            raise AssertionError(f"/health: {exc}") from exc

    def kill(self) -> None:
        """SIGKILL: no shutdown hooks, no final commit."""
        with self._lifecycle:
            assert self.process is not None
            self._killed = True
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(10)

    def stop(self) -> int | None:
        self._stopping = True
        with self._lifecycle:  # after a restart the supervisor has under way
            if self.process is None or self.process.poll() is not None:
                return self.process.returncode if self.process else None
            self.process.send_signal(signal.SIGTERM)
            try:
                return self.process.wait(60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                return self.process.wait(10)

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def post(self, path: str, token: str | None = None, **headers: str) -> tuple[int, Any]:
        """POST with an optional bearer token; (status, decoded JSON body), errors included."""
        request = urllib.request.Request(f"http://127.0.0.1:{self.web_port}{path}", method="POST", data=b"")
        if token is not None:
            request.add_header("Authorization", f"Bearer {token}")
        for name, value in headers.items():
            request.add_header(name.replace("_", "-"), value)
        try:
            with urllib.request.urlopen(request, timeout=10) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as error:
            return error.code, json.loads(error.read() or b"null")

    def get_json(self, path: str, token: str | None = None) -> Any:
        request = urllib.request.Request(f"http://127.0.0.1:{self.web_port}{path}")
        if token is not None:
            request.add_header("Authorization", f"Bearer {token}")
        with urllib.request.urlopen(request, timeout=5) as r:
            return json.loads(r.read())

    def get(self, path: str, *, password: str | None = None) -> tuple[int, bytes]:
        """GET with optional HTTP Basic (the viewer token as the password); (status, body), errors
        included."""
        request = urllib.request.Request(f"http://127.0.0.1:{self.web_port}{path}")
        if password is not None:
            credentials = base64.b64encode(f"ops:{password}".encode()).decode()
            request.add_header("Authorization", f"Basic {credentials}")
        try:
            with urllib.request.urlopen(request, timeout=10) as r:
                return r.status, r.read()
        except urllib.error.HTTPError as error:
            return error.code, error.read()

    def metrics(self) -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.web_port}/metrics", timeout=5) as r:
            return str(r.read().decode())

    def metric(self, name: str, **labels: str) -> float:
        """Sum of the samples of `name` whose labels include `labels`."""
        total = 0.0
        for line in self.metrics().splitlines():
            if not line.startswith(name + "{") and not line.startswith(name + " "):
                continue
            series, value = line.rsplit(" ", 1)
            if all(f'{k}="{v}"' in series for k, v in labels.items()):
                total += float(value)
        return total

    def log_tail(self, lines: int = 60) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])


def run_tool(worker: WorkerProcess, module: str, *args: str, json_output: bool = True,
             expect_exit: int = 0) -> Any:
    """An operator's command (`python -m module args`) as its own process, with the worker's
    environment; its JSON output decoded (or the text)."""
    done = subprocess.run([sys.executable, "-m", module, *args], env={**os.environ, **worker.env},
                          capture_output=True, timeout=180, check=False, cwd=PROJECT_ROOT)
    assert done.returncode == expect_exit, done.stderr.decode() + done.stdout.decode()
    return json.loads(done.stdout) if json_output else done.stdout.decode() + done.stderr.decode()


def worker_env(stack: DevStack, prefix: str, data_dir: Path, **overrides: str) -> dict[str, str]:
    return {
        **stack.settings_env(),
        "INGEST_APP_ID": f"it-{prefix}",
        "INGEST_TOPIC_PREFIX": prefix,
        "INGEST_DATA_DIR": str(data_dir),
        "INGEST_WEB_PORT": str(free_port()),
        "INGEST_WEB_HOST": "127.0.0.1",
        **overrides,
    }


# --- Kafka, through librdkafka -------------------------------------------------------------
@dataclass
class Kafka:
    bootstrap: str

    def create_topics(self, names: Iterable[str], partitions: int = 4) -> None:
        admin = AdminClient({"bootstrap.servers": self.bootstrap})
        futures = admin.create_topics([NewTopic(n, num_partitions=partitions, replication_factor=1)
                                       for n in names])
        for future in futures.values():
            future.result(30)

    def produce(self, topic: str, messages: Sequence[tuple[bytes | None, bytes | None]],
                headers: Sequence[tuple[str, bytes]] = (), timestamps_ms: Sequence[int] | None = None,
                headers_each: Sequence[Sequence[tuple[str, bytes]]] | None = None,
                compression: str = "none") -> list[tuple[int, int]]:
        """Send in order (with these record timestamps, if given; `headers` on every message, then
        `headers_each[i]` on message i); return each (partition, offset)."""
        producer = Producer({"bootstrap.servers": self.bootstrap, "enable.idempotence": False,
                             "linger.ms": 5, "message.max.bytes": 4_000_000, "compression.type": compression})
        positions: list[tuple[int, int] | None] = [None] * len(messages)

        def delivered(index: int) -> Callable[[Any, Any], None]:
            def callback(error: Any, message: Any) -> None:
                assert error is None, error
                positions[index] = (message.partition(), message.offset())
            return callback

        for index, (key, value) in enumerate(messages):
            stamp = {"timestamp": timestamps_ms[index]} if timestamps_ms is not None else {}
            own = list(headers_each[index]) if headers_each is not None else []
            producer.produce(topic, value=value, key=key, headers=[*headers, *own],
                             on_delivery=delivered(index), **stamp)
            producer.poll(0)
        assert producer.flush(60) == 0
        assert all(p is not None for p in positions)
        return [p for p in positions if p is not None]

    def read_all(self, topic: str, idle_s: float = 1.5) -> list[Any]:
        """Every record now in the topic, read until no more arrive for `idle_s`.

        Not up to the high watermark: Tansu reports the last batch's base offset + 1 as the high
        watermark, short of the records after it in that batch (all of them are readable).
        """
        consumer = Consumer({"bootstrap.servers": self.bootstrap, "group.id": f"reader-{time.time_ns()}",
                             "enable.auto.commit": False, "auto.offset.reset": "earliest"})
        try:
            metadata = consumer.list_topics(topic, timeout=10).topics[topic]
            consumer.assign([TopicPartition(topic, p, 0) for p in metadata.partitions])
            records: list[Any] = []
            last_message = time.monotonic()
            deadline = last_message + 120
            while time.monotonic() - last_message < idle_s and time.monotonic() < deadline:
                message = consumer.poll(0.2)
                if message is None or message.error():
                    continue
                records.append(message)
                last_message = time.monotonic()
            return records
        finally:
            consumer.close()

    def end_offsets(self, topics: Sequence[str]) -> dict[tuple[str, int], int]:
        """Last offset + 1 per non-empty partition, by reading (see `read_all`)."""
        ends: dict[tuple[str, int], int] = {}
        for topic in topics:
            for message in self.read_all(topic):
                tp = (topic, message.partition())
                ends[tp] = max(ends.get(tp, 0), message.offset() + 1)
        return ends

    def committed(self, group: str, topics: Sequence[str]) -> dict[tuple[str, int], int]:
        """The group's committed offsets (partitions without a commit are left out)."""
        consumer = Consumer({"bootstrap.servers": self.bootstrap, "group.id": group,
                             "enable.auto.commit": False})
        try:
            partitions = []
            for topic in topics:
                meta = consumer.list_topics(topic, timeout=10).topics[topic]
                partitions += [TopicPartition(topic, p) for p in meta.partitions]
            return {(tp.topic, tp.partition): tp.offset
                    for tp in consumer.committed(partitions, timeout=10) if tp.offset >= 0}
        finally:
            consumer.close()

    def lag(self, group: str, topics: Sequence[str]) -> dict[tuple[str, int], int]:
        """Records not yet committed, per non-empty partition."""
        committed = self.committed(group, topics)
        return {tp: end - committed.get(tp, 0) for tp, end in self.end_offsets(topics).items()}


def headers_of(message: Any) -> dict[str, str]:
    return {k: (v or b"").decode("utf-8", "replace") for k, v in (message.headers() or [])}


# --- the sinks -------------------------------------------------------------------------------
READ_TIMEOUT_S = 30


class SinkReader:
    """Reads what the three sinks hold for some tenants. One Bolt driver for the whole session
    (FalkorDB stops answering new connections after a driver is closed)."""

    def __init__(self, stack: DevStack) -> None:
        self._stack = stack
        self._loop = asyncio.new_event_loop()
        self._graph: AsyncDriver = AsyncGraphDatabase.driver(stack.neo4j_uri, auth=("falkordb", ""))
        self._typesense = typesense.Client({
            "nodes": [{"host": "127.0.0.1", "port": stack.typesense_port, "protocol": "http"}],
            "api_key": stack.typesense_api_key, "connection_timeout_seconds": 10})

    def run(self, coro: Any) -> Any:
        """Run one read; a server that stops answering fails the check instead of hanging the suite."""
        try:
            return self._loop.run_until_complete(asyncio.wait_for(coro, READ_TIMEOUT_S))
        except TimeoutError as error:
            raise AssertionError(f"a sink server did not answer a read within {READ_TIMEOUT_S}s") from error

    def postgres(self, tenants: Sequence[str]) -> dict[tuple[str, str], dict[str, Any]]:
        async def read() -> list[asyncpg.Record]:
            conn = await asyncpg.connect(self._stack.postgres_dsn)
            try:
                return await conn.fetch(
                    "SELECT tenant, id, revision, deleted, kind, attributes FROM ingest_records "
                    "WHERE tenant = ANY($1::text[])", list(tenants))
            finally:
                await conn.close()

        return {(r["tenant"], r["id"]): {"revision": r["revision"], "deleted": r["deleted"],
                                         "kind": r["kind"], "attributes": json.loads(r["attributes"])}
                for r in self.run(read())}

    def execute(self, sql: str) -> None:
        async def run() -> None:
            conn = await asyncpg.connect(self._stack.postgres_dsn)
            try:
                await conn.execute(sql)
            finally:
                await conn.close()

        self.run(run())

    def audit(self, tenants: Sequence[str]) -> list[Any]:
        """Every write the test's trigger saw for these tenants, in order."""
        async def read() -> list[asyncpg.Record]:
            conn = await asyncpg.connect(self._stack.postgres_dsn)
            try:
                return await conn.fetch("SELECT * FROM test_audit WHERE tenant = ANY($1::text[]) ORDER BY at",
                                        list(tenants))
            finally:
                await conn.close()

        return list(self.run(read()))

    def postgres_overwrites_of_newer(self, tenants: Sequence[str]) -> list[Any]:
        """Audit rows (written by the test's own trigger) where a revision replaced a newer one."""
        async def read() -> list[asyncpg.Record]:
            conn = await asyncpg.connect(self._stack.postgres_dsn)
            try:
                return await conn.fetch(
                    "SELECT * FROM test_audit WHERE tenant = ANY($1::text[]) AND "
                    "old_revision IS NOT NULL AND new_revision < old_revision", list(tenants))
            finally:
                await conn.close()

        return list(self.run(read()))

    def graph_nodes(self, tenants: Sequence[str]) -> dict[tuple[str, str], dict[str, Any]]:
        result = self.run(self._graph.execute_query(
            "MATCH (n:Record) WHERE n.tenant IN $tenants AND n.revision IS NOT NULL "
            "RETURN n.tenant AS tenant, n.id AS id, n.revision AS revision, n.deleted AS deleted, "
            "n.kind AS kind", tenants=list(tenants)))
        return {(r["tenant"], r["id"]): {k: r[k] for k in ("revision", "deleted", "kind")}
                for r in result.records}

    def graph_edges(self, tenants: Sequence[str]) -> set[tuple[str, str, str, str]]:
        result = self.run(self._graph.execute_query(
            "MATCH (a:Record)-[l:LINK]->(b:Record) WHERE a.tenant IN $tenants "
            "RETURN a.tenant AS tenant, a.id AS source, l.rel AS rel, b.id AS target", tenants=list(tenants)))
        return {(r["tenant"], r["source"], r["rel"], r["target"]) for r in result.records}

    def search_documents(self, tenants: Sequence[str]) -> dict[tuple[str, str], int]:
        found: dict[tuple[str, str], int] = {}
        for tenant in tenants:
            page = 1
            while True:
                try:
                    result = self._typesense.collections["ingest_records"].documents.search({
                        "q": "*", "filter_by": f"tenant:=`{tenant}`", "per_page": 250, "page": page})
                except ObjectNotFound:  # no collection yet: nothing written
                    return found
                for hit in result["hits"]:
                    doc = hit["document"]
                    found[(doc["tenant"], doc["record_id"])] = doc["revision"]
                if page * 250 >= result["found"]:
                    break
                page += 1
        return found

    def close(self) -> None:
        self._loop.close()


AUDIT_SQL = """
CREATE TABLE IF NOT EXISTS test_audit (
    tenant text, id text, old_revision bigint, new_revision bigint, at timestamptz DEFAULT clock_timestamp());
CREATE OR REPLACE FUNCTION test_audit_write() RETURNS trigger AS $$
BEGIN
    INSERT INTO test_audit (tenant, id, old_revision, new_revision)
    VALUES (NEW.tenant, NEW.id, CASE WHEN TG_OP = 'UPDATE' THEN OLD.revision END, NEW.revision);
    RETURN NEW;
END $$ LANGUAGE plpgsql;
DROP TRIGGER IF EXISTS test_audit ON ingest_records;
CREATE TRIGGER test_audit AFTER INSERT OR UPDATE ON ingest_records
    FOR EACH ROW EXECUTE FUNCTION test_audit_write();
"""
