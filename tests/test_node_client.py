"""NodeClient's channel handling against gRPC's own threads (no coordinator needed), and how
it puts a coordinator's error details in a log line."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import grpc._channel
import pytest

from group_node.client import MAX_DETAILS_CHARS, NodeClient, close_channel, shortened
from group_node.config import NodeConfig

pytestmark = pytest.mark.timeout(30)


class _StallingClock:
    """Stands in for the `time` module of grpc._channel: once armed, the next time() call
    from another thread (gRPC's connectivity poller, just before it watches the channel again)
    says so and stalls, so that a close can land where it otherwise lands only by chance."""

    def __init__(self) -> None:
        self.armed = False
        self.stalled = threading.Event()

    def time(self) -> float:
        if self.armed and threading.current_thread() is not threading.main_thread():
            self.armed = False
            self.stalled.set()
            time.sleep(0.3)
        return time.time()

    def __getattr__(self, name: str) -> Any:
        return getattr(time, name)


@pytest.fixture
def server_port() -> Iterator[int]:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=1))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield port
    server.stop(None)


def test_closing_a_watched_channel_leaves_no_traceback_in_grpcs_poller(
    server_port: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A node with tls_crl follows its channel's connectivity (a subscription). Closed right
    after the unsubscribe (at exit, or when it re-pins a renewed coordinator certificate), the
    poller thread gRPC runs for subscriptions could find the channel closed as it watched it
    again: "Cannot monitor channel state: Channel closed!", a traceback on the node's stderr
    (seen in a test run). With unsubscribe() and close() in a row, as the client did, this test
    gets that error every time (grpcio 1.85)."""
    errors: list[BaseException | None] = []
    monkeypatch.setattr(threading, "excepthook", lambda args: errors.append(args.exc_value))
    clock = _StallingClock()
    monkeypatch.setattr(grpc._channel, "time", clock)
    channel = grpc.insecure_channel(f"127.0.0.1:{server_port}")
    states: list[grpc.ChannelConnectivity] = []
    channel.subscribe(states.append)
    grpc.channel_ready_future(channel).result(timeout=10)
    clock.armed = True
    assert clock.stalled.wait(5)  # the poller is between two watches
    close_channel(channel, states.append)
    time.sleep(0.6)  # the poller wakes and watches again
    assert errors == []
    assert grpc.ChannelConnectivity.READY in states  # the subscription did follow the channel


def test_closing_a_client_that_follows_its_channel_leaves_no_traceback(
    server_port: int, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A NodeClient with tls_crl subscribes to its channel at its first certificate check; its
    close (at every exit of `node run`) unsubscribes before it closes, as above. Here the
    client's state after such a check is set by hand (no TLS coordinator needed)."""
    errors: list[BaseException | None] = []
    monkeypatch.setattr(threading, "excepthook", lambda args: errors.append(args.exc_value))
    clock = _StallingClock()
    monkeypatch.setattr(grpc._channel, "time", clock)
    config = NodeConfig(
        coordinator=f"127.0.0.1:{server_port}", group="G", data=tmp_path / "g.csv", insecure=True
    )
    client = NodeClient(config)
    client._revocations = object()  # type: ignore[assignment]  # as with tls_crl
    client.channel.subscribe(client._on_connectivity)  # as its first check does
    client._checked_connection = 0
    grpc.channel_ready_future(client.channel).result(timeout=10)
    clock.armed = True
    assert clock.stalled.wait(5)  # the poller is between two watches
    client.close()
    time.sleep(0.6)  # the poller wakes and watches again
    assert errors == []
    assert client._connections >= 1  # the subscription did follow the channel


def test_details_for_a_log_line_are_one_line_of_at_most_the_limit() -> None:
    """A coordinator's error details go into the node's log lines: whitespace and newlines
    made single spaces, and a long text cut to the limit itself, the ellipsis included."""
    assert shortened("a\n  b\tc") == "a b c"
    assert shortened("x" * MAX_DETAILS_CHARS) == "x" * MAX_DETAILS_CHARS
    cut = shortened("y" * (MAX_DETAILS_CHARS + 50))
    assert len(cut) == MAX_DETAILS_CHARS and cut.endswith("y…")
