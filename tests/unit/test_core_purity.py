"""`core` is pure: no Faust, Kafka client, drivers, asyncio, clock or randomness calls."""

import ast
from pathlib import Path

import ingest_stream.core

FORBIDDEN = {"faust", "mode", "aiokafka", "asyncpg", "neo4j", "typesense", "asyncio", "random",
             "time", "httpx", "prometheus_client", "rocksdict", "socket", "subprocess"}


def test_core_imports_nothing_impure():
    core = Path(ingest_stream.core.__file__).parent
    offenders = []
    for path in core.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            offenders += [f"{path.name}: {n}" for n in names if n.split(".")[0] in FORBIDDEN]
    assert offenders == []


def test_core_never_reads_the_clock():
    core = Path(ingest_stream.core.__file__).parent
    for path in core.glob("*.py"):
        text = path.read_text()
        assert "datetime.now(" not in text and ".utcnow(" not in text, path.name
