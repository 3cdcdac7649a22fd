"""What a node takes from the coordinator's Join reply, against a stand-in coordinator (a real
gRPC server on 127.0.0.1, plain text) that answers Join with a chosen max_chunk_bytes: the node
cuts its uploads to it, uses the protocol's default when the coordinator leaves it unset, and
refuses to go on, saying what is wrong, when the value is out of range."""

from __future__ import annotations

from collections.abc import Iterator
from concurrent import futures
from pathlib import Path

import grpc
import pytest

from group_node.node import NodeClient, NodeConfig
from pluralfed.errors import InputError
from pluralfed.proto.pluralfed.v1 import federation_pb2 as pb
from pluralfed.proto.pluralfed.v1 import federation_pb2_grpc as pb_grpc
from pluralfed.transport import (
    DEFAULT_UPLOAD_CHUNK_BYTES,
    MIN_CHUNK_BYTES,
    PROTOCOL_VERSION,
    upload_chunk_bytes,
)
from pluralfed.wire import DEFAULT_CHUNK_BYTES

pytestmark = pytest.mark.timeout(60)


class JoinOnly(pb_grpc.FederationServicer):
    def __init__(self, max_chunk_bytes: int) -> None:
        self.max_chunk_bytes = max_chunk_bytes

    def Join(self, request: pb.JoinRequest, context: grpc.ServicerContext) -> pb.JoinReply:
        return pb.JoinReply(
            session_id="s-1",
            protocol_version=PROTOCOL_VERSION,
            max_chunk_bytes=self.max_chunk_bytes,
        )


@pytest.fixture
def coordinator() -> Iterator[tuple[JoinOnly, int]]:
    servicer = JoinOnly(0)
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    pb_grpc.add_FederationServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield servicer, port
    finally:
        server.stop(None).wait(5)


def client(port: int, tmp_path: Path) -> NodeClient:
    config = NodeConfig(
        coordinator=f"127.0.0.1:{port}", group="G", data=tmp_path / "g.csv", insecure=True
    )
    return NodeClient(config)


@pytest.mark.parametrize(
    ("advertised", "used"),
    [
        (0, DEFAULT_CHUNK_BYTES),  # a coordinator that does not say: the protocol's default
        (MIN_CHUNK_BYTES, MIN_CHUNK_BYTES),
        (DEFAULT_UPLOAD_CHUNK_BYTES, DEFAULT_UPLOAD_CHUNK_BYTES),
        (DEFAULT_CHUNK_BYTES, DEFAULT_CHUNK_BYTES),
    ],
)
def test_node_uploads_with_the_chunk_size_join_gives(
    coordinator: tuple[JoinOnly, int], tmp_path: Path, advertised: int, used: int
) -> None:
    servicer, port = coordinator
    servicer.max_chunk_bytes = advertised
    node = client(port, tmp_path)
    try:
        node.join(10, "enc")
        assert node.upload_chunk_bytes == used
    finally:
        node.close()


@pytest.mark.parametrize("advertised", [1, MIN_CHUNK_BYTES - 1, DEFAULT_CHUNK_BYTES + 1])
def test_node_refuses_a_chunk_size_out_of_range(
    coordinator: tuple[JoinOnly, int], tmp_path: Path, advertised: int
) -> None:
    servicer, port = coordinator
    servicer.max_chunk_bytes = advertised
    node = client(port, tmp_path)
    try:
        with pytest.raises(InputError, match=rf"Join reply: .*max_chunk_bytes.*got {advertised}"):
            node.join(10, "enc")
    finally:
        node.close()


def test_upload_chunk_bytes_range() -> None:
    assert upload_chunk_bytes(0) == DEFAULT_CHUNK_BYTES
    assert upload_chunk_bytes(65536) == 65536
    for bad in (-1, MIN_CHUNK_BYTES - 1, DEFAULT_CHUNK_BYTES + 1):
        with pytest.raises(ValueError, match=str(bad)):
            upload_chunk_bytes(bad)
