"""docs/runbook.md: every command in it is one this product accepts — the tools' arguments parse,
and every HTTP route it calls exists on the worker; every dashboard link in it and in the reference
runbook opens a provisioned dashboard (and the panel it names)."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from ingest_stream.cli import build_parser as ingest_stream_parser
from ingest_stream.ops.dlqtriage import build_parser as dlqtriage_parser
from ingest_stream.ops.replayctl import build_parser as replayctl_parser
from tests.deploy.grafana import DASHBOARD_LINK, resolve

RUNBOOK = Path(__file__).resolve().parents[2] / "docs" / "runbook.md"
PARSERS = {"ingest-stream": ingest_stream_parser, "dlqtriage": dlqtriage_parser,
           "replayctl": replayctl_parser}
PLACEHOLDERS = {"<tenant>": "acme-corp", "<plan-id>": "rp-1", "<reason>": "CONNECTION_ERROR",
                "<archive>": "dlq-purge-1", "<bucket>": "in", "<prefix>": "acme"}
ROUTES = {"/health", "/health/detailed", "/metrics", "/admin/drain", "/admin/pause", "/admin/resume",
          "/admin/brownout", "/admin/audit", "/ingest/webhook", "/", "/operator/state", "/ingest/audit",
          "/kpis", "/checkpoints", "/dedupe/stats"}
SOURCE_ROUTE = re.compile(r"^/admin/sources/(kafka|webhook|s3|sftp)/(enable|disable)$")
CHECKPOINT_ROUTE = re.compile(r"^/checkpoints/[a-z0-9-]+/(kafka|webhook|s3|sftp)$")


def code_lines() -> list[str]:
    """Commands in the code blocks, continuation lines joined, comments cut."""
    lines: list[str] = []
    inside, pending = False, ""
    for line in RUNBOOK.read_text().splitlines():
        if line.startswith("```"):
            inside = not inside
            continue
        if not inside:
            continue
        line = pending + line.split("  #", 1)[0].strip()
        if line.endswith("\\"):
            pending = line[:-1] + " "
            continue
        pending = ""
        lines.append(line)
    return [line for line in lines if line]


def tool_commands() -> list[list[str]]:
    commands = []
    for line in code_lines():
        for placeholder, value in PLACEHOLDERS.items():
            line = line.replace(placeholder, value)
        line = re.sub(r"\[([^\]]*)\]", r"\1", line)  # optional parts: take them
        words = shlex.split(line)
        if words and words[0] in PARSERS:
            commands.append(words)
    return commands


def test_the_runbook_uses_every_tool():
    assert {words[0] for words in tool_commands()} == set(PARSERS)


@pytest.mark.parametrize("words", tool_commands(), ids=lambda words: " ".join(words)[:60])
def test_each_tool_command_parses(words):
    PARSERS[words[0]]().parse_args(words[1:])  # SystemExit(2) on an unknown command or option


def test_each_http_route_exists():
    text = RUNBOOK.read_text()
    paths = {m.group(1) for m in re.finditer(r"\$INGEST(/[a-z/_-]+)", text)}
    assert paths, "no routes found"
    for path in paths:
        assert path in ROUTES or SOURCE_ROUTE.match(path) or CHECKPOINT_ROUTE.match(path), path


# The operators' reference runbook (shared/reference/ingest-pipeline-runbook.md) runs these as written.
REFERENCE_COMMANDS = [
    "replayctl plan --tenant acme-corp --from 2025-01-01T00:00:00Z --to 2025-01-02T00:00:00Z "
    "--sources s3,kafka --throttle 100",
    "replayctl approve rp-1 --rfa RFA-1234",
    "replayctl run --plan rp-1",
    "replayctl status rp-1",
    "replayctl list --tenant acme-corp",
    "dlqtriage summary --tenant acme-corp",
    "dlqtriage sample --reason SCHEMA_DRIFT --limit 5",
    "dlqtriage sample --reason SCHEMA_DRIFT --full",
    "dlqtriage analyze --tenant acme-corp",
    "dlqtriage redrive --tenant acme-corp --reason CONNECTION_ERROR",
    "dlqtriage purge --older-than 7 --reason OLDER_REVISION",
]


@pytest.mark.parametrize("line", REFERENCE_COMMANDS, ids=lambda line: line[:60])
def test_the_reference_runbooks_commands_parse(line):
    words = shlex.split(line)
    PARSERS[words[0]]().parse_args(words[1:])


# The reference runbook's dashboard links, as it writes them (its header).
REFERENCE_DASHBOARD_LINKS = ["**Dashboard**: [Ingest Overview](/d/ingest-overview)"]


def dashboard_links(text: str) -> list[re.Match[str]]:
    links = list(DASHBOARD_LINK.finditer(text))
    assert len(links) == text.count("/d/"), "a dashboard link in a form this test does not read"
    return links


def test_each_dashboard_link_opens_a_provisioned_dashboard_and_the_panel_it_names():
    links = dashboard_links(RUNBOOK.read_text())
    assert links, "no dashboard links found"
    for link in links:
        _, panel = resolve(link)
        assert panel is None or link.group("title"), f"{link.group(0)}: name the panel it opens"


@pytest.mark.parametrize("text", REFERENCE_DASHBOARD_LINKS)
def test_the_reference_runbooks_dashboard_links_resolve(text):
    [link] = dashboard_links(text)
    resolve(link)
