"""The hand-written protobuf paths of the bulk streams (`serialized_tensor_part`,
`decode_update_chunk`, `decode_model_chunk`) against protobuf itself.

They skip protobuf for speed, so they must never differ from it: the same bytes out, and on any
input (valid, odd or corrupt) the same decoded values or the same error. No network.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
from google.protobuf.message import DecodeError, Message

from pluralfed import transport
from pluralfed.proto.pluralfed.v1 import federation_pb2 as pb
from pluralfed.transport import (
    chunk_from_proto,
    chunk_to_proto,
    decode_model_chunk,
    decode_update_chunk,
    serialized_tensor_part,
)
from pluralfed.wire import DTYPES, Chunk, WireError, numpy_dtype_of

NAMES = [
    "w",
    "encoder.layers.0.linear1.weight",
    "é",
    "名前/層.重み",
    "emoji 😀 \x00 nul",
    "x" * 300,  # a name whose length needs a 2-byte varint
    "",
]
BIG = [2**7, 2**14, 2**31, 2**32, 2**63 - 1, 2**63, 2**64 - 1]  # multi-byte and 10-byte varints

Outcome = tuple[Any, ...]


def random_name(rng: random.Random) -> str:
    if rng.random() < 0.6:
        return rng.choice(NAMES)
    points = [
        rng.choice(
            [rng.randrange(1, 0x80), rng.randrange(0x80, 0xD800), rng.randrange(0xE000, 0x110000)]
        )
        for _ in range(rng.randrange(1, 12))
    ]
    return "".join(map(chr, points))


def random_data(rng: random.Random, dtype: str | None, max_bytes: int) -> bytes | memoryview | Any:
    """Data of a random length as bytes, a memoryview or a numpy array (what senders pass)."""
    size = rng.choice([0, 0, 1, 3, 8, 127, 128, 4096, rng.randrange(max_bytes + 1)])
    raw = rng.randbytes(size)
    kind = rng.randrange(3)
    if kind == 0:
        return raw
    if kind == 1:
        return memoryview(raw)
    numpy_dtype = numpy_dtype_of(dtype or "uint8")
    whole = len(raw) - len(raw) % numpy_dtype.itemsize
    return np.frombuffer(raw[:whole], dtype=numpy_dtype).copy()


def random_chunk(rng: random.Random, max_bytes: int = 70_000) -> Chunk:
    dtype = rng.choice([*DTYPES, None])
    shape: tuple[int, ...] | None = None
    if dtype is not None and rng.random() < 0.9:
        shape = tuple(
            rng.choice([0, 1, 3, 384, rng.randrange(2**20), rng.choice(BIG)])
            for _ in range(rng.choice([0, 0, 1, 2, 3, 8]))
        )
    offset = rng.choice([0, 0, 0, 1, 1024, 2**20, 2**40, rng.choice(BIG)])
    return Chunk(random_name(rng), dtype, shape, offset, random_data(rng, dtype, max_bytes))


def outcome(decoded: Message | Chunk) -> Outcome:
    """What the coordinator gets out of a decoded UpdateChunk/ModelChunk: a chunk's fields (data
    as bytes), the WireError `chunk_from_proto` raises, or the other part's message."""
    if isinstance(decoded, Chunk):
        assert isinstance(decoded.name, str) and type(decoded.offset) is int
        assert decoded.shape is None or all(type(d) is int for d in decoded.shape)
        return (
            "tensor",
            decoded.name,
            decoded.dtype,
            decoded.shape,
            decoded.offset,
            bytes(decoded.data),
        )
    part = decoded.WhichOneof("part")
    if part == "tensor":
        try:
            chunk = chunk_from_proto(decoded.tensor)  # type: ignore[attr-defined]
        except WireError as err:
            return ("wire-error", str(err))
        return outcome(chunk)
    return (part, decoded.SerializeToString())


def decoded_by(decode: Callable[[bytes], Message | Chunk], raw: bytes) -> Outcome:
    try:
        return outcome(decode(raw))
    except DecodeError as err:
        return ("decode-error", type(err), str(err))


