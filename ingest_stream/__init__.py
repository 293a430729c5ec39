"""ingest_stream: Kafka source topics → validate → dedupe → Postgres / Neo4j / Typesense, with a
reason-coded dead-letter topic. README.md says how to run it; docs/ holds the rest."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("ingest-stream")
except PackageNotFoundError:  # run from a checkout that was never installed
    __version__ = "0+unknown"
