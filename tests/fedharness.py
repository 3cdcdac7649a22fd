"""Helpers for the federation's integration tests: real processes, real sockets, real mutual TLS,
all on 127.0.0.1.

- `Procs` starts coordinator and node processes (`python -m pluralfed.cli ...`), each logging to
  its own file, and stops every one of them (by its pid) at teardown, whatever happened.
- `start_coordinator` / `start_node` write the TOML configs a deployment would use and start the
  services; `Coordinator` reads what a running coordinator writes (port, metrics.jsonl, state).
- `wait_until` is the only way to wait: every wait is bounded and a timeout fails the test with
  the tail of the relevant processes' logs.
- `FakeNode` is a lightweight in-process node that speaks the protocol with the generated stubs,
  and `update_messages` builds upload streams, well-formed or deliberately broken.

Timeouts that only guard against hangs scale with $PLURALFED_TEST_SLOWDOWN (default 1) for slow
machines; deadlines a test measures do not.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Protocol, TypeVar, cast

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from pluralfed import tls
from pluralfed.data import SurveyData, write_group_files
from pluralfed.localfed import child_env, node_id, write_toml
from pluralfed.pki import create_ca, issue_node_cert, issue_server_cert
from pluralfed.proto.pluralfed.v1 import federation_pb2 as pb
from pluralfed.proto.pluralfed.v1 import federation_pb2_grpc as pb_grpc
from pluralfed.transport import (
    DEFAULT_UPLOAD_CHUNK_BYTES,
    PROTOCOL_VERSION,
    chunk_from_proto,
    chunk_to_proto,
    grpc_options,
)
from pluralfed.wire import TensorAssembler, digest_of, iter_chunks, specs_of

T = TypeVar("T")

HOST = "127.0.0.1"
CLI = [sys.executable, "-m", "pluralfed.cli"]
# the smallest model the tests train: a few thousand parameters, milliseconds per step
TINY_MODEL: dict[str, Any] = {
    "d_model": 32,
    "n_layers": 2,
    "n_heads": 4,
    "d_ff": 32,
    "mlp_layers": 2,
}
SLOWDOWN = float(os.environ.get("PLURALFED_TEST_SLOWDOWN", "1") or 1)
POLL_S = 0.05
RPC_TIMEOUT_S = 30.0


def scaled(seconds: float) -> float:
    """A hang guard for this machine: `seconds` times $PLURALFED_TEST_SLOWDOWN."""
    return seconds * SLOWDOWN


def free_port() -> int:
    """A TCP port on 127.0.0.1 nobody listens on right now (for a coordinator that restarts on
    the same address; gRPC binds with SO_REUSEADDR/SO_REUSEPORT, so rebinding after a kill works)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


# ------------------------------------------------------------------------------------------------
# processes


class Proc:
    """One child process and its log file."""

    def __init__(self, name: str, popen: subprocess.Popen[bytes], log_path: Path) -> None:
        self.name = name
        self.popen = popen
        self.log_path = log_path

    def __repr__(self) -> str:
        return f"Proc({self.name!r}, pid={self.pid}, returncode={self.popen.returncode})"

    @property
    def pid(self) -> int:
        return self.popen.pid

    @property
    def returncode(self) -> int | None:
        return self.popen.poll()

    @property
    def alive(self) -> bool:
        return self.popen.poll() is None

    def log(self) -> str:
        try:
            return self.log_path.read_text("utf-8", errors="replace")
        except FileNotFoundError:
            return ""

    def tail(self, lines: int = 40) -> str:
        text = self.log().rstrip("\n").splitlines()[-lines:]
        state = "running" if self.alive else f"exited with code {self.returncode}"
        body = "\n".join(f"    {line}" for line in text) or "    (empty)"
        return f"--- {self.name} ({state}), last lines of {self.log_path}:\n{body}"

    def kill(self) -> None:
        """SIGKILL (no chance to clean up) and reap."""
        if self.alive:
            self.popen.kill()
        self.popen.wait(scaled(30))

    def wait(self, timeout: float, others: Sequence[Proc] = ()) -> int:
        """The exit code, or fail the test (with logs) if the process is still running."""
        try:
            return self.popen.wait(scaled(timeout))
        except subprocess.TimeoutExpired:
            pytest.fail(
                f"{self.name} did not exit within {scaled(timeout):.0f} s\n\n"
                + tails([self, *others]),
                pytrace=False,
            )


