"""The command line's failures are one line, never a traceback; settings are shown and checked."""

import io
import json
import subprocess
import sys

import pytest

from ingest_stream import cli
from ingest_stream.config import Settings, effective, unknown_names
from ingest_stream.ops.devstack import free_port


def test_a_malformed_setting_is_one_line_naming_the_variable_and_what_it_expects(monkeypatch, capsys):
    monkeypatch.setenv("INGEST_WEB_PORT", "eighty")
    assert cli.main(["config"]) == 1
    assert capsys.readouterr().err == "ingest-stream: INGEST_WEB_PORT='eighty': expected a whole number\n"


def test_config_shows_every_setting_with_secrets_masked_and_warns_of_unknown_names(monkeypatch, capsys):
    monkeypatch.setenv("INGEST_ADMIN_TOKEN", "s3cret")
    monkeypatch.setenv("INGEST_WEB_PROT", "9000")
    assert cli.main(["config", "--json"]) == 0
    out, err = capsys.readouterr()
    shown = json.loads(out)
    assert shown["INGEST_ADMIN_TOKEN"] == "********" and "s3cret" not in out
    assert shown["INGEST_WEB_PORT"] == "8080"
    assert set(shown) == set(effective(Settings()))
    assert "INGEST_WEB_PROT (did you mean INGEST_WEB_PORT?) is not a setting" in err


def test_unknown_names_are_only_ingest_variables_that_name_no_setting():
    assert unknown_names({"INGEST_WEB_PORT": "1", "PATH": "/bin", "INGEST_NOPE": "x"}) == ["INGEST_NOPE"]


def test_produce_without_a_broker_is_one_line_and_exit_1():
    done = subprocess.run([sys.executable, "-m", "ingest_stream.cli", "produce", "--synthetic", "1"],
                          env={"INGEST_KAFKA_BOOTSTRAP": f"127.0.0.1:{free_port()}", "PATH": "/usr/bin:/bin"},
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 1
    assert done.stderr.startswith("ingest-stream produce: ") and done.stderr.count("\n") == 1, done.stderr
    assert "Traceback" not in done.stderr and "Unclosed" not in done.stderr


@pytest.mark.parametrize("tool", ["ingest_stream.ops.dlqtriage", "ingest_stream.ops.replayctl"])
def test_the_tools_too_answer_a_malformed_setting_in_one_line(tool):
    done = subprocess.run([sys.executable, "-m", tool, "list" if "replayctl" in tool else "summary"],
                          env={"INGEST_PARTITIONS": "many", "PATH": "/usr/bin:/bin"},
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 1, done.stderr
    assert done.stderr.strip().endswith("INGEST_PARTITIONS='many': expected a whole number"), done.stderr
    assert "Traceback" not in done.stderr


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_what_cannot_be_undone_asks_at_a_terminal_and_needs_yes_without_one():
    from ingest_stream.ops.dlqtriage import confirm
    from ingest_stream.ops.kafka_io import ToolError

    confirm("purge: sure?", yes=True, stdin=io.StringIO(""))  # --yes: no question
    with pytest.raises(ToolError, match="purge needs --yes without a terminal"):
        confirm("purge: sure?", yes=False, stdin=io.StringIO("y\n"))
    asked = io.StringIO()
    confirm("purge: sure?", yes=False, stdin=Terminal("y\n"), out=asked)
    assert asked.getvalue() == "purge: sure? [y/N] "
    with pytest.raises(ToolError, match="not confirmed"):
        confirm("purge: sure?", yes=False, stdin=Terminal("\n"), out=io.StringIO())


def test_a_legal_hold_is_set_with_a_tenant_and_a_reason(capsys):
    from ingest_stream.ops import replayctl

    with pytest.raises(SystemExit):
        replayctl.main(["hold", "set", "--help"])
    assert "--tenant TENANT --reason REASON" in capsys.readouterr().out
    with pytest.raises(SystemExit) as refused:
        replayctl.main(["hold", "set", "--tenant", "acme"])
    assert refused.value.code == 2 and "--reason" in capsys.readouterr().err


def test_every_dlqtriage_command_is_run_by_its_own_function():
    import argparse

    from ingest_stream.ops import dlqtriage

    (commands,) = [a for a in dlqtriage.build_parser()._actions if isinstance(a, argparse._SubParsersAction)]
    assert set(commands.choices) == set(dlqtriage.COMMANDS)
