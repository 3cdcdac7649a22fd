"""Operating the coordinator (operator review, session 20): a start that cannot listen leaves
no run behind, a signal is an exit code of its own, every round line appears once when stdout
and stderr go to one file (docker logs, systemd), and --print-config shows the allow-list. The
real CLI in child processes, with mutual TLS, as an operator runs it."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
from collections.abc import Sequence
from concurrent import futures
from pathlib import Path

import grpc
import pytest
from fedharness import (
    CLI,
    HOST,
    TINY_MODEL,
    FakeNode,
    Pki,
    Procs,
    env_for_children,
    scaled,
    start_coordinator,
    tails,
    update_messages,
    wait_until,
)

from coordinator.rounds import RoundEngine
from coordinator.server import start_server
from pluralfed.auth import AllowList
from pluralfed.cli import main
from pluralfed.embeddings import make_encoder
from pluralfed.errors import InputError
from pluralfed.localfed import node_id
from pluralfed.proto.pluralfed.v1 import federation_pb2 as pb

pytestmark = pytest.mark.timeout(240)

ALLOW = {node_id("A"): "A", node_id("B"): "B"}
TINY_OPTIONS = [f"--{key.replace('_', '-')}={value}" for key, value in TINY_MODEL.items()]


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return Pki(tmp_path_factory.mktemp("pki"))


def coordinator(args: Sequence[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*CLI, "coordinator", *args],
        env=env_for_children(),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=scaled(120),
    )


def allow_file(tmp_path: Path) -> Path:
    path = tmp_path / "allow.toml"
    path.write_text("[allow_list]\n" + "".join(f'"{k}" = "{v}"\n' for k, v in ALLOW.items()))
    return path


def test_a_coordinator_that_cannot_listen_leaves_no_run_behind(tmp_path: Path, pki: Pki) -> None:
    """It had made the run (state.json, weights-r00000.safetensors) before it found the port
    busy, so the next start in that folder with other settings was refused as another run."""
    occupant = grpc.server(futures.ThreadPoolExecutor(1))
    port = occupant.add_insecure_port(f"{HOST}:0")
    occupant.start()
    state = tmp_path / "state"
    common = ["--allow-list-file", str(allow_file(tmp_path)), "--tls-dir", str(pki.server)]
    common += ["--state-dir", str(state), "--quorum-timeout-s", "1", *TINY_OPTIONS]
    try:
        busy = coordinator([*common, "--listen", f"{HOST}:{port}"])
        assert busy.returncode == 2, busy.stderr
        assert f"cannot listen on {HOST}:{port}: the port is in use" in busy.stderr
        assert not state.exists()  # made by that start, so not left behind (a typo'd folder)
        state.mkdir()  # a folder that was there stays, with nothing of a run in it
        busy = coordinator([*common, "--listen", f"{HOST}:{port}"])
        assert busy.returncode == 2 and state.is_dir(), busy.stderr
        assert not (state / "state.json").exists() and not list(state.glob("weights-*"))
    finally:
        occupant.stop(None)
    # a TLS folder that is not there is found before the state folder is made
    elsewhere = tmp_path / "elsewhere"
    no_certs = ["--tls-dir", str(tmp_path / "no-certs"), "--state-dir", str(elsewhere)]
    refused = coordinator([*common, "--listen", f"{HOST}:0", *no_certs])
    assert refused.returncode == 2 and not elsewhere.exists(), refused.stderr
    # nor is an encoder that does not load (it loads after the state folder is locked)
    no_encoder = ["--encoder", str(tmp_path / "no-such-encoder"), "--state-dir", str(elsewhere)]
    refused = coordinator([*common, "--listen", f"{HOST}:0", *no_encoder])
    assert refused.returncode == 2 and "no-such-encoder" in refused.stderr, refused.stderr
    assert not elsewhere.exists()
    # the next start there, with another model, makes a run of its own (and, without a
    # quorum within 1 s, stops: exit 1)
    again = coordinator([*common, "--listen", f"{HOST}:0", "--d-model=64"])
    assert again.returncode == 1, again.stderr
    assert "differs" not in again.stderr and "no quorum after 1 s" in again.stderr
    assert json.loads((state / "state.json").read_text())["model_config"]["d_model"] == 64


@pytest.mark.parametrize(
    ("entry", "code", "says"),
    [
        ("spool", 2, "spool: cannot use it for the updates being received"),
        ("coordinator.port", 3, "cannot write the run's state in"),
    ],
)
def test_a_state_folder_entry_of_the_wrong_kind_is_said_not_a_traceback(
    tmp_path: Path, pki: Pki, entry: str, code: int, says: str
) -> None:
    """A file named spool (the folder of updates being received), a folder named
    coordinator.port: each gave a traceback."""
    state = tmp_path / "state"
    state.mkdir()
    if entry == "spool":
        (state / entry).write_text("not a folder")
    else:
        (state / entry).mkdir()
    common = ["--allow-list-file", str(allow_file(tmp_path)), "--tls-dir", str(pki.server)]
    done = coordinator([*common, "--state-dir", str(state), "--listen", f"{HOST}:0", *TINY_OPTIONS])
    assert done.returncode == code, done.stderr
    assert says in done.stderr and "Traceback" not in done.stderr, done.stderr


def test_a_server_whose_engine_fails_to_open_frees_its_port() -> None:
    """start_server binds first and makes the engine after; when that fails, the port must be
    free again for a caller that goes on in this process (an unstarted gRPC server kept it)."""

    def cannot_open() -> RoundEngine:
        raise InputError("no engine")

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with pytest.raises(InputError, match="no engine"):
        start_server(cannot_open, f"127.0.0.1:{port}", None, AllowList({"node-a": "A"}))
    with socket.socket() as again:
        again.bind(("127.0.0.1", port))  # "Address already in use" before the fix


@pytest.mark.parametrize(("signum", "code"), [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_signal_stops_the_coordinator_with_128_plus_its_number(
    tmp_path: Path, pki: Pki, signum: int, code: int
) -> None:
    """It exited 1, as for a failure, where the node and `pluralfed federate` exit 143/130."""
    with Procs(tmp_path / "logs") as procs:
        coord = start_coordinator(procs, tmp_path, pki, ALLOW, {"min_nodes": 2})
        wait_until(
            lambda: (
                "waiting for a quorum: 0 of 2 training nodes; allow-listed groups not connected: A, B"
                in coord.proc.log()
            ),
            60,
            "the coordinator to wait for its quorum, naming who is missing",
            must_live=[coord.proc],
        )
        coord.proc.popen.send_signal(signum)
        assert coord.proc.wait(60) == code, tails([coord.proc])
        # no round was open: "an open round is abandoned" was said all the same
        assert f"signal {int(signum)}: stopping\n" in coord.proc.log(), tails([coord.proc])
        assert "abandoned" not in coord.proc.log()


def test_each_round_line_appears_once_in_the_combined_output(tmp_path: Path, pki: Pki) -> None:
    """Round and evaluation lines were logged (stderr) and printed again to the console: with
    stdout and stderr in one file, as Procs (and docker, and systemd) keep them, each line
    appeared twice."""
    with Procs(tmp_path / "logs") as procs:
        coord = start_coordinator(
            procs, tmp_path, pki, ALLOW, {"rounds": 2, "eval_every": 1, "eval_timeout_s": 2.0}
        )
        with FakeNode(coord.port, "A", tls_dir=pki.node(node_id("A"))) as node:
            node.join(make_encoder().identity)
            task = node.wait_task(pb.TASK_KIND_TRAIN)
            weights = node.download(task.model_version)
            reply = node.upload(update_messages(node.session_id, task, weights, 10))
            assert reply.accepted, reply
            node.wait_task(pb.TASK_KIND_EVALUATE)  # round 1's evaluation: its line is due
        wait_until(
            lambda: "evaluation at round 1: no reports" in coord.proc.log(),
            120,
            "round 1's evaluation to end without reports",
            must_live=[coord.proc],
        )
        coord.proc.popen.terminate()
        assert coord.proc.wait(60) == 143
    output = coord.proc.log()
    assert output.count("round 1/2 done: 1/1 updates") == 1, output


def test_print_config_shows_the_allow_list_and_warns_of_unknown_held_out_groups(
    tmp_path: Path, pki: Pki
) -> None:
    """The allow-list (node id -> group) was the one part of the setup --print-config did not
    show; an evaluate_only group the allow-list does not admit went unremarked until start."""
    args = ["--allow-list-file", str(allow_file(tmp_path)), "--tls-dir", str(pki.server)]
    done = coordinator([*args, "--evaluate-only", '["B", "Narnia"]', "--print-config"])
    assert done.returncode == 0, done.stderr
    printed = json.loads(done.stdout)
    assert printed["allow_list"] == ALLOW and printed["evaluate_only"] == ["B", "Narnia"]
    assert done.stderr == (
        "pluralfed coordinator: warning: coordinator config: evaluate_only names ['Narnia'], "
        "which the allow-list does not admit (it admits ['A', 'B'])\n"
    )


def test_the_help_says_what_each_exit_code_means(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["coordinator", "--help"])
    epilog = capsys.readouterr().out.split("exit codes:")[1]
    for code in ("0 ", "1 ", "2 ", "3 ", "130 ", "143 "):
        assert f"\n  {code}" in epilog or f", {code}by" in epilog, code