def assert_same(raw: bytes) -> Outcome:
    """Both fast decoders give exactly what protobuf gives for these bytes."""
    want_update = decoded_by(pb.UpdateChunk.FromString, raw)
    assert decoded_by(decode_update_chunk, raw) == want_update, raw.hex()
    want_model = decoded_by(pb.ModelChunk.FromString, raw)
    assert decoded_by(decode_model_chunk, raw) == want_model, raw.hex()
    return want_update


# --------------------------------------------------------------------------------------------
# serialized_tensor_part


def test_serialized_tensor_part_is_protobufs_bytes() -> None:
    rng = random.Random(20260101)
    for _ in range(600):
        chunk = random_chunk(rng)
        tensor = chunk_to_proto(chunk)
        got = serialized_tensor_part(chunk)
        assert got == pb.UpdateChunk(tensor=tensor).SerializeToString(), chunk
        assert got == pb.ModelChunk(tensor=tensor).SerializeToString(), chunk


@pytest.mark.parametrize(
    "data",
    [b"", b"\x00", bytearray(b"abc"), memoryview(b"abcd"), np.arange(6, dtype="<f4")],
    ids=["empty", "one", "bytearray", "memoryview", "float32-array"],
)
def test_serialized_tensor_part_data_kinds(data: Any) -> None:
    chunk = Chunk("t", "float32", (2, 3), 0, data)
    expected = pb.ModelChunk(tensor=chunk_to_proto(chunk)).SerializeToString()
    assert serialized_tensor_part(chunk) == expected


def test_serialized_tensor_part_multidimensional_view() -> None:
    """A memoryview of a 2-d array: its length is the rows, the data is all its bytes."""
    array = np.arange(12, dtype="<f8").reshape(3, 4)
    chunk = Chunk("m", "float64", (3, 4), 0, array.data)
    expected = pb.ModelChunk(tensor=chunk_to_proto(chunk)).SerializeToString()
    assert serialized_tensor_part(chunk) == expected


# --------------------------------------------------------------------------------------------
# decoding valid messages


def valid_messages(rng: random.Random, count: int, max_bytes: int = 70_000) -> list[bytes]:
    """Serialized UpdateChunks of every kind protobuf would send (and ModelChunk's header)."""
    out: list[bytes] = [
        b"",
        pb.UpdateChunk().SerializeToString(),
        pb.UpdateChunk(tensor=pb.TensorChunk()).SerializeToString(),
        pb.UpdateChunk(trailer=pb.StreamTrailer()).SerializeToString(),
        pb.UpdateChunk(trailer=pb.StreamTrailer(digest=bytes(range(32)))).SerializeToString(),
        pb.UpdateChunk(
            header=pb.UpdateHeader(
                session_id="s" * 32,
                task_id="t",
                round=7,
                base_model_version="v3",
                num_examples=1234,
                metrics={"loss": 0.5, "seconds": 1e9},
                tensor_count=3,
                total_bytes=2**40,
            )
        ).SerializeToString(),
        pb.ModelChunk(
            header=pb.ModelHeader(
                model_version="v1",
                round=2,
                tensors=[pb.TensorSpec(name="a", dtype=pb.DTYPE_FLOAT32, shape=[2, 3])],
                total_bytes=24,
                digest=b"\x01" * 32,
                wire_format="pluralfed.wire/2",
            )
        ).SerializeToString(),
        # fields protobuf writes but a sender of ours would not: dtype unspecified with a shape,
        # an unknown dtype code, dtype without shape
        pb.UpdateChunk(
            tensor=pb.TensorChunk(name="a", shape=[1, 2], data=b"xy")
        ).SerializeToString(),
        pb.UpdateChunk(
            tensor=pb.TensorChunk(name="a", dtype=99, shape=[1])  # type: ignore[arg-type]
        ).SerializeToString(),
        pb.UpdateChunk(tensor=pb.TensorChunk(name="a", dtype=pb.DTYPE_INT64)).SerializeToString(),
    ]
    for _ in range(count):
        chunk = random_chunk(rng, max_bytes)
        out.append(pb.UpdateChunk(tensor=chunk_to_proto(chunk)).SerializeToString())
        out.append(serialized_tensor_part(chunk))
    return out


