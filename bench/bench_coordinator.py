"""The pluralfed coordinator for the systems benchmark: the real RoundEngine and gRPC server
(mutual TLS, streaming FedAvg, spooling, checkpoint every round) over a synthetic float32 model
of any size, instead of the GPO model `coordinator.service` builds with torch.

    python bench/bench_coordinator.py --params 1200000 --nodes 8 --rounds 20 \
        --pki DIR --state-dir DIR --out results.json

Writes state-dir/coordinator.port once listening, and --out (round records, CPU, RSS) at the end.
"""

from __future__ import annotations

import argparse
import logging
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from sysbench_common import ENCODER_ID, HOST, node_ids, synthetic_model, usage, write_json

before_imports = usage()

from coordinator.rounds import RoundEngine  # noqa: E402
from coordinator.server import (  # noqa: E402
    DEFAULT_MAX_CONCURRENT_DOWNLOADS,
    DEFAULT_MAX_CONCURRENT_UPLOADS,
    limit_malloc_arenas,
    start_server,
)
from coordinator.settings import RoundSettings  # noqa: E402
from pluralfed.auth import AllowList  # noqa: E402
from pluralfed.tls import TlsFiles  # noqa: E402
from pluralfed.transport import (  # noqa: E402
    DEFAULT_UPLOAD_CHUNK_BYTES,
    SERVER_STREAM_WINDOW_BYTES,
)
from pluralfed.wire import DEFAULT_CHUNK_BYTES  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--params", type=int, required=True)
    ap.add_argument("--nodes", type=int, required=True)
    ap.add_argument("--rounds", type=int, required=True)
    ap.add_argument("--pki", type=Path, required=True)
    ap.add_argument("--state-dir", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--max-workers", type=int, default=0, help="0: 2 x nodes + 32")
    ap.add_argument("--round-timeout", type=float, default=600.0)
    ap.add_argument("--session-timeout", type=float, default=120.0)
    ap.add_argument("--linger", type=float, default=20.0)
    ap.add_argument(
        "--max-concurrent-uploads",
        type=int,
        default=DEFAULT_MAX_CONCURRENT_UPLOADS,
        help="updates read at once (0: no bound)",
    )
    ap.add_argument(
        "--max-concurrent-downloads",
        type=int,
        default=DEFAULT_MAX_CONCURRENT_DOWNLOADS,
        help="models sent at once (0: no bound)",
    )
    ap.add_argument(
        "--upload-chunk-bytes",
        type=int,
        default=DEFAULT_UPLOAD_CHUNK_BYTES,
        help="largest upload chunk, told to nodes in Join",
    )
    ap.add_argument(
        "--download-chunk-bytes",
        type=int,
        default=DEFAULT_CHUNK_BYTES,
        help="largest tensor part per download message",
    )
    ap.add_argument(
        "--upload-window-bytes",
        type=int,
        default=SERVER_STREAM_WINDOW_BYTES,
        help="gRPC receive window per upload stream",
    )
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(message)s")
    after_imports = usage()
    weights = synthetic_model(args.params)
    settings = RoundSettings(
        rounds=args.rounds,
        min_nodes=args.nodes,
        min_updates=args.nodes,
        round_timeout_s=args.round_timeout,
        eval_timeout_s=args.round_timeout,
        eval_every=0,  # the engine still evaluates once after the last round (no download)
        weighting="uniform",
        session_timeout_s=args.session_timeout,
        heartbeat_interval_s=5.0,
        quorum_timeout_s=600.0,
    )
    engine = RoundEngine(settings, weights, args.state_dir, ENCODER_ID, {"bench": "synthetic"})
    del weights
    ids = node_ids(args.nodes)
    allow = AllowList({i: i for i in ids}, source="bench")
    workers = args.max_workers or 2 * args.nodes + 32
    limit_malloc_arenas()  # as the coordinator process does
    server, port = start_server(
        engine,
        f"{HOST}:0",
        TlsFiles.from_dir(args.pki / "coordinator"),
        allow,
        workers,
        upload_slots=args.max_concurrent_uploads,
        upload_chunk_bytes=args.upload_chunk_bytes,
        download_slots=args.max_concurrent_downloads,
        download_chunk_bytes=args.download_chunk_bytes,
        upload_window_bytes=args.upload_window_bytes,
    )
    (args.state_dir / "coordinator.port").write_text(f"{port}\n")
    ready = usage()
    driver = threading.Thread(target=engine.run, name="rounds", daemon=True)
    driver.start()
    driver.join()
    done = usage()
    linger_until = time.time() + args.linger
    while engine.live_sessions() and time.time() < linger_until:
        time.sleep(0.2)
    server.stop(grace=2.0).wait()
    end = usage()
    history = [
        {k: v for k, v in r.items() if k not in ("node_metrics", "outcomes", "selected")}
        | {"n_selected": len(r["selected"]), "n_participants": len(r["participants"])}
        for r in engine.state.history.records()
    ]
    for r in history:
        r.pop("participants")
    write_json(
        args.out,
        {
            "done": engine.done,
            "rounds": engine.state.completed_rounds,
            "max_workers": workers,
            "max_concurrent_uploads": args.max_concurrent_uploads,
            "upload_chunk_bytes": args.upload_chunk_bytes,
            "download_chunk_bytes": args.download_chunk_bytes,
            "upload_window_bytes": args.upload_window_bytes,
            "max_concurrent_downloads": args.max_concurrent_downloads,
            "model_bytes": sum(s.nbytes for s in engine.specs),
            "tensors": len(engine.specs),
            "history": history,
            "usage": {
                "before_imports": before_imports,
                "after_imports": after_imports,
                "ready": ready,
                "rounds_done": done,
                "end": end,
            },
        },
    )
    return 0 if engine.done else 1


if __name__ == "__main__":
    sys.exit(main())
