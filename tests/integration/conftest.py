"""Session fixtures: the real servers of the embedded stack, started by the suite, torn down after.

A server that cannot start fails the suite; it never skips.
"""

from __future__ import annotations

import asyncio
import shutil
import tempfile
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import asyncpg
import pytest

from ingest_stream.ops.devstack import DevStack, free_port
from ingest_stream.sinks.postgres import migrate
from tests.integration.harness import AUDIT_SQL, Kafka, SinkReader, WorkerProcess, worker_env


@pytest.fixture(scope="session")
def stack() -> Iterator[DevStack]:
    # Not under pytest's own temp dir: PostgreSQL runs as another user, which must traverse to its
    # data, and every new pytest session (a unit-test run alongside, say) resets that dir to 0700.
    root = Path(tempfile.mkdtemp(prefix="ingest-stack-"))
    try:
        with DevStack(root) as running:
            asyncio.run(_prepare_postgres(running.postgres_dsn))
            yield running
    finally:
        shutil.rmtree(root, ignore_errors=True)


async def _prepare_postgres(dsn: str) -> None:
    """The project's migrations, then the test's own audit trigger: an independent witness of writes."""
    conn = await asyncpg.connect(dsn)
    try:
        await migrate(conn)
        await conn.execute(AUDIT_SQL)
    finally:
        await conn.close()


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[str]:
    """A real S3 API (moto's server mode) on a free port, for the S3 source's tests."""
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.stop()


@dataclass(frozen=True)
class SftpServer:
    port: int
    root: Path
    username: str = "ingest"
    password: str = "sftp-test-password"


@pytest.fixture(scope="session")
def sftp_server() -> Iterator[SftpServer]:
    """A real SFTP server (asyncssh, password auth, chrooted to a temp dir) on its own thread."""
    import asyncssh

    root = Path(tempfile.mkdtemp(prefix="ingest-sftp-"))
    server = SftpServer(free_port(), root)
    loop = asyncio.new_event_loop()

    class PasswordOnly(asyncssh.SSHServer):
        def password_auth_supported(self) -> bool:
            return True

        def validate_password(self, username: str, password: str) -> bool:
            return (username, password) == (server.username, server.password)

    async def listen() -> asyncssh.SSHAcceptor:
        return await asyncssh.listen(
            "127.0.0.1", server.port, server_factory=PasswordOnly,
            server_host_keys=[asyncssh.generate_private_key("ssh-ed25519")],
            sftp_factory=lambda channel: asyncssh.SFTPServer(channel, chroot=str(root).encode()))

    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    acceptor = asyncio.run_coroutine_threadsafe(listen(), loop).result(30)
    try:
        yield server
    finally:
        acceptor.close()
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="session")
def kafka(stack: DevStack) -> Kafka:
    return Kafka(stack.kafka_bootstrap)


@pytest.fixture(scope="session")
def sinks(stack: DevStack) -> Iterator[SinkReader]:
    reader = SinkReader(stack)
    yield reader
    reader.close()


@pytest.fixture(autouse=True)
def servers_survive(request: pytest.FixtureRequest) -> Iterator[None]:
    """A test after which a server of the stack is dead fails with that server's log tail, and the
    server is started again so that later tests do not fail for it (chaos tests restart their own)."""
    yield
    if "stack" not in request.fixturenames:
        return
    stack: DevStack = request.getfixturevalue("stack")
    dead = {name: (server.process.returncode if server.process else None, server.log_tail(40))
            for name, server in stack.servers.items() if not server.running}
    for name in dead:
        stack.servers[name].start()
    if dead:
        pytest.fail("server(s) died during the test: " + "\n".join(
            f"--- {name} (exit {code}) ---\n{tail}" for name, (code, tail) in dead.items()))


@pytest.fixture
def prefix() -> str:
    """Topics, consumer group and tenants of one test are its own."""
    return f"t{uuid.uuid4().hex[:8]}"


@pytest.fixture
def make_worker(stack: DevStack, prefix: str, tmp_path: Path) -> Iterator:
    workers: list[WorkerProcess] = []

    def make(**overrides: str) -> WorkerProcess:
        env = worker_env(stack, prefix, tmp_path / f"worker-{len(workers)}", **overrides)
        worker = WorkerProcess(env, tmp_path / f"worker-{len(workers)}.log")
        workers.append(worker)
        return worker

    yield make
    for worker in workers:
        worker.stop()