def test_decode_valid_messages_like_protobuf() -> None:
    rng = random.Random(7)
    kinds = set()
    for raw in valid_messages(rng, 300):
        kinds.add(assert_same(raw)[0])
    assert {"tensor", "header", "trailer", None, "wire-error"} <= kinds


def test_decoded_tensor_part_takes_the_fast_path_and_views_the_bytes() -> None:
    chunk = Chunk("layer.weight", "float32", (2, 2), 0, np.arange(4, dtype="<f4").tobytes())
    raw = serialized_tensor_part(chunk)
    decoded = decode_update_chunk(raw)
    assert isinstance(decoded, Chunk)
    assert isinstance(decoded.data, memoryview) and decoded.data.obj is raw
    assert decoded == Chunk("layer.weight", "float32", (2, 2), 0, decoded.data)
    assert bytes(decoded.data) == chunk.data
    assert isinstance(decode_model_chunk(raw), Chunk)


# --------------------------------------------------------------------------------------------
# odd encodings, built field by field


def varint(value: int, pad: int = 0) -> bytes:
    """`value` as a varint, made `pad` bytes longer than needed (a legal, non-minimal encoding
    while the total stays within 10 bytes)."""
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value == 0 and pad == 0:
            out.append(byte)
            return bytes(out)
        if value == 0:
            pad -= 1
        out.append(byte | 0x80)


def field(number: int, wire_type: int, payload: bytes = b"", tag_pad: int = 0) -> bytes:
    return varint(number << 3 | wire_type, tag_pad) + payload


def length_delimited(number: int, payload: bytes, tag_pad: int = 0, len_pad: int = 0) -> bytes:
    return field(number, 2, varint(len(payload), len_pad) + payload, tag_pad)


def tensor_part(fields: bytes, tag_pad: int = 0, len_pad: int = 0) -> bytes:
    return length_delimited(2, fields, tag_pad, len_pad)


ODD_TENSOR_FIELDS: dict[str, bytes] = {
    "plain": length_delimited(1, b"a") + field(2, 0, b"\x01") + field(5, 2, b"\x02xy"),
    "offset 2**64-1": length_delimited(1, b"a") + field(4, 0, varint(2**64 - 1)),
    "offset 2**64+5 (10-byte varint beyond 64 bits)": length_delimited(1, b"a")
    + field(4, 0, varint(2**64 + 5)),
    "offset 2**70 (11-byte varint)": length_delimited(1, b"a") + field(4, 0, varint(2**70)),
    "shape -1 as int64 (10 bytes)": field(2, 0, b"\x01") + field(3, 0, varint(2**64 - 1)),
    "shape beyond 64 bits": field(2, 0, b"\x01") + field(3, 0, varint(2**64 + 3)),
    "packed shape beyond 64 bits": field(2, 0, b"\x01")
    + length_delimited(3, varint(2) + varint(2**64 + 3)),
    "dtype 2**32+1 (int32 truncation)": field(2, 0, varint(2**32 + 1)) + field(3, 0, b"\x02"),
    "dtype -1 (10 bytes)": field(2, 0, varint(2**64 - 1)) + field(3, 0, b"\x02"),
    "dtype 2**31+1": field(2, 0, varint(2**31 + 1)),
    "dtype 99 (unknown)": field(2, 0, varint(99)) + field(3, 0, b"\x02"),
    "dtype 0 with shape": field(2, 0, b"\x00") + field(3, 0, b"\x02"),
    "overlong dtype": field(2, 0, varint(1, pad=8)) + field(3, 0, varint(4, pad=3)),
    "overlong offset (10 bytes)": field(4, 0, varint(7, pad=9)),
    "overlong offset (11 bytes)": field(4, 0, varint(7, pad=10)),
    "overlong tag": field(1, 2, varint(1) + b"a", tag_pad=3) + field(5, 2, b"\x01z", tag_pad=1),
    "overlong tag, 6 bytes": field(1, 2, varint(1) + b"a", tag_pad=5),
    "overlong tag, 10 bytes": field(1, 2, varint(1) + b"a", tag_pad=9),
    "overlong length": length_delimited(1, b"ab", len_pad=2) + length_delimited(5, b"c", len_pad=9),
    "length beyond 64 bits": field(5, 2, varint(2**64 + 1) + b"x"),
    "length 2**31": field(5, 2, varint(2**31) + b"x"),
    "packed and unpacked shape": field(2, 0, b"\x03")
    + field(3, 0, b"\x02")
    + length_delimited(3, b"\x03\x04")
    + field(3, 0, b"\x05"),
    "empty packed shape": field(2, 0, b"\x03") + length_delimited(3, b""),
    "truncated packed shape": field(2, 0, b"\x03") + length_delimited(3, b"\x80"),
    "name twice": length_delimited(1, b"a") + length_delimited(1, b"b"),
    "data twice": length_delimited(5, b"a") + length_delimited(5, b"b"),
    "dtype twice": field(2, 0, b"\x01") + field(2, 0, b"\x02") + field(3, 0, b"\x01"),
    "offset twice": field(4, 0, b"\x01") + field(4, 0, b"\x02"),
    "fields out of order": field(5, 2, b"\x01z") + field(4, 0, b"\x00") + length_delimited(1, b"n"),
    "invalid utf-8 name": length_delimited(1, b"\xff\xfe"),
    "surrogate in name": length_delimited(1, "\ud800".encode("utf-8", "surrogatepass")),
    "overlong utf-8 name": length_delimited(1, b"\xc0\xaf"),
    "unknown varint field": field(9, 0, b"\x01") + length_delimited(1, b"a"),
    "unknown fixed64 field": field(6, 1, b"\x00" * 8),
    "unknown fixed32 field": field(7, 5, b"\x00" * 4),
    "unknown bytes field": length_delimited(100, b"zz"),
    "unknown group": field(11, 3) + field(11, 4),
    "unmatched end group": field(11, 4),
    "field number 0": field(0, 0, b"\x01"),
    "field number 2**29-1": field(2**29 - 1, 0, b"\x01"),
    "field number 2**29": field(2**29, 0, b"\x01"),
    "wire type 6": field(1, 6, b"\x01"),
    "wire type 7": field(1, 7, b"\x01"),
    "name as varint": field(1, 0, b"\x01"),
    "data as fixed32": field(5, 5, b"abcd"),
    "dtype as bytes": length_delimited(2, b"\x01"),
    "offset as fixed64": field(4, 1, b"\x01" * 8),
    "truncated data": field(5, 2, varint(10) + b"abc"),
    "truncated varint": field(4, 0, b"\xff\xff"),
    "tag without value": field(4, 0),
    "empty": b"",
}


