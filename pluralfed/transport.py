"""What coordinator and nodes share about the wire: protocol version, gRPC options, and the
mapping between `pluralfed.wire.Chunk` and the protobuf `TensorChunk`."""

from __future__ import annotations

import contextlib
import errno
import heapq
import itertools
import logging
import socket
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import grpc
import numpy as np
from google.protobuf.message import Message

from pluralfed.errors import InputError
from pluralfed.proto.pluralfed.v1 import federation_pb2 as pb
from pluralfed.wire import (
    DEFAULT_CHUNK_BYTES,
    DIGEST_BYTES,
    WIRE_FORMAT,
    Chunk,
    TensorAssembler,
    TensorSpec,
    WireError,
    digest_of,
    iter_chunks,
    specs_of,
)

log = logging.getLogger(__name__)

# Field numbers the fast paths below read and write without protobuf: the `tensor` part of
# ModelChunk and UpdateChunk, and TensorChunk's fields. Checked against federation.proto at
# import (`_check_field_numbers`), so a renumbered proto fails loudly, not with garbled tensors.
TENSOR_PART_FIELD = 2
_NAME_FIELD, _DTYPE_FIELD, _SHAPE_FIELD, _OFFSET_FIELD, _DATA_FIELD = 1, 2, 3, 4, 5


def _check_field_numbers() -> None:
    numbers = {
        "ModelChunk.tensor": pb.ModelChunk.DESCRIPTOR.fields_by_name["tensor"].number,
        "UpdateChunk.tensor": pb.UpdateChunk.DESCRIPTOR.fields_by_name["tensor"].number,
        **{
            f"TensorChunk.{name}": pb.TensorChunk.DESCRIPTOR.fields_by_name[name].number
            for name in ("name", "dtype", "shape", "offset", "data")
        },
    }
    expected = {
        "ModelChunk.tensor": TENSOR_PART_FIELD,
        "UpdateChunk.tensor": TENSOR_PART_FIELD,
        "TensorChunk.name": _NAME_FIELD,
        "TensorChunk.dtype": _DTYPE_FIELD,
        "TensorChunk.shape": _SHAPE_FIELD,
        "TensorChunk.offset": _OFFSET_FIELD,
        "TensorChunk.data": _DATA_FIELD,
    }
    if numbers != expected:
        raise RuntimeError(
            f"federation.proto's field numbers {numbers} are not the ones pluralfed.transport's "
            f"fast paths encode ({expected}): update them together"
        )


_check_field_numbers()

PROTOCOL_VERSION = 2
# the two bulk streams, whose (de)serializers both sides swap for the fast paths below
DOWNLOAD_METHOD = "/pluralfed.v1.Federation/DownloadModel"
UPLOAD_METHOD = "/pluralfed.v1.Federation/UploadUpdate"
# Chunking moves models of any size; one message is a chunk plus a little framing. The limit is
# set explicitly (on both sides) so that a peer cannot make the other buffer huge messages.
MAX_MESSAGE_BYTES = DEFAULT_CHUNK_BYTES + 64 * 1024
# The coordinator's receive window per upload stream (`server_grpc_options`), and the range a
# coordinator config may set (`upload_window_bytes`). Memory: at most about this per node.
SERVER_STREAM_WINDOW_BYTES = 64 * 1024
MAX_STREAM_WINDOW_BYTES = 16 << 20
# Upload chunk sizes a coordinator may ask for (JoinReply.max_chunk_bytes). gRPC keeps a read
# buffer of about one message on every connection after it has received one, so the upload
# chunk size times the number of nodes is part of the coordinator's memory (systems bench C).
MIN_CHUNK_BYTES = 4 * 1024
DEFAULT_UPLOAD_CHUNK_BYTES = 512 * 1024
# The largest model a node downloads: a ModelHeader announcing more is refused before anything
# is allocated for it. The default GPO is about 3 MB, so this leaves room for far larger ones.
MAX_MODEL_BYTES = 4 << 30