def tails(procs: Iterable[Proc], lines: int = 40) -> str:
    return "\n\n".join(p.tail(lines) for p in procs)


class Procs:
    """The child processes of one test (or module): started with logs in `log_dir`, all stopped
    by `stop_all` — terminate, then kill what is left — each by its own pid."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = Path(log_dir)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.started: list[Proc] = []
        self._files: list[IO[bytes]] = []

    def start(self, name: str, argv: Sequence[str], env: Mapping[str, str]) -> Proc:
        log_path = self.log_dir / f"{name}.log"
        n = 2
        while log_path.exists():  # a restarted process gets a log of its own
            log_path = self.log_dir / f"{name}-{n}.log"
            n += 1
        out = log_path.open("wb")
        self._files.append(out)
        popen = subprocess.Popen(
            list(argv),
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=dict(env),
        )
        proc = Proc(name, popen, log_path)
        self.started.append(proc)
        return proc

    def stop_all(self, grace_s: float = 5.0) -> None:
        for proc in self.started:
            if proc.alive:
                proc.popen.terminate()
        deadline = time.monotonic() + grace_s
        for proc in self.started:
            try:
                proc.popen.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.popen.kill()
                proc.popen.wait(30)
        for f in self._files:
            f.close()
        self._files.clear()

    def __enter__(self) -> Procs:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop_all()


def wait_until(
    predicate: Callable[[], T | None],
    timeout: float,
    what: str,
    *,
    logs: Iterable[Proc] = (),
    must_live: Iterable[Proc] = (),
    poll_s: float = POLL_S,
) -> T:
    """Poll `predicate` until it returns something truthy (returned), for at most `timeout`
    seconds (scaled). Fails at once if a process in `must_live` exits meanwhile. Failure messages
    say what was awaited and show the tails of `logs` and `must_live`."""
    logs, must_live = list(logs), list(must_live)
    shown = list(dict.fromkeys([*must_live, *logs]))
    limit = scaled(timeout)
    deadline = time.monotonic() + limit
    while True:
        value = predicate()
        if value:
            return value
        for proc in must_live:
            if not proc.alive:
                pytest.fail(
                    f"{proc.name} exited with code {proc.returncode} while waiting for {what}"
                    f"\n\n{tails(shown)}",
                    pytrace=False,
                )
        if time.monotonic() > deadline:
            pytest.fail(
                f"timed out after {limit:.0f} s waiting for {what}\n\n{tails(shown)}",
                pytrace=False,
            )
        time.sleep(poll_s)


def env_for_children(cache_dir: Path | None = None) -> dict[str, str]:
    """What each service process gets: one torch thread, offline, unbuffered, the shared cache."""
    env = child_env(1)
    if cache_dir is not None:
        env["PLURALFED_CACHE_DIR"] = str(cache_dir)
    return env


# ------------------------------------------------------------------------------------------------
# certificates and data


class Pki:
    """A federation's CA, the coordinator's certificate (localhost, 127.0.0.1) and node
    certificates issued on demand."""

    def __init__(self, root: Path, ca_name: str = "pluralfed test CA") -> None:
        self.root = Path(root)
        self.ca = self.root / "ca"
        create_ca(self.ca, common_name=ca_name)
        self.server = self.root / "coordinator"
        issue_server_cert(self.ca, self.server, "coordinator", ["localhost", HOST])

    def node(
        self,
        identity: str,
        *,
        folder: str | None = None,
        not_before: dt.datetime | None = None,
        not_after: dt.datetime | None = None,
    ) -> Path:
        """The folder (ca.pem, cert.pem, key.pem) of a node certificate for `identity`."""
        out = self.root / "nodes" / (folder or identity)
        if not (out / tls.CERT_FILE).exists():
            issue_node_cert(self.ca, out, identity, not_before=not_before, not_after=not_after)
        return out


@dataclass
class FedData:
    """Synthetic survey data split into one file per group, embedded once into the cache."""

    data: SurveyData
    files: dict[str, Path]  # group -> its JSONL file (what that group's node gets)
    train_counts: dict[str, int]  # group -> train questions (a node's FedAvg weight)
    groups: list[str]


def make_fed_data(
    out_dir: Path, cache_dir: Path, n_groups: int = 4, n_questions: int = 40, seed: int = 7
) -> FedData:
    from pluralfed.embeddings import CachedEncoder, make_encoder
    from pluralfed.prepare import embed_groups
    from pluralfed.synthetic import generate_synthetic

    data = generate_synthetic(n_groups=n_groups, n_questions=n_questions, seed=seed)
    groups = sorted(data.groups)
    files = write_group_files(data, out_dir)
    # embed everything here, once, so that no node process has to load the text encoder
    encoder = CachedEncoder(make_encoder(show_progress=False), cache_dir)
    splits = embed_groups(data, groups, encoder)
    return FedData(data, files, {g: len(splits[g].train) for g in groups}, groups)


# ------------------------------------------------------------------------------------------------
# services


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    try:
        text = path.read_text("utf-8")
    except FileNotFoundError:
        return []
    return [json.loads(line) for line in text.splitlines() if line.strip()]


@dataclass
class Coordinator:
    proc: Proc
    config: Path
    state_dir: Path
    port: int

    @property
    def address(self) -> str:
        return f"{HOST}:{self.port}"

    def metrics(self) -> list[dict[str, Any]]:
        return read_jsonl(self.state_dir / "metrics.jsonl")

    def round_records(self) -> list[dict[str, Any]]:
        return [r for r in self.metrics() if r.get("kind") == "round"]

    def evaluation_records(self) -> list[dict[str, Any]]:
        return [r for r in self.metrics() if r.get("kind") == "evaluation"]

    def completed_rounds(self) -> int:
        return max((r["round"] for r in self.round_records()), default=0)

    def wait_round(self, n: int, timeout: float, logs: Iterable[Proc] = ()) -> dict[str, Any]:
        """The record of round `n` once metrics.jsonl has it."""

        def record() -> dict[str, Any] | None:
            return next((r for r in self.round_records() if r["round"] == n), None)

        return wait_until(
            record,
            timeout,
            f"round {n} in {self.state_dir / 'metrics.jsonl'}",
            logs=logs,
            must_live=[self.proc],
        )


def coordinator_defaults(state_dir: Path, pki: Pki | None) -> dict[str, Any]:
    return {
        "listen": f"{HOST}:0",
        "state_dir": str(state_dir),
        **({"insecure": True} if pki is None else {"tls_dir": str(pki.server)}),
        "heartbeat_interval_s": 1.0,
        "session_timeout_s": 30.0,
        "round_timeout_s": 120.0,
        "eval_timeout_s": 60.0,
        "local_steps": 3,
        "linger_s": 3.0,
        "max_workers": 16,
        **TINY_MODEL,
    }


def start_coordinator(
    procs: Procs,
    work: Path,
    pki: Pki | None,
    allow_list: Mapping[str, str],
    settings: Mapping[str, Any],
    *,
    name: str = "coordinator",
    cache_dir: Path | None = None,
    wait: bool = True,
    verbose: bool = False,
) -> Coordinator:
    """Write `work/<name>.toml` and start `pluralfed coordinator` with it (pki=None: insecure;
    verbose: `pluralfed -v`, debug logging)."""
    state_dir = work / name
    config = work / f"{name}.toml"
    work.mkdir(parents=True, exist_ok=True)
    write_toml(
        config,
        {**coordinator_defaults(state_dir, pki), **settings},
        {"allow_list": dict(allow_list)},
    )
    coordinator = Coordinator(
        _launch(procs, name, config, state_dir, cache_dir, verbose), config, state_dir, 0
    )
    if wait:
        coordinator.port = wait_for_port(coordinator)
    return coordinator


def _launch(
    procs: Procs,
    name: str,
    config: Path,
    state_dir: Path,
    cache_dir: Path | None,
    verbose: bool = False,
) -> Proc:
    (state_dir / "coordinator.port").unlink(missing_ok=True)  # so a new one means "listening"
    options = ["-v"] if verbose else []
    return procs.start(
        name,
        [*CLI, *options, "coordinator", "--config", str(config)],
        env_for_children(cache_dir),
    )


def restart_coordinator(
    procs: Procs, old: Coordinator, cache_dir: Path | None = None
) -> Coordinator:
    """The same config and state folder again, in a new process (its log: <name>-2.log)."""
    if old.proc.alive:
        raise RuntimeError("restart_coordinator: the old coordinator is still running")
    proc = _launch(procs, old.proc.name, old.config, old.state_dir, cache_dir)
    coordinator = Coordinator(proc, old.config, old.state_dir, 0)
    coordinator.port = wait_for_port(coordinator)
    return coordinator


def wait_for_port(coordinator: Coordinator, timeout: float = 120.0) -> int:
    port_file = coordinator.state_dir / "coordinator.port"

    def port() -> int:
        try:
            text = port_file.read_text().strip()
        except FileNotFoundError:
            return 0
        return int(text) if text else 0

    return wait_until(
        port, timeout, f"the coordinator to listen ({port_file})", must_live=[coordinator.proc]
    )


def start_node(
    procs: Procs,
    work: Path,
    pki: Pki | None,
    coordinator: Coordinator,
    group: str,
    data_file: Path,
    *,
    role: str = "train",
    cache_dir: Path | None = None,
    settings: Mapping[str, Any] | None = None,
) -> Proc:
    """Write `work/nodes/<node id>.toml` and start `pluralfed node run` for `group`."""
    nid = node_id(group)
    config = work / "nodes" / f"{nid}.toml"
    config.parent.mkdir(parents=True, exist_ok=True)
    write_toml(
        config,
        {
            "group": group,
            "role": role,
            "data": str(data_file),
            "threads": 1,
            **({"insecure": True} if pki is None else {"tls_dir": str(pki.node(nid))}),
            "tls_server_name": "localhost",
            **({"cache_dir": str(cache_dir)} if cache_dir else {}),
            "poll_wait_s": 10.0,
            "backoff_initial_s": 0.2,
            "backoff_max_s": 2.0,
            **(settings or {}),
        },
        {},
    )
    return procs.start(
        nid,
        [*CLI, "node", "run", "--config", str(config), "--coordinator", coordinator.address],
        env_for_children(cache_dir),
    )


# ------------------------------------------------------------------------------------------------
# an in-process node


class HealthStub(Protocol):
    """grpc.health.v1's generated client stub, typed: its stubs package declares no methods."""

    Check: grpc.UnaryUnaryMultiCallable[
        health_pb2.HealthCheckRequest, health_pb2.HealthCheckResponse
    ]
    Watch: grpc.UnaryStreamMultiCallable[
        health_pb2.HealthCheckRequest, health_pb2.HealthCheckResponse
    ]


