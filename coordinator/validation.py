"""Checks of what nodes send, before the round logic uses it: text that may be logged or quoted
back, labels, metrics. A refusal is a `Rejection`, which the transport turns into a gRPC status
(or, for an upload, an UploadReply's reason). No gRPC here, no round state.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

from pluralfed.errors import quoted


class Rejection(Exception):
    """A request the engine refuses. `code` names the gRPC status for ordinary calls; `reason`
    (an UploadReply reject reason: STALE, DUPLICATE, ...) is set when it refuses an update."""

    def __init__(self, code: str, message: str, reason: str | None = None) -> None:
        super().__init__(message)
        self.code = code  # a grpc.StatusCode name: FAILED_PRECONDITION, UNAUTHENTICATED, ...
        self.message = message
        self.reason = reason


MAX_UPDATE_METRICS = 32
# A node's declared training examples are its FedAvg weight, so they are bounded: far above any
# survey group's question count, yet small enough that no one node's claim can dwarf the rest
# by orders of magnitude through an absurd number (it must also repeat its Join's count).
MAX_NODE_EXAMPLES = 10_000_000
MAX_METRIC_NAME = 64
# the most of a refusal's text kept in a round's outcomes (metrics.jsonl) and in the log
MAX_REASON_TEXT = 500
# JoinRequest.software_version, labels (logged), and free text (Leave.reason, Heartbeat.message)
MAX_VERSION_TEXT = 64
MAX_LABELS = 32
MAX_LABEL_KEY = 64
MAX_LABEL_VALUE = 256
MAX_FREE_TEXT = 1000
# the longest a GetTask is held (its `wait`, capped): the server clips the request to it and the
# engine never waits longer whoever calls it
MAX_WAIT_S = 60.0


def clipped(text: str, limit: int = MAX_REASON_TEXT) -> str:
    """A refusal's reason as outcomes and logs keep it: control characters escaped, at most
    `limit` characters of it (it may quote what a node sent)."""
    cut = text[:limit]
    if not cut.isprintable():
        cut = "".join(c if c.isprintable() else ascii(c)[1:-1] for c in cut)
    return cut if len(text) <= limit else f"{cut}... ({len(text)} characters)"


def checked_text(field: str, value: str, limit: int, *, printable: bool = True) -> str:
    """`value` of message field `field` if it has at most `limit` characters, all printable
    unless it is free text (`printable=False`, shown only through `quoted`); else refused
    INVALID_ARGUMENT naming the field."""
    if len(value) > limit:
        raise Rejection(
            "INVALID_ARGUMENT", f"{field} has {len(value)} characters (at most {limit})"
        )
    if printable and not value.isprintable():
        raise Rejection("INVALID_ARGUMENT", f"{field} {quoted(value)} has non-printable characters")
    return value


def checked_labels(labels: Mapping[str, str]) -> dict[str, str]:
    """JoinRequest.labels, which the coordinator logs: a few short printable key/value pairs."""
    if len(labels) > MAX_LABELS:
        raise Rejection(
            "INVALID_ARGUMENT", f"labels has {len(labels)} entries (at most {MAX_LABELS})"
        )
    out: dict[str, str] = {}
    for key, value in sorted(labels.items()):
        if not key:
            raise Rejection("INVALID_ARGUMENT", "labels has an empty key")
        checked_text("labels key", key, MAX_LABEL_KEY)
        out[key] = checked_text(f"labels[{key!r}]", value, MAX_LABEL_VALUE)
    return out


def checked_metrics(
    what: str, metrics: Mapping[str, float], reason: str | None = "MALFORMED"
) -> dict[str, float]:
    """`metrics` if they are sane: at most MAX_UPDATE_METRICS named, finite numbers; else refused
    (INVALID_ARGUMENT, with reject reason `reason` for an upload), naming the metric."""
    if len(metrics) > MAX_UPDATE_METRICS:
        raise Rejection(
            "INVALID_ARGUMENT",
            f"{what} has {len(metrics)} metrics (at most {MAX_UPDATE_METRICS})",
            reason=reason,
        )
    out: dict[str, float] = {}
    for name, value in sorted(metrics.items()):
        if not (0 < len(name) <= MAX_METRIC_NAME and name.isprintable()):
            raise Rejection(
                "INVALID_ARGUMENT",
                f"{what}: metric name {name[:MAX_METRIC_NAME]!r} must be 1 to "
                f"{MAX_METRIC_NAME} printable characters",
                reason=reason,
            )
        if not math.isfinite(value):
            raise Rejection(
                "INVALID_ARGUMENT",
                f"{what}: metric {name!r} is {value} (not a finite number)",
                reason=reason,
            )
        out[name] = float(value)
    return out


def checked_update_metrics(group: str, metrics: Mapping[str, float]) -> dict[str, float]:
    """An update's metrics (UpdateHeader.metrics) if they are sane: a few named, finite numbers.

    They go into the round records and metrics.jsonl, and `alignment_before` into the update's
    weight when `fairness_q` > 0, so a NaN or a flood of keys is refused, naming the metric.
    """
    return checked_metrics(f"update from {group}", metrics)
