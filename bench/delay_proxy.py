"""A TCP proxy that delays every byte by a fixed time each way: a link with latency, for
benchmarks on one machine (this machine's kernel has no netem).

    python bench/delay_proxy.py --target-port P --one-way-ms 25 --port-file F

Bytes are forwarded unchanged (TLS passes through) and in order, each read delivered
`--one-way-ms` after it was read; the proxy adds no bandwidth limit and buffers what is in
flight, so what limits a stream through it is what limits one over a real long link: the
round trip and the flow-control windows at both ends.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
from pathlib import Path

HOST = "127.0.0.1"
READ_BYTES = 64 * 1024


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, delay_s: float) -> None:
    loop = asyncio.get_running_loop()
    in_flight: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()

    async def read() -> None:
        while True:
            data = await reader.read(READ_BYTES)
            await in_flight.put((loop.time() + delay_s, data))
            if not data:
                return

    async def write() -> None:
        while True:
            due, data = await in_flight.get()
            wait = due - loop.time()
            if wait > 0:
                await asyncio.sleep(wait)
            if not data:
                with contextlib.suppress(OSError):
                    writer.write_eof()
                return
            writer.write(data)
            await writer.drain()

    try:
        await asyncio.gather(read(), write())
    except (ConnectionError, OSError):
        pass
    finally:
        writer.close()


async def serve(target_port: int, delay_s: float, port_file: Path) -> None:
    async def handle(client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        try:
            server_r, server_w = await asyncio.open_connection(HOST, target_port)
        except OSError:
            client_w.close()
            return
        await asyncio.gather(
            _pipe(client_r, server_w, delay_s),
            _pipe(server_r, client_w, delay_s),
            return_exceptions=True,
        )

    server = await asyncio.start_server(handle, HOST, 0)
    port = server.sockets[0].getsockname()[1]
    port_file.write_text(f"{port}\n")
    async with server:
        await server.serve_forever()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--target-port", type=int, required=True)
    ap.add_argument("--one-way-ms", type=float, required=True)
    ap.add_argument("--port-file", type=Path, required=True)
    args = ap.parse_args()
    asyncio.run(serve(args.target_port, args.one_way_ms / 1000.0, args.port_file))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
