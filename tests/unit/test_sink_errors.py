"""Driver exceptions → reason codes, by type (constructed exceptions, no servers)."""

import asyncpg
import httpx
import pytest
from neo4j import exceptions as neo4j_errors
from typesense import exceptions as ts_errors

from ingest_stream.core.reasons import Reason
from ingest_stream.sinks.registry import SINK_NAMES, sink_module
from ingest_stream.sinks.typesense import ImportRejected

CASES = [
    ("postgres", TimeoutError(), Reason.SINK_TIMEOUT),
    ("postgres", asyncpg.QueryCanceledError("statement timeout"), Reason.SINK_TIMEOUT),
    ("postgres", asyncpg.TooManyConnectionsError("too many"), Reason.RATE_LIMITED),
    ("postgres", asyncpg.UniqueViolationError("dup"), Reason.CONSTRAINT_VIOLATION),
    ("postgres", asyncpg.CheckViolationError("check"), Reason.CONSTRAINT_VIOLATION),
    ("postgres", asyncpg.InvalidTextRepresentationError("bad"), Reason.CONSTRAINT_VIOLATION),
    ("postgres", ConnectionRefusedError(111, "refused"), Reason.CONNECTION_ERROR),
    ("postgres", asyncpg.ConnectionDoesNotExistError("closed"), Reason.CONNECTION_ERROR),
    ("postgres", asyncpg.AdminShutdownError("terminating"), Reason.CONNECTION_ERROR),
    ("postgres", asyncpg.InternalClientError("cannot switch to state 15"), Reason.CONNECTION_ERROR),
    ("neo4j", neo4j_errors.ServiceUnavailable("down"), Reason.CONNECTION_ERROR),
    ("neo4j", neo4j_errors.SessionExpired("gone"), Reason.CONNECTION_ERROR),
    ("neo4j", neo4j_errors.ConstraintError("unique"), Reason.CONSTRAINT_VIOLATION),
    ("neo4j", neo4j_errors.TransientError("deadlock"), Reason.SINK_TIMEOUT),
    ("neo4j", TimeoutError(), Reason.SINK_TIMEOUT),
    ("neo4j", neo4j_errors.DatabaseError("Neo.DatabaseError.General.UnknownError"), Reason.CONNECTION_ERROR),
    ("typesense", httpx.ReadTimeout("slow"), Reason.SINK_TIMEOUT),
    ("typesense", ts_errors.Timeout("slow"), Reason.SINK_TIMEOUT),
    ("typesense", httpx.ConnectError("refused"), Reason.CONNECTION_ERROR),
    ("typesense", ts_errors.ServiceUnavailable(503, "unavailable"), Reason.CONNECTION_ERROR),
    ("typesense", ts_errors.TypesenseClientError(429, "rate limit exceeded"), Reason.RATE_LIMITED),
    ("typesense", ts_errors.RequestMalformed(400, "bad field"), Reason.CONSTRAINT_VIOLATION),
    ("typesense", ImportRejected("1 document(s) refused"), Reason.CONSTRAINT_VIOLATION),
]


@pytest.mark.parametrize(("sink", "exc", "reason"), CASES,
                         ids=[f"{s}-{type(e).__name__}" for s, e, _ in CASES])
def test_classified_by_type(sink, exc, reason):
    error = sink_module(sink).classify(exc)
    assert error is not None
    assert error.reason is reason
    assert error.sink == sink
    assert error.retryable is reason.retryable


def test_message_text_does_not_decide():
    # a generic client error whose text says "rate limit" is not RATE_LIMITED without the 429 status
    error = sink_module("typesense").classify(ts_errors.TypesenseClientError("rate limit exceeded"))
    assert error is not None and error.reason is Reason.CONNECTION_ERROR


@pytest.mark.parametrize("sink", SINK_NAMES)
def test_unknown_exceptions_are_bugs_not_sink_failures(sink):
    assert sink_module(sink).classify(KeyError("x")) is None
    assert sink_module(sink).classify(ValueError("x")) is None