def _check_byte_count(value: int, what: str, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{what} must be a whole number of bytes, got {value!r}")
    if not low <= value <= high:
        raise ValueError(f"{what} must be {low}..{high} bytes, got {value}")
    return value


def check_chunk_bytes(value: int, what: str = "upload_chunk_bytes") -> int:
    """`value` if it is a chunk size both sides accept, else ValueError saying what is wrong."""
    return _check_byte_count(value, what, MIN_CHUNK_BYTES, DEFAULT_CHUNK_BYTES)


def upload_chunk_bytes(advertised: int) -> int:
    """The chunk size a node uploads with: the coordinator's JoinReply.max_chunk_bytes, or the
    protocol's default when the coordinator leaves it unset (0). ValueError if out of range."""
    if advertised == 0:
        return DEFAULT_CHUNK_BYTES
    return check_chunk_bytes(advertised, "the coordinator's max_chunk_bytes")


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
_DTYPE_NAMES_BY_CODE: dict[int, str] = {int(v): k for k, v in _DTYPES.items()}


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


# gRPC sets SO_REUSEPORT by default, so a second server on a busy port starts without an error
# and the kernel splits the clients between the two (two coordinators would each get some of
# the nodes). Off, the second server's bind fails (`bind_port`).
EXCLUSIVE_PORT = ("grpc.so_reuseport", 0)


def bind_port(server: grpc.Server, address: str, credentials: grpc.ServerCredentials | None) -> int:
    """Listen on `address` (host:port; port 0 picks one), with TLS unless `credentials` is None.
    Returns the port; a busy or unusable address is an InputError that says why. (A host name
    that resolves to several addresses counts as bound when one of them binds, as in gRPC:
    listen on an IP address to be sure no other server shares the port.)"""
    try:
        if credentials is None:
            port = server.add_insecure_port(address)
        else:
            port = server.add_secure_port(address, credentials)
    except RuntimeError:  # gRPC: "Failed to bind to address ..."
        port = 0
    if port == 0:
        raise InputError(f"cannot listen on {address}: {why_unbindable(address)}")
    return port


def why_unbindable(address: str) -> str:
    """Why gRPC could not listen on `address`, found by binding a plain socket there: gRPC only
    says so in its own log, which pluralfed keeps quiet (`pluralfed.cli.GRPC_CORE_VERBOSITY`)."""
    unknown = "gRPC could not bind it (run with `pluralfed -v` to see gRPC's own reason)"
    host, _, port = address.rpartition(":")
    if address.startswith("unix:") or not port.isdigit():
        return unknown
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    try:
        infos = socket.getaddrinfo(
            host or None, int(port), type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )
    except (OSError, UnicodeError) as err:
        return f"the host {host!r} cannot be resolved ({err})"
    reasons = {
        errno.EADDRINUSE: "the port is in use (another coordinator or service still running?)",
        errno.EADDRNOTAVAIL: "the address is not one of this machine's",
        errno.EACCES: "the port is not permitted (ports below 1024 need root or "
        "CAP_NET_BIND_SERVICE)",
    }
    for family, kind, proto, _, sockaddr in infos:
        with socket.socket(family, kind, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as gRPC binds
            try:
                probe.bind(sockaddr)
            except OSError as err:
                return reasons.get(err.errno or 0, f"{err.strerror or err}")
    return unknown


def check_window_bytes(value: int, what: str = "upload_window_bytes") -> int:
    """`value` if it is a receive window the coordinator may use, else ValueError."""
    return _check_byte_count(value, what, SERVER_STREAM_WINDOW_BYTES, MAX_STREAM_WINDOW_BYTES)


def server_grpc_options(
    window_bytes: int = SERVER_STREAM_WINDOW_BYTES, max_message_bytes: int = MAX_MESSAGE_BYTES
) -> list[tuple[str, int]]:
    """`grpc_options` plus a fixed receive window per stream (no BDP probing).

    With BDP probing, gRPC grows every stream's window to several MB, so a coordinator busy
    with many uploads buffered megabytes per node: memory grew with the number of nodes. The
    window is also what an upload waiting for its slot (`StreamSlots`) may have the coordinator
    buffer: with one message (1 MiB) of lookahead, 256 waiting uploads held ~256 MiB. gRPC still
    lets a stream being read receive the whole message it is reading, so 64 KiB keeps loopback
    uploads as fast (systems bench C and D round times unchanged) while bounding waiting ones.

    Over a link with latency an upload moves about max(window, one chunk) per round trip, so a
    coordinator whose nodes are far away trades memory for speed with `window_bytes`
    (`bench/wan.py` measures it).
    """
    return [
        *grpc_options(max_message_bytes),
        EXCLUSIVE_PORT,
        ("grpc.http2.bdp_probe", 0),
        ("grpc.http2.lookahead_bytes", check_window_bytes(window_bytes, "window_bytes")),
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


def serialize_message(message: Message | bytes) -> bytes:
    """A bulk stream's serializer: messages may come already serialized (`serialized_tensor_part`)."""
    return message if isinstance(message, bytes) else message.SerializeToString()


def _varint(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _length_delimited(field: int, length: int) -> bytes:
    """The tag and length prefix of a bytes/message field (wire type 2)."""
    return _varint(field << 3 | 2) + _varint(length)


def serialized_tensor_part(chunk: Chunk) -> bytes:
    """The wire bytes of a ModelChunk or UpdateChunk whose `tensor` part is this chunk.

    Equal to building the messages and calling SerializeToString, but the data is copied once
    (straight into the result) instead of three times (bytes(), into the message, out of it):
    for a large model those copies of fresh memory were a large part of the cost of sending it.
    Fields are in field-number order, as protobuf serializes them.
    """
    head = chunk_to_proto(Chunk(chunk.name, chunk.dtype, chunk.shape, chunk.offset, b""))
    fields = head.SerializeToString()
    size = len(chunk.data) if isinstance(chunk.data, bytes) else memoryview(chunk.data).nbytes
    if size:
        fields += _length_delimited(_DATA_FIELD, size)
    return b"".join((_length_delimited(TENSOR_PART_FIELD, len(fields) + size), fields, chunk.data))


class _NotFastPath(Exception):
    """The bytes are not a plain tensor part: let protobuf itself decode them."""


def _read_varint(buf: memoryview, pos: int, end: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= end or shift > 63:
            raise _NotFastPath
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            if value >> 64:  # a 10-byte varint beyond 64 bits: protobuf truncates it
                raise _NotFastPath
            return value, pos
        shift += 7


def _read_short_varint(buf: memoryview, pos: int, end: int) -> tuple[int, int]:
    """A tag or length: protobuf refuses those longer than 5 bytes or beyond 2**31 - 2."""
    value, after = _read_varint(buf, pos, end)
    if after - pos > 5 or value >= 0x7FFFFFFF:
        raise _NotFastPath
    return value, after


def _tensor_part_chunk(raw: bytes) -> Chunk:
    """The chunk of a message that is exactly one `tensor` part, its data a view into `raw`."""
    buf = memoryview(raw)
    end = len(raw)
    if end == 0 or buf[0] != (TENSOR_PART_FIELD << 3 | 2):
        raise _NotFastPath
    length, pos = _read_short_varint(buf, 1, end)
    if pos + length != end:
        raise _NotFastPath
    name = b""
    data: memoryview | bytes = b""
    dtype = offset = 0
    shape: list[int] = []
    seen: set[int] = set()
    while pos < end:
        key, pos = _read_short_varint(buf, pos, end)
        field, wire_type = key >> 3, key & 7
        if field in seen and field != _SHAPE_FIELD:
            raise _NotFastPath  # a repeated singular field: protobuf's merge rules apply
        seen.add(field)
        if wire_type == 0 and field in (_DTYPE_FIELD, _SHAPE_FIELD, _OFFSET_FIELD):
            value, pos = _read_varint(buf, pos, end)
            if field == _DTYPE_FIELD:
                dtype = value
            elif field == _SHAPE_FIELD:
                shape.append(value)
            else:
                offset = value
        elif wire_type == 2 and field in (_NAME_FIELD, _SHAPE_FIELD, _DATA_FIELD):
            size, pos = _read_short_varint(buf, pos, end)
            if pos + size > end:
                raise _NotFastPath
            if field == _NAME_FIELD:
                name = bytes(buf[pos : pos + size])
            elif field == _DATA_FIELD:
                data = buf[pos : pos + size]
            else:  # packed shape
                stop = pos + size
                at = pos
                while at < stop:
                    value, at = _read_varint(buf, at, stop)
                    shape.append(value)
            pos += size
        else:
            raise _NotFastPath
    if pos != end or (dtype not in _DTYPE_NAMES_BY_CODE and dtype != pb.DTYPE_UNSPECIFIED):
        raise _NotFastPath
    try:
        text = name.decode("utf-8")
    except UnicodeDecodeError:
        raise _NotFastPath from None
    has_spec = dtype != pb.DTYPE_UNSPECIFIED
    return Chunk(
        name=text,
        dtype=_DTYPE_NAMES_BY_CODE[dtype] if has_spec else None,
        shape=tuple(shape) if has_spec else None,
        offset=offset,
        data=data,
    )


def _fast_tensor_part(raw: bytes) -> Chunk | None:
    """The chunk if `raw` is a plain tensor part, else None (protobuf must decode it)."""
    try:
        return _tensor_part_chunk(raw)
    except _NotFastPath:
        return None


def decode_update_chunk(raw: bytes) -> pb.UpdateChunk | Chunk:
    """UploadUpdate's request deserializer: a tensor part straight to a `Chunk` whose data is a
    view into the received bytes, any other message to a protobuf `UpdateChunk`.

    Saves two copies of every uploaded byte (into protobuf's arena, out again as `bytes`) and
    their allocations. Only a plain, well-formed tensor part takes this path; anything else
    (unknown fields or dtype codes, repeated fields, bad UTF-8, varints beyond 64 bits,
    malformed bytes) is decoded by protobuf as before, so errors and their handling do not
    change (tests/test_transport_fastpath.py checks this against protobuf).
    """
    chunk = _fast_tensor_part(raw)
    return chunk if chunk is not None else pb.UpdateChunk.FromString(raw)


# what an error names a message that did not decode (`never_raising`)
decode_update_chunk.message_type = pb.UpdateChunk.DESCRIPTOR.full_name  # type: ignore[attr-defined]


def decode_model_chunk(raw: bytes) -> pb.ModelChunk | Chunk:
    """DownloadModel's response deserializer for nodes: as `decode_update_chunk` (ModelChunk's
    tensor part is the same field), so a downloaded chunk's data is not copied twice."""
    chunk = _fast_tensor_part(raw)
    return chunk if chunk is not None else pb.ModelChunk.FromString(raw)


@dataclass(frozen=True)
class Undecodable:
    """A request whose bytes did not decode, handed to the handler instead of an exception.

    A request deserializer must never raise: gRPC (1.85) then answers INTERNAL ("Exception
    deserializing request!"), logs a traceback for every such message, unthrottled, and keeps
    ~16 KiB of the server's memory for good per call (review, session 20). Health/Check, which any
    certificate of the CA may call, made this a way to exhaust the coordinator's memory."""

    message_type: str
    error: str

    def describe(self) -> str:
        return f"the request is not a valid {self.message_type}: {self.error}"


class UndecodableRequest(WireError):
    """Raised by a request stream (see `decoded_requests`) where an undecodable message was."""


def never_raising(deserializer: Callable[[bytes], Any] | None) -> Callable[[bytes], Any] | None:
    """`deserializer` returning `Undecodable` where it would raise (None stays None: raw bytes)."""
    if deserializer is None or getattr(deserializer, "never_raises", False):
        return deserializer
    owner = getattr(deserializer, "__self__", None)  # a generated class's FromString
    descriptor = getattr(owner, "DESCRIPTOR", None)
    message_type = (
        getattr(deserializer, "message_type", None)  # a function of ours says what it decodes
        or getattr(descriptor, "full_name", None)
        or "message"
    )

    def decode(raw: bytes) -> Any:
        try:
            return deserializer(raw)
        except Exception as err:  # any failure: bad UTF-8, truncated fields, a bug of the codec
            return Undecodable(message_type, f"{type(err).__name__}: {err}"[:300])

    decode.never_raises = True  # type: ignore[attr-defined]
    return decode


def decoded_requests(requests: Iterator[Any]) -> Iterator[Any]:
    """A request stream that raises `UndecodableRequest` where a message did not decode (a
    WireError, so handlers refuse it as the malformed message it is)."""
    for request in requests:
        if isinstance(request, Undecodable):
            raise UndecodableRequest(request.describe())
        yield request


@dataclass(frozen=True)
class BulkStreamCalls:
    """A node's two bulk RPCs without protobuf's copies of the tensor data: uploads send tensor
    parts already serialized (`serialized_tensor_part`), downloads decode them to `Chunk`s that
    view the received bytes (`decode_model_chunk`); the bytes on the wire are the generated
    stub's."""

    download_model: grpc.UnaryStreamMultiCallable
    upload_update: grpc.StreamUnaryMultiCallable

    @classmethod
    def on(cls, channel: grpc.Channel) -> BulkStreamCalls:
        return cls(
            download_model=channel.unary_stream(
                DOWNLOAD_METHOD,
                request_serializer=pb.DownloadModelRequest.SerializeToString,
                response_deserializer=decode_model_chunk,
            ),
            upload_update=channel.stream_unary(
                UPLOAD_METHOD,
                request_serializer=serialize_message,
                response_deserializer=pb.UploadReply.FromString,
            ),
        )


def header_specs(header: pb.ModelHeader, max_bytes: int = MAX_MODEL_BYTES) -> list[TensorSpec]:
    """The tensors a ModelHeader announces, checked before anything is allocated for them: this
    wire format, a digest, valid specs with unique names, and a total_bytes that is their sum
    and at most `max_bytes`. Raises WireError saying what is wrong."""
    if header.wire_format != WIRE_FORMAT:
        raise WireError(
            f"ModelHeader.wire_format is {header.wire_format[:64]!r}, this side reads "
            f"{WIRE_FORMAT!r}"
        )
    if len(header.digest) != DIGEST_BYTES:
        raise WireError(
            f"ModelHeader.digest is {len(header.digest)} bytes, a {WIRE_FORMAT} digest is "
            f"{DIGEST_BYTES}"
        )
    specs: list[TensorSpec] = []
    names: set[str] = set()
    total = 0
    for position, tensor in enumerate(header.tensors):
        try:
            spec = TensorSpec(tensor.name, dtype_from_proto(tensor.dtype), tuple(tensor.shape))
        except WireError as err:
            raise WireError(f"ModelHeader.tensors[{position}]: {err}") from None
        if spec.name in names:
            raise WireError(f"ModelHeader.tensors[{position}]: tensor {spec.name!r} listed twice")
        names.add(spec.name)
        total += spec.nbytes
        if total > max_bytes:
            raise WireError(
                f"ModelHeader.tensors[{position}]: with tensor {spec.name!r} ({spec.nbytes} "
                f"bytes) the model exceeds the {max_bytes} bytes this side accepts"
            )
        specs.append(spec)
    if header.total_bytes != total:
        raise WireError(
            f"ModelHeader.total_bytes is {header.total_bytes}, its tensors add up to {total}"
        )
    return specs


def receive_model(
    stream: Iterable[pb.ModelChunk | Chunk],
    error: Callable[[str], Exception],
    *,
    model_version: str = "",
    max_bytes: int = MAX_MODEL_BYTES,
) -> dict[str, np.ndarray]:
    """The tensors of a DownloadModel stream (header, tensor parts, trailer).

    The header is checked first (`header_specs`; its model_version must be `model_version` if
    that is given), then every tensor part against the header's tensors, so what the sender
    declares can never make this side allocate more than the header's total_bytes, at most
    `max_bytes`. The trailer's digest must be the header's and the data's. A stream out of
    that order or a wrong model version raises `error(message)`, bad tensor data a WireError.
    """
    header = None
    assembler = None
    for msg in stream:
        if isinstance(msg, Chunk):  # a tensor part, decoded without protobuf
            if assembler is None:
                raise error("unexpected 'tensor' message")
            assembler.add(msg)
            continue
        part = msg.WhichOneof("part")
        if part == "header" and header is None:
            header = msg.header
            if model_version and header.model_version != model_version:
                raise error(
                    f"asked for model version {model_version!r}, the stream is "
                    f"{header.model_version[:64]!r}"
                )
            assembler = TensorAssembler(
                header_specs(header, max_bytes), collect=True, max_bytes=header.total_bytes
            )
        elif part == "tensor" and assembler is not None:
            assembler.add(chunk_from_proto(msg.tensor))
        elif part == "trailer" and assembler is not None and header is not None:
            if msg.trailer.digest != header.digest:
                raise WireError("the trailer's digest is not the one ModelHeader.digest announced")
            assembler.finish(
                msg.trailer.digest, total_bytes=header.total_bytes, tensor_count=len(header.tensors)
            )
            return assembler.to_dict()
        else:
            raise error(f"unexpected {part!r} message")
    raise error("the stream ended before its trailer")


def update_stream(
    header: pb.UpdateHeader,
    weights: Mapping[str, np.ndarray],
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
) -> Iterator[pb.UpdateChunk | bytes]:
    """An UploadUpdate stream: `header` completed with the tensors' count and size, the tensor
    parts (at most `chunk_bytes` of data each) already serialized (`serialized_tensor_part`),
    and the digest trailer."""
    specs = specs_of(weights)
    header.tensor_count = len(specs)
    header.total_bytes = sum(s.nbytes for s in specs)
    yield pb.UpdateChunk(header=header)
    for chunk in iter_chunks(weights, chunk_bytes):
        yield serialized_tensor_part(chunk)
    yield pb.UpdateChunk(trailer=pb.StreamTrailer(digest=digest_of(weights)))


class StreamDeadlines:
    """Cancels calls still running at their deadline, from one thread: a peer that stops
    sending (an upload, or a request it never sends) or reading (a download) would otherwise
    hold an RPC thread, and a stream slot, for ever. `message` is logged for each call cut."""

    def __init__(self, message: str = "a call outlived its deadline: cancelled") -> None:
        self.message = message
        self._cond = threading.Condition()
        self._heap: list[tuple[float, int]] = []  # (monotonic deadline, token)
        self._contexts: dict[int, grpc.RpcContext] = {}
        self._tokens = itertools.count()
        self._thread: threading.Thread | None = None
        self.cancelled = 0  # streams cut so far (for tests and diagnostics)

    @contextlib.contextmanager
    def watch(self, context: grpc.RpcContext, seconds: float) -> Iterator[None]:
        """Cancel `context`'s RPC if the block is still running `seconds` from now."""
        token = next(self._tokens)
        with self._cond:
            self._contexts[token] = context
            heapq.heappush(self._heap, (time.monotonic() + max(0.0, seconds), token))
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._run, name="stream-deadlines", daemon=True
                )
                self._thread.start()
            self._cond.notify()
        try:
            yield
        finally:
            with self._cond:
                self._contexts.pop(token, None)

    def _run(self) -> None:
        while True:
            with self._cond:
                while self._heap and self._heap[0][1] not in self._contexts:
                    heapq.heappop(self._heap)  # finished in time
                if not self._heap:
                    self._cond.wait()
                    continue
                deadline, token = self._heap[0]
                left = deadline - time.monotonic()
                if left > 0:
                    self._cond.wait(left)
                    continue
                heapq.heappop(self._heap)
                context = self._contexts.pop(token)
                self.cancelled += 1
            try:  # one thread cuts every call: an error here must not end it for the later ones
                log.warning(self.message)
                context.cancel()  # the servicer's read (or send) fails at once; its slot is freed
            except Exception:
                log.exception("cannot cancel a call past its deadline")
