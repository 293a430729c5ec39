"""How the operator tools print: aligned tables for people, indented JSON for scripts.

What the tools print can come from records (dead letters, headers, tenants): text for people goes
through `printable`, so a record cannot move the cursor, rewrite the screen or set the terminal's
title, and JSON goes through `json_text`, which escapes what JSON itself leaves raw.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import re
import sys
from collections.abc import Callable, Coroutine, Sequence
from typing import Any, TextIO

import orjson

from ingest_stream import __version__
from ingest_stream.errors import ConfigError

# C0 and C1 controls (ESC, CSI, BEL, CR, backspace, ...), DEL, the bidirectional overrides and
# isolates (text shown in another order than it is), line and paragraph separators, and lone
# surrogates (which a terminal's encoder refuses).
_UNPRINTABLE = re.compile("[\x00-\x1f\x7f-\x9f\u061c\u200e\u200f\u2028-\u202e\u2066-\u2069"
                          "\ud800-\udfff]")
# What JSON leaves raw but a terminal may act on; inside a JSON document these can only be in strings.
_JSON_UNSAFE = re.compile("[\x7f-\x9f\u061c\u200e\u200f\u2028-\u202e\u2066-\u2069]")
_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _escape(match: re.Match[str]) -> str:
    char = match.group()
    named = _NAMED.get(char)
    if named is not None:
        return named
    code = ord(char)
    return f"\\x{code:02x}" if code <= 0xFF else f"\\u{code:04x}"


def printable(value: object) -> str:
    """`value` as text safe for a terminal: control characters shown as escapes, like repr (`\\x1b`,
    `\\n`, `\\u202e`); everything else, backslashes included, as it is, for reading."""
    return _UNPRINTABLE.sub(_escape, str(value))


def json_text(document: Any, *, indent: bool = False) -> str:
    """JSON with every character a terminal could act on escaped (`\\u009b`): the same document."""
    text = orjson.dumps(document, option=orjson.OPT_INDENT_2 if indent else None).decode()
    return _JSON_UNSAFE.sub(lambda m: f"\\u{ord(m.group()):04x}", text)


def format_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    cells = [[printable(c) for c in headers]] + [[printable(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip()
                     for row in cells)


def write_json(document: Any, out: TextIO) -> None:
    out.write(json_text(document, indent=True) + "\n")


def run_command(prog: str, main: Callable[[], Coroutine[Any, Any, int]], *,
                errors: tuple[type[BaseException], ...], interrupted: str) -> int:
    """Run a tool's coroutine; an expected failure is one line on stderr and exit 1, Ctrl-C 130."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("aiokafka").setLevel(logging.CRITICAL)  # its connection errors reach us anyway
    caught: tuple[type[BaseException], ...] = (*errors, ConfigError)  # a malformed INGEST_* value too
    try:
        return asyncio.run(main())
    except caught as error:  # its message can quote a record or a file: escaped
        print(f"{prog}: {printable(error)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"\n{prog}: interrupted; {interrupted}", file=sys.stderr)
        return 130


def add_version(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """`--version` on every tool: the installed package's version."""
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    return parser