def health_stub(channel: grpc.Channel) -> HealthStub:
    return cast(HealthStub, health_pb2_grpc.HealthStub(channel))


def rpc_error(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> grpc.RpcError:
    """The RpcError that calling fn raises (a response stream is drained); fails if none."""
    try:
        result = fn(*args, **kwargs)
        if isinstance(result, Iterable) and not isinstance(result, bytes | str | dict):
            for _ in result:
                pass
    except grpc.RpcError as err:
        return err
    pytest.fail(f"{getattr(fn, '__name__', fn)} succeeded; expected an RPC error", pytrace=False)


class FakeNode:
    """A node client without data or model: each protocol call as one method, nothing hidden."""

    def __init__(
        self,
        port: int,
        group: str,
        *,
        tls_dir: Path | None = None,
        credentials: grpc.ChannelCredentials | None = None,
        server_name: str | None = "localhost",
        insecure: bool = False,
    ) -> None:
        target = f"{HOST}:{port}"
        if insecure:
            self.channel = grpc.insecure_channel(target, options=grpc_options())
        else:
            if credentials is None:
                if tls_dir is None:
                    raise ValueError("FakeNode needs tls_dir, credentials or insecure=True")
                credentials = tls.TlsFiles.from_dir(tls_dir).channel_credentials()
            self.channel = grpc.secure_channel(
                target,
                credentials,
                options=[*tls.channel_options(server_name), *grpc_options()],
            )
        self.stub = pb_grpc.FederationStub(self.channel)
        self.group = group
        self.session_id = ""
        self.run_id = ""

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> FakeNode:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def join(
        self,
        encoder_id: str,
        num_examples: int = 10,
        *,
        role: pb.Role.ValueType = pb.ROLE_TRAIN,
        group: str | None = None,
        protocol_version: int = PROTOCOL_VERSION,
    ) -> pb.JoinReply:
        reply = self.stub.Join(
            pb.JoinRequest(
                group=self.group if group is None else group,
                role=role,
                num_train_examples=num_examples if role == pb.ROLE_TRAIN else 0,
                software_version="test",
                protocol_version=protocol_version,
                encoder_id=encoder_id,
            ),
            timeout=RPC_TIMEOUT_S,
        )
        self.session_id = reply.session_id
        self.run_id = reply.run_id
        return reply

    def get_task(self, wait_s: float = 5.0, session_id: str | None = None) -> pb.Task:
        req = pb.GetTaskRequest(session_id=self.session_id if session_id is None else session_id)
        req.wait.FromMilliseconds(int(wait_s * 1000))
        return self.stub.GetTask(req, timeout=wait_s + RPC_TIMEOUT_S)

    def wait_task(self, kind: pb.TaskKind.ValueType, timeout: float = 60.0) -> pb.Task:
        """Long-poll until a task of `kind` comes (WAIT answers are skipped)."""

        def poll() -> pb.Task | None:
            task = self.get_task(wait_s=1.0)
            if task.kind == kind:
                return task
            if task.kind != pb.TASK_KIND_WAIT:
                pytest.fail(f"{self.group}: expected {pb.TaskKind.Name(kind)}, got {task}")
            return None

        return wait_until(
            poll, timeout, f"a {pb.TaskKind.Name(kind)} task for {self.group}", poll_s=0
        )

    def download(self, version: str, session_id: str | None = None) -> dict[str, np.ndarray]:
        stream = self.stub.DownloadModel(
            pb.DownloadModelRequest(
                session_id=self.session_id if session_id is None else session_id,
                model_version=version,
            ),
            timeout=RPC_TIMEOUT_S,
        )
        header: pb.ModelHeader | None = None
        assembler = TensorAssembler(None, collect=True)
        for msg in stream:
            part = msg.WhichOneof("part")
            if part == "header":
                header = msg.header
            elif part == "tensor":
                assembler.add(chunk_from_proto(msg.tensor))
            elif part == "trailer":
                assert header is not None, "trailer before header"
                assembler.finish(msg.trailer.digest, total_bytes=header.total_bytes)
                return assembler.to_dict()
        raise AssertionError("model download ended before its trailer")

    def upload(self, messages: Iterable[pb.UpdateChunk]) -> pb.UploadReply:
        return self.stub.UploadUpdate(iter(list(messages)), timeout=RPC_TIMEOUT_S)

    def heartbeat(
        self,
        session_id: str | None = None,
        *,
        state: pb.NodeState.ValueType = pb.NODE_STATE_IDLE,
        task_id: str = "",
        message: str = "",
    ) -> pb.HeartbeatReply:
        return self.stub.Heartbeat(
            pb.HeartbeatRequest(
                session_id=self.session_id if session_id is None else session_id,
                state=state,
                task_id=task_id,
                message=message,
            ),
            timeout=RPC_TIMEOUT_S,
        )

    def leave(self, session_id: str | None = None) -> pb.Ack:
        return self.stub.Leave(
            pb.LeaveRequest(
                session_id=self.session_id if session_id is None else session_id, reason="test"
            ),
            timeout=RPC_TIMEOUT_S,
        )


def update_messages(
    session_id: str,
    task: pb.Task,
    weights: Mapping[str, np.ndarray],
    num_examples: int,
    *,
    digest: bytes | None = None,
    trailer: bool = True,
    task_id: str | None = None,
    round_: int | None = None,
    chunk_bytes: int = DEFAULT_UPLOAD_CHUNK_BYTES,
    metrics: Mapping[str, float] | None = None,
    base_model_version: str | None = None,
) -> list[pb.UpdateChunk]:
    """An upload stream for `weights`: header, chunks, trailer (its digest computed unless given;
    trailer=False leaves it out, a truncated stream). Any tensor, dtype or shape is sent as is;
    the header's metrics are {"loss": 0.5} and its base model the task's unless given."""
    specs = specs_of(weights)
    messages = [
        pb.UpdateChunk(
            header=pb.UpdateHeader(
                session_id=session_id,
                task_id=task.task_id if task_id is None else task_id,
                round=task.round if round_ is None else round_,
                base_model_version=(
                    task.model_version if base_model_version is None else base_model_version
                ),
                num_examples=num_examples,
                metrics={"loss": 0.5} if metrics is None else dict(metrics),
                tensor_count=len(specs),
                total_bytes=sum(s.nbytes for s in specs),
            )
        )
    ]
    messages += [
        pb.UpdateChunk(tensor=chunk_to_proto(c)) for c in iter_chunks(weights, chunk_bytes)
    ]
    if trailer:
        messages.append(
            pb.UpdateChunk(
                trailer=pb.StreamTrailer(digest=digest_of(weights) if digest is None else digest)
            )
        )
    return messages


def reject_name(reply: pb.UploadReply) -> str:
    """ACCEPTED, or the reject reason without its prefix (STALE, DUPLICATE, ...)."""
    if reply.accepted:
        return "ACCEPTED"
    return pb.RejectReason.Name(reply.reason).removeprefix("REJECT_REASON_")


def weighted_average(
    updates: Sequence[Mapping[str, np.ndarray]], weights: Sequence[float]
) -> dict[str, np.ndarray]:
    """sum_i w_i x_i / sum_i w_i per tensor, in float64, independently of the coordinator's code."""
    total = float(sum(weights))
    out = {}
    for name in updates[0]:
        acc = np.zeros(np.shape(updates[0][name]), dtype=np.float64)
        for update, w in zip(updates, weights, strict=True):
            acc += np.asarray(update[name], dtype=np.float64) * float(w)
        out[name] = acc / total
    return out


def assert_weights_close(
    actual: Mapping[str, np.ndarray], expected: Mapping[str, np.ndarray], what: str
) -> None:
    assert list(actual) == list(expected), f"{what}: tensor names differ"
    for name in expected:
        a, e = np.asarray(actual[name]), np.asarray(expected[name])
        assert a.shape == e.shape, f"{what}: {name} has shape {a.shape}, expected {e.shape}"
        # float32 results of a float64 average: equal up to the last float32 rounding
        np.testing.assert_allclose(
            a.astype(np.float64), e, rtol=1e-6, atol=1e-7, err_msg=f"{what}: tensor {name}"
        )


@contextlib.contextmanager
def stand_in_coordinator(servicer: pb_grpc.FederationServicer) -> Iterator[int]:
    """A plain-text gRPC server on 127.0.0.1 serving `servicer`, a coordinator stand-in that
    misbehaves on purpose; yields its port."""
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    pb_grpc.add_FederationServicer_to_server(servicer, server)
    port = server.add_insecure_port(f"{HOST}:0")
    server.start()
    try:
        yield port
    finally:
        server.stop(None).wait(5)
