"""Unknown settings are named as the user wrote them, with the one most likely meant: a key in
a table as `[tls] directory` (it read "unknown settings ['tls_directory']"), and a misspelled
environment variable of the node or the coordinator, which was ignored without a word while
files and options refuse unknown keys (operator review, session 20)."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from group_node.config import NodeConfig
from pluralfed.cli import main
from pluralfed.config import load_config
from pluralfed.errors import InputError

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            '[tls]\ndirectory = "/c"\n',
            "unknown settings ['[tls] directory'] ('[tls] directory': did you mean '[tls] dir'?)",
        ),
        ("thread = 2\n", "unknown settings ['thread'] ('thread': did you mean 'threads'?)"),
        ("[tls]\nbogus = 1\n", "unknown settings ['[tls] bogus']; known: ["),
        # a flat setting written in a table is suggested flat, not as a key of that table
        (
            "[tls]\nthread = 2\n",
            "unknown settings ['[tls] thread'] ('[tls] thread': did you mean 'threads'?)",
        ),
    ],
)
def test_unknown_keys_are_named_as_written(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "node.toml"
    path.write_text('group = "A"\n' + text)
    with pytest.raises(InputError) as err:
        load_config(NodeConfig, path, "PLURALFED_NODE_", {}, environ={})
    assert str(err.value).startswith(f"{path}: {message}"), str(err.value)


def test_a_misspelled_node_variable_is_warned_about(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("PLURALFED_NODE_COORDINATER", "coord:7443")
    monkeypatch.setenv("PLURALFED_NODE_XYZZY", "1")
    monkeypatch.setenv("PLURALFED_NODE_GROUP", "A")  # a setting: no warning
    with caplog.at_level(logging.WARNING, logger="pluralfed.config"):
        assert main(["node", "run", "--insecure"]) == 2  # stops on the missing data, after loading
    assert [r.getMessage() for r in caplog.records if r.name == "pluralfed.config"] == [
        "environment variable PLURALFED_NODE_COORDINATER is not a setting and is ignored: did "
        "you mean PLURALFED_NODE_COORDINATOR?",
        "environment variable PLURALFED_NODE_XYZZY is not a setting and is ignored (settings: "
        "PLURALFED_NODE_<NAME>)",
    ]


def test_a_misspelled_coordinator_variable_is_warned_about(
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv("PLURALFED_COORDINATOR_ROUND", "3")
    monkeypatch.setenv("PLURALFED_COORDINATOR_MIN_NODES", "8")
    with caplog.at_level(logging.WARNING, logger="pluralfed.config"):
        code = main(
            ["coordinator", "--config", str(EXAMPLES / "coordinator.toml"), "--print-config"]
        )
    assert code == 0, capsys.readouterr().err
    assert [r.getMessage() for r in caplog.records if r.name == "pluralfed.config"] == [
        "environment variable PLURALFED_COORDINATOR_ROUND is not a setting and is ignored: did "
        "you mean PLURALFED_COORDINATOR_ROUNDS?"
    ]
