"""The floor for the systems benchmark: raw gRPC mutual-TLS throughput on loopback.

A tiny generic service with one client-streaming RPC that takes raw 1 MiB byte messages (no
protobuf, no digest, no spooling) and answers with the byte count and the server process's CPU
time so far; same certificates, chunk size and message limits as pluralfed. Server and client are
separate processes. Besides the time, the client reports the CPU both processes spent per GB
moved: what the wire itself costs, against which the systems bench sets pluralfed's.

    python bench/raw_grpc.py server --pki DIR --port-file F
    python bench/raw_grpc.py client --pki DIR --port P --sizes 4800000,38400000 --repeat 3 --out F
"""

from __future__ import annotations

import argparse
import json
import struct
import sys
import time
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path

import grpc

sys.path.insert(0, str(Path(__file__).resolve().parent))

from sysbench_common import HOST, loopback_bytes, usage, write_json

from pluralfed.tls import TlsFiles
from pluralfed.transport import grpc_options
from pluralfed.wire import DEFAULT_CHUNK_BYTES

METHOD = "/bench.Raw/Push"


def _ident(b: bytes) -> bytes:
    return b


def serve(pki: Path, port_file: Path, seconds: float) -> int:
    def push(requests: Iterator[bytes], context: grpc.ServicerContext) -> bytes:
        n = 0
        for msg in requests:
            n += len(msg)
        return n.to_bytes(8, "little") + struct.pack("<d", time.process_time())

    handler = grpc.method_handlers_generic_handler(
        "bench.Raw",
        {
            "Push": grpc.stream_unary_rpc_method_handler(
                push, request_deserializer=_ident, response_serializer=_ident
            )
        },
    )
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8), options=grpc_options())
    server.add_generic_rpc_handlers((handler,))
    port = server.add_secure_port(
        f"{HOST}:0", TlsFiles.from_dir(pki / "coordinator").server_credentials()
    )
    server.start()
    port_file.write_text(f"{port}\n")
    server.wait_for_termination(timeout=seconds)
    server.stop(1.0)
    return 0


def client(pki: Path, port: int, sizes: list[int], repeat: int, out: Path) -> int:
    creds = TlsFiles.from_dir(pki / "nodes" / "n0000").channel_credentials()
    channel = grpc.secure_channel(f"{HOST}:{port}", creds, options=grpc_options())
    push = channel.stream_unary(METHOD, request_serializer=_ident, response_deserializer=_ident)
    chunk = bytes(DEFAULT_CHUNK_BYTES)

    def stream(total: int) -> Iterator[bytes]:
        left = total
        while left > 0:
            n = min(left, DEFAULT_CHUNK_BYTES)
            yield chunk if n == DEFAULT_CHUNK_BYTES else chunk[:n]
            left -= n

    def server_cpu() -> float:
        return float(struct.unpack("<d", push(iter(()), timeout=60)[8:])[0])

    push(stream(DEFAULT_CHUNK_BYTES), timeout=60)  # connect + handshake + warm-up
    results = []
    for size in sizes:
        times = []
        lo0 = loopback_bytes()
        cpu0, server0 = time.process_time(), server_cpu()
        for _ in range(repeat):
            t0 = time.perf_counter()
            got = int.from_bytes(push(stream(size), timeout=600)[:8], "little")
            times.append(time.perf_counter() - t0)
            assert got == size, (got, size)
        client_cpu, server_cpu_s = time.process_time() - cpu0, server_cpu() - server0
        lo_per_byte = (loopback_bytes() - lo0) / (size * repeat)
        best = min(times)
        results.append(
            {
                "bytes": size,
                "seconds": times,
                "best_s": best,
                "best_MBps": size / best / 1e6,
                "loopback_bytes_per_payload_byte": lo_per_byte,
                # both processes' CPU over all repeats, per GB moved
                "client_cpu_s_per_GB": client_cpu / (size * repeat / 1e9),
                "server_cpu_s_per_GB": server_cpu_s / (size * repeat / 1e9),
                "cpu_s_per_GB": (client_cpu + server_cpu_s) / (size * repeat / 1e9),
            }
        )
    write_json(out, {"results": results, "usage": usage()})
    channel.close()
    print(json.dumps(results))
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("mode", choices=["server", "client"])
    ap.add_argument("--pki", type=Path, required=True)
    ap.add_argument("--port-file", type=Path)
    ap.add_argument("--seconds", type=float, default=600.0)
    ap.add_argument("--port", type=int)
    ap.add_argument("--sizes", default="")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--out", type=Path)
    a = ap.parse_args()
    if a.mode == "server":
        assert a.port_file is not None
        return serve(a.pki, a.port_file, a.seconds)
    assert a.port is not None and a.out is not None
    return client(a.pki, a.port, [int(s) for s in a.sizes.split(",")], a.repeat, a.out)


if __name__ == "__main__":
    sys.exit(main())
