"""A node checks what comes from outside: its own config, and every message of the coordinator.

A bad value is an InputError (WireError for tensor streams and files) that says what and where.
A coordinator that breaks the protocol (bad JoinReply, a model download that does not match its
header or the model config) stops the node with one logged line and exit code 2, never a
traceback; a declared tensor shape never makes the node allocate more than the header's
total_bytes, itself capped. Stand-in coordinators are real gRPC servers on 127.0.0.1.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import resource
import signal
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import grpc
import numpy as np
import pytest
from fedharness import stand_in_coordinator
from safetensors.numpy import save_file

import group_node.node as node_module
import pluralfed.training
from coordinator.server import ModelDownload
from coordinator.tasks import GlobalModel
from group_node.client import model_config_of
from group_node.config import NodeConfig
from group_node.node import GroupNode, audit_file_name
from group_node.worker import GroupWorker
from pluralfed.config import load_config
from pluralfed.data import SurveyData, SurveyItem, is_test_question
from pluralfed.episodes import EmbeddedItem
from pluralfed.errors import InputError
from pluralfed.model import GPOConfig
from pluralfed.proto.pluralfed.v1 import federation_pb2 as pb
from pluralfed.proto.pluralfed.v1 import federation_pb2_grpc as pb_grpc
from pluralfed.tensorfiles import load_tensors, save_tensors, state_dict_to_numpy
from pluralfed.training import TrainingSettings, build_model
from pluralfed.transport import (
    PROTOCOL_VERSION,
    chunk_from_proto,
    decode_model_chunk,
    dtype_to_proto,
    header_specs,
    receive_model,
    serialized_tensor_part,
)
from pluralfed.wire import (
    WIRE_FORMAT,
    Chunk,
    NonFiniteError,
    TensorAssembler,
    WireError,
    digest_of,
    float32_to_bfloat16,
    specs_of,
)

pytestmark = pytest.mark.timeout(60)

ENV = "PLURALFED_NODE_"
BASE_ENV = {ENV + "GROUP": "G", ENV + "DATA": "/x.jsonl", ENV + "INSECURE": "1"}
DIM = 8
SMALL = GPOConfig(embed_dim=DIM, d_model=8, mlp_layers=1, n_layers=1, n_heads=2, d_ff=8)


def small_weights(cfg: GPOConfig = SMALL) -> dict[str, np.ndarray]:
    return state_dict_to_numpy(build_model(cfg, 0).state_dict())


# --------------------------------------------------------------------------------------------
# 1. the node's own config


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("BACKOFF_INITIAL_S", "inf", "backoff_initial_s must be 0.01..3600 seconds, got inf"),
        ("BACKOFF_INITIAL_S", "nan", "backoff_initial_s must be 0.01..3600 seconds, got nan"),
        ("BACKOFF_INITIAL_S", "0", "backoff_initial_s must be"),
        ("BACKOFF_MAX_S", "-1", "backoff_max_s must be 0.01..3600 seconds, got -1.0"),
        ("BACKOFF_MAX_S", "0.1", "backoff_max_s (0.1) must be at least backoff_initial_s (0.5)"),
        ("GIVE_UP_AFTER_S", "nan", "give_up_after_s must be a finite number of seconds > 0"),
        ("GIVE_UP_AFTER_S", "inf", "leave it unset to retry forever"),
        ("GIVE_UP_AFTER_S", "0", "give_up_after_s must be"),
        ("POLL_WAIT_S", "1e12", "poll_wait_s must be 0.1..3600 seconds, got 1000000000000.0"),
        ("POLL_WAIT_S", "-5", "poll_wait_s must be"),
        ("POLL_WAIT_S", "0", "poll_wait_s must be"),
        ("COORDINATOR", ":", "coordinator must be host:port or [IPv6]:port, got ':': no host"),
        ("COORDINATOR", ":7443", "no host"),
        ("COORDINATOR", "localhost", "no :port"),
        ("COORDINATOR", "localhost:", "port '' is not a number in 1..65535"),
        ("COORDINATOR", "localhost:0", "port '0'"),
        ("COORDINATOR", "localhost:65536", "port '65536'"),
        ("COORDINATOR", "localhost:x", "port 'x'"),
        ("COORDINATOR", "::1:7443", "IPv6 goes in brackets"),
        ("COORDINATOR", "[::1:7443", "not an IPv6 address in brackets"),
        ("COORDINATOR", "[zz]:7443", "not an IPv6 address in brackets"),
        ("COORDINATOR", "a b:7443", "not a host name"),
        # DNS names are at most 253 characters; a host name starts with a letter or digit
        ("COORDINATOR", "a" * 254 + ":7443", "is not a host name or IPv4 address"),
        ("COORDINATOR", "-coord:7443", "is not a host name or IPv4 address"),
        # int() reads other scripts' digits: "\u0667" would be port 7
        ("COORDINATOR", "localhost:\u0667", "is not a number in 1..65535"),
        ("POLL_WAIT_S", "0.05", "poll_wait_s must be 0.1..3600 seconds, got 0.05"),
        ("THREADS", "100000000", "threads must be 1..1024, got 100000000"),
        ("GROUP", "Fran\0ce", "holds control characters"),
        # a coordinator would refuse it at Join; the node says so before it connects
        ("GROUP", "G" * 201, "group is 201 characters, more than the 200 a group name may have"),
        (
            "GROUP",
            "Japan ",
            "group 'Japan ' has leading or trailing whitespace; remove it ('Japan')",
        ),
        ("ROLE", "trainer", "role must be train or evaluate-only, got 'trainer'"),
    ],
)
def test_bad_node_timing_and_address_are_refused_naming_the_key(
    key: str, value: str, message: str
) -> None:
    with pytest.raises(InputError) as err:
        load_config(NodeConfig, None, ENV, {}, environ={**BASE_ENV, ENV + key: value})
    assert message in str(err.value)
    # where the value was set (before, role, threads and the rest said only "node config")
    assert str(err.value).startswith(f"environment {ENV}{key}: ")
    with pytest.raises(InputError, match=r"^node config: "):  # made in code: no source to name
        load_config(NodeConfig, None, ENV, {}, environ={})


@pytest.mark.parametrize(
    "address",
    [
        "localhost:7443",
        "127.0.0.1:1",
        "[::1]:7443",
        "coord-1.example.org:65535",
        "coordinator:7443",
    ],
)
def test_good_addresses_and_timings_are_accepted(address: str) -> None:
    env = {**BASE_ENV, ENV + "COORDINATOR": address, ENV + "GIVE_UP_AFTER_S": "3"}
    cfg = load_config(NodeConfig, None, ENV, {}, environ=env)
    assert cfg.coordinator == address and cfg.give_up_after_s == 3.0
    assert load_config(NodeConfig, None, ENV, {}, environ=BASE_ENV).give_up_after_s is None


def test_node_settings_at_the_edges_of_their_ranges_are_accepted() -> None:
    """Each range includes its ends: a limit of 1024 threads takes 1024, and a back-off that
    does not grow (initial = max) is a choice, not an error."""
    edges = {
        ENV + "COORDINATOR": "a" * 253 + ":7443",
        ENV + "THREADS": "1024",
        ENV + "PERSONALIZE_STEPS": "100000",
        ENV + "PERSONALIZED_DIR": "/p",
        ENV + "POLL_WAIT_S": "0.1",
        ENV + "BACKOFF_INITIAL_S": "2",
        ENV + "BACKOFF_MAX_S": "2",
        ENV + "GIVE_UP_AFTER_S": "0.001",
    }
    cfg = load_config(NodeConfig, None, ENV, {}, environ={**BASE_ENV, **edges})
    assert (cfg.threads, cfg.personalize_steps, cfg.poll_wait_s) == (1024, 100000, 0.1)
    assert (cfg.backoff_initial_s, cfg.backoff_max_s, cfg.give_up_after_s) == (2, 2, 0.001)
    top = {ENV + "POLL_WAIT_S": "3600", ENV + "BACKOFF_INITIAL_S": "0.01"}
    cfg = load_config(NodeConfig, None, ENV, {}, environ={**BASE_ENV, **top})
    assert (cfg.poll_wait_s, cfg.backoff_initial_s) == (3600, 0.01)


def test_a_back_off_start_over_the_default_cap_names_where_it_was_set() -> None:
    """backoff_initial_s set alone above the default backoff_max_s (15 s): the refusal names
    where the value that broke the rule was set, not just "node config"."""
    env = {**BASE_ENV, ENV + "BACKOFF_INITIAL_S": "100"}
    with pytest.raises(InputError) as err:
        load_config(NodeConfig, None, ENV, {}, environ=env)
    assert str(err.value) == (
        f"environment {ENV}BACKOFF_INITIAL_S: backoff_max_s (15) must be at least "
        "backoff_initial_s (100)"
    )


@pytest.mark.parametrize("key", ["poll_wait_s", "backoff_initial_s", "backoff_max_s"])
def test_a_timing_set_in_code_to_true_is_refused_not_read_as_one_second(key: str) -> None:
    """A NodeConfig made in code checks its timings as a loaded one does: True (an int to
    Python) is not a number of seconds."""
    timing: dict[str, Any] = {key: True}
    with pytest.raises(InputError, match=f"^node config: {key} must be a number of seconds"):
        NodeConfig(coordinator="localhost:7443", group="G", insecure=True, **timing)


# --------------------------------------------------------------------------------------------
# 2. the coordinator's JoinReply and model


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("{not json", "is not valid JSON"),
        ("[]", "is a JSON list, not an object"),
        ("5", "is a JSON int, not an object"),
        ('{"memory_temperature": NaN}', "NaN is not a JSON number"),
        ('{"bogus": 1}', "is not a valid model config: unknown GPO config fields: ['bogus']"),
        ('{"d_model": 8, "n_heads": 0}', "is not a valid model config"),
        ('{"members": "3"}', "is not a valid model config"),
    ],
)
def test_a_bad_model_config_in_join_reply_is_an_input_error(text: str, message: str) -> None:
    with pytest.raises(InputError) as err:
        model_config_of(text, "coordinator c:1")
    assert str(err.value).startswith("coordinator c:1: JoinReply.model_config_json ")
    assert message in str(err.value)


def test_a_good_model_config_passes() -> None:
    assert model_config_of("", "c") == {}
    assert model_config_of('{"d_model": 8, "n_heads": 2}', "c") == {"d_model": 8, "n_heads": 2}


class FakeEncoder:
    identity = "fake-enc"
    dim = DIM

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        rows = [np.frombuffer(hashlib.sha256(t.encode()).digest()[:DIM], np.uint8) for t in texts]
        return np.array(rows, dtype=np.float32).reshape(-1, DIM) / 255


def worker() -> GroupWorker:
    items = [SurveyItem(f"Question {i}?", ("a", "b"), np.array([0.3, 0.7])) for i in range(8)]
    return GroupWorker("G", SurveyData({"G": items}), FakeEncoder())


def test_a_task_may_ask_for_a_fresh_local_optimizer() -> None:
    """Hyperparameters.keep_local_optimizer_state: True keeps Adam's moments across TRAIN tasks
    (the paper's nodes; what the coordinator sends), False starts each task afresh. Before, the
    node ignored the field and always kept them."""
    w = worker()
    w.load_global(SMALL.to_dict(), small_weights())
    settings = TrainingSettings(context_range=(2, 3), target_range=(2, 3))

    def adam_steps() -> set[float]:
        assert w.trainer is not None
        return {float(st["step"]) for st in w.trainer.optimizer.state.values()}

    w.train(2, settings)
    assert adam_steps() == {2.0}
    w.train(3, settings, keep_optimizer_state=True)
    assert adam_steps() == {5.0}
    w.train(3, settings, keep_optimizer_state=False)
    assert adam_steps() == {3.0}


def split_worker() -> GroupWorker:
    """A worker whose group has both TRAIN and TEST questions (PROTOCOL.md's sha256 split)."""
    items = [SurveyItem(f"Question {i}?", ("a", "b"), np.array([0.3, 0.7])) for i in range(20)]
    w = GroupWorker("G", SurveyData({"G": items}), FakeEncoder())
    assert len(w.split.train) >= 2 and len(w.split.test) >= 1
    return w


@pytest.mark.parametrize("task", ["train", "personalized"])
def test_local_training_draws_episodes_only_from_the_groups_train_questions(
    task: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The TEST questions are held out: every model and context-gain figure of the federation is
    measured on them. A node that also trained (or fine-tuned its personal copy) on them would
    leak the held-out answers into the model, and no run would fail."""
    w = split_worker()
    w.load_global(SMALL.to_dict(), small_weights())
    drawn_from: list[list[str]] = []
    original = pluralfed.training.sample_episode

    def recording(items: Sequence[EmbeddedItem], *args: Any, **kwargs: Any) -> Any:
        drawn_from.append([e.item.question for e in items])
        return original(items, *args, **kwargs)

    monkeypatch.setattr(pluralfed.training, "sample_episode", recording)
    settings = TrainingSettings(context_range=(2, 3), target_range=(2, 3))
    if task == "train":
        w.train(3, settings)
    else:
        w.personalized(3, settings)
    train = [e.item.question for e in w.split.train]
    assert drawn_from == [train] * 3
    assert not any(is_test_question(q) for q in train)


def test_a_nodes_example_count_is_its_number_of_train_questions() -> None:
    """The count the node joins with weighs its update in FedAvg: only the questions it trains
    on count, not its held-out TEST questions."""
    w = split_worker()
    assert w.num_train_examples == len(w.split.train)
    assert w.num_train_examples == sum(not is_test_question(f"Question {i}?") for i in range(20))


def test_worker_refuses_weights_that_do_not_fit_the_config() -> None:
    w = worker()
    weights = small_weights()
    w.load_global(SMALL.to_dict(), weights)  # the matching pair loads
    name = next(iter(weights))
    wrong_shape = {**weights, name: np.zeros((3, 3), np.float32)}
    with pytest.raises(InputError, match=rf"tensor '{name}' has shape \(3, 3\), the config"):
        w.load_global(SMALL.to_dict(), wrong_shape)
    with pytest.raises(InputError, match="missing \\['"):
        w.load_global(SMALL.to_dict(), {k: v for k, v in weights.items() if k != name})
    # a config asking for a far bigger model is refused against the weights, before building it
    huge = {**SMALL.to_dict(), "d_model": 1024, "d_ff": 1024, "n_layers": 8}
    with pytest.raises(InputError, match="do not fit its config"):
        w.load_global(huge, weights)
    with pytest.raises(InputError, match="model config is not valid"):
        w.load_global({**SMALL.to_dict(), "n_heads": 0}, weights)


def model_messages(
    weights: dict[str, np.ndarray], version: str = "v1", **header: object
) -> list[bytes]:
    """What a real coordinator streams for `weights` (coordinator.server.ModelDownload), with
    header fields overridden as given."""
    download = ModelDownload.of(GlobalModel(version, 0, weights), specs_of(weights), 4096)
    messages = list(download.messages())
    if header:
        msg = pb.ModelChunk.FromString(messages[0])
        for field, value in header.items():
            if field == "tensors":
                del msg.header.tensors[:]
                msg.header.tensors.extend(value)  # type: ignore[arg-type]
            else:
                setattr(msg.header, field, value)
        messages[0] = msg.SerializeToString()
    return messages


# A stand-in serves only the RPCs it defines; the generated base answers the rest UNIMPLEMENTED.
# The stubs mark those abstract, so making one is `# type: ignore[abstract]`.
class StandIn(pb_grpc.FederationServicer):
    """Joins with a chosen model config, offers one TRAIN task, serves chosen download bytes."""

    def __init__(self, model_config_json: str, download: list[bytes]) -> None:
        self.model_config_json = model_config_json
        self.download = download
        self.left: list[str] = []

    def Join(self, request: pb.JoinRequest, context: grpc.ServicerContext) -> pb.JoinReply:
        return pb.JoinReply(
            session_id="s-1",
            protocol_version=PROTOCOL_VERSION,
            model_config_json=self.model_config_json,
        )

    def GetTask(self, request: pb.GetTaskRequest, context: grpc.ServicerContext) -> pb.Task:
        task = pb.Task(kind=pb.TASK_KIND_TRAIN, task_id="t-1", round=1, model_version="v1")
        hp = task.hyperparameters
        hp.local_steps, hp.learning_rate = 1, 1e-3
        hp.context_range.min, hp.context_range.max = 1, 2
        hp.target_range.min, hp.target_range.max = 1, 2
        return task

    def DownloadModel(
        self, request: pb.DownloadModelRequest, context: grpc.ServicerContext
    ) -> Iterator[pb.ModelChunk]:
        for raw in self.download:
            yield pb.ModelChunk.FromString(raw)

    def Heartbeat(
        self, request: pb.HeartbeatRequest, context: grpc.ServicerContext
    ) -> pb.HeartbeatReply:
        return pb.HeartbeatReply()

    def Leave(self, request: pb.LeaveRequest, context: grpc.ServicerContext) -> pb.Ack:
        self.left.append(request.reason)
        return pb.Ack()


def run_node(
    servicer: StandIn, tmp_path: Path, w: object, caplog: pytest.LogCaptureFixture
) -> tuple[int, list[logging.LogRecord]]:
    with stand_in_coordinator(servicer) as port:
        config = NodeConfig(
            coordinator=f"127.0.0.1:{port}", group="G", data=tmp_path / "g.csv", insecure=True
        )
        with caplog.at_level(logging.ERROR, logger="pluralfed.node"):
            code = GroupNode(config, w).run()  # type: ignore[arg-type]
    return code, [r for r in caplog.records if r.levelno >= logging.ERROR]


STUB_WORKER = SimpleNamespace(num_train_examples=4, encoder=SimpleNamespace(identity="fake-enc"))


def test_an_unexpected_error_in_a_task_is_logged_and_the_node_leaves(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An error nobody planned for (here: no temporary folder, as in a read-only container,
    which torch needs in its first training step) ended the node with a bare traceback and
    without leaving, so the round waited for it until its deadline (Docker review, session
    20). It is logged with its traceback, the node leaves and exits 1."""

    def no_temporary_folder(self: GroupNode, task: pb.Task) -> None:
        raise FileNotFoundError("No usable temporary directory found in ['/tmp']")

    monkeypatch.setattr(GroupNode, "_train", no_temporary_folder)
    servicer = StandIn("{}", [])  # type: ignore[abstract]
    with stand_in_coordinator(servicer) as port:
        config = NodeConfig(
            coordinator=f"127.0.0.1:{port}", group="G", data=tmp_path / "g.csv", insecure=True
        )
        with caplog.at_level(logging.ERROR, logger="pluralfed.node"):
            code = GroupNode(config, STUB_WORKER).run()  # type: ignore[arg-type]
    assert code == 1
    assert servicer.left == ["stopped on an unexpected error"]
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and errors[0].exc_info is not None
    assert "stopping on an unexpected error" in errors[0].getMessage()


def test_a_node_without_a_writable_temporary_folder_stops_before_joining(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from pluralfed.commands.node import check_temporary_folder

    monkeypatch.setattr(tempfile, "tempdir", None)
    monkeypatch.setattr(tempfile, "_candidate_tempdir_list", lambda: [str(tmp_path / "none")])
    with pytest.raises(InputError, match=r"no writable temporary folder .*--tmpfs /tmp"):
        check_temporary_folder()


class OneAnswer(StandIn):
    """Answers every GetTask with the same task, at once, and counts the polls."""

    def __init__(self, task: pb.Task) -> None:
        super().__init__("{}", [])
        self.task, self.polls = task, 0

    def GetTask(self, request: pb.GetTaskRequest, context: grpc.ServicerContext) -> pb.Task:
        self.polls += 1
        return self.task


def wait_answer(retry_after_ms: int) -> pb.Task:
    task = pb.Task(kind=pb.TASK_KIND_WAIT)
    task.retry_after.FromMilliseconds(retry_after_ms)
    return task


def polled_for(servicer: Any, tmp_path: Path, seconds: float) -> None:
    """A node of group G runs against the stand-in `servicer` for `seconds`, then stops."""
    with stand_in_coordinator(servicer) as port:
        config = NodeConfig(
            coordinator=f"127.0.0.1:{port}", group="G", data=tmp_path / "g.csv", insecure=True
        )
        node = GroupNode(config, STUB_WORKER)  # type: ignore[arg-type]
        runner = threading.Thread(target=node.run, daemon=True)
        runner.start()
        time.sleep(seconds)
        node.stop()
        runner.join(10)
    assert not runner.is_alive()


@pytest.mark.parametrize(
    "task",
    [
        pb.Task(kind=99),  # type: ignore[arg-type]  # a kind of a newer protocol
        pb.Task(kind=pb.TASK_KIND_UNSPECIFIED),
        wait_answer(0),
        wait_answer(-5000),
    ],
    ids=["kind-99", "unspecified", "wait-0", "wait-negative"],
)
def test_an_answer_the_node_cannot_act_on_does_not_make_it_poll_in_a_loop(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, task: pb.Task
) -> None:
    """A task kind this node does not know (enums may grow: a newer coordinator), or a WAIT
    that was not held, made the node ask again at once: ~1,500 GetTask calls a second (review,
    session 20). It now waits: a second for an unheld WAIT, REFUSED_TASK_POLL_S for an unknown
    kind, which it logs once."""
    servicer = OneAnswer(task)  # type: ignore[abstract]
    with caplog.at_level(logging.WARNING, logger="pluralfed.node"):
        polled_for(servicer, tmp_path, 2.5)
    assert 1 <= servicer.polls <= 4, f"{servicer.polls} polls in 2.5 s"
    unknown = [r for r in caplog.records if "does not know" in r.getMessage()]
    assert len(unknown) == (0 if task.kind == pb.TASK_KIND_WAIT else 1)


def test_a_task_kind_the_node_does_not_know_is_logged_once_however_often_it_comes(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A newer coordinator may offer its new kind of task for a whole run: the node says once
    that it does not know it, not a warning on every poll (here every 0.2 s)."""
    monkeypatch.setattr(node_module, "REFUSED_TASK_POLL_S", 0.2)
    servicer = OneAnswer(pb.Task(kind=99))  # type: ignore[abstract, arg-type]
    with caplog.at_level(logging.WARNING, logger="pluralfed.node"):
        polled_for(servicer, tmp_path, 1.5)
    assert servicer.polls >= 3
    unknown = [r.getMessage() for r in caplog.records if "does not know" in r.getMessage()]
    assert len(unknown) == 1 and "task of kind 99" in unknown[0]


@pytest.mark.parametrize(
    ("model_config_json", "message"),
    [("{not json", "is not valid JSON"), ("[]", "not an object"), ('{"n_heads": 0}', "n_heads")],
)
def test_node_stops_with_one_error_line_on_a_bad_join_reply(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, model_config_json: str, message: str
) -> None:
    servicer = StandIn(model_config_json, [])  # type: ignore[abstract]
    code, errors = run_node(servicer, tmp_path, STUB_WORKER, caplog)
    assert code == 2
    assert len(errors) == 1 and errors[0].exc_info is None
    text = errors[0].getMessage()
    assert text.startswith("G: stopping: coordinator 127.0.0.1:") and message in text
    assert "JoinReply.model_config_json" in text
    assert servicer.left == ["stopped on an error"]


def test_node_stops_on_a_download_whose_header_declares_a_huge_tensor(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    weights = {"w": np.zeros(4, np.float32)}
    huge = pb.TensorSpec(name="w", dtype=pb.DTYPE_FLOAT32, shape=[2**40])
    download = model_messages(weights, tensors=[huge], total_bytes=2**42)
    code, errors = run_node(StandIn("", download), tmp_path, STUB_WORKER, caplog)  # type: ignore[abstract]
    assert code == 2 and len(errors) == 1
    text = errors[0].getMessage()
    assert "model 'v1' download: ModelHeader.tensors[0]: with tensor 'w'" in text
    assert "exceeds the 4294967296 bytes" in text


def test_node_stops_on_weights_that_do_not_fit_the_join_config(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    other = GPOConfig(embed_dim=DIM, d_model=16, mlp_layers=1, n_layers=1, n_heads=2, d_ff=8)
    download = model_messages(small_weights(other))
    servicer = StandIn(json.dumps(SMALL.to_dict()), download)  # type: ignore[abstract]
    code, errors = run_node(servicer, tmp_path, worker(), caplog)
    assert code == 2 and len(errors) == 1
    assert "G: stopping: the federation's model weights do not fit its config" in (
        errors[0].getMessage()
    )


# --------------------------------------------------------------------------------------------
# 3. model downloads: the header bounds and describes what follows


def received(messages: list[bytes], **kw: Any) -> dict[str, np.ndarray]:
    """receive_model over the messages as the node decodes them."""
    return receive_model(
        [decode_model_chunk(m) for m in messages],
        lambda message: InputError(f"download: {message}"),
        **kw,
    )


def test_a_real_coordinators_download_is_received() -> None:
    weights = small_weights()
    got = received(model_messages(weights), model_version="v1")
    assert list(got) == list(weights)
    assert all(np.array_equal(got[k], weights[k]) for k in weights)


def tensor_spec(name: str, shape: Sequence[int], dtype: str = "float32") -> pb.TensorSpec:
    return pb.TensorSpec(name=name, dtype=dtype_to_proto(dtype), shape=list(shape))


@pytest.mark.parametrize(
    ("header", "message"),
    [
        ({"wire_format": "pluralfed.wire/9"}, "ModelHeader.wire_format is 'pluralfed.wire/9'"),
        ({"wire_format": ""}, "ModelHeader.wire_format is ''"),
        ({"digest": b"x"}, "ModelHeader.digest is 1 bytes"),
        ({"total_bytes": 99}, "ModelHeader.total_bytes is 99, its tensors add up to 16"),
        (
            {"tensors": [tensor_spec("w", [4]), tensor_spec("w", [4])], "total_bytes": 32},
            "tensor 'w' listed twice",
        ),
        ({"tensors": [pb.TensorSpec(name="w", shape=[4])]}, "unknown dtype code 0"),
        ({"tensors": [tensor_spec("", [4])]}, "tensor name must be a non-empty string"),
        (
            {"tensors": [tensor_spec("w", [2**62])], "total_bytes": 2**64 - 1},
            "more than a uint64 byte count",
        ),
        (
            {"tensors": [tensor_spec("w", [2**32] * 3)], "total_bytes": 0},
            "more than a uint64 byte count",
        ),
        (
            {"tensors": [tensor_spec("w", [2**40])], "total_bytes": 2**42},
            "exceeds the 4294967296 bytes",
        ),
        # the header describes other tensors than those that follow
        ({"tensors": [tensor_spec("other", [4])]}, "unexpected tensor 'w': not in the model"),
        ({"tensors": [tensor_spec("w", [2, 2])]}, "tensor 'w': shape (4,), expected (2, 2)"),
        (
            {"tensors": [tensor_spec("w", [4]), tensor_spec("z", [0])]},
            "1 of 2 tensors missing: 'z'",
        ),
    ],
)
def test_a_download_must_match_its_header(header: dict[str, Any], message: str) -> None:
    weights = {"w": np.arange(4, dtype=np.float32)}
    with pytest.raises(WireError) as err:
        received(model_messages(weights, **header))
    assert message in str(err.value)


def test_a_chunk_declaring_a_huge_shape_allocates_nothing() -> None:
    weights = {"a": np.zeros(1, np.float32)}
    messages = model_messages(weights)
    for shape in [(2**62,), (2**32,) * 3, (2**40,)]:
        bad = [messages[0], serialized_tensor_part(Chunk("a", "float32", shape, 0, b"\0" * 4))]
        with pytest.raises(WireError, match="tensor 'a': shape"):
            received([*bad, messages[-1]])


def test_the_stream_must_be_the_version_asked_for_and_keep_its_digest() -> None:
    weights = {"w": np.arange(4, dtype=np.float32)}
    with pytest.raises(InputError, match="asked for model version 'v2', the stream is 'v1'"):
        received(model_messages(weights), model_version="v2")
    messages = model_messages(weights)
    other = pb.ModelChunk(trailer=pb.StreamTrailer(digest=b"\1" * 32)).SerializeToString()
    with pytest.raises(WireError, match=r"not the one ModelHeader\.digest announced"):
        received([*messages[:-1], other])
    with pytest.raises(InputError, match="unexpected 'header' message"):
        received([messages[0], *messages])


def test_an_assembler_without_expected_model_refuses_sizes_beyond_uint64() -> None:
    for shape in [(2**32,) * 3, (2**64,)]:
        with pytest.raises(WireError, match="uint64"):
            TensorAssembler(None).add(Chunk("a", "float32", shape, 0, b""))
    with pytest.raises(WireError, match="tensor 'a': cannot hold its"):
        TensorAssembler(None, collect=True).add(Chunk("a", "float32", (2**61,), 0, b""))
    with pytest.raises(WireError, match="uint64"):
        header_specs(
            pb.ModelHeader(
                wire_format=WIRE_FORMAT, digest=bytes(32), tensors=[tensor_spec("a", [2**64 - 1])]
            )
        )


def test_the_download_cap_is_a_parameter() -> None:
    """The cap is a parameter: a node may accept less than the default."""
    weights = {"w": np.arange(1024, dtype=np.float32)}
    with pytest.raises(WireError, match="exceeds the 1000 bytes"):
        received(model_messages(weights), max_bytes=1000)
    assert len(received(model_messages(weights), max_bytes=4096)["w"]) == 1024


# --------------------------------------------------------------------------------------------
# 4. safetensors files


@pytest.mark.parametrize(
    ("order", "message"),
    [
        ("not json", "metadata 'pluralfed.order' is not JSON"),
        ("5", "metadata 'pluralfed.order' is not a list of tensor names: '5'"),
        ('{"a": 1}', "is not a list of tensor names"),
        ("[1]", "is not a list of tensor names"),
        ('["a", "a"]', "does not match the tensors in the file"),
        ('["b"]', "does not match the tensors in the file"),
    ],
)
def test_load_tensors_checks_the_recorded_order(tmp_path: Path, order: str, message: str) -> None:
    path = tmp_path / "t.safetensors"
    save_file({"a": np.zeros(2, np.float32)}, str(path), metadata={"pluralfed.order": order})
    with pytest.raises(InputError) as err:
        load_tensors(path)
    assert str(err.value).startswith(f"{path}: ")
    assert message in str(err.value)


@pytest.mark.parametrize(
    "array",
    [
        np.array([1.0, np.nan], np.float32),
        np.array([np.inf], np.float64),
        np.array([-np.inf], np.float16),
        float32_to_bfloat16(np.array([0.0, np.nan], np.float32)),
    ],
)
def test_load_tensors_refuses_non_finite_weights(tmp_path: Path, array: np.ndarray) -> None:
    path = tmp_path / "t.safetensors"
    save_tensors(path, {"ok": np.ones(3, np.float32), "bad": array})
    with pytest.raises(NonFiniteError, match=rf"^{path}: tensor 'bad': non-finite value .* tensor"):
        load_tensors(path)
    assert list(load_tensors(path, check_finite=False)) == ["ok", "bad"]


def test_load_tensors_refuses_a_bool_that_is_not_0_or_1(tmp_path: Path) -> None:
    path = tmp_path / "t.safetensors"
    save_file({"b": np.array([0, 2], np.uint8).view(np.bool_)}, str(path))
    with pytest.raises(WireError, match="bool element 1 is byte 2"):
        load_tensors(path)


def test_saved_weights_still_load(tmp_path: Path) -> None:
    path = tmp_path / "t.safetensors"
    weights = small_weights()
    save_tensors(path, weights)
    assert digest_of(load_tensors(path)) == digest_of(weights)


# --------------------------------------------------------------------------------------------
# 5. a task that fails here (training diverges, predictions are not finite) is reported as
#    failed; the node goes on, with no poisoned state, and never uploads what it cannot stand by


class Rounds(StandIn):
    """Offers `len(downloads)` tasks of `kind`, round n serving downloads[n - 1]; records the
    uploads (finite or not) and the tasks the node reports as failed; then SHUTDOWN."""

    def __init__(
        self, downloads: list[list[bytes]], kind: pb.TaskKind.ValueType = pb.TASK_KIND_TRAIN
    ) -> None:
        super().__init__(json.dumps(SMALL.to_dict()), [])
        self.downloads, self.kind, self.round = downloads, kind, 0
        self.uploads: list[bool] = []
        self.failed: list[tuple[str, str]] = []
        self.reports = 0

    def GetTask(self, request: pb.GetTaskRequest, context: grpc.ServicerContext) -> pb.Task:
        if self.round >= len(self.downloads):
            return pb.Task(kind=pb.TASK_KIND_SHUTDOWN)
        self.round += 1
        task = super().GetTask(request, context)
        task.kind, task.round, task.task_id = self.kind, self.round, f"t-{self.round}"
        task.hyperparameters.local_steps = 3
        task.deadline.FromMilliseconds(int((time.time() + 60) * 1000))
        self.download = self.downloads[self.round - 1]
        return task

    def UploadUpdate(
        self, request_iterator: Iterator[pb.UpdateChunk], context: grpc.ServicerContext
    ) -> pb.UploadReply:
        assembler = TensorAssembler(collect=True, check_finite=False)
        digest = b""
        for message in request_iterator:
            if message.WhichOneof("part") == "tensor":
                assembler.add(chunk_from_proto(message.tensor))
            elif message.WhichOneof("part") == "trailer":
                digest = message.trailer.digest
        assembler.finish(digest)
        finite = all(np.isfinite(v).all() for v in assembler.to_dict().values())
        self.uploads.append(bool(finite))
        return pb.UploadReply(accepted=bool(finite))

    def ReportEvaluation(
        self, request: pb.EvaluationReport, context: grpc.ServicerContext
    ) -> pb.Ack:
        self.reports += 1
        return pb.Ack()

    def Heartbeat(
        self, request: pb.HeartbeatRequest, context: grpc.ServicerContext
    ) -> pb.HeartbeatReply:
        if request.state == pb.NODE_STATE_FAILED:
            self.failed.append((request.task_id, request.message))
        return pb.HeartbeatReply()


def diverging_weights() -> dict[str, np.ndarray]:
    """Finite weights that pass every download check but make training blow up (found by the
    session-14 review: one norm's gain times 1e10)."""
    weights = small_weights()
    name = next(n for n in weights if n.endswith("norm2.weight"))
    return {**weights, name: weights[name] * np.float32(1e10)}


def test_a_round_that_diverges_is_reported_failed_and_does_not_poison_later_rounds(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Before: the Adam state kept across rounds took the NaN, and every later round, trained
    from a clean global model, uploaded NaN (refused by the coordinator; the node never knew)."""
    servicer = Rounds([model_messages(diverging_weights())] + [model_messages(small_weights())] * 2)
    code, errors = run_node(servicer, tmp_path, worker(), caplog)
    assert code == 0
    assert servicer.uploads == [True, True]  # round 1 uploads nothing; rounds 2 and 3 are finite
    assert [task for task, _ in servicer.failed] == ["t-1"]
    assert "local training diverged" in servicer.failed[0][1]
    assert len(errors) == 1 and "round 1 update failed: local training diverged" in (
        errors[0].getMessage()
    )


class DivergesUntilClosed(Rounds):
    """Offers round 1's task, whose weights make training diverge, until `open_s` has passed
    (a coordinator offers a task until it has its answer: a FAILED heartbeat may come after
    the next GetTask), then SHUTDOWN; counts the downloads."""

    def __init__(self, open_s: float) -> None:
        super().__init__([model_messages(diverging_weights())])
        self.closes_at = time.monotonic() + open_s
        self.served = 0

    def GetTask(self, request: pb.GetTaskRequest, context: grpc.ServicerContext) -> pb.Task:
        if time.monotonic() >= self.closes_at:
            return pb.Task(kind=pb.TASK_KIND_SHUTDOWN)
        self.round = 0  # the same task again
        return super().GetTask(request, context)

    def DownloadModel(
        self, request: pb.DownloadModelRequest, context: grpc.ServicerContext
    ) -> Iterator[pb.ModelChunk]:
        self.served += 1
        yield from super().DownloadModel(request, context)


def test_a_task_that_failed_here_is_not_trained_again_when_offered_again(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A task that failed on this node (TaskFailed) is answered: offered again, it is waited
    out like a refused one, not downloaded, trained (diverging again) and reported failed
    once more on every offer until its round closes."""
    monkeypatch.setattr(node_module, "REFUSED_TASK_POLL_S", 0.2)
    servicer = DivergesUntilClosed(open_s=1.5)
    code, errors = run_node(servicer, tmp_path, worker(), caplog)
    assert code == 0 and servicer.uploads == []
    assert servicer.served == 1 and [task for task, _ in servicer.failed] == ["t-1"]
    assert len(errors) == 1


@pytest.mark.parametrize("kind", [pb.TASK_KIND_TRAIN, pb.TASK_KIND_EVALUATE])
def test_a_model_that_predicts_no_distribution_fails_the_task_not_the_node(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, kind: pb.TaskKind.ValueType
) -> None:
    """Every weight 3e38 (finite) makes the predictions NaN; before, the metric's ValueError
    escaped `GroupNode.run` as a traceback."""
    huge = {k: np.full(v.shape, 3e38, np.float32) for k, v in small_weights().items()}
    servicer = Rounds([model_messages(huge)], kind=kind)
    code, errors = run_node(servicer, tmp_path, worker(), caplog)
    assert code == 0 and servicer.uploads == [] and servicer.reports == 0
    assert [task for task, _ in servicer.failed] == ["t-1"]
    assert "not finite" in servicer.failed[0][1] and len(errors) == 1


def test_weights_of_another_dtype_are_refused() -> None:
    """Loading casts silently: float64 1e300 is finite on the wire and inf in the model."""
    weights = small_weights()
    name = next(iter(weights))
    for wrong in (weights[name].astype(np.float64) * 1e300, weights[name] > 0):
        with pytest.raises(InputError, match=rf"tensor '{name}' is (float64|bool), the model's"):
            worker().load_global(SMALL.to_dict(), {**weights, name: wrong})


@pytest.mark.parametrize(
    ("task_id", "name"),
    [
        ("t-1", "round-00001-t-1.safetensors"),
        ("../../escaped", None),
        ("no/such/dir", None),
        ("x" * 300, None),
        ("", None),
    ],
)
def test_the_audit_copy_is_named_safely_whatever_the_task_id(
    task_id: str, name: str | None
) -> None:
    """The task id is the coordinator's free text: a `/`, `..` or 300 characters must not
    make the node write elsewhere or fail on the file name."""
    got = audit_file_name(1, task_id)
    if name is not None:
        assert got == name
    else:
        assert re.fullmatch(r"round-00001-id-[0-9a-f]{32}\.safetensors", got), got


WIDER = GPOConfig(embed_dim=DIM, d_model=128, mlp_layers=1, n_layers=1, n_heads=2, d_ff=128)


def run_with_audit_folder(servicer: Rounds, audit: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A node with `save_updates_dir` = `audit` against `servicer`, run until it ends (0)."""
    with stand_in_coordinator(servicer) as port:
        config = NodeConfig(
            coordinator=f"127.0.0.1:{port}",
            group="G",
            data=audit.parent / "g.csv",
            insecure=True,
            save_updates_dir=audit,
        )
        with caplog.at_level(logging.ERROR, logger="pluralfed.node"):
            assert GroupNode(config, worker()).run() == 0


@pytest.fixture
def small_file_limit() -> Iterator[int]:
    """Writes past 128 KiB fail in this process as on a full disk (EFBIG instead of ENOSPC; the
    signal such a write also raises is ignored meanwhile). Far above what a test logs (pytest
    captures output in files), below a model of WIDER's size."""
    limit = 128 * 1024
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    previous = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))
    try:
        yield limit
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, previous)


def test_an_audit_copy_that_does_not_fit_on_the_disk_fails_the_task_not_the_node(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, small_file_limit: int
) -> None:
    """Soak review: safetensors' own error type for a failed write (here a file over the size
    limit, as on a full disk) escaped the node's `except OSError`, and the node stopped ("an
    unexpected error") and left the federation, in every round it was asked to train."""
    servicer = Rounds([model_messages(small_weights(WIDER))])
    servicer.model_config_json = json.dumps(WIDER.to_dict())
    assert sum(a.nbytes for a in small_weights(WIDER).values()) > 2 * small_file_limit
    run_with_audit_folder(servicer, tmp_path / "audit", caplog)
    assert servicer.uploads == [] and [t for t, _ in servicer.failed] == ["t-1"]
    assert "cannot save the audit copy" in servicer.failed[0][1]
    assert "File too large" in servicer.failed[0][1]
    assert list((tmp_path / "audit").iterdir()) == []  # no partial file left


def test_a_node_that_cannot_save_its_audit_copy_uploads_nothing(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    (tmp_path / "audit").write_text("a file where the folder should be")
    servicer = Rounds([model_messages(small_weights())])
    run_with_audit_folder(servicer, tmp_path / "audit", caplog)
    assert servicer.uploads == [] and [t for t, _ in servicer.failed] == ["t-1"]
    assert "cannot save the audit copy" in servicer.failed[0][1]
