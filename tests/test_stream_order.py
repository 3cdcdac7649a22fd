"""Tensor streams must keep their order: header, tensor parts, trailer, and nothing after it.

Uploads: the real coordinator stack (RoundEngine and its gRPC server in this process, real mutual
TLS on 127.0.0.1, in-process fake nodes). An upload with a second header (or any other part that
is not a tensor) before its trailer, or with messages after its trailer, is refused as MALFORMED,
finally: the node's round is decided, and the round's average holds only the good update.

Downloads: the node's own client (NodeClient over a real gRPC channel) against a stand-in
coordinator that streams a model out of order. A download that ends before its trailer, or that
sends a tensor part before its header, is an error naming the download, never weights.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from fedharness import (
    assert_weights_close,
    reject_name,
    scaled,
    stand_in_coordinator,
    update_messages,
    weighted_average,
)
from test_update_validation import ENCODER, nudged, serve
from test_validation_node import StandIn, model_messages, small_weights

from coordinator.settings import RoundSettings
from group_node.client import NodeClient
from group_node.config import NodeConfig
from pluralfed.errors import InputError
from pluralfed.proto.pluralfed.v1 import federation_pb2 as pb
from pluralfed.transport import decode_model_chunk, receive_model

pytestmark = pytest.mark.timeout(120)

# ------------------------------------------------------------------------------------------------
# uploads (coordinator side)

Stream = list[pb.UpdateChunk]
# name -> (the good stream [header, tensor parts..., trailer] made out of order, the refusal)
OUT_OF_ORDER: dict[str, tuple[Callable[[Stream], Stream], str]] = {
    "second header before the trailer": (
        lambda m: [*m[:-1], m[0], m[-1]],
        "update rejected: unexpected 'header' message inside an upload",
    ),
    "header twice before any tensor": (
        lambda m: [m[0], m[0], *m[1:]],
        "update rejected: unexpected 'header' message inside an upload",
    ),
    "an empty message before the trailer": (
        lambda m: [*m[:-1], pb.UpdateChunk(), m[-1]],
        "update rejected: unexpected None message inside an upload",
    ),
    "a tensor part after the trailer": (
        lambda m: [*m, m[1]],
        "update rejected: messages after the trailer",
    ),
    "a second trailer": (lambda m: [*m, m[-1]], "update rejected: messages after the trailer"),
    "a header after the trailer": (
        lambda m: [*m, m[0]],
        "update rejected: messages after the trailer",
    ),
}


@pytest.mark.parametrize("case", list(OUT_OF_ORDER))
def test_an_upload_out_of_order_is_refused_as_malformed_and_never_averaged(
    tmp_path: Path, case: str
) -> None:
    reorder, refusal = OUT_OF_ORDER[case]
    settings = RoundSettings(
        rounds=1, min_nodes=2, min_updates=1, round_timeout_s=scaled(60), eval_every=0
    )
    with serve(tmp_path, settings) as fed:
        good, sender = fed.node("node-good-a"), fed.node("node-good-b")
        try:
            good.join(ENCODER, 30)
            sender.join(ENCODER, 50)
            task = good.wait_task(pb.TASK_KIND_TRAIN, timeout=10)
            assert sender.wait_task(pb.TASK_KIND_TRAIN, timeout=10).task_id == task.task_id
            g0 = good.download(task.model_version)

            bad_update = nudged(g0, 2)
            stream = update_messages(sender.session_id, task, bad_update, 50)
            reply = sender.upload(reorder(stream))
            assert reject_name(reply) == "MALFORMED", reply
            assert reply.message == refusal
            # the refusal is final: the sender's round is decided, a good copy is not taken
            again = sender.upload(update_messages(sender.session_id, task, bad_update, 50))
            assert reject_name(again) == "ALREADY_REJECTED", again

            update = nudged(g0, 1)
            accepted = good.upload(update_messages(good.session_id, task, update, 30))
            assert reject_name(accepted) == "ACCEPTED", accepted
            fed.wait_rounds(1)
        finally:
            good.close()
            sender.close()
        record = fed.engine.state.history.first
        assert record is not None
        assert record["participants"] == ["Good A"] and record["total_weight"] == 30
        assert (
            record["outcomes"]["Good B"] == f"rejected: {refusal.removeprefix('update rejected: ')}"
        )
        assert_weights_close(
            fed.engine.state.weights, weighted_average([update], [30]), "global model"
        )
        assert fed.spooled() == [], "a refused upload's spool file outlived it"


@pytest.mark.parametrize(
    "first",
    [pb.UpdateChunk(trailer=pb.StreamTrailer(digest=bytes(32))), pb.UpdateChunk()],
    ids=["a trailer", "an empty message"],
)
def test_an_upload_that_does_not_start_with_its_header_is_refused_as_malformed(
    tmp_path: Path, first: pb.UpdateChunk
) -> None:
    """Before its header an upload names no session: one that starts with anything else is
    MALFORMED (the node's stream is wrong), not read as an empty header, whose unknown session
    would abort the call UNAUTHENTICATED and send the node to join again."""
    settings = RoundSettings(rounds=1, min_nodes=9, round_timeout_s=scaled(60), eval_every=0)
    with serve(tmp_path, settings) as fed, fed.node("node-good-b") as sender:
        sender.join(ENCODER, 50)
        reply = sender.upload([first])
        assert reject_name(reply) == "MALFORMED", reply
        assert reply.message == "an upload starts with its header"
        assert sender.heartbeat().current_round == 0  # its session is as it was


# ------------------------------------------------------------------------------------------------
# downloads (node side)


def node_download(tmp_path: Path, messages: list[bytes]) -> dict[str, np.ndarray]:
    """What the node's own client makes of `messages`, streamed by a real gRPC server as
    DownloadModel's answer for version 'v1'."""
    servicer = StandIn("", messages)  # type: ignore[abstract]  # (the calls it leaves out)
    with stand_in_coordinator(servicer) as port:
        config = NodeConfig(
            coordinator=f"127.0.0.1:{port}", group="G", data=tmp_path / "g.csv", insecure=True
        )
        client = NodeClient(config)
        try:
            return client.download("v1", timeout=scaled(30))
        finally:
            client.close()


def test_the_stand_in_serves_a_good_download(tmp_path: Path) -> None:
    """The control: the same stand-in and client receive a well-ordered model whole."""
    weights = small_weights()
    got = node_download(tmp_path, model_messages(weights))
    assert list(got) == list(weights)
    assert all(np.array_equal(got[k], weights[k]) for k in weights)


# name -> (the good stream [header, tensor parts..., trailer] made out of order, the error)
DOWNLOADS: dict[str, tuple[Callable[[list[bytes]], list[bytes]], str]] = {
    "no trailer": (lambda m: m[:-1], "the stream ended before its trailer"),
    "the header alone": (lambda m: m[:1], "the stream ended before its trailer"),
    "nothing at all": (lambda m: [], "the stream ended before its trailer"),
    "a tensor part before the header": (lambda m: [m[1], *m], "unexpected 'tensor' message"),
    "tensor parts without a header": (lambda m: m[1:], "unexpected 'tensor' message"),
}


@pytest.mark.parametrize("case", list(DOWNLOADS))
def test_a_download_out_of_order_is_an_error_not_weights(tmp_path: Path, case: str) -> None:
    reorder, message = DOWNLOADS[case]
    messages = model_messages(small_weights())
    assert len(messages) > 3  # header, several tensor parts, trailer
    with pytest.raises(InputError) as err:
        node_download(tmp_path, reorder(messages))
    assert f": model 'v1' download: {message}" in str(err.value)
    assert str(err.value).startswith("coordinator 127.0.0.1:")


def test_a_download_of_another_version_than_the_task_names_is_an_error(tmp_path: Path) -> None:
    """A coordinator that streams the wrong model (an older version still cached, a bug) must
    not have the node train or evaluate it as the task's: the stream's header names its
    version, and the node's client checks it against the one it asked for."""
    with pytest.raises(InputError) as err:
        node_download(tmp_path, model_messages(small_weights(), version="v0"))
    assert "model 'v1' download: asked for model version 'v1', the stream is 'v0'" in str(err.value)


def test_a_protobuf_tensor_part_before_the_header_is_refused() -> None:
    """A tensor part decoded by protobuf (not the node's fast path) is refused the same way."""
    parts = [pb.ModelChunk.FromString(m) for m in model_messages(small_weights())]
    assert parts[1].WhichOneof("part") == "tensor"
    with pytest.raises(InputError, match=r"^download: unexpected 'tensor' message$"):
        receive_model([parts[1], *parts], lambda m: InputError(f"download: {m}"))
    # the node's decoder gives the same refusal for the same bytes
    raw = model_messages(small_weights())
    with pytest.raises(InputError, match=r"^download: unexpected 'tensor' message$"):
        receive_model(
            [decode_model_chunk(m) for m in [raw[1], *raw]], lambda m: InputError(f"download: {m}")
        )
