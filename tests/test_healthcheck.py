"""`python -m pluralfed.healthcheck`, the container healthcheck: against a real mutual-TLS gRPC
health service on 127.0.0.1 it exits 0 only when the service says SERVING, 1 when it does not,
cannot be reached or the TLS files cannot be read, and 2 on a wrong command line."""

from __future__ import annotations

from collections.abc import Iterator
from concurrent import futures
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from pluralfed import healthcheck
from pluralfed.pki import create_ca, issue_node_cert, issue_server_cert
from pluralfed.tls import TlsFiles

pytestmark = pytest.mark.timeout(60)


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("pki")
    create_ca(root / "ca")
    # the server's certificate names only coord.example: 127.0.0.1 needs the server name
    issue_server_cert(root / "ca", root / "server", "coordinator", ["coord.example"])
    issue_node_cert(root / "ca", root / "health", "node-healthcheck")
    return root


@pytest.fixture
def service(certs: Path) -> Iterator[tuple[str, health.HealthServicer]]:
    """A health service over mutual TLS: ("127.0.0.1:PORT", its servicer)."""
    server = grpc.server(futures.ThreadPoolExecutor(2))
    servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = server.add_secure_port(
        "127.0.0.1:0", TlsFiles.from_dir(certs / "server").server_credentials()
    )
    server.start()
    try:
        yield f"127.0.0.1:{port}", servicer
    finally:
        server.stop(None)


def test_serving_is_exit_0_and_not_serving_exit_1(
    certs: Path, service: tuple[str, health.HealthServicer], capsys: pytest.CaptureFixture[str]
) -> None:
    """The exit code is the container's health: a service that says NOT_SERVING is unhealthy."""
    target, servicer = service
    argv = [target, str(certs / "health"), "coord.example"]
    servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    assert healthcheck.main(argv) == 0
    assert capsys.readouterr().out == "SERVING\n"
    servicer.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
    assert healthcheck.main(argv) == 1
    assert capsys.readouterr().out == "NOT SERVING\n"


def test_the_server_name_argument_is_the_name_checked_in_the_certificate(
    certs: Path, service: tuple[str, health.HealthServicer], capsys: pytest.CaptureFixture[str]
) -> None:
    """Without SERVER_NAME the host of the target (127.0.0.1) must be in the server's
    certificate; with it, that name is checked instead."""
    target, servicer = service
    servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    assert healthcheck.main([target, str(certs / "health")]) == 1
    assert capsys.readouterr().err.startswith("unhealthy: ")
    assert healthcheck.main([target, str(certs / "health"), "coord.example"]) == 0


def test_unreadable_tls_files_are_unhealthy_not_a_traceback(
    tmp_path: Path, service: tuple[str, health.HealthServicer], capsys: pytest.CaptureFixture[str]
) -> None:
    """A healthcheck that crashes says nothing useful in `docker inspect`: a missing TLS
    folder is exit 1 with one line saying why."""
    target, _ = service
    assert healthcheck.main([target, str(tmp_path / "missing")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("unhealthy: ") and "Traceback" not in err
    assert f"file not found: {tmp_path / 'missing'}" in err  # says which file


def test_a_relative_tls_dir_in_a_removed_working_folder_is_unhealthy_not_a_traceback(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A relative TLS_DIR read from a working folder that was removed (Path.cwd() fails) is
    exit 1 with one line that says so, as a missing file is."""
    gone = tmp_path / "gone"
    gone.mkdir()
    monkeypatch.chdir(gone)
    gone.rmdir()
    assert healthcheck.main(["127.0.0.1:1", "health"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("unhealthy: ") and "Traceback" not in err
    assert "(relative to a working folder that no longer exists)" in err


@pytest.mark.parametrize("argv", [[], ["127.0.0.1:1"], ["a:1", "dir", "name", "extra"]])
def test_a_wrong_command_line_is_exit_2_with_the_usage(
    argv: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    assert healthcheck.main(argv) == 2
    assert (
        "python3 -m pluralfed.healthcheck HOST:PORT TLS_DIR [SERVER_NAME]"
        in capsys.readouterr().err
    )
