"""The architecture's boundaries, checked on the real imports: transport knows nothing of ML
(the coordinator's server and round engine load without torch), the round engine and its parts
(node calls, sessions, tasks, evaluations) know nothing of gRPC, the bookkeeping of the bulk
streams knows nothing of gRPC or the engine, and aggregation knows nothing of gRPC (the strategy
loads without grpc or protobuf). Each check runs in a fresh interpreter, so what other tests
imported cannot hide a dependency."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def loaded_after_import(modules: list[str], watched: list[str]) -> list[str]:
    code = (
        "import sys\n"
        + "".join(f"import {m}\n" for m in modules)
        + f"print(' '.join(w for w in {watched!r} if w in sys.modules))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True
    )
    return out.stdout.split()


@pytest.mark.parametrize(
    "module",
    [
        "coordinator.server",
        "coordinator.streams",
        "coordinator.rounds",
        "coordinator.sessions",
        "coordinator.tasks",
        "coordinator.evaluations",
        "coordinator.node_calls",
        "pluralfed.auth",
        "pluralfed.pki",
        "pluralfed.records",
        "pluralfed.tls",
        "pluralfed.transport",
    ],
)
def test_transport_and_round_logic_load_without_ml(module: str) -> None:
    assert loaded_after_import([module], ["torch", "transformers"]) == []


@pytest.mark.parametrize(
    "module",
    [
        "coordinator.rounds",
        "coordinator.node_calls",
        "coordinator.sessions",
        "coordinator.tasks",
        "coordinator.evaluations",
    ],
)
def test_round_logic_loads_without_grpc(module: str) -> None:
    # the engine is called by the transport, never the other way: it runs without gRPC
    assert loaded_after_import([module], ["grpc", "google.protobuf", "coordinator.server"]) == []


@pytest.mark.parametrize(
    "module",
    [
        "coordinator.node_calls",
        "coordinator.sessions",
        "coordinator.tasks",
        "coordinator.evaluations",
    ],
)
def test_the_engines_parts_load_without_the_engine(module: str) -> None:
    # rounds.py uses them, never the other way: each can be read (and tested) on its own
    assert loaded_after_import([module], ["coordinator.rounds"]) == []


def test_the_streams_bookkeeping_loads_without_grpc_or_the_engine() -> None:
    # the servicer uses it, never the other way; it sees a call and the engine only through small
    # Protocols, so it is read (and tested, with fakes) without a server or an engine
    watched = ["grpc", "google.protobuf", "coordinator.server", "coordinator.rounds"]
    assert loaded_after_import(["coordinator.streams"], watched) == []


def test_runtime_tls_loads_without_the_pki_tooling() -> None:
    # pki builds on tls, never the other way: services load no certificate-making code
    assert loaded_after_import(["pluralfed.tls"], ["pluralfed.pki"]) == []


def test_aggregation_loads_without_grpc() -> None:
    assert loaded_after_import(["coordinator.strategy"], ["grpc", "google.protobuf"]) == []


def test_the_check_sees_an_ml_import() -> None:
    # the node's worker trains: it must show torch, or the checks above prove nothing
    assert loaded_after_import(["group_node.worker"], ["torch"]) == ["torch"]


@pytest.mark.parametrize("argv", [["--help"], ["certs", "--help"], ["data", "--help"]])
def test_light_commands_load_no_torch(argv: list[str]) -> None:
    code = (
        "import sys\n"
        "from pluralfed import cli\n"
        "try:\n"
        f"    cli.main({argv!r})\n"
        "except SystemExit:\n"
        "    pass\n"
        "print('torch' in sys.modules)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True
    )
    assert out.stdout.split()[-1] == "False", out.stdout[-500:]


def test_each_commands_one_line_help_is_its_own() -> None:
    """`pluralfed --help` lists the commands without importing them: the lines it shows must be
    the ones each command registers."""
    import argparse
    import importlib

    from pluralfed.cli import COMMANDS

    for name, (module, line) in COMMANDS.items():
        subparsers = argparse.ArgumentParser().add_subparsers()
        importlib.import_module(module).register(subparsers)
        [action] = subparsers._choices_actions
        assert (action.dest, action.help) == (name, line)
