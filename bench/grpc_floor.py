"""What a bare gRPC mutual-TLS server needs in memory to carry a federation's traffic.

Why: the systems benchmark's coordinator target (scenario C: peak RSS at most 4 x the model over
start-up, whatever the number of nodes) mixes two things: what pluralfed keeps (the running sums,
the new model, spooling) and what gRPC itself holds to move the bytes. This measures the second
alone. A minimal server in its own process, with the coordinator's gRPC server options, thread
pool and stream slots, plays the coordinator's traffic and nothing else: every node process holds a
long-poll call open, and in each round every node downloads the model (download-chunk messages, at
most 4 sends at once), adds a random delta to it as the systems bench's no-op nodes "train", and
uploads the result (upload-chunk messages, at most 4 read at once), which the server counts and
drops. No protobuf, no digest, no spool, no sums, no pluralfed code in
the path. The server reports its RSS when ready (model bytes in memory, no connection yet) and its
peak RSS at the end, like `bench/systems.py` does for the coordinator.

    .venv/bin/python bench/grpc_floor.py                  # writes bench/results/grpc_floor.*
    .venv/bin/python bench/grpc_floor.py --nodes 32 --upload-chunks 524288 --download-chunks 1048576

The server caps glibc's malloc arenas as the coordinator does (`limit_malloc_arenas`); set
MALLOC_ARENA_MAX in the environment to try another cap. `--servers threads,aio` also plays the
same traffic on gRPC's asyncio server (`grpc.aio`), to see whether the coordinator's threaded
server is what costs the memory:

    .venv/bin/python bench/grpc_floor.py --nodes 32 --servers threads,aio --out bench/results/grpc_floor_aio

The same bare server also bounds speed. Every row reports the round's uploads together in MB/s,
as `bench/systems.py` does for the coordinator, and `--raw` adds one raw client-streaming RPC
moving those bytes (`bench/raw_grpc.py`) to set them against: how much of the raw stream's
throughput can B's traffic (8 node processes, 25M parameters) reach through gRPC alone?

    .venv/bin/python bench/grpc_floor.py --nodes 8 --params 25000000 --rounds 5 \
        --upload-chunks 524288 --download-chunks 1048576 --repeat 3 --raw --out bench/results/grpc_floor_b
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import multiprocessing as mp
import os
import resource
import shlex
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import AsyncIterator, Iterator
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from sysbench_common import HOST, mtls_channel, node_ids, pki, rss_mib, wait_for_line, write_json

from coordinator.server import COORDINATOR_MALLOC_ARENAS, limit_malloc_arenas
from pluralfed.tls import TlsFiles
from pluralfed.transport import server_grpc_options

HERE = Path(__file__).resolve().parent
SERVICE = "bench.Floor"
DOWNLOAD_CHUNK = 1 << 20  # the coordinator's download chunk (pluralfed.wire.DEFAULT_CHUNK_BYTES)
SLOTS = 4  # the coordinator's default max_concurrent_uploads and max_concurrent_downloads


def _ident(b: bytes) -> bytes:
    return b


def _int(value: int) -> bytes:
    return value.to_bytes(8, "little")


class _Rounds:
    """Round state of the bare server: round r opens once every node has uploaded in round r-1.
    The caller holds its server's condition around `upload_done`."""

    def __init__(self, nodes: int, model_bytes: int, download_chunk: int) -> None:
        self.nodes = nodes
        self.download_chunk = download_chunk
        self.model = (
            np.random.default_rng(1).standard_normal(model_bytes // 4, np.float32).tobytes()
        )
        self.round = 0
        self.round_opened: list[float] = []  # when each round after the first opened
        self.uploads_done = 0

    def parts(self) -> Iterator[bytes]:
        for i in range(0, len(self.model), self.download_chunk):
            yield self.model[i : i + self.download_chunk]  # a fresh copy per message

    def upload_done(self) -> bool:
        """Count one upload; True when it completes the round (the next one is now open)."""
        self.uploads_done += 1
        if self.uploads_done < self.nodes:
            return False
        self.uploads_done = 0
        self.round += 1
        self.round_opened.append(time.time())
        return True

    def stats(self) -> bytes:
        """RSS, peak RSS and the median round (round 0 waits for node start-up: left out)."""
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        rounds = sorted(b - a for a, b in itertools.pairwise(self.round_opened))
        median = rounds[len(rounds) // 2] if rounds else float("nan")
        stats = {"rss_mib": rss_mib(), "peak_mib": peak, "round_s": median, "cpu_s": cpu_s()}
        return json.dumps(stats).encode()


class FloorServer(_Rounds):
    """The threaded server's handlers (the coordinator's kind of server)."""

    def __init__(self, nodes: int, model_bytes: int, download_chunk: int) -> None:
        super().__init__(nodes, model_bytes, download_chunk)
        self.cond = threading.Condition()
        self.down_slots = threading.Semaphore(SLOTS)
        self.up_slots = threading.Semaphore(SLOTS)

    def poll(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        """Long-poll: returns once the round the node asks for is open (as GetTask waits)."""
        wanted = int.from_bytes(request, "little")
        with self.cond:
            self.cond.wait_for(lambda: self.round >= wanted, timeout=60)
            return _int(self.round)

    def down(self, request: bytes, context: grpc.ServicerContext) -> Iterator[bytes]:
        with self.down_slots:
            yield from self.parts()

    def up(self, requests: Iterator[bytes], context: grpc.ServicerContext) -> bytes:
        with self.up_slots:
            got = sum(len(m) for m in requests)
        with self.cond:
            if self.upload_done():
                self.cond.notify_all()
        return _int(got)

    def stats_rpc(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        return self.stats()


class AioFloorServer(_Rounds):
    """The same rounds on gRPC's asyncio server: one event loop instead of a thread per RPC."""

    def __init__(self, nodes: int, model_bytes: int, download_chunk: int) -> None:
        super().__init__(nodes, model_bytes, download_chunk)
        self.cond = asyncio.Condition()
        self.down_slots = asyncio.Semaphore(SLOTS)
        self.up_slots = asyncio.Semaphore(SLOTS)

    async def poll(self, request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        wanted = int.from_bytes(request, "little")
        async with self.cond:
            with contextlib.suppress(TimeoutError):  # as the threaded poll: the node asks again
                await asyncio.wait_for(self.cond.wait_for(lambda: self.round >= wanted), 60)
            return _int(self.round)

    async def down(self, request: bytes, context: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
        async with self.down_slots:
            for part in self.parts():
                yield part

    async def up(self, requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext) -> bytes:
        async with self.up_slots:
            got = 0
            async for m in requests:
                got += len(m)
        async with self.cond:
            if self.upload_done():
                self.cond.notify_all()
        return _int(got)

    async def stats_rpc(self, request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        return self.stats()


def _handler(state: FloorServer | AioFloorServer) -> grpc.GenericRpcHandler:
    """The bench service's four methods, raw bytes in and out, for either kind of server."""
    return grpc.method_handlers_generic_handler(
        SERVICE,
        {
            "Poll": grpc.unary_unary_rpc_method_handler(state.poll, _ident, _ident),
            "Down": grpc.unary_stream_rpc_method_handler(state.down, _ident, _ident),
            "Up": grpc.stream_unary_rpc_method_handler(state.up, _ident, _ident),
            "Stats": grpc.unary_unary_rpc_method_handler(state.stats_rpc, _ident, _ident),
        },
    )


async def _serve_aio(pki_dir: Path, port_file: Path, state: AioFloorServer) -> None:
    handler = _handler(state)
    server = grpc.aio.server(options=server_grpc_options())
    server.add_generic_rpc_handlers((handler,))
    port = server.add_secure_port(
        f"{HOST}:0", TlsFiles.from_dir(pki_dir / "coordinator").server_credentials()
    )
    await server.start()
    await asyncio.sleep(0.5)
    ready = {"port": port, "ready_rss_mib": rss_mib(), "ready_cpu_s": cpu_s()}
    port_file.write_text(json.dumps(ready) + "\n")
    await server.wait_for_termination(timeout=900)


def serve(
    pki_dir: Path,
    port_file: Path,
    nodes: int,
    model_bytes: int,
    download_chunk: int,
    kind: str = "threads",
) -> int:
    limit_malloc_arenas()  # the coordinator's allocator setting, unless MALLOC_ARENA_MAX is set
    if kind == "aio":

        async def run() -> None:
            # built inside the loop: asyncio's primitives belong to the loop that runs them
            aio_state = AioFloorServer(nodes, model_bytes, download_chunk)
            await _serve_aio(pki_dir, port_file, aio_state)

        asyncio.run(run())
        return 0
    state = FloorServer(nodes, model_bytes, download_chunk)
    handler = _handler(state)
    workers = 2 * nodes + 32  # as bench/bench_coordinator.py sizes the coordinator's pool
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=workers),
        options=server_grpc_options(),
        maximum_concurrent_rpcs=workers * 4,
    )
    server.add_generic_rpc_handlers((handler,))
    port = server.add_secure_port(
        f"{HOST}:0", TlsFiles.from_dir(pki_dir / "coordinator").server_credentials()
    )
    server.start()
    time.sleep(0.5)
    ready = {"port": port, "ready_rss_mib": rss_mib(), "ready_cpu_s": cpu_s()}
    port_file.write_text(json.dumps(ready) + "\n")
    server.wait_for_termination(timeout=900)
    return 0


def node(folder: Path, port: int, rounds: int, model_bytes: int, chunk: int, out: Any) -> None:
    """One node process: per round, wait for it, download the model, add a random delta to it (as
    the systems bench's no-op node "trains"), upload the result."""
    channel = mtls_channel(folder, port)
    poll = channel.unary_unary(f"/{SERVICE}/Poll", _ident, _ident)
    down = channel.unary_stream(f"/{SERVICE}/Down", _ident, _ident)
    up = channel.stream_unary(f"/{SERVICE}/Up", _ident, _ident)
    delta = np.random.default_rng(0).standard_normal(model_bytes // 4, np.float32) * 1e-3
    # (round, start, end) of each upload, as the systems bench's nodes time theirs
    uploads: list[tuple[int, float, float]] = []
    started_cpu = cpu_s()
    for r in range(rounds):
        while int.from_bytes(poll(_int(r), timeout=120), "little") < r:
            pass
        got = b"".join(down(b"", timeout=120))
        if len(got) != model_bytes:
            raise RuntimeError(f"downloaded {len(got)} bytes, expected {model_bytes}")
        payload = (np.frombuffer(got, np.float32) + delta).tobytes()
        del got
        parts = (payload[i : i + chunk] for i in range(0, model_bytes, chunk))
        up_start = time.time()
        sent = int.from_bytes(up(parts, timeout=120), "little")
        uploads.append((r, up_start, time.time()))
        if sent != model_bytes:
            raise RuntimeError(f"server counted {sent} uploaded bytes, expected {model_bytes}")
    channel.close()
    out.put({"uploads": uploads, "cpu_s": cpu_s() - started_cpu})


def measure(
    pki_dir: Path,
    nodes: int,
    params: int,
    rounds: int,
    chunk: int,
    download_chunk: int,
    kind: str = "threads",
) -> dict[str, Any]:
    model_bytes = 4 * params
    ids = node_ids(nodes + 1)
    load = [round(x, 2) for x in os.getloadavg()]
    with tempfile.TemporaryDirectory() as tmp:
        port_file = Path(tmp) / "port"
        argv = [sys.executable, __file__, "server", "--pki", str(pki_dir)]
        argv += ["--port-file", str(port_file), "--nodes", str(nodes), "--params", str(params)]
        argv += ["--download-chunk", str(download_chunk), "--servers", kind]
        server = subprocess.Popen(argv)
        try:
            started = json.loads(wait_for_line(port_file, server, "floor server"))
            port = started["port"]
            ctx = mp.get_context("spawn")
            done: Any = ctx.Queue()
            procs = [
                ctx.Process(
                    target=node,
                    args=(pki_dir / "nodes" / nid, port, rounds, model_bytes, chunk, done),
                )
                for nid in ids[1:]
            ]
            for p in procs:
                p.start()
            for p in procs:
                p.join(timeout=600)
            if any(p.exitcode != 0 for p in procs):
                raise RuntimeError(f"node exit codes {[p.exitcode for p in procs]}")
            reports = [done.get(timeout=5) for _ in procs]
            uploads = [r["uploads"] for r in reports]
            if [len(u) for u in uploads] != [rounds] * nodes:
                raise RuntimeError("not every node finished every round")
            probe = mtls_channel(pki_dir / "nodes" / ids[0], port)
            stats = json.loads(probe.unary_unary(f"/{SERVICE}/Stats", _ident, _ident)(b""))
            probe.close()
        finally:
            server.kill()
            server.wait()
    ready = started["ready_rss_mib"]
    return {
        "server": kind,
        "nodes": nodes,
        "params": params,
        "model_mib": round(model_bytes / 2**20, 2),
        "rounds": rounds,
        "upload_chunk_bytes": chunk,
        "download_chunk_bytes": download_chunk,
        "malloc_arenas": os.environ.get("MALLOC_ARENA_MAX") or COORDINATOR_MALLOC_ARENAS,
        "ready_rss_mib": round(ready, 1),
        "peak_over_ready_mib": round(stats["peak_mib"] - ready, 1),
        "end_over_ready_mib": round(stats["rss_mib"] - ready, 1),
        "bound_4x_model_mib": round(4 * model_bytes / 2**20, 1),
        "round_s_median": round(stats["round_s"], 3),
        "upload_MBps_aggregate_median": round(aggregate_upload_rate(uploads, model_bytes) / 1e6, 1),
        # the server's CPU from ready to the end and every node's over its rounds, per round
        # (as `bench/systems.py`'s "CPU s/round (all)")
        "cpu_s_per_round": round(
            (stats["cpu_s"] - started["ready_cpu_s"] + sum(r["cpu_s"] for r in reports)) / rounds,
            2,
        ),
        "load_before": load,
    }


def cpu_s() -> float:
    """This process's CPU time so far (user + system), seconds."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def aggregate_upload_rate(uploads: list[list[tuple[int, float, float]]], model_bytes: int) -> float:
    """Bytes per second of a round's uploads together, from the first upload's start to the last
    one's end (median over the rounds), as `bench/systems.py` measures the coordinator's."""
    spans: dict[int, list[tuple[float, float]]] = {}
    for node_uploads in uploads:
        for r, start, end in node_uploads:
            spans.setdefault(r, []).append((start, end))
    rates = [
        len(s) * model_bytes / (max(e for _, e in s) - min(b for b, _ in s)) for s in spans.values()
    ]
    return statistics.median(rates) if rates else float("nan")


def with_raw_stream(row: dict[str, Any], pki_dir: Path, upload_bytes: int) -> None:
    """Add to `row` one raw client-streaming RPC's throughput for the round's upload bytes
    (`bench/raw_grpc.py`, best of 3, as `bench/systems.py` runs it) and the uploads' fraction."""
    from systems import run_raw  # the systems bench's raw stream, on the same certificates

    with tempfile.TemporaryDirectory() as work:
        best = run_raw(Path(work), pki_dir, [upload_bytes], timeout=600)[upload_bytes]["best_MBps"]
    row["raw_MBps_round_uploads"] = round(best, 1)
    row["upload_frac_of_raw"] = row["upload_MBps_aggregate_median"] / best


def markdown(rows: list[dict[str, Any]], command: str) -> str:
    lines = [
        "# A bare gRPC mutual-TLS server carrying a federation's traffic",
        "",
        f"Command: `{command}` (see its docstring). The server holds "
        "the model's bytes, keeps one long-poll call per node open, sends the model to every "
        "node in download-chunk messages; each node adds a random delta and uploads the result in "
        f"upload-chunk messages, which the server counts and drops; at most {SLOTS} sends and {SLOTS} reads at once; "
        "coordinator's gRPC server options and thread pool; one process per node. Peak and "
        "end RSS are over the server's RSS when ready; round time is the median from one round's "
        "opening to the next, the first round (node start-up) left out.",
        "",
        "Upload MB/s is a round's uploads together, from the first one's start to the last "
        "one's end (median over the rounds), as `bench/systems.py` measures the coordinator's; "
        "with `--raw`, over one raw client-streaming RPC moving the round's upload bytes "
        "(`bench/raw_grpc.py`, best of 3), run right after each row.",
        "",
        "| server | nodes | model MiB | download chunk | upload chunk | malloc arenas | peak - ready MiB "
        "| end - ready MiB | 4 x model MiB | round s (median) | upload MB/s (agg) | raw MB/s "
        "| upload / raw | CPU s/round (all) | load before |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        frac = r.get("upload_frac_of_raw")
        lines.append(
            f"| {r.get('server', 'threads')} | {r['nodes']} | {r['model_mib']} "
            f"| {r['download_chunk_bytes'] // 1024} KiB "
            f"| {r['upload_chunk_bytes'] // 1024} KiB "
            f"| {r['malloc_arenas']} | {r['peak_over_ready_mib']} | {r['end_over_ready_mib']} "
            f"| {r['bound_4x_model_mib']} | {r['round_s_median']} "
            f"| {r.get('upload_MBps_aggregate_median', '-')} "
            f"| {r.get('raw_MBps_round_uploads', '-')} "
            f"| {'-' if frac is None else f'{frac:.2f}'} "
            f"| {r.get('cpu_s_per_round', '-')} "
            f"| {'/'.join(f'{x:.1f}' for x in r['load_before'])} |"
        )
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("mode", nargs="?", default="run", choices=["run", "server"])
    ap.add_argument("--pki", type=Path, default=Path(tempfile.gettempdir()) / "pluralfed-floor")
    ap.add_argument("--port-file", type=Path)
    ap.add_argument("--nodes", default="8,32", help="comma-separated node counts")
    ap.add_argument("--params", type=int, default=1_200_000, help="float32 parameters")
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--upload-chunks", default="65536,131072,524288", help="bytes, comma-separated")
    ap.add_argument(
        "--download-chunks",
        default=f"{DOWNLOAD_CHUNK},65536",
        help="bytes, comma-separated (the coordinator's: 1 MiB)",
    )
    ap.add_argument(
        "--servers",
        default="threads",
        help="comma-separated gRPC servers to try: threads (the coordinator's), aio",
    )
    ap.add_argument("--download-chunk", type=int, help=argparse.SUPPRESS)  # server mode
    ap.add_argument("--repeat", type=int, default=1, help="runs of each setting (rows)")
    ap.add_argument(
        "--raw",
        action="store_true",
        help="also time one raw client-streaming RPC moving a round's upload bytes "
        "(bench/raw_grpc.py) and report the uploads as a fraction of it",
    )
    ap.add_argument("--out", type=Path, default=HERE / "results" / "grpc_floor")
    a = ap.parse_args()
    if a.mode == "run" and (a.download_chunk is not None or a.port_file is not None):
        ap.error(
            "--download-chunk and --port-file are for server mode; did you mean --download-chunks?"
        )
    if a.mode == "server":
        if a.port_file is None or a.download_chunk is None:
            ap.error("server mode needs --port-file and --download-chunk")
        return serve(a.pki, a.port_file, int(a.nodes), 4 * a.params, a.download_chunk, a.servers)
    counts = [int(n) for n in a.nodes.split(",")]
    chunks = [int(c) for c in a.upload_chunks.split(",")]
    downloads = [int(c) for c in a.download_chunks.split(",")]
    kinds = a.servers.split(",")
    if not set(kinds) <= {"threads", "aio"}:
        ap.error(f"--servers: threads and/or aio, got {a.servers!r}")
    pki(a.pki, node_ids(max(counts) + 1))
    rows = []
    for n in counts:
        for down in downloads:
            for chunk in chunks:
                for kind in kinds:
                    for _ in range(a.repeat):
                        row = measure(a.pki, n, a.params, a.rounds, chunk, down, kind)
                        if a.raw:  # right after each row: the raw stream varies from run to run
                            with_raw_stream(row, a.pki, 4 * a.params * n)
                        rows.append(row)
                        print(json.dumps(row), flush=True)
    command = shlex.join([".venv/bin/python", "bench/grpc_floor.py", *sys.argv[1:]])
    write_json(a.out.with_suffix(".json"), {"command": command, "rows": rows})
    a.out.with_suffix(".md").write_text(markdown(rows, command))
    print(markdown(rows, command))
    return 0


if __name__ == "__main__":
    sys.exit(main())
