"""Log lines a peer can cause, at most one a minute per (peer, kind): a client that repeats a
refused call in a loop (a revoked certificate, a stale upload) must not be able to fill the
coordinator's disk with log lines, and the operator still sees each kind of trouble at once."""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Hashable


class LogThrottle:
    """Admits the first line of each key, then at most one per `interval_s`, and says how many
    were left out in between."""

    MAX_KEYS = 4096  # keys remembered; beyond, the memory starts afresh (a line more, no more)

    def __init__(self, interval_s: float = 60.0) -> None:
        self.interval_s = interval_s
        self._lock = threading.Lock()
        self._seen: dict[Hashable, tuple[float, int]] = {}

    def admit(self, key: Hashable) -> str | None:
        """None: leave this line out. Else log it, followed by the returned text ('' or
        ' (N more like it in the last S s)')."""
        now = time.monotonic()
        with self._lock:
            last, left_out = self._seen.get(key, (-math.inf, 0))
            if now - last < self.interval_s:
                self._seen[key] = (last, left_out + 1)
                return None
            if len(self._seen) >= self.MAX_KEYS:
                self._seen.clear()
            self._seen[key] = (now, 0)
        return f" ({left_out} more like it in the last {now - last:.0f} s)" if left_out else ""

    def forget(self) -> None:
        """Admit the next line of every key (tests that look for one)."""
        with self._lock:
            self._seen.clear()