@pytest.mark.parametrize("name", list(ODD_TENSOR_FIELDS))
@pytest.mark.parametrize(
    "wrap",
    ["plain", "overlong tensor tag", "overlong tensor length", "header before", "trailer after"],
)
def test_odd_encodings_like_protobuf(name: str, wrap: str) -> None:
    fields = ODD_TENSOR_FIELDS[name]
    if wrap == "plain":
        raw = tensor_part(fields)
    elif wrap == "overlong tensor tag":
        raw = tensor_part(fields, tag_pad=1)
    elif wrap == "overlong tensor length":
        raw = tensor_part(fields, len_pad=4)
    elif wrap == "header before":
        raw = length_delimited(1, b"") + tensor_part(fields)
    else:
        raw = tensor_part(fields) + length_delimited(3, b"")
    assert_same(raw)


def test_repeated_tensor_parts_like_protobuf() -> None:
    """Two tensor parts in one message: protobuf merges them, so the fast path must not take
    just the first or the last."""
    first = length_delimited(1, b"a") + field(2, 0, b"\x01") + field(3, 0, b"\x02")
    second = length_delimited(5, b"\x00\x00\x80\x3f") + field(4, 0, b"\x04")
    assert_same(tensor_part(first) + tensor_part(second))
    assert_same(tensor_part(first) + tensor_part(b""))
    assert_same(tensor_part(b"") + tensor_part(first))


# --------------------------------------------------------------------------------------------
# fuzzing


