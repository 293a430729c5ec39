"""The one place that turns driver exceptions into reason codes — by exception type, never by text.

Each sink's rules are checked in order; the first whose types match wins, so timeouts come first
(`TimeoutError` is an `OSError`). An exception no rule knows is a bug: `translated_errors` flags it.
A value the driver cannot encode (`OverflowError`: an integer past 64 bits) is the record's fault.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import asyncpg
import httpx
from neo4j import exceptions as neo4j_errors
from typesense import exceptions as ts_errors

from ingest_stream.core.reasons import Reason
from ingest_stream.errors import SinkError

Rule = tuple[tuple[type[BaseException], ...], Reason]

HTTP_TOO_MANY_REQUESTS = 429

RULES: dict[str, Sequence[Rule]] = {
    "postgres": (
        ((TimeoutError, asyncpg.QueryCanceledError), Reason.SINK_TIMEOUT),
        ((asyncpg.TooManyConnectionsError,), Reason.RATE_LIMITED),
        ((asyncpg.IntegrityConstraintViolationError, asyncpg.DataError, OverflowError),
         Reason.CONSTRAINT_VIOLATION),
        # InternalClientError: the protocol state broke mid-operation, seen when the server shut
        # down during a query; asyncpg terminates that connection ("most likely an IO error").
        ((OSError, asyncpg.PostgresError, asyncpg.InterfaceError, asyncpg.InternalClientError),
         Reason.CONNECTION_ERROR),
    ),
    "neo4j": (
        ((TimeoutError, neo4j_errors.TransientError), Reason.SINK_TIMEOUT),
        ((neo4j_errors.ConstraintError, neo4j_errors.CypherTypeError, OverflowError),
         Reason.CONSTRAINT_VIOLATION),
        ((neo4j_errors.ServiceUnavailable, neo4j_errors.SessionExpired, OSError), Reason.CONNECTION_ERROR),
        # The FalkorDB stand-in answers every error as a generic database error.
        ((neo4j_errors.Neo4jError, neo4j_errors.DriverError), Reason.CONNECTION_ERROR),
    ),
    "typesense": (
        ((ts_errors.Timeout, httpx.TimeoutException, TimeoutError), Reason.SINK_TIMEOUT),
        ((ts_errors.ObjectUnprocessable, ts_errors.RequestMalformed, OverflowError),
         Reason.CONSTRAINT_VIOLATION),
        ((ts_errors.TypesenseClientError, httpx.TransportError, OSError), Reason.CONNECTION_ERROR),
    ),
}


def _typesense_status(exc: BaseException) -> int | None:
    """The HTTP status the typesense client raised with (its first argument), if any."""
    if isinstance(exc, ts_errors.TypesenseClientError) and exc.args and isinstance(exc.args[0], int):
        return exc.args[0]
    return None


_REFINE: dict[str, Callable[[BaseException], Reason | None]] = {
    # 429 has no exception type of its own in the client: it raises the base type with the status.
    "typesense": lambda exc: Reason.RATE_LIMITED if _typesense_status(exc) == HTTP_TOO_MANY_REQUESTS
    else None,
}


def classify(sink: str, exc: BaseException) -> SinkError | None:
    refine = _REFINE.get(sink)
    reason = refine(exc) if refine else None
    if reason is None:
        reason = next((r for types, r in RULES[sink] if isinstance(exc, types)), None)
    if reason is None:
        return None
    return SinkError(sink, reason, f"{type(exc).__name__}: {exc}")


def classifier(sink: str) -> Callable[[BaseException], SinkError | None]:
    return lambda exc: classify(sink, exc)
