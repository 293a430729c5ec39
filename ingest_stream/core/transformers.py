"""Upcasters between input schema versions: `UPCASTERS[n]` turns a valid version-n record into n+1.

Adding version 3 means adding `schemas/input.v3.schema.json` (with `"x-schema-version": 3`) and an
entry `UPCASTERS[2]` here; the validator chains upcasters up to the newest schema it finds.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

Upcaster = Callable[[dict[str, Any]], dict[str, Any]]


def v1_to_v2(old: dict[str, Any]) -> dict[str, Any]:
    """Legacy producers: `rev`→`revision`, `ts`→`event_time`, `data`→`attributes`, defaults for the rest."""
    return {
        "schema_version": 2,
        "tenant": old["tenant"],
        "source": old["source"],
        "id": old["id"],
        "revision": old["rev"],
        "event_time": old["ts"],
        "priority": "normal",
        "kind": "record",
        "attributes": old["data"],
    }


UPCASTERS: Mapping[int, Upcaster] = {1: v1_to_v2}
