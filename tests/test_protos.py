"""The generated gRPC code: it imports, matches the contract, and is kept current by gen_protos."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from pluralfed import wire
from pluralfed.proto.pluralfed.v1 import federation_pb2 as pb
from pluralfed.proto.pluralfed.v1 import federation_pb2_grpc as pb_grpc

REPO_ROOT = Path(__file__).resolve().parent.parent
GENERATED = Path("pluralfed/proto")
STALE = "generated code is stale, run make protos"


def test_service_has_the_contract_rpcs() -> None:
    service = pb.DESCRIPTOR.services_by_name["Federation"]
    shapes = {
        m.name: (m.input_type.name, m.output_type.name, m.client_streaming, m.server_streaming)
        for m in service.methods
    }
    assert shapes == {
        "Join": ("JoinRequest", "JoinReply", False, False),
        "GetTask": ("GetTaskRequest", "Task", False, False),
        "DownloadModel": ("DownloadModelRequest", "ModelChunk", False, True),
        "UploadUpdate": ("UpdateChunk", "UploadReply", True, False),
        "ReportEvaluation": ("EvaluationReport", "Ack", False, False),
        "Heartbeat": ("HeartbeatRequest", "HeartbeatReply", False, False),
        "Leave": ("LeaveRequest", "Ack", False, False),
    }
    assert pb.DESCRIPTOR.package == "pluralfed.v1"
    assert pb.DESCRIPTOR.name == "pluralfed/v1/federation.proto"
    for name in ("FederationStub", "FederationServicer", "add_FederationServicer_to_server"):
        assert hasattr(pb_grpc, name)
    assert pb.JoinRequest.__module__ == "pluralfed.proto.pluralfed.v1.federation_pb2"


def test_every_wire_dtype_has_an_enum_value() -> None:
    """The transport maps wire dtypes to DType as "DTYPE_" + name.upper()."""
    names = {pb.DType.Name(v) for v in pb.DType.values()} - {"DTYPE_UNSPECIFIED"}
    assert names == {"DTYPE_" + d.upper() for d in wire.DTYPES}


def test_messages_round_trip() -> None:
    chunk = next(wire.iter_chunks({"w": np.arange(4, dtype=np.float32)}))
    assert chunk.dtype is not None and chunk.shape is not None
    message = pb.UpdateChunk(
        tensor=pb.TensorChunk(
            name=chunk.name,
            dtype=pb.DType.Value("DTYPE_" + chunk.dtype.upper()),
            shape=list(chunk.shape),
            offset=chunk.offset,
            data=bytes(chunk.data),
        )
    )
    back = pb.UpdateChunk.FromString(message.SerializeToString())
    assert back.WhichOneof("part") == "tensor"
    assert back.tensor.data == bytes(chunk.data) and list(back.tensor.shape) == [4]

    header = pb.UpdateChunk(
        header=pb.UpdateHeader(
            session_id="s", task_id="t", round=3, num_examples=120, metrics={"loss_last": 0.25}
        )
    )
    assert pb.UpdateChunk.FromString(header.SerializeToString()).header.metrics["loss_last"] == 0.25

    task = pb.Task(
        kind=pb.TASK_KIND_TRAIN,
        task_id="r3-Germany",
        round=3,
        model_version="r2",
        hyperparameters=pb.Hyperparameters(
            local_steps=6,
            learning_rate=3e-4,
            context_range=pb.IntRange(min=9, max=90),
            target_range=pb.IntRange(min=9, max=90),
            seed=7,
            extensions={"x": "y"},
        ),
    )
    task.deadline.FromMilliseconds(1_700_000_000_000)
    task.time_budget.FromSeconds(600)
    back_task = pb.Task.FromString(task.SerializeToString())
    assert back_task == task and back_task.deadline.ToMilliseconds() == 1_700_000_000_000


def run_gen(root: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(root / "scripts" / "gen_protos.py"), *args],
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_committed_code_is_current() -> None:
    result = run_gen(REPO_ROOT, "--check")
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.fixture
def repo_copy(tmp_path: Path) -> Path:
    """What gen_protos needs, copied, so tampering never touches the real tree."""
    root = tmp_path / "repo"
    shutil.copytree(REPO_ROOT / "scripts", root / "scripts")
    shutil.copytree(REPO_ROOT / "protos", root / "protos")
    shutil.copytree(
        REPO_ROOT / GENERATED, root / GENERATED, ignore=shutil.ignore_patterns("__pycache__")
    )
    assert run_gen(root, "--check").returncode == 0
    return root


def test_check_fails_when_generated_code_was_edited(repo_copy: Path) -> None:
    target = repo_copy / GENERATED / "pluralfed" / "v1" / "federation_pb2.py"
    target.write_text(target.read_text() + "\n# hand edit\n")
    result = run_gen(repo_copy, "--check")
    assert result.returncode == 1
    assert STALE in result.stderr
    assert "federation_pb2.py" in result.stderr and "-# hand edit" in result.stderr  # a diff
    # regenerating repairs it
    assert run_gen(repo_copy).returncode == 0
    assert run_gen(repo_copy, "--check").returncode == 0


def test_check_fails_when_the_proto_changed(repo_copy: Path) -> None:
    proto = repo_copy / "protos" / "pluralfed" / "v1" / "federation.proto"
    proto.write_text(proto.read_text() + "\nmessage Extra {\n  string x = 1;\n}\n")
    result = run_gen(repo_copy, "--check")
    assert result.returncode == 1 and STALE in result.stderr


def test_check_fails_on_missing_or_stale_files(repo_copy: Path) -> None:
    (repo_copy / GENERATED / "pluralfed" / "v1" / "federation_pb2_grpc.pyi").unlink()
    (repo_copy / GENERATED / "pluralfed" / "v1" / "old_pb2.py").write_text(
        "# from a removed proto\n"
    )
    result = run_gen(repo_copy, "--check")
    assert result.returncode == 1
    assert "missing" in result.stderr and "old_pb2.py" in result.stderr
    assert run_gen(repo_copy).returncode == 0
    assert not (repo_copy / GENERATED / "pluralfed" / "v1" / "old_pb2.py").exists()
    assert run_gen(repo_copy, "--check").returncode == 0
