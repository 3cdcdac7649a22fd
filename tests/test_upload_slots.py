"""The coordinator's bounds on uploads read and downloads sent at once (`StreamSlots`), alone
and on the real stack.

Alone: the bound holds under many threads, waiters are served first come first served, and a
waiter whose RPC dies leaves the queue (or passes on a slot handed to it just then). On the real
coordinator (RoundEngine + gRPC server with mutual TLS on 127.0.0.1): more nodes upload at once
than there are slots, and every update is accepted and averaged; an upload cancelled while it
holds a slot, or while it waits for one, gives its place back, so nothing deadlocks. The same
for downloads: more nodes download at once than there are slots and all get the model intact;
one abandoned mid-stream gives its slot back.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

import grpc
import numpy as np
import pytest
from fedharness import (
    HOST,
    FakeNode,
    Pki,
    assert_weights_close,
    reject_name,
    scaled,
    update_messages,
    wait_until,
    weighted_average,
)

from coordinator.rounds import RoundEngine
from coordinator.server import start_server
from coordinator.settings import RoundSettings
from coordinator.streams import StreamSlots
from pluralfed.auth import AllowList
from pluralfed.proto.pluralfed.v1 import federation_pb2 as pb
from pluralfed.tls import TlsFiles
from pluralfed.transport import SERVER_STREAM_WINDOW_BYTES

pytestmark = pytest.mark.timeout(120)

ENCODER = "test-encoder/8/mean"
NODES = {f"node-{i}": f"Group {i}" for i in range(6)}
SLOTS = 2


def test_bound_holds_under_many_threads() -> None:
    slots = StreamSlots(3)
    lock = threading.Lock()
    inside = 0
    most = 0
    done: list[int] = []

    def upload(i: int) -> None:
        nonlocal inside, most
        assert slots.acquire(lambda: True, poll_s=0.01)
        try:
            with lock:
                inside += 1
                most = max(most, inside)
            time.sleep(0.005)
            with lock:
                inside -= 1
        finally:
            slots.release()
        done.append(i)

    threads = [threading.Thread(target=upload, args=(i,)) for i in range(40)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert sorted(done) == list(range(40))
    assert most <= 3 and slots.peak <= 3
    assert slots.active == 0 and slots.waiting == 0


def queued(slots: StreamSlots, n: int) -> Callable[[], bool]:
    return lambda: slots.waiting == n


@pytest.mark.parametrize("limit", [0, -1])
def test_a_limit_of_zero_or_less_bounds_nothing(limit: int) -> None:
    """The coordinator takes max_concurrent_uploads = 0, and a limit <= 0 is no bound: every
    stream runs at once, none waits, and giving slots back keeps no count."""
    slots = StreamSlots(limit)
    dead = lambda: False  # noqa: E731 - a stream that would give up at once if it had to wait
    assert all(slots.acquire(dead, poll_s=0.01) for _ in range(20))
    assert slots.waiting == 0 and slots.active == 0
    for _ in range(20):
        slots.release()
    assert slots.active == 0 and slots.peak == 0


def test_waiters_are_served_in_order_and_dead_ones_leave() -> None:
    slots = StreamSlots(1)
    assert slots.acquire(lambda: True)
    order: list[str] = []
    alive = {"a": True, "b": True, "c": True}

    def wait(name: str) -> None:
        if slots.acquire(lambda: alive[name], poll_s=0.01):
            order.append(name)
            slots.release()

    threads = []
    for name in ("a", "b", "c"):
        threads.append(threading.Thread(target=wait, args=(name,)))
        threads[-1].start()
        wait_until(queued(slots, len(threads)), 10, f"{name} to queue", poll_s=0.01)
    alive["b"] = False  # b's RPC is cancelled while it waits: it leaves the queue
    wait_until(lambda: slots.waiting == 2, 10, "b to leave the queue", poll_s=0.01)
    slots.release()
    for t in threads:
        t.join(10)
    assert order == ["a", "c"]
    assert slots.active == 0 and slots.waiting == 0


def test_slot_handed_to_a_dead_waiter_is_passed_on() -> None:
    slots = StreamSlots(1)
    assert slots.acquire(lambda: True)
    gone = threading.Event()
    result: list[bool] = []
    waiter = threading.Thread(
        target=lambda: result.append(slots.acquire(lambda: not gone.is_set(), poll_s=0.05))
    )
    waiter.start()
    wait_until(lambda: slots.waiting == 1, 10, "the waiter to queue", poll_s=0.01)
    gone.set()
    slots.release()  # may reach the waiter just as it notices its RPC is gone
    waiter.join(10)
    if result == [False]:  # it gave the slot back (or never took it)
        assert slots.active == 0
    else:  # it got the slot before noticing
        assert result == [True]
        slots.release()
    assert slots.active == 0 and slots.waiting == 0
    assert slots.acquire(lambda: True, poll_s=0.01)


def test_a_slot_handed_over_as_its_waiter_gives_up_is_passed_on_every_time() -> None:
    """The race above made certain: the slot is handed to the waiter just as it finds its RPC
    gone (here the release happens inside that very check). It must not keep the slot: the
    bound would shrink by one for the rest of the run."""
    slots = StreamSlots(1)
    assert slots.acquire(lambda: True)

    def gone_as_the_slot_comes() -> bool:
        slots.release()  # the holder ends: its slot goes to this waiter, the only one
        return False

    assert slots.acquire(gone_as_the_slot_comes, poll_s=0.01) is False
    assert slots.active == 0 and slots.waiting == 0
    assert slots.acquire(lambda: False, poll_s=0.01)  # free: taken at once, without waiting


def toy_weights() -> dict[str, np.ndarray]:
    """A 1.2 MB tensor (two chunks) and a small one."""
    rng = np.random.default_rng(0)
    return {
        "embed.weight": rng.normal(size=(300, 1024)).astype(np.float32),
        "head.bias": rng.normal(size=(8,)).astype(np.float32),
    }


def nudged(weights: Mapping[str, np.ndarray], seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        k: (v + rng.normal(0.0, 1e-3, size=v.shape)).astype(v.dtype) for k, v in weights.items()
    }


def held(messages: list[pb.UpdateChunk], release: threading.Event) -> Iterator[pb.UpdateChunk]:
    """An upload that sends its header and first chunk, then waits for `release`."""
    yield messages[0]
    yield messages[1]
    release.wait(60)
    yield from messages[2:]


@contextlib.contextmanager
def federation(
    tmp_path: Path,
    weights: Mapping[str, np.ndarray],
    *,
    upload_slots: StreamSlots | None = None,
    download_slots: StreamSlots | None = None,
    upload_window_bytes: int = SERVER_STREAM_WINDOW_BYTES,
) -> Iterator[tuple[RoundEngine, dict[str, FakeNode]]]:
    """The real engine and gRPC server (mutual TLS on 127.0.0.1, rounds driven in a thread) for
    one round of all NODES, with the given slots (default: 4 each), and a connected FakeNode
    per node."""
    pki = Pki(tmp_path / "pki")
    settings = RoundSettings(
        rounds=1,
        min_nodes=len(NODES),
        min_updates=len(NODES),
        round_timeout_s=scaled(60),
        eval_timeout_s=1.0,
        eval_every=0,
        weighting="examples",
        heartbeat_interval_s=1.0,
        session_timeout_s=120.0,
    )
    engine = RoundEngine(settings, weights, tmp_path / "state", ENCODER, {"toy": True})
    server, port = start_server(
        engine,
        f"{HOST}:0",
        TlsFiles.from_dir(pki.server),
        AllowList(NODES),
        max_workers=32,
        upload_slots=upload_slots or StreamSlots(4),
        download_slots=download_slots or StreamSlots(4),
        upload_window_bytes=upload_window_bytes,
    )
    driver = threading.Thread(target=engine.run, name="rounds", daemon=True)
    driver.start()
    nodes = {i: FakeNode(port, g, tls_dir=pki.node(i)) for i, g in NODES.items()}
    try:
        yield engine, nodes
    finally:
        for n in nodes.values():
            n.close()
        engine.stop()
        server.stop(None).wait(10)
        driver.join(10)


def test_uploads_beyond_the_bound_wait_and_cancelled_ones_give_back_their_slot(
    tmp_path: Path,
) -> None:
    slots = StreamSlots(SLOTS)
    with federation(tmp_path, toy_weights(), upload_slots=slots) as (engine, nodes):
        examples = {i: 10 + 5 * k for k, i in enumerate(NODES)}
        for i, n in nodes.items():
            n.join(ENCODER, examples[i])
        tasks = {i: n.wait_task(pb.TASK_KIND_TRAIN, timeout=30) for i, n in nodes.items()}
        g0 = nodes["node-0"].download(tasks["node-0"].model_version)
        updates = {i: nudged(g0, k + 1) for k, i in enumerate(NODES)}
        msgs = {
            i: update_messages(nodes[i].session_id, tasks[i], updates[i], examples[i])
            for i in NODES
        }

        # node-0 and node-1 take both slots and stall mid-stream
        release = {i: threading.Event() for i in ("node-0", "node-1")}
        holders = {
            i: nodes[i].stub.UploadUpdate.future(held(msgs[i], release[i]), timeout=60)
            for i in release
        }
        wait_until(lambda: slots.active == SLOTS, 10, "both slots taken", poll_s=0.02)
        # node-2 must wait; its RPC is cancelled while waiting: it leaves the queue
        waiter = nodes["node-2"].stub.UploadUpdate.future(iter(msgs["node-2"]), timeout=60)
        wait_until(lambda: slots.waiting == 1, 10, "node-2 to wait for a slot", poll_s=0.02)
        waiter.cancel()
        wait_until(lambda: slots.waiting == 0, 10, "the cancelled waiter to leave", poll_s=0.02)
        # node-0 is cancelled while it holds a slot (its process died mid-upload): slot freed
        holders["node-0"].cancel()
        wait_until(lambda: slots.active == SLOTS - 1, 10, "node-0's slot back", poll_s=0.02)
        assert engine.state.completed_rounds == 0  # neither refusal was final

        # everyone else (and node-0, node-2 again) uploads at once, more than there are slots
        replies: dict[str, str] = {}

        def upload(i: str) -> None:
            replies[i] = reject_name(nodes[i].upload(msgs[i]))

        threads = [threading.Thread(target=upload, args=(i,)) for i in NODES if i != "node-1"]
        for t in threads:
            t.start()
        release["node-1"].set()
        for t in threads:
            t.join(60)
        replies["node-1"] = reject_name(holders["node-1"].result(timeout=60))
        assert replies == {i: "ACCEPTED" for i in NODES}, replies
        with pytest.raises(grpc.FutureCancelledError):
            holders["node-0"].result()

        wait_until(lambda: engine.completed_rounds() >= 1, 60, "the round to complete")
        assert 1 <= slots.peak <= SLOTS
        assert slots.active == 0 and slots.waiting == 0
        record = engine.state.history.first
        assert record is not None
        assert record["participants"] == sorted(NODES.values())
        expected = weighted_average(
            [updates[i] for i in NODES], [float(examples[i]) for i in NODES]
        )
        assert_weights_close(engine.state.weights, expected, "global model after the round")


@pytest.mark.parametrize("window", [SERVER_STREAM_WINDOW_BYTES, 1 << 20])
def test_an_upload_waiting_for_its_slot_sends_about_the_window(tmp_path: Path, window: int) -> None:
    """`upload_window_bytes` is gRPC's receive window on the real server: an upload waiting for
    a slot has sent its header and about one window, then waits (what it may have the
    coordinator buffer; over a long link, about what an upload moves per round trip)."""
    slots = StreamSlots(1)
    chunk = 16 * 1024
    weights = {"w": np.random.default_rng(0).normal(size=(4, 2**18)).astype(np.float32)}  # 4 MiB
    with federation(tmp_path, weights, upload_slots=slots, upload_window_bytes=window) as (
        engine,
        nodes,
    ):
        for n in nodes.values():
            n.join(ENCODER, 10)
        tasks = {i: n.wait_task(pb.TASK_KIND_TRAIN, timeout=30) for i, n in nodes.items()}
        g0 = nodes["node-0"].download(tasks["node-0"].model_version)
        release = threading.Event()
        holder = nodes["node-0"].stub.UploadUpdate.future(
            held(update_messages(nodes["node-0"].session_id, tasks["node-0"], g0, 10), release),
            timeout=60,
        )
        wait_until(lambda: slots.active == 1, 10, "node-0 to hold the slot", poll_s=0.02)
        messages = update_messages(
            nodes["node-1"].session_id, tasks["node-1"], nudged(g0, 1), 10, chunk_bytes=chunk
        )
        assert sum(m.ByteSize() for m in messages) > window + 8 * chunk  # it cannot all fit
        sent = 0

        def counted() -> Iterator[pb.UpdateChunk]:
            nonlocal sent
            for m in messages:
                yield m
                sent += m.ByteSize()

        waiter = nodes["node-1"].stub.UploadUpdate.future(counted(), timeout=60)
        wait_until(lambda: slots.waiting == 1, 10, "node-1 to wait for the slot", poll_s=0.02)
        header = messages[0].ByteSize()
        # until the sender is blocked by flow control: no progress for 1.5 s once about a
        # window is in (a sending thread starved on a busy machine also stands still, earlier)
        last, still = -1, 0
        deadline = time.monotonic() + scaled(30)
        while time.monotonic() < deadline:
            still = still + 1 if sent == last else 0
            last = sent
            if still >= 5 and sent - header >= window - 2 * chunk:
                break
            time.sleep(scaled(0.3))
        # About the window (`sent` counts a message once gRPC asks for the next one, so one
        # chunk late), not the whole upload. gRPC's flow control lets somewhat more in than the
        # window it is given: 16 KB more at 64 KiB, 0.2-0.5 MB at 1 MiB (on a busy machine).
        assert window - 2 * chunk <= sent - header <= 2 * window + 512 * 1024, (sent, window)
        release.set()
        assert reject_name(holder.result(timeout=60)) == "ACCEPTED"
        assert reject_name(waiter.result(timeout=60)) == "ACCEPTED"
        assert engine.state.completed_rounds == 0  # 4 of 6 updates still to come


def test_downloads_beyond_the_bound_wait_and_abandoned_ones_give_back_their_slot(
    tmp_path: Path,
) -> None:
    # 16 MB: more than gRPC buffers for a node that stops reading, so its download stalls
    weights = {**toy_weights(), "big": np.random.default_rng(1).normal(size=4_000_000)}
    weights["big"] = weights["big"].astype(np.float32)
    slots = StreamSlots(1)
    with federation(tmp_path, weights, download_slots=slots) as (_, nodes):
        for n in nodes.values():
            n.join(ENCODER)
        version = nodes["node-0"].wait_task(pb.TASK_KIND_TRAIN, timeout=30).model_version

        # node-0 reads the header, then stops reading: its download holds the only slot
        stalled = nodes["node-0"].stub.DownloadModel(
            pb.DownloadModelRequest(session_id=nodes["node-0"].session_id, model_version=version),
            timeout=60,
        )
        assert next(stalled).WhichOneof("part") == "header"
        wait_until(lambda: slots.active == 1, 10, "node-0 to hold the slot", poll_s=0.02)
        got: dict[str, dict[str, np.ndarray]] = {}

        def download(i: str) -> None:
            got[i] = nodes[i].download(version)

        waiter = threading.Thread(target=download, args=("node-1",))
        waiter.start()
        wait_until(lambda: slots.waiting == 1, 10, "node-1 to wait for the slot", poll_s=0.02)
        stalled.cancel()  # node-0's process died mid-download: its slot goes to node-1
        waiter.join(30)
        assert "node-1" in got, "node-1's download never got the slot"

        # everyone else at once, more than there are slots
        threads = [threading.Thread(target=download, args=(i,)) for i in NODES if i != "node-1"]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert sorted(got) == sorted(NODES)
        for i, model in got.items():
            assert_weights_close(model, weights, f"{i}'s download")
        assert slots.peak == 1
        wait_until(lambda: slots.active == 0 and slots.waiting == 0, 10, "all slots back")


def test_a_download_cancelled_while_waiting_for_its_slot_sends_nothing_and_frees_none(
    tmp_path: Path,
) -> None:
    """A download whose node went away while it waited for a slot ends there: it sends nothing
    and gives back no slot, since it took none. Giving one back would count the slot of the
    download still running as free, and the bound would be one higher for the rest of the run."""
    # 16 MB: more than gRPC buffers for a node that stops reading, so its download stalls
    weights = {**toy_weights(), "big": np.random.default_rng(1).normal(size=4_000_000)}
    weights["big"] = weights["big"].astype(np.float32)
    slots = StreamSlots(1)
    with federation(tmp_path, weights, download_slots=slots) as (_, nodes):
        for n in nodes.values():
            n.join(ENCODER)
        version = nodes["node-0"].wait_task(pb.TASK_KIND_TRAIN, timeout=30).model_version

        def request(i: str) -> pb.DownloadModelRequest:
            return pb.DownloadModelRequest(session_id=nodes[i].session_id, model_version=version)

        # node-0 reads the header, then stops reading: its download holds the only slot
        stalled = nodes["node-0"].stub.DownloadModel(request("node-0"), timeout=60)
        assert next(stalled).WhichOneof("part") == "header"
        wait_until(lambda: slots.active == 1, 10, "node-0 to hold the slot", poll_s=0.02)
        gone = nodes["node-1"].stub.DownloadModel(request("node-1"), timeout=60)
        wait_until(lambda: slots.waiting == 1, 10, "node-1 to wait for the slot", poll_s=0.02)
        gone.cancel()  # node-1's process died while it waited
        wait_until(lambda: slots.waiting == 0, 10, "the cancelled waiter to leave", poll_s=0.02)
        time.sleep(1.0)  # its handler has ended
        assert slots.active == 1, "node-0's running download no longer counts"
        # so the bound still holds: node-2 waits
        later = nodes["node-2"].stub.DownloadModel(request("node-2"), timeout=60)
        wait_until(lambda: slots.waiting == 1, 10, "node-2 to wait for the slot", poll_s=0.02)
        assert slots.active == 1
        stalled.cancel()  # node-0's slot goes to node-2
        assert next(later).WhichOneof("part") == "header"
        later.cancel()
        wait_until(lambda: slots.active == 0 and slots.waiting == 0, 10, "all slots back")
        assert slots.peak == 1
