"""What the systems benchmark's processes share: the synthetic model, the PKI, process accounting.

Imports neither torch nor anything of pluralfed that does, so that node processes stay light.
"""

from __future__ import annotations

import json
import os
import resource
import time
from pathlib import Path
from typing import Any

import numpy as np

HOST = "127.0.0.1"
ENCODER_ID = "bench/no-encoder"
MATRIX = 512  # the synthetic model: 512x512 float32 matrices plus one remainder vector


def synthetic_model(params: int, seed: int = 0) -> dict[str, np.ndarray]:
    """`params` float32 parameters as 512x512 matrices plus a remainder vector (like a model's
    state dict: many medium tensors), small random values."""
    rng = np.random.default_rng(seed)
    out: dict[str, np.ndarray] = {}
    per = MATRIX * MATRIX
    for i in range(params // per):
        out[f"layer{i:03d}.weight"] = (rng.standard_normal((MATRIX, MATRIX)) * 0.02).astype(
            np.float32
        )
    rest = params % per
    if rest:
        out["head.bias"] = np.zeros(rest, np.float32)
    return out


def pki(root: Path, node_ids: list[str]) -> dict[str, Path]:
    """CA, coordinator certificate (127.0.0.1, localhost) and one certificate per node id, made
    once and reused. Returns the folders: 'ca', 'coordinator' and one per node id."""
    from pluralfed import tls  # light: cryptography + grpc
    from pluralfed.pki import create_ca, issue_node_cert, issue_server_cert

    root.mkdir(parents=True, exist_ok=True)
    ca, server = root / "ca", root / "coordinator"
    if not (ca / tls.CA_CERT_FILE).exists():
        create_ca(ca, common_name="pluralfed bench CA")
    if not (server / tls.CERT_FILE).exists():
        issue_server_cert(ca, server, "coordinator", ["localhost", HOST])
    folders = {"ca": ca, "coordinator": server}
    for nid in node_ids:
        out = root / "nodes" / nid
        if not (out / tls.CERT_FILE).exists():
            issue_node_cert(ca, out, nid)
        folders[nid] = out
    return folders


def node_ids(n: int) -> list[str]:
    return [f"n{i:04d}" for i in range(n)]


def proc_io() -> dict[str, int]:
    """/proc/self/io: rchar/wchar count every read/write syscall, sockets included."""
    out: dict[str, int] = {}
    try:
        for line in Path("/proc/self/io").read_text().splitlines():
            k, v = line.split(":")
            out[k.strip()] = int(v)
    except OSError:
        pass
    return out


def loopback_bytes() -> int:
    """Bytes sent over the loopback interface, machine-wide (/proc/net/dev, TX): what crossed
    the "wire" including TCP/IP, TLS, HTTP/2 and protobuf framing. Other loopback users count
    too."""
    try:
        for line in Path("/proc/net/dev").read_text().splitlines():
            name, _, rest = line.partition(":")
            if name.strip() == "lo":
                return int(rest.split()[8])
    except (OSError, IndexError, ValueError):
        pass
    return -1


def rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def proc_status(pid: int) -> dict[str, float] | None:
    """Another process's RSS and peak RSS (VmHWM) in MiB, CPU seconds (user + system), threads
    and open file descriptors, read from /proc; None once it has exited."""
    try:
        status: dict[str, str] = {}
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            key, _, value = line.partition(":")
            status[key] = value
        # the fields after the command name, which may hold spaces and parentheses
        stat = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        fds = len(os.listdir(f"/proc/{pid}/fd"))
    except (OSError, ValueError):
        return None
    if "VmRSS" not in status:  # a zombie: exited, not yet reaped
        return None
    return {
        "rss_mib": int(status["VmRSS"].split()[0]) / 1024,
        "hwm_mib": int(status["VmHWM"].split()[0]) / 1024,
        "cpu_s": (int(stat[11]) + int(stat[12])) / os.sysconf("SC_CLK_TCK"),
        "threads": int(status["Threads"]),
        "fds": fds,
    }


def usage() -> dict[str, Any]:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return {
        "time": time.time(),
        "utime": ru.ru_utime,
        "stime": ru.ru_stime,
        "maxrss_mib": ru.ru_maxrss / 1024,
        "rss_mib": rss_mib(),
        "io": proc_io(),
        "lo_tx": loopback_bytes(),
        "threads": len(os.listdir("/proc/self/task")),
    }


def write_json(path: Path, data: Any) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
    tmp.replace(path)


def wait_for_line(path: Path, process: Any, what: str, timeout: float = 60.0) -> str:
    """The text of `path` once `process` (a subprocess.Popen) has written it whole, ending in a
    newline; RuntimeError if the process exits or `timeout` seconds pass first."""
    deadline = time.time() + timeout
    while not path.exists() or not path.read_text().endswith("\n"):
        if process.poll() is not None or time.time() > deadline:
            raise RuntimeError(f"{what} did not start (exit {process.poll()})")
        time.sleep(0.05)
    return path.read_text()


def mtls_channel(folder: Path, port: int) -> Any:
    """A mutual-TLS gRPC channel to 127.0.0.1:port with the node certificate in `folder` and the
    nodes' channel options (imported here, so node processes that never call it stay light)."""
    import grpc

    from pluralfed.tls import TlsFiles
    from pluralfed.transport import grpc_options

    creds = TlsFiles.from_dir(folder).channel_credentials()
    return grpc.secure_channel(f"{HOST}:{port}", creds, options=grpc_options())
