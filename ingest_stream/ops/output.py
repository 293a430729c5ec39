"""How the operator tools print: aligned tables for people, indented JSON for scripts."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, TextIO

import orjson


def format_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    cells = [list(map(str, headers))] + [[str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip()
                     for row in cells)


def write_json(document: Any, out: TextIO) -> None:
    out.write(orjson.dumps(document, option=orjson.OPT_INDENT_2).decode() + "\n")
