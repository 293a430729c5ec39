"""The wheel's contents are declared by hand (pyproject.toml): every package of the source tree
must be listed, and its data files named, or the installed product lacks them."""

import tomllib

import pytest

from ingest_stream.config import PROJECT_ROOT


def test_every_package_of_the_tree_is_in_the_wheel_and_the_schemas_with_it():
    setuptools = tomllib.loads((PROJECT_ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    tree = {".".join(path.parent.relative_to(PROJECT_ROOT).parts)
            for path in (PROJECT_ROOT / "ingest_stream").rglob("__init__.py")}
    assert set(setuptools["packages"]) == tree | {"ingest_stream.schemas"}
    assert setuptools["package-dir"] == {"ingest_stream.schemas": "schemas"}
    data = setuptools["package-data"]
    assert list((PROJECT_ROOT / "schemas").glob(data["ingest_stream.schemas"][0]))
    assert list((PROJECT_ROOT / "ingest_stream" / "sinks").glob(data["ingest_stream.sinks"][0]))


def test_every_tool_says_its_version(capsys):
    from ingest_stream import __version__, cli
    from ingest_stream.ops import dlqtriage, replayctl

    tools = (("ingest-stream", cli.main), ("dlqtriage", dlqtriage.main), ("replayctl", replayctl.main))
    for prog, main in tools:
        with pytest.raises(SystemExit) as exited:
            main(["--version"])
        assert exited.value.code == 0
        assert capsys.readouterr().out.strip() == f"{prog} {__version__}"
    assert __version__ != "0+unknown"  # the package is installed (editable here): its metadata answers
