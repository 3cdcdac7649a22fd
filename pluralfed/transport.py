"""What coordinator and nodes share about the wire: protocol version, gRPC options, and the
mapping between `pluralfed.wire.Chunk` and the protobuf `TensorChunk`."""

from __future__ import annotations

from pluralfed.proto.pluralfed.v1 import federation_pb2 as pb
from pluralfed.wire import DEFAULT_CHUNK_BYTES, Chunk, WireError

PROTOCOL_VERSION = 1
# Chunking moves models of any size; one message is a chunk plus a little framing. The limit is
# set explicitly (on both sides) so that a peer cannot make the other buffer huge messages.
MAX_MESSAGE_BYTES = DEFAULT_CHUNK_BYTES + 64 * 1024

_DTYPES = {
    "float32": pb.DTYPE_FLOAT32,
    "float64": pb.DTYPE_FLOAT64,
    "float16": pb.DTYPE_FLOAT16,
    "bfloat16": pb.DTYPE_BFLOAT16,
    "int64": pb.DTYPE_INT64,
    "int32": pb.DTYPE_INT32,
    "uint8": pb.DTYPE_UINT8,
    "bool": pb.DTYPE_BOOL,
}
_DTYPE_NAMES = {v: k for k, v in _DTYPES.items()}


def grpc_options(max_message_bytes: int = MAX_MESSAGE_BYTES) -> list[tuple[str, int]]:
    return [
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.keepalive_time_ms", 20_000),
        ("grpc.keepalive_timeout_ms", 10_000),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.max_pings_without_data", 0),
        ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
    ]


def dtype_to_proto(dtype: str) -> pb.DType.ValueType:
    return _DTYPES[dtype]


def dtype_from_proto(value: pb.DType.ValueType) -> str:
    try:
        return _DTYPE_NAMES[value]
    except KeyError:
        raise WireError(f"unknown dtype code {value}") from None


def chunk_to_proto(chunk: Chunk) -> pb.TensorChunk:
    msg = pb.TensorChunk(name=chunk.name, offset=chunk.offset, data=bytes(chunk.data))
    if chunk.offset == 0 and chunk.dtype is not None and chunk.shape is not None:
        msg.dtype = dtype_to_proto(chunk.dtype)
        msg.shape.extend(chunk.shape)
    return msg


def chunk_from_proto(msg: pb.TensorChunk) -> Chunk:
    has_spec = msg.dtype != pb.DTYPE_UNSPECIFIED
    return Chunk(
        name=msg.name,
        dtype=dtype_from_proto(msg.dtype) if has_spec else None,
        shape=tuple(int(d) for d in msg.shape) if has_spec else None,
        offset=int(msg.offset),
        data=msg.data,
    )
