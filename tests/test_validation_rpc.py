"""Every field a node sends besides uploads, checked by the real coordinator stack: RoundEngine and
its gRPC server in this process, real mutual TLS on 127.0.0.1, in-process fake nodes.

Bad input gets a status that names the field (or, for a stale or foreign report, says why),
never an opaque transport error: an identifier of half a megabyte is quoted back cut short, not
echoed into a status gRPC would drop (RESOURCE_EXHAUSTED) nor into a log line. Free text that is
logged (a Leave reason) cannot forge log lines. A bad evaluation report is the node's final answer,
so the round does not wait for it until the deadline, and no report on another model version, with
non-finite, out-of-range, missing or contradictory figures, or with per-question scores nobody
asked for, is recorded.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from fedharness import FakeNode, reject_name, rpc_error, scaled, update_messages, wait_until
from test_update_validation import ALLOW, ENCODER, Federation, serve, toy_weights

import coordinator.server as server_module
from coordinator.settings import RoundSettings
from pluralfed.errors import MAX_QUOTED, quoted
from pluralfed.proto.pluralfed.v1 import federation_pb2 as pb
from pluralfed.protocol import REPLACED_SESSION_MARK
from pluralfed.transport import PROTOCOL_VERSION

pytestmark = pytest.mark.timeout(120)

HUGE = "x" * 500_000  # far over gRPC's 16 KiB status limit, well under the message limit
# what a sane status message or log line stays under, whatever a node sends
SHORT = 1000
GOOD_METRICS = {
    "model": 0.5,
    "uniform_context": 0.4,
    "uniform_baseline": 0.3,
    "prior_baseline": 0.35,
}


def quiet_settings(**overrides: Any) -> RoundSettings:
    """No round ever starts (no quorum): for checks of single calls."""
    values: dict[str, Any] = {"rounds": 1, "min_nodes": 9, "session_timeout_s": 120.0}
    return RoundSettings(**{**values, **overrides})


@pytest.fixture
def quiet(tmp_path: Path) -> Iterator[Federation]:
    with serve(tmp_path, quiet_settings()) as fed:
        yield fed


def status(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> tuple[grpc.StatusCode, str]:
    err = rpc_error(fn, *args, **kwargs)
    return err.code(), str(err.details())


def join_request(**fields: Any) -> pb.JoinRequest:
    base: dict[str, Any] = {
        "group": "Good A",
        "role": pb.ROLE_TRAIN,
        "num_train_examples": 10,
        "software_version": "0.1.0",
        "protocol_version": PROTOCOL_VERSION,
        "encoder_id": ENCODER,
    }
    return pb.JoinRequest(**{**base, **fields})


def longest_log_line(caplog: pytest.LogCaptureFixture) -> int:
    return max((len(r.getMessage()) for r in caplog.records), default=0)


def test_join_fields_are_checked(quiet: Federation, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    with quiet.node("node-good-a") as node:
        join = node.stub.Join
        cases: list[tuple[dict[str, Any], str]] = [
            ({"software_version": HUGE}, "software_version"),
            ({"software_version": "v" * 65}, "software_version"),
            ({"software_version": "0.1.0\nINFO forged line"}, "software_version"),
            ({"labels": {f"k{i}": "v" for i in range(33)}}, "labels"),
            ({"labels": {"site": "v" * 257}}, "labels['site']"),
            ({"labels": {"a\nb": "v"}}, "labels key"),
            ({"labels": {"": "v"}}, "labels"),
            # a group is named exactly, as the allow-list names it: before, the coordinator
            # stripped these, so " Good A" joined as "Good A"
            ({"group": " Good A"}, "group"),
            ({"group": "Good A\n"}, "group"),
            ({"group": "Good\aA"}, "group"),
            ({"group": ""}, "group"),
        ]
        for fields, named in cases:
            code, details = status(join, join_request(**fields), timeout=30)
            assert code == grpc.StatusCode.INVALID_ARGUMENT, (list(fields), code, details)
            assert details.startswith(named) and len(details) < SHORT, details
        # another encoder is named in the refusal, cut short: not a status too big to send
        code, details = status(join, join_request(encoder_id=HUGE), timeout=30)
        assert code == grpc.StatusCode.FAILED_PRECONDITION and "encoder mismatch" in details
        assert ENCODER in details and len(details) < SHORT, details
        assert not quiet.engine.live_sessions()

        # labels are logged (the protocol says so), as the version is: one line each join
        reply = join(join_request(labels={"site": "Lab 3", "gpu": "none"}), timeout=30)
        assert reply.session_id
        line = next(r.getMessage() for r in caplog.records if "joined as" in r.getMessage())
        assert "'0.1.0'" in line and "'site': 'Lab 3'" in line, line
        # an evaluate-only node sends the size of its context questions: no weight, so accepted
        judge = quiet.node("node-judge")
        with judge:
            judge.stub.Join(
                join_request(group="Judge", role=pb.ROLE_EVALUATE_ONLY, num_train_examples=7),
                timeout=30,
            )
    assert longest_log_line(caplog) < SHORT


def test_a_join_speaking_another_protocol_version_is_refused(quiet: Federation) -> None:
    """A node of another protocol version would misread tasks and updates: its Join is refused
    (FAILED_PRECONDITION, naming both versions) and no session is made. Only the @slow
    test_coordinator_auth checked this before."""
    with quiet.node("node-good-a") as node:
        for version in (0, PROTOCOL_VERSION + 1):
            code, details = status(
                node.stub.Join, join_request(protocol_version=version), timeout=30
            )
            assert code == grpc.StatusCode.FAILED_PRECONDITION, (version, code, details)
            assert f"protocol version {version} is not supported" in details, details
            assert f"speaks version {PROTOCOL_VERSION}" in details, details
            assert not quiet.engine.live_sessions()
        assert node.stub.Join(join_request(), timeout=30).session_id  # the control


def test_the_join_limits_the_proto_states_hold_over_rpc(quiet: Federation) -> None:
    """JoinRequest's comments give these limits; the protocol review found them tested only at
    the engine, or not at all. An empty model_version downloads the current model, as
    DownloadModelRequest says."""
    with quiet.node("node-good-a") as node:
        over: list[dict[str, Any]] = [
            {"num_train_examples": 10_000_001},
            {"labels": {"k" * 65: "v"}},
            {"role": pb.ROLE_UNSPECIFIED},
            {"num_train_examples": 0},
        ]
        for fields in over:
            code, details = status(node.stub.Join, join_request(**fields), timeout=30)
            assert code == grpc.StatusCode.INVALID_ARGUMENT, (fields, code, details)
        assert not quiet.engine.live_sessions()
        at_the_limits = join_request(num_train_examples=10_000_000, labels={"k" * 64: "v"})
        session_id = node.stub.Join(at_the_limits, timeout=30).session_id
        request = pb.DownloadModelRequest(session_id=session_id, model_version="")
        messages = list(node.stub.DownloadModel(request, timeout=30))
        assert messages[0].header.model_version == quiet.engine.model_version
        assert messages[-1].WhichOneof("part") == "trailer"


def test_huge_identifiers_are_refused_with_a_short_clear_status(
    quiet: Federation, caplog: pytest.LogCaptureFixture
) -> None:
    """Before: each of these came back RESOURCE_EXHAUSTED ("received metadata size exceeds hard
    limit"), and a claimed group or task id was logged whole."""
    caplog.set_level(logging.INFO)
    with quiet.node("node-good-a") as node:
        node.join(ENCODER, 10)
        checks: list[tuple[str, Callable[[], Any], grpc.StatusCode, str]] = [
            (
                "Heartbeat",
                lambda: node.heartbeat(session_id=HUGE),
                grpc.StatusCode.UNAUTHENTICATED,
                "session",
            ),
            (
                "GetTask",
                lambda: node.get_task(0.1, session_id=HUGE),
                grpc.StatusCode.UNAUTHENTICATED,
                "session",
            ),
            (
                "Leave",
                lambda: node.leave(session_id=HUGE),
                grpc.StatusCode.UNAUTHENTICATED,
                "session",
            ),
            (
                "DownloadModel",
                lambda: node.download(HUGE),
                grpc.StatusCode.NOT_FOUND,
                "model version",
            ),
            (
                "ReportEvaluation (group)",
                lambda: report(node, pb.Task(task_id="t"), group=HUGE),
                grpc.StatusCode.INVALID_ARGUMENT,
                "group",
            ),
            (
                "ReportEvaluation (claims another group)",
                lambda: report(node, pb.Task(task_id="t"), group="y" * 200),
                grpc.StatusCode.PERMISSION_DENIED,
                "may not act as",
            ),
            (
                "ReportEvaluation (task id)",
                lambda: report(node, pb.Task(task_id=HUGE)),
                grpc.StatusCode.FAILED_PRECONDITION,
                "is not the open one",
            ),
        ]
        for what, call, code, says in checks:
            got, details = status(call)
            assert got == code and says in details and len(details) < SHORT, (what, got, details)
        # an upload's header: refused STALE with a short reply message (and a short log line)
        reply = node.upload(
            update_messages(node.session_id, pb.Task(task_id=HUGE, model_version=HUGE), {}, 1)
        )
        assert reply.reason == pb.REJECT_REASON_STALE and len(reply.message) < SHORT, reply
        assert node.heartbeat().current_round == 0  # the session is unharmed
    assert longest_log_line(caplog) < SHORT


BAD_UTF8_FIELD_1 = b"\x0a\x02\xff\xfe"  # field 1, a string in both messages, not UTF-8


def test_a_request_that_does_not_decode_is_invalid_not_internal(
    quiet: Federation, caplog: pytest.LogCaptureFixture
) -> None:
    """A request deserializer that raised left gRPC to answer INTERNAL ("Exception deserializing
    request!"), log a traceback for every call and keep ~16 KiB of memory per call for good
    (review, session 20: 4,000 such Joins, +64 MB). Health/Check takes any certificate of the CA,
    allow-listed or not, so any such certificate could exhaust the coordinator's memory."""
    with quiet.node("node-good-a") as node:
        # bytes as they are
        join: grpc.UnaryUnaryMultiCallable[bytes, bytes] = node.channel.unary_unary(
            "/pluralfed.v1.Federation/Join"
        )
        code, details = status(join, BAD_UTF8_FIELD_1, timeout=10)
        assert code == grpc.StatusCode.INVALID_ARGUMENT, details
        assert "not a valid pluralfed.v1.JoinRequest" in details and "UTF-8" in details
        assert node.join(ENCODER, 10).session_id  # the next good request is served
    stranger_certs = quiet.pki.node("node-stranger")  # of the CA, not in the allow-list
    with FakeNode(quiet.port, "Stranger", tls_dir=stranger_certs) as stranger:
        check: grpc.UnaryUnaryMultiCallable[bytes, bytes] = stranger.channel.unary_unary(
            "/grpc.health.v1.Health/Check"
        )
        code, details = status(check, BAD_UTF8_FIELD_1, timeout=10)
        assert code == grpc.StatusCode.INVALID_ARGUMENT, details
        assert "not a valid grpc.health.v1.HealthCheckRequest" in details
        assert check(b"", timeout=10) == b"\x08\x01"  # SERVING: a good Check still answers
    assert not [r for r in caplog.records if "deserializ" in r.getMessage()]


def test_a_refused_upload_repeated_in_a_loop_is_one_log_line(
    quiet: Federation, caplog: pytest.LogCaptureFixture
) -> None:
    """Each refused upload logged a line, so a node could grow the coordinator's log at network
    speed (review, session 20); now the first of each (node, reason) is logged, then one a
    minute with a count."""
    caplog.set_level(logging.INFO)
    with quiet.node("node-good-a") as node:
        node.join(ENCODER, 10)
        stale = pb.Task(kind=pb.TASK_KIND_TRAIN, task_id="f" * 32, round=1, model_version="v")
        replies = [
            node.upload(update_messages(node.session_id, stale, {"w": np.zeros(4, np.float32)}, 1))
            for _ in range(20)
        ]
    assert all(not r.accepted and r.message for r in replies)
    lines = [r for r in caplog.records if "upload refused before reading it" in r.getMessage()]
    assert len(lines) == 1, [r.getMessage() for r in lines]


def test_a_check_only_join_leaves_the_running_nodes_session_alone(quiet: Federation) -> None:
    """`pluralfed node check` joined like the node, so run beside a running node it replaced the
    node's session (and threw away its round's work, review session 20). A check_only Join is
    checked as a join is and opens nothing."""
    with quiet.node("node-good-a") as running, quiet.node("node-good-a") as check:
        running.join(ENCODER, 10)
        reply = check.stub.Join(join_request(check_only=True), timeout=10)
        assert reply.session_id == "" and reply.run_id == running.run_id
        assert running.heartbeat().current_round == 0  # the running node's session still works
        code, details = status(check.stub.Join, join_request(check_only=True, encoder_id="x"))
        assert code == grpc.StatusCode.FAILED_PRECONDITION and "encoder mismatch" in details


def test_a_replaced_session_is_told_so_and_repeated_replacements_are_warned_about(
    quiet: Federation, caplog: pytest.LogCaptureFixture
) -> None:
    """Two processes with one node certificate replace each other's session every few seconds,
    for ever: each was told only "unknown or expired session", and the coordinator's log said
    "joined" again and again (review, session 20)."""
    caplog.set_level(logging.INFO)
    with quiet.node("node-good-a") as first, quiet.node("node-good-a") as second:
        first.join(ENCODER, 10)
        second.join(ENCODER, 10)
        code, details = status(first.heartbeat)
        assert code == grpc.StatusCode.UNAUTHENTICATED
        assert "was replaced by a newer Join with this node's certificate" in details
        assert "another process runs as this node" in details and "ipv4:127.0.0.1:" in details
        assert not [r for r in caplog.records if "two processes" in r.getMessage()]
        for node in (first, second, first):  # 3 more replacements within the window
            node.join(ENCODER, 10)
        warnings = [r.getMessage() for r in caplog.records if "two processes" in r.getMessage()]
        assert len(warnings) == 1 and "node Good A joined again 3 times" in warnings[0], warnings
        assert "unknown or expired" in status(first.heartbeat, "f" * 32)[1]  # never issued


def test_a_join_that_ended_again_is_not_taken_for_a_second_process(quiet: Federation) -> None:
    """An older `pluralfed node check` joins and leaves at once: the running node whose session
    it took is told so without the mark that makes a node count a second process (three such
    checks stopped it, review of session 20)."""
    with quiet.node("node-good-a") as running, quiet.node("node-good-a") as old_check:
        running.join(ENCODER, 10)
        old_check.join(ENCODER, 10)
        old_check.leave()
        code, details = status(running.heartbeat)
        assert code == grpc.StatusCode.UNAUTHENTICATED
        assert "taken over by a Join" in details and REPLACED_SESSION_MARK not in details


def test_restarts_of_a_node_whose_process_died_are_not_warned_about(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A session silent for two heartbeat intervals is a process that died: its replacement by
    the restarted node is no sign of a second process, however often it happens."""
    caplog.set_level(logging.INFO)
    with (
        serve(tmp_path, quiet_settings(heartbeat_interval_s=0.5)) as fed,
        fed.node("node-good-a") as node,
    ):
        for _ in range(4):
            node.join(ENCODER, 10)
            time.sleep(1.2)  # silent past 2 x 0.5 s: as if the process had died
    assert not [r for r in caplog.records if "two processes" in r.getMessage()]


def test_heartbeat_fields_are_checked(quiet: Federation) -> None:
    with quiet.node("node-good-a") as node:
        node.join(ENCODER, 10)

        def beat(**fields: Any) -> pb.HeartbeatReply:
            request = pb.HeartbeatRequest(session_id=node.session_id, **fields)
            return node.stub.Heartbeat(request, timeout=30)

        cases: list[tuple[dict[str, Any], str]] = [
            ({"progress": float("nan")}, "progress"),
            ({"progress": float("inf")}, "progress"),
            ({"progress": -0.1}, "progress"),
            ({"progress": 1.5}, "progress"),
            ({"task_id": "t" * 65}, "task_id"),
            ({"task_id": "abc\n"}, "task_id"),
            ({"message": "m" * 1001}, "message"),
        ]
        for fields, named in cases:
            code, details = status(beat, **fields)
            assert code == grpc.StatusCode.INVALID_ARGUMENT and details.startswith(named), details
        # what a node may send: any state (one this coordinator does not know is a newer node's),
        # a multi-line error message, progress in [0, 1]
        beat(state=pb.NODE_STATE_FAILED, task_id="f" * 32, progress=1.0, message="boom\ntrace")
        beat(state=99, progress=0.0)
        # a lost session is said first, whatever the fields: the node must join again (before,
        # a node that sent a bad progress with it was told INVALID_ARGUMENT, never to rejoin)
        node.session_id = "gone"
        for fields, _ in cases:
            code, details = status(beat, **fields)
            assert code == grpc.StatusCode.UNAUTHENTICATED, (fields, code, details)


def test_a_heartbeat_reply_says_the_interval_to_beat_at(tmp_path: Path) -> None:
    """HeartbeatReply.heartbeat_interval is "the interval to use from now on": every reply
    carries the coordinator's setting, as the JoinReply does."""
    with (
        serve(tmp_path, quiet_settings(heartbeat_interval_s=7.5)) as fed,
        fed.node("node-good-a") as node,
    ):
        assert node.join(ENCODER, 10).heartbeat_interval.ToMilliseconds() == 7500
        reply = node.heartbeat()
        assert reply.HasField("heartbeat_interval"), reply
        assert reply.heartbeat_interval.ToMilliseconds() == 7500


def test_a_join_reply_says_how_long_a_silent_session_lives(tmp_path: Path) -> None:
    """JoinReply.session_timeout is the protocol's word on how long a session lives without a
    call (several heartbeat intervals): it is the coordinator's setting, to the millisecond.
    No test read the field; the node keeps to the heartbeat interval, but a client sizing its
    retries by this one must not be told another figure."""
    with (
        serve(tmp_path, quiet_settings(session_timeout_s=45.5)) as fed,
        fed.node("node-good-a") as node,
    ):
        assert node.join(ENCODER, 10).session_timeout.ToMilliseconds() == 45_500


def test_leave_reason_is_bounded_and_cannot_forge_log_lines(
    quiet: Federation, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    with quiet.node("node-good-a") as node:
        node.join(ENCODER, 10)
        leave = node.stub.Leave
        code, details = status(
            leave, pb.LeaveRequest(session_id=node.session_id, reason=HUGE), timeout=30
        )
        assert code == grpc.StatusCode.INVALID_ARGUMENT and details.startswith("reason"), details
        assert node.heartbeat().current_round == 0  # refused: still a member
        forged = "done\n2099-01-01 INFO pluralfed.coordinator node Good B joined as train"
        leave(pb.LeaveRequest(session_id=node.session_id, reason=forged), timeout=30)
        assert not quiet.engine.live_sessions()
    lines = [r.getMessage() for r in caplog.records if "left" in r.getMessage()]
    assert lines == [
        "node Good A left: 'done\\n2099-01-01 INFO pluralfed.coordinator node Good B "
        "joined as train'"
    ], lines


def test_quoted_text_is_escaped_whole_up_to_the_limit_and_cut_beyond_it() -> None:
    """What quotes a caller's text in a status or a log line: repr-escaped whether it is cut or
    not (a newline cannot forge a log line), whole up to MAX_QUOTED characters, cut beyond."""
    at_limit = "x" * MAX_QUOTED
    assert quoted(at_limit) == repr(at_limit)
    assert quoted(at_limit + "y") == f"{at_limit!r}... ({MAX_QUOTED + 1} characters)"
    forged = "done\n2099-01-01 INFO pluralfed.coordinator node B joined" + "z" * MAX_QUOTED
    shown = quoted(forged)
    assert "\n" not in shown and shown.startswith("'done\\n2099-01-01 INFO")
    assert shown.endswith(f"... ({len(forged)} characters)")


def test_get_task_without_wait_is_held_for_the_coordinators_default(
    quiet: Federation, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The protocol: the coordinator uses its own default when `wait` is unset. Before, an unset
    wait meant 0 s: WAIT at once with retry_after 0, a node busy-polling the coordinator."""
    monkeypatch.setattr(server_module, "DEFAULT_WAIT_S", 1.0)
    with quiet.node("node-good-a") as node:
        node.join(ENCODER, 10)
        started = time.monotonic()
        task = node.stub.GetTask(pb.GetTaskRequest(session_id=node.session_id), timeout=30)
        assert task.kind == pb.TASK_KIND_WAIT and time.monotonic() - started >= 0.9
        assert task.retry_after.ToMilliseconds() == 0  # it waited: it may ask again at once
        started = time.monotonic()  # an explicit zero still answers at once ...
        task = node.get_task(0.0)
        assert task.kind == pb.TASK_KIND_WAIT
        assert time.monotonic() - started < 0.9
        # ... but asks the node to wait out the rest of a second before the next poll
        assert task.retry_after.ToMilliseconds() == 1000
        assert node.get_task(0.4).retry_after.ToMilliseconds() == 600


def test_a_negative_wait_is_taken_as_no_wait(quiet: Federation) -> None:
    """GetTaskRequest.wait below zero (a node's arithmetic gone wrong) counts as zero: WAIT at
    once, with the rest of a second to wait before the next poll, as for an explicit zero,
    not a second plus the negative amount."""
    with quiet.node("node-good-a") as node:
        node.join(ENCODER, 10)
        request = pb.GetTaskRequest(session_id=node.session_id)
        request.wait.FromMilliseconds(-5000)
        started = time.monotonic()
        task = node.stub.GetTask(request, timeout=30)
        assert task.kind == pb.TASK_KIND_WAIT and time.monotonic() - started < 0.9
        assert task.retry_after.ToMilliseconds() == 1000


def test_get_task_holds_a_call_no_longer_than_the_coordinators_cap(
    quiet: Federation, monkeypatch: pytest.MonkeyPatch
) -> None:
    """GetTaskRequest.wait: the coordinator caps it (60 s; 1 s here), so a node asking for an
    hour holds one of its threads no longer (the protocol review found the cap untested)."""
    monkeypatch.setattr(server_module, "MAX_WAIT_S", 1.0)
    with quiet.node("node-good-a") as node:
        node.join(ENCODER, 10)
        request = pb.GetTaskRequest(session_id=node.session_id)
        request.wait.FromSeconds(3600)
        started = time.monotonic()
        task = node.stub.GetTask(request, timeout=30)
        assert task.kind == pb.TASK_KIND_WAIT
        assert 0.9 <= time.monotonic() - started < 10


def report(
    node: FakeNode,
    task: pb.Task,
    *,
    metrics: Mapping[str, float] = GOOD_METRICS,
    num_questions: int = 12,
    mean_alignment: float | None = None,
    group: str | None = None,
    **fields: Any,
) -> pb.Ack:
    """ReportEvaluation as `node` for `task`; fields override the report's own."""
    request = pb.EvaluationReport(
        session_id=node.session_id,
        task_id=task.task_id,
        round=task.round,
        group=node.group if group is None else group,
        model_version=task.model_version,
        metrics=pb.GroupMetrics(
            num_questions=num_questions,
            mean_alignment=metrics.get("model", 0.0) if mean_alignment is None else mean_alignment,
            metrics=dict(metrics),
        ),
    )
    for name, value in fields.items():
        if name == "questions":
            request.questions.extend(value)
        else:
            setattr(request, name, value)
    return node.stub.ReportEvaluation(request, timeout=30)


# one bad report per node: a refusal of the figures is final for the round
BAD_REPORTS: dict[str, tuple[dict[str, Any], str]] = {
    "node-nan": ({"metrics": {**GOOD_METRICS, "model": float("nan")}}, "'model'"),
    "node-shape": ({"mean_alignment": 0.9}, "mean_alignment is 0.9"),
    "node-dtype": (
        {"questions": [pb.QuestionScore(question_id="ab" * 32, alignment=0.5)]},
        "questions",
    ),
    "node-digest": ({"num_questions": 4_000_000_000}, "num_questions"),
    "node-trunc": ({"metrics": {**GOOD_METRICS, "context_gain": float("inf")}}, "'context_gain'"),
    "node-late": (
        {"metrics": {**GOOD_METRICS, **{f"m{i}": 0.0 for i in range(29)}}},
        "33 metrics",
    ),
}
# the protocol's four metrics are required, each in [0, 1] (EvaluationReport's GroupMetrics)
BAD_FIGURES: dict[str, tuple[dict[str, Any], str]] = {
    "node-nan": ({"metrics": {**GOOD_METRICS, "model": 1.5}}, "['model'] are not in [0, 1]"),
    "node-shape": (
        {"metrics": {**GOOD_METRICS, "uniform_baseline": -0.25}},
        "['uniform_baseline'] are not in [0, 1]",
    ),
    "node-dtype": (
        {"metrics": {k: v for k, v in GOOD_METRICS.items() if k != "prior_baseline"}},
        "lacks metrics ['prior_baseline']",
    ),
}


# figures that describe no evaluation: no question evaluated, or a mean_alignment that is not
# a number (NaN compares false to everything, so "differs from 'model'" must not miss it)
BAD_COUNTS: dict[str, tuple[dict[str, Any], str]] = {
    "node-nan": ({"num_questions": 0}, "metrics.num_questions is 0"),
    "node-shape": ({"mean_alignment": float("nan")}, "metrics.mean_alignment is nan"),
}


@pytest.mark.parametrize(
    "bad", [BAD_REPORTS, BAD_FIGURES, BAD_COUNTS], ids=["malformed", "figures", "counts"]
)
def test_evaluation_reports_are_checked_and_a_bad_one_does_not_stall_the_round(
    tmp_path: Path, bad: dict[str, tuple[dict[str, Any], str]]
) -> None:
    settings = RoundSettings(
        rounds=1,
        min_nodes=2 + len(bad),
        eval_at_start=True,
        eval_every=0,
        round_timeout_s=scaled(60),
        eval_timeout_s=scaled(60),
        session_timeout_s=120.0,
    )
    with serve(tmp_path, settings) as fed:
        judge = fed.node("node-judge")
        judge.join(ENCODER, role=pb.ROLE_EVALUATE_ONLY)  # before the quorum: it is asked too
        nodes = {ident: fed.node(ident) for ident in ("node-good-a", "node-good-b", *bad)}
        try:
            for n in nodes.values():
                n.join(ENCODER, 10)
            _evaluation_round(fed, judge, nodes, bad)
        finally:
            for n in [judge, *nodes.values()]:
                n.close()


def _evaluation_round(
    fed: Federation,
    judge: FakeNode,
    nodes: dict[str, FakeNode],
    bad: dict[str, tuple[dict[str, Any], str]],
) -> None:
    started = time.monotonic()
    tasks = {ident: n.wait_task(pb.TASK_KIND_EVALUATE, timeout=20) for ident, n in nodes.items()}
    task = tasks["node-good-a"]
    assert judge.wait_task(pb.TASK_KIND_EVALUATE, timeout=20).task_id == task.task_id

    for ident, (fields, says) in bad.items():
        code, details = status(report, nodes[ident], task, **fields)
        assert code == grpc.StatusCode.INVALID_ARGUMENT and says in details, (ident, details)
        # the node's answer: a good report afterwards is not recorded either
        code, details = status(report, nodes[ident], task)
        assert code == grpc.StatusCode.FAILED_PRECONDITION and "already refused" in details

    a, b = nodes["node-good-a"], nodes["node-good-b"]
    stale = pb.Task(task_id=task.task_id, round=task.round, model_version="older-r0-000")
    code, details = status(report, a, stale)  # evaluated another model: refused, not final
    assert code == grpc.StatusCode.FAILED_PRECONDITION and "older-r0-000" in details, details
    code, _ = status(report, a, pb.Task(task_id="f" * 32, model_version=task.model_version))
    assert code == grpc.StatusCode.FAILED_PRECONDITION
    code, _ = status(report, b, task, group="Good A")  # another group's figures
    assert code == grpc.StatusCode.PERMISSION_DENIED
    assert len(fed.engine.state.evaluations) == 0  # Good A, Good B and Judge have yet to answer
    report(a, task, metrics={**GOOD_METRICS, "model": 0.6})
    assert status(report, a, task)[0] == grpc.StatusCode.ALREADY_EXISTS
    report(b, task, metrics={**GOOD_METRICS, "model": 0.7})
    report(judge, task, metrics={**GOOD_METRICS, "model": 0.2})

    # every node has answered: the round closes now, not at its deadline
    wait_until(lambda: len(fed.engine.state.evaluations), 20, "the evaluation record")
    assert time.monotonic() - started < fed.engine.settings.eval_timeout_s / 2
    record = next(fed.engine.state.evaluations.records())
    assert record["groups"] == ["Good A", "Good B", "Judge"]
    assert record["missing"] == sorted(ALLOW[i] for i in bad)
    assert record["per_group"]["Good A"]["model"] == 0.6
    assert record["reports"]["held-out groups"]["per_group"] == {"Judge": 0.2}


def test_a_repeat_of_an_answer_after_its_round_closed_is_told_what_became_of_the_first(
    tmp_path: Path,
) -> None:
    """The answer that closes a round is the likeliest to have its reply lost (the protocol
    review, P1-P3). Its repeat was told STALE, or FAILED_PRECONDITION for a report, as if it had
    never counted; a report after the evaluation's deadline got FAILED_PRECONDITION, not the
    DEADLINE_EXCEEDED the protocol says; and a report's figures were checked before whether it
    could count at all, so a bad repeat of a recorded report got INVALID_ARGUMENT."""
    settings = RoundSettings(
        rounds=1,
        min_nodes=2,
        min_updates=1,
        eval_every=1,
        round_timeout_s=scaled(60),
        eval_timeout_s=scaled(3),
        session_timeout_s=120.0,
    )
    with serve(tmp_path, settings) as fed:
        a, b = fed.node("node-good-a"), fed.node("node-good-b")
        try:
            a.join(ENCODER, 10)
            b.join(ENCODER, 10)
            uploads = {}
            for node in (a, b):
                task = node.wait_task(pb.TASK_KIND_TRAIN, timeout=20)
                uploads[node] = update_messages(node.session_id, task, toy_weights(), 10)
                assert node.upload(uploads[node]).accepted
            fed.wait_rounds(1)  # b's upload closed it
            for node in (b, a):
                assert reject_name(node.upload(uploads[node])) == "DUPLICATE"

            task = a.wait_task(pb.TASK_KIND_EVALUATE, timeout=20)
            assert b.wait_task(pb.TASK_KIND_EVALUATE, timeout=20).task_id == task.task_id
            report(a, task)
            # a bad repeat is a repeat first: ALREADY_EXISTS, not INVALID_ARGUMENT
            bad = {**GOOD_METRICS, "model": 1.5}
            assert status(report, a, task, metrics=bad)[0] == grpc.StatusCode.ALREADY_EXISTS
            # ... and bad figures for a task that is not open are stale first
            code, _ = status(report, b, pb.Task(task_id="f" * 32), metrics=bad)
            assert code == grpc.StatusCode.FAILED_PRECONDITION
            wait_until(lambda: fed.engine.done, 30, "the evaluation to close at its deadline")
            code, details = status(report, b, task)  # b never reported: too late
            assert code == grpc.StatusCode.DEADLINE_EXCEEDED, details
            assert status(report, a, task)[0] == grpc.StatusCode.ALREADY_EXISTS
        finally:
            a.close()
            b.close()
