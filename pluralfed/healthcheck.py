"""A gRPC health check over mutual TLS, light enough for a container healthcheck.

    python3 -m pluralfed.healthcheck HOST:PORT TLS_DIR [SERVER_NAME]

Exits 0 when the service answers SERVING, 1 otherwise. Imports only grpc and the TLS helpers (no
torch), so it costs a fraction of a second. The health service is exempt from the allow-list, but
the TLS handshake still needs a client certificate of the federation's CA.
"""

from __future__ import annotations

import sys
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from pluralfed.tls import TlsFiles, secure_channel


def check(target: str, tls_dir: Path, server_name: str | None = None, timeout: float = 5.0) -> bool:
    with secure_channel(target, TlsFiles.from_dir(tls_dir), server_name_override=server_name) as ch:
        stub = health_pb2_grpc.HealthStub(ch)
        request = health_pb2.HealthCheckRequest(service="")
        reply = stub.Check(request, timeout=timeout)  # type: ignore[attr-defined]  # no stub
        return bool(reply.status == health_pb2.HealthCheckResponse.SERVING)


def main(argv: list[str]) -> int:
    if len(argv) not in (2, 3):
        print(__doc__, file=sys.stderr)
        return 2
    try:
        ok = check(argv[0], Path(argv[1]), argv[2] if len(argv) == 3 else None)
    except (grpc.RpcError, OSError, ValueError) as err:
        print(f"unhealthy: {err}", file=sys.stderr)
        return 1
    print("SERVING" if ok else "NOT SERVING")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
