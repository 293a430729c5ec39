"""`ingest-stream dev`, the README's main command, as installed in the venv: the whole pipeline on
embedded servers, its demo records reaching every sink, and a `kill` (SIGTERM, as a closing
terminal or a supervisor sends) stopping every server it started."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path

from tests.integration.harness import eventually


def descendants(pid: int) -> set[int]:
    """Every process below `pid`, from /proc."""
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            parents[int(entry.name)] = int(stat.rsplit(")", 1)[1].split()[1])
    found: set[int] = set()
    frontier = {pid}
    while frontier:
        frontier = {child for child, parent in parents.items() if parent in frontier} - found
        found |= frontier
    return found


def running(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_dev_runs_the_pipeline_and_a_kill_stops_every_server_it_started(tmp_path: Path) -> None:
    log = tmp_path / "dev.log"
    command = [str(Path(sys.executable).parent / "ingest-stream"), "dev", "--root", str(tmp_path / "root"),
               "--demo-rate", "20"]
    with log.open("wb") as out:
        dev = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, cwd=tmp_path,
                               start_new_session=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        def banner() -> int:
            text = log.read_text(errors="replace")
            assert dev.poll() is None, text[-3000:]
            found = re.search(r"worker +http://127\.0\.0\.1:(\d+)/", text)
            assert found, "no banner yet"
            return int(found.group(1))

        port = eventually(banner, timeout_s=240, interval_s=1)

        def demo_records_reach_every_sink() -> None:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/operator/state", timeout=5) as answer:
                    state = json.loads(answer.read())
            except OSError as error:  # the worker's web server starts after the banner
                raise AssertionError(f"/operator/state: {error}") from error
            assert state["kpis"]["tenants"] and state["kpis"]["tenants"][0]["forwarded"] > 0, state["kpis"]
            assert all(sink["last_success_at"] for sink in state["health"]["sinks"].values()), state["health"]
            assert state["kpis"]["tenants"][0]["lag_ok"] is True, state["kpis"]  # demo records are fresh

        eventually(demo_records_reach_every_sink, timeout_s=180, interval_s=1,
                   context=lambda: log.read_text(errors="replace")[-3000:])
        started = descendants(dev.pid)
        assert len(started) >= 5, started  # four servers and the worker (at least)

        dev.send_signal(signal.SIGTERM)
        assert dev.wait(120) == 0, log.read_text(errors="replace")[-3000:]
        def all_stopped() -> None:
            assert [pid for pid in started if running(pid)] == [], "still running"

        eventually(all_stopped, timeout_s=30)
        assert "stopped." in log.read_text()
    finally:  # a failed test leaves nothing running either (each server is a group of its own)
        leftovers = descendants(dev.pid)
        if dev.poll() is None:
            dev.send_signal(signal.SIGTERM)
            try:
                dev.wait(60)
            except subprocess.TimeoutExpired:
                dev.kill()
        for pid in leftovers:
            if running(pid):
                os.kill(pid, signal.SIGKILL)
