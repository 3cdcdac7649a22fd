"""Services check their certificates before they do any work: a coordinator with a bad TLS
folder starts no run (it had written one, which a corrected restart then resumed), a node finds
a bad certificate before embedding its data (13 s in, before), and a TLS file that cannot be
read is an error naming it, not a traceback (review, session 15)."""

from __future__ import annotations

import fcntl
import os
import socket
from concurrent import futures
from pathlib import Path

import grpc
import pytest

from coordinator.service import lock_state_dir
from pluralfed import pki, tls
from pluralfed.cli import main
from pluralfed.errors import InputError
from pluralfed.transport import EXCLUSIVE_PORT, bind_port


def test_a_coordinator_with_bad_tls_files_starts_no_run(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    allow = tmp_path / "allow.toml"
    allow.write_text('[allow_list]\n"node-a" = "A"\n')
    state = tmp_path / "state"
    code = main(
        [
            "coordinator",
            "--allow-list-file",
            str(allow),
            "--tls-dir",
            str(tmp_path / "no-such-folder"),
            "--state-dir",
            str(state),
            "--listen",
            "127.0.0.1:0",
        ]
    )
    assert code == 2
    assert "CA certificate file not found: " + str(tmp_path / "no-such-folder" / "ca.pem") in (
        capsys.readouterr().err
    )
    assert not (state / "state.json").exists()


def test_a_coordinator_with_bad_tls_files_leaves_an_existing_state_folder_untouched(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The files are checked before the state folder is taken (a lock file made in it) and
    before the text encoder is loaded."""
    allow = tmp_path / "allow.toml"
    allow.write_text('[allow_list]\n"node-a" = "A"\n')
    state = tmp_path / "state"
    state.mkdir()
    args = ["coordinator", "--allow-list-file", str(allow), "--state-dir", str(state)]
    tls_dir = tmp_path / "no-such-folder"
    code = main([*args, "--tls-dir", str(tls_dir), "--listen", "127.0.0.1:0"])
    assert code == 2
    assert "CA certificate file not found: " + str(tls_dir / "ca.pem") in capsys.readouterr().err
    assert list(state.iterdir()) == []


def test_a_node_checks_its_certificates_before_its_data(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(
        [
            "node",
            "run",
            "--group",
            "A",
            "--data",
            str(tmp_path / "missing.jsonl"),  # would be the first error after embedding
            "--coordinator",
            "127.0.0.1:1",
            "--tls-dir",
            str(tmp_path / "certs"),
        ]
    )
    err = capsys.readouterr().err
    assert code == 2
    assert "CA certificate file not found: " + str(tmp_path / "certs" / "ca.pem") in err
    assert "missing.jsonl" not in err


def test_an_unreadable_tls_file_is_an_error_naming_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Tests run as root, who reads any file: the folder that is not searchable (mode 0700 of
    another user, as `certs federation` makes them) is played by Path.exists raising."""
    path = tmp_path / "certs" / "ca.pem"

    def denied(self: Path, *args: object, **kwargs: object) -> bool:
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(Path, "exists", denied)
    with pytest.raises(InputError, match=r"^CA certificate file is not readable") as err:
        tls.load_channel_credentials(path.with_name("cert.pem"), path.with_name("key.pem"), path)
    assert str(path) in str(err.value) and "uid" in str(err.value)


def test_a_relative_tls_path_says_what_it_is_relative_to(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(InputError) as err:
        tls.load_channel_credentials("c/cert.pem", "c/key.pem", "c/ca.pem")
    assert str(err.value) == f"CA certificate file not found: c/ca.pem (relative to {tmp_path})"


def test_a_relative_tls_path_in_a_removed_working_folder_is_a_clear_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Path.cwd() fails once the working folder is gone: that is said, not a bare traceback."""
    gone = tmp_path / "gone"
    gone.mkdir()
    monkeypatch.chdir(gone)
    gone.rmdir()
    with pytest.raises(InputError) as err:
        tls.load_channel_credentials("c/cert.pem", "c/key.pem", "c/ca.pem")
    assert str(err.value) == (
        "CA certificate file not found: c/ca.pem (relative to a working folder that no longer "
        "exists)"
    )


@pytest.mark.parametrize("existing", [False, True])
def test_a_coordinator_on_a_busy_port_says_so(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], existing: bool
) -> None:
    """gRPC's default SO_REUSEPORT let a second coordinator (or reward service) start on a busy
    port, and the kernel split the clients between the two (walkthrough review, session 17).
    A state folder the failed start made is gone again (a typo'd --state-dir leaves no stray
    folder); one that existed stays."""
    if existing:
        (tmp_path / "state").mkdir()
    occupant = grpc.server(futures.ThreadPoolExecutor(1))  # gRPC's defaults: port reuse on
    port = occupant.add_insecure_port("127.0.0.1:0")
    occupant.start()
    pki.create_ca(tmp_path / "ca")
    server = pki.issue_server_cert(tmp_path / "ca", tmp_path / "server", "c", ["127.0.0.1"])
    allow = tmp_path / "allow.toml"
    allow.write_text('[allow_list]\n"node-a" = "A"\n')
    try:
        code = main(
            [
                "coordinator",
                "--allow-list-file",
                str(allow),
                "--tls-dir",
                str(server.cert.parent),
                "--state-dir",
                str(tmp_path / "state"),
                "--listen",
                f"127.0.0.1:{port}",
                "--quorum-timeout-s",
                "1",  # a coordinator that did start (the bug) ends soon, failing the test
            ]
        )
    finally:
        occupant.stop(None)
    assert code == 2
    assert f"cannot listen on 127.0.0.1:{port}: the port is in use" in capsys.readouterr().err
    assert (tmp_path / "state").is_dir() is existing


def test_node_check_needs_no_data_but_node_run_does(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A partner checking the connection before its data is ready had to make up a data path
    (walkthrough review, session 17)."""
    pki.create_ca(tmp_path / "ca")
    node = pki.issue_node_cert(tmp_path / "ca", tmp_path / "node", "node-a")
    common = ["--group", "A", "--coordinator", "127.0.0.1:1", "--tls-dir", str(node.cert.parent)]
    assert main(["node", "check", *common]) == 1  # got as far as connecting
    err = capsys.readouterr().err
    assert "FAILED: UNAVAILABLE" in err and "data" not in err
    assert main(["node", "run", *common]) == 2
    assert "node config: data is required to run" in capsys.readouterr().err


def test_a_second_coordinator_on_the_same_state_folder_is_refused_before_touching_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """It would resume the same run and delete the first one's upload spools before failing on
    the busy port (diff review, session 17)."""
    state = tmp_path / "state"
    first = lock_state_dir(state)
    try:
        spool = state / "spool"
        spool.mkdir()
        (spool / "node-a.spool").write_bytes(b"an upload in flight")
        with pytest.raises(
            InputError, match=rf"in use by another coordinator \(pid {os.getpid()}\)"
        ):
            lock_state_dir(state)
        code = main(
            ["coordinator", "--allow-list-file", str(_allow(tmp_path)), "--insecure",
             "--state-dir", str(state), "--listen", "127.0.0.1:0"]
        )  # fmt: skip
        assert code == 2 and "in use by another coordinator" in capsys.readouterr().err
        assert (spool / "node-a.spool").read_bytes() == b"an upload in flight"
        assert not (state / "state.json").exists()
    finally:
        first.close()
    lock_state_dir(state).close()  # free again once the first is gone


def _allow(tmp_path: Path) -> Path:
    allow = tmp_path / "allow.toml"
    allow.write_text('[allow_list]\n"node-a" = "A"\n')
    return allow


@pytest.mark.parametrize(
    ("address", "reason"),
    [
        ("BUSY", "the port is in use"),
        ("192.0.2.1:7443", "the address is not one of this machine's"),  # TEST-NET-1
        ("host.invalid:7443", "the host 'host.invalid' cannot be resolved"),
    ],
)
def test_a_server_that_cannot_listen_says_why(address: str, reason: str) -> None:
    """gRPC says why a bind failed only in its own log, which pluralfed keeps quiet (a peer
    could fill it): the message said "in use, not this machine's, or not permitted: gRPC's
    log line above says which", and there was no such line."""
    occupant = grpc.server(futures.ThreadPoolExecutor(1))
    port = occupant.add_insecure_port("127.0.0.1:0")
    occupant.start()
    address = f"127.0.0.1:{port}" if address == "BUSY" else address
    server = grpc.server(futures.ThreadPoolExecutor(1), options=[EXCLUSIVE_PORT])  # as ours
    try:
        with pytest.raises(InputError) as err:
            bind_port(server, address, None)
    finally:
        occupant.stop(None)
    assert str(err.value).startswith(f"cannot listen on {address}: {reason}")


def test_a_busy_ipv6_port_in_brackets_is_said_to_be_busy() -> None:
    """An IPv6 address is written in brackets ([::1]:PORT); the reason a bind failed is found
    by binding the bare address, so the brackets must come off first, or every IPv6 listen
    address that was busy read as a host that "cannot be resolved"."""
    try:
        with socket.socket(socket.AF_INET6) as probe:
            probe.bind(("::1", 0))
    except OSError:
        pytest.skip("no IPv6 loopback on this machine")
    occupant = grpc.server(futures.ThreadPoolExecutor(1))
    port = occupant.add_insecure_port("[::1]:0")
    occupant.start()
    address = f"[::1]:{port}"
    server = grpc.server(futures.ThreadPoolExecutor(1), options=[EXCLUSIVE_PORT])
    try:
        with pytest.raises(InputError) as err:
            bind_port(server, address, None)
    finally:
        occupant.stop(None)
    assert str(err.value).startswith(f"cannot listen on {address}: the port is in use")


def test_the_state_folder_lock_says_this_process_only(tmp_path: Path) -> None:
    """A lock file left by an earlier coordinator with a longer pid holds this one's pid alone
    (its tail would make the "in use by another coordinator (pid ...)" message wrong)."""
    (tmp_path / "coordinator.lock").write_text("1234567890123\n")
    lock = lock_state_dir(tmp_path)
    try:
        assert (tmp_path / "coordinator.lock").read_text() == f"{os.getpid()}\n"
    finally:
        lock.close()


def test_a_state_folder_locked_before_its_holder_wrote_its_pid_says_the_pid_is_unknown(
    tmp_path: Path,
) -> None:
    """Another coordinator between taking the lock and writing its pid: "(pid unknown)", not
    "(pid )"."""
    with (tmp_path / "coordinator.lock").open("a+", encoding="utf-8") as holder:
        fcntl.flock(holder, fcntl.LOCK_EX | fcntl.LOCK_NB)
        with pytest.raises(InputError) as err:
            lock_state_dir(tmp_path)
    assert str(err.value).startswith(f"{tmp_path} is in use by another coordinator (pid unknown);")