def random_field(rng: random.Random) -> bytes:
    """One TensorChunk field, usually well-formed, sometimes odd (see ODD_TENSOR_FIELDS)."""
    pad = rng.choice([0] * 8 + [1, 2, 9, 10])
    small = rng.choice([0, 1, 2, 5, 8, 9, 127, 128, 300])
    value = rng.choice([small, small, small, rng.choice(BIG), 2**64 + small, 2**70])
    choice = rng.randrange(10)
    if choice == 0:
        name = random_name(rng).encode() if rng.random() < 0.9 else rng.randbytes(3)
        return length_delimited(1, name, pad, rng.choice([0, 0, 0, 1]))
    if choice == 1:
        return field(2, 0, varint(rng.choice([1, 2, 5, 8, 0, 9, value]), pad))
    if choice == 2:
        return field(3, 0, varint(value, pad))
    if choice == 3:
        packed = b"".join(varint(rng.choice([small, value])) for _ in range(rng.randrange(4)))
        return length_delimited(3, packed)
    if choice == 4:
        return field(4, 0, varint(value, pad))
    if choice == 5:
        return length_delimited(5, rng.randbytes(rng.randrange(12)), pad)
    if choice == 6:  # an unknown field or a known one with another wire type
        number = rng.choice([1, 2, 3, 4, 5, 6, 15, 16, 2**29 - 1, 0])
        wire_type = rng.randrange(8)
        payload = {0: varint(small), 1: rng.randbytes(8), 2: varint(2) + b"ab", 5: rng.randbytes(4)}
        return field(number, wire_type, payload.get(wire_type, b""))
    if choice == 7:
        return rng.randbytes(rng.randrange(1, 4))
    return length_delimited(rng.choice([1, 5]), rng.randbytes(rng.randrange(4)))


def mutate(rng: random.Random, raw: bytes) -> bytes:
    """Corrupt a message: change, insert, delete or duplicate bytes, truncate, append garbage."""
    buf = bytearray(raw)
    for _ in range(rng.choice([1, 1, 1, 2, 3])):
        op = rng.randrange(7)
        at = rng.randrange(len(buf) + 1)
        if op == 0 and buf:
            buf[min(at, len(buf) - 1)] = rng.randrange(256)
        elif op == 1 and buf:
            buf[min(at, len(buf) - 1)] ^= 1 << rng.randrange(8)
        elif op == 2:
            buf[at:at] = rng.choice([rng.randbytes(rng.randrange(1, 4)), b"\xff" * 9, b"\x80"])
        elif op == 3:
            del buf[at : at + rng.randrange(1, 4)]
        elif op == 4:
            del buf[at:]
        elif op == 5:
            buf += rng.randbytes(rng.randrange(1, 6))
        else:
            buf[at:at] = buf[at : at + rng.randrange(1, 6)]
    return bytes(buf)


def test_fuzz_decoders_never_disagree_with_protobuf() -> None:
    """Seeded: valid messages corrupted at random, whole or inside their tensor part (rewrapped
    with a correct length, so the corruption reaches the fast path's field parser), and tensor
    parts generated field by field. Every outcome must be protobuf's."""
    rng = random.Random(1234)
    corpus = [raw for raw in valid_messages(rng, 40, max_bytes=40) if raw]
    fast_path_hits = 0
    for case in range(6000):
        kind = case % 3
        if kind == 0:
            raw = mutate(rng, rng.choice(corpus))
        elif kind == 1:
            whole = rng.choice(corpus)
            inner = whole[2:] if whole[:1] == b"\x12" and len(whole) < 130 else whole
            raw = tensor_part(mutate(rng, inner), len_pad=rng.choice([0, 0, 1]))
        else:
            raw = tensor_part(b"".join(random_field(rng) for _ in range(rng.randrange(7))))
            if rng.random() < 0.2:
                raw = mutate(rng, raw)
        assert_same(raw)
        fast_path_hits += isinstance(_decoded_or_none(raw), Chunk)
    assert fast_path_hits > 600  # the fuzz reaches the fast path, not only the fallback


def _decoded_or_none(raw: bytes) -> Message | Chunk | None:
    try:
        return decode_update_chunk(raw)
    except DecodeError:
        return None


def test_the_fast_paths_field_numbers_are_checked_against_the_proto(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    transport._check_field_numbers()  # as at import: the numbers agree
    monkeypatch.setattr(transport, "_DATA_FIELD", 6)  # as if federation.proto had renumbered
    with pytest.raises(RuntimeError, match=r"'TensorChunk.data': 5.*update them together"):
        transport._check_field_numbers()
