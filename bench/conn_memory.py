"""How much memory a gRPC mutual-TLS server keeps per connection after uploads (systems bench C).

Why: in the systems benchmark the coordinator's peak memory grows by about one upload chunk per
node, whatever the number of uploads read at once. This isolates that from pluralfed: a tiny
generic server (raw byte messages, no protobuf, no spooling, no FedAvg) in its own process; N
client connections each upload 20 messages of S bytes, one connection after the other, never two
at once; then the server's RSS is read (over one more RPC) after the uploads, after the clients
close their connections, and after glibc's malloc_trim(0). Server options are either the
coordinator's (`server_grpc_options`: no BDP probing, 64 KiB stream window) or gRPC's defaults
with the same message limits (`grpc_options`).

    .venv/bin/python bench/conn_memory.py                    # writes bench/results/conn_memory.*
    .venv/bin/python bench/conn_memory.py --sizes 524288 --connections 32

Growth that stays after the uploads and goes away once the connections close is held by the
connections themselves (gRPC core), not by any Python object.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc

sys.path.insert(0, str(Path(__file__).resolve().parent))

from sysbench_common import HOST, mtls_channel, node_ids, pki, rss_mib, wait_for_line, write_json

from pluralfed.tls import TlsFiles
from pluralfed.transport import grpc_options, server_grpc_options

HERE = Path(__file__).resolve().parent
SERVICE = "bench.ConnMemory"
MESSAGES_PER_UPLOAD = 20
OPTION_SETS: dict[str, Callable[[], list[tuple[str, int]]]] = {
    "coordinator": server_grpc_options,
    "grpc-default": grpc_options,
}


def _ident(b: bytes) -> bytes:
    return b


def serve(pki_dir: Path, port_file: Path, options: str, seconds: float) -> int:
    """The server process: Up (count the bytes), Rss (RSS in KiB), Trim (malloc_trim)."""

    def up(requests: Iterator[bytes], context: grpc.ServicerContext) -> bytes:
        return sum(len(m) for m in requests).to_bytes(8, "little")

    def rss(request: bytes, context: grpc.ServicerContext) -> bytes:
        return int(rss_mib() * 1024).to_bytes(8, "little")

    def trim(request: bytes, context: grpc.ServicerContext) -> bytes:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        return b""

    handler = grpc.method_handlers_generic_handler(
        SERVICE,
        {
            "Up": grpc.stream_unary_rpc_method_handler(up, _ident, _ident),
            "Rss": grpc.unary_unary_rpc_method_handler(rss, _ident, _ident),
            "Trim": grpc.unary_unary_rpc_method_handler(trim, _ident, _ident),
        },
    )
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8), options=OPTION_SETS[options]())
    server.add_generic_rpc_handlers((handler,))
    creds = TlsFiles.from_dir(pki_dir / "coordinator").server_credentials()
    port = server.add_secure_port(f"{HOST}:0", creds)
    server.start()
    port_file.write_text(f"{port}\n")
    server.wait_for_termination(timeout=seconds)
    server.stop(1.0)
    return 0


def measure(pki_dir: Path, options: str, message_bytes: int, connections: int) -> dict[str, Any]:
    """Start a server, upload over `connections` connections one after the other, read its RSS."""
    with tempfile.TemporaryDirectory() as tmp:
        port_file = Path(tmp) / "port"
        argv = [sys.executable, __file__, "server", "--pki", str(pki_dir)]
        argv += ["--port-file", str(port_file), "--options", options]
        server = subprocess.Popen(argv)
        try:
            port = int(wait_for_line(port_file, server, "conn_memory server"))
            ids = node_ids(connections + 1)
            probe = mtls_channel(pki_dir / "nodes" / ids[0], port)

            def server_mib(method: str = "Rss") -> float:
                call = probe.unary_unary(f"/{SERVICE}/{method}", _ident, _ident)
                return int.from_bytes(call(b"", timeout=30), "little") / 1024

            channels = [mtls_channel(pki_dir / "nodes" / nid, port) for nid in ids[1:]]
            for ch in channels:
                grpc.channel_ready_future(ch).result(timeout=30)
            time.sleep(0.5)
            start = server_mib()
            message = bytes(message_bytes)
            for ch in channels:
                upload = ch.stream_unary(f"/{SERVICE}/Up", _ident, _ident)
                got = int.from_bytes(
                    upload(iter([message] * MESSAGES_PER_UPLOAD), timeout=120), "little"
                )
                if got != message_bytes * MESSAGES_PER_UPLOAD:
                    raise RuntimeError(f"server counted {got} bytes")
            time.sleep(0.5)
            after_uploads = server_mib()
            for ch in channels:
                ch.close()
            time.sleep(1.0)
            after_close = server_mib()
            server_mib("Trim")
            after_trim = server_mib()
            probe.close()
        finally:
            server.kill()
            server.wait()
    return {
        "options": options,
        "message_bytes": message_bytes,
        "connections": connections,
        "server_rss_start_mib": round(start, 1),
        "after_uploads_mib": round(after_uploads - start, 1),
        "after_close_mib": round(after_close - start, 1),
        "after_close_and_trim_mib": round(after_trim - start, 1),
    }


def markdown(rows: list[dict[str, Any]]) -> str:
    lines = [
        "# Server memory kept per gRPC mutual-TLS connection after uploads",
        "",
        f"Command: `.venv/bin/python bench/conn_memory.py`. Each connection uploads "
        f"{MESSAGES_PER_UPLOAD} messages, one connection at a time; growth of the server's RSS "
        "over its RSS with all connections open and idle; 'per added connection' is the growth over "
        "the row above divided by the connections added.",
        "",
        "| server options | message | connections | after uploads MiB | KiB per added connection "
        "| after close MiB | after close + malloc_trim MiB |",
        "|---|---|---|---|---|---|---|",
    ]
    previous: dict[tuple[str, int], dict[str, Any]] = {}
    for r in rows:
        key = (r["options"], r["message_bytes"])
        before = previous.get(key)
        slope = ""
        if before is not None and r["connections"] > before["connections"]:
            grown_kib = (r["after_uploads_mib"] - before["after_uploads_mib"]) * 1024
            slope = f"{grown_kib / (r['connections'] - before['connections']):.0f}"
        previous[key] = r
        lines.append(
            f"| {r['options']} | {r['message_bytes'] // 1024} KiB | {r['connections']} "
            f"| {r['after_uploads_mib']} | {slope} | {r['after_close_mib']} "
            f"| {r['after_close_and_trim_mib']} |"
        )
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("mode", nargs="?", default="run", choices=["run", "server"])
    ap.add_argument("--pki", type=Path, default=Path(tempfile.gettempdir()) / "pluralfed-connmem")
    ap.add_argument("--port-file", type=Path)
    ap.add_argument("--options", default="coordinator", choices=sorted(OPTION_SETS))
    ap.add_argument("--seconds", type=float, default=600.0)
    ap.add_argument("--sizes", default="65536,524288,1048576", help="message sizes, bytes")
    ap.add_argument("--connections", default="1,8,32")
    ap.add_argument("--out", type=Path, default=HERE / "results" / "conn_memory")
    a = ap.parse_args()
    if a.mode == "server":
        if a.port_file is None:
            ap.error("server mode needs --port-file")
        return serve(a.pki, a.port_file, a.options, a.seconds)
    sizes = [int(s) for s in a.sizes.split(",")]
    counts = [int(c) for c in a.connections.split(",")]
    pki(a.pki, node_ids(max(counts) + 1))
    rows = []
    for options in OPTION_SETS:
        for size in sizes:
            for n in counts:
                rows.append(measure(a.pki, options, size, n))
                print(json.dumps(rows[-1]), flush=True)
    write_json(a.out.with_suffix(".json"), {"rows": rows})
    a.out.with_suffix(".md").write_text(markdown(rows))
    print(markdown(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
