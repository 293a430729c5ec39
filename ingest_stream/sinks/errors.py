"""How driver exceptions become reason codes — by exception type, never by text.

Each sink module owns its rules (`ERROR_RULES`, beside the driver it talks to); they are checked in
order: the first whose types match wins, so timeouts come first
(`TimeoutError` is an `OSError`). An exception no rule knows is a bug: `translated_errors` flags it.
A value the driver cannot encode (`OverflowError`: an integer past 64 bits) is the record's fault.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from ingest_stream.core.reasons import Reason
from ingest_stream.errors import SinkError

Rule = tuple[tuple[type[BaseException], ...], Reason]
Refine = Callable[[BaseException], Reason | None]  # a sink's reason that no type tells (an HTTP status)


def classify(sink: str, rules: Sequence[Rule], exc: BaseException, refine: Refine | None = None
             ) -> SinkError | None:
    reason = refine(exc) if refine else None
    if reason is None:
        reason = next((r for types, r in rules if isinstance(exc, types)), None)
    if reason is None:
        return None
    return SinkError(sink, reason, f"{type(exc).__name__}: {exc}")


def classifier(sink: str, rules: Sequence[Rule], refine: Refine | None = None
               ) -> Callable[[BaseException], SinkError | None]:
    """The sink's classifier (what `sinks.base.translated_errors` takes), from its own rules."""
    return lambda exc: classify(sink, rules, exc, refine)
