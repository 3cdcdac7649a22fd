"""metrics.jsonl: the run's round and evaluation records, one a line, for people and tools.

It follows the checkpointed state (history.jsonl and evaluations.jsonl): never a round
twice, never one lost. A row is appended as its record is checkpointed, so a round's cost does
not grow with the run's length; the file is rebuilt from the state only when it cannot be
trusted (at a resumed start that finds it different, after a failed write) or when an
evaluation was replaced. Rebuilding and checking stream the records: a resume of a long run
does not hold them all in memory.
"""

from __future__ import annotations

import heapq
import json
import logging
import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from coordinator.state import CheckpointError, RunState
from pluralfed.fsutil import atomic_write_chunks

log = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"


def row_key(row: Mapping[str, Any]) -> tuple[int, bool]:
    """Where a row goes in metrics.jsonl: by round, a round's evaluation after the round."""
    return int(row["round"]), row.get("kind") == "evaluation"


def _line(row: Mapping[str, Any]) -> bytes:
    return (json.dumps(row, sort_keys=True) + "\n").encode("utf-8")


class MetricsFile:
    """The state folder's metrics.jsonl, kept in step with `state` (the engine's RunState)."""

    def __init__(self, folder: Path, state: RunState) -> None:
        self.path = Path(folder) / METRICS_FILE
        self._state = state
        # the key of the file's last row, once this process has checked or rebuilt the file
        # against the state; None until then (a crash may have cut a row) and after a failure
        self._last: tuple[int, bool] | None = None

    def write(self, row: Mapping[str, Any] | None = None) -> None:
        """After a checkpoint: `row`, the record just checkpointed, is appended; the file is
        rebuilt from the state instead when this process has not written or checked it yet,
        without a row (an evaluation replaced), for a row out of order, and after a write that
        failed. CheckpointError if it cannot be written: as for the checkpoint, the run stops."""
        last, self._last = self._last, None  # unknown until written
        try:
            if row is not None and last is not None and row_key(row) >= last:
                with self.path.open("ab") as f:
                    f.write(_line(row))
                    f.flush()
                    os.fsync(f.fileno())
                self._last = row_key(row)
                return
            self._last = self._rebuild()
        except OSError as err:
            raise CheckpointError(f"cannot write {self.path}: {err}") from err

    def mend(self) -> None:
        """At a resumed start: the file made right if it is not (a crash may have cut its last
        row, or lost it), also for a start that writes no row; rewritten only if it differs. A
        failure (a full disk) is the next write's to report."""
        try:
            last = self._matches()
            if last is None:
                if not self.path.exists() and next(self._lines(), None) is None:
                    return  # no record, no file: nothing to mend
                last = self._rebuild()
                log.info("%s did not match the checkpoint: written anew from it", self.path)
            self._last = last
        except OSError as err:
            log.warning("cannot mend %s (%s): the next round writes it anew", self.path, err)

    # ------------------------------------------------------------------------ from the state

    def _rows(self) -> Iterator[Mapping[str, Any]]:
        """The state's records in metrics.jsonl's order: the rounds and the evaluations (each
        in round order in its file, read one at a time) merged."""
        rounds = ({"kind": "round", **r} for r in self._state.history.records())
        return heapq.merge(rounds, self._state.evaluations.records(), key=row_key)

    def _lines(self) -> Iterator[bytes]:
        return (_line(row) for row in self._rows())

    def _rebuild(self) -> tuple[int, bool]:
        """The file written anew from the state (atomically); its last key."""
        last = [(-1, False)]

        def lines() -> Iterator[bytes]:
            for row in self._rows():
                yield _line(row)
                last[0] = row_key(row)

        atomic_write_chunks(self.path, lines())
        return last[0]

    def _matches(self) -> tuple[int, bool] | None:
        """The last key if the file holds exactly the state's rows, else None."""
        last = (-1, False)
        try:
            f = self.path.open("rb")
        except FileNotFoundError:
            return None
        with f:
            for row in self._rows():
                if f.readline() != _line(row):
                    return None
                last = row_key(row)
            return last if f.read(1) == b"" else None
