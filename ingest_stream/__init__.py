"""ingest_stream: Kafka source topics → validate → dedupe → Postgres / Neo4j / Typesense, with a
reason-coded dead-letter topic. The contract is README.md; the design notes are in docs/."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("ingest-stream")
except PackageNotFoundError:  # run from a checkout that was never installed
    __version__ = "0+unknown"
