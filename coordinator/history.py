"""The run's round records: `history.jsonl` in the state folder, appended to, never rewritten.

Every training round adds one record. Kept inside state.json, the whole history was rewritten
(and fsync'd) every round under the engine's lock and kept in memory: at 20,000 rounds a
checkpoint took 1.2 s of CPU and the coordinator grew ~11 KB a round. Now a round appends one
line (fsync'd) before state.json is committed, and state.json records how many bytes of the file
are the run's and their BLAKE3 digest. A crash between the two leaves a line beyond that length,
which no reader reads and the next append overwrites. In memory stay only what the engine reads
between rounds: the first and last record and the groups the records name.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, cast

import blake3

from pluralfed.errors import InputError
from pluralfed.fsutil import atomic_write_bytes
from pluralfed.records import RoundRecord

HISTORY_FILE = "history.jsonl"


class RoundHistory:
    """The records of rounds 1..len(self), in order, backed by `path`."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._count = 0
        self._nbytes = 0  # the file's bytes that hold the records (any beyond: a cut append)
        self._hash = blake3.blake3()
        self.first: RoundRecord | None = None
        self.last: RoundRecord | None = None
        self.trained: set[str] = set()  # groups whose update was averaged in, in any round
        self.named: set[str] = set()  # those and the groups asked to train

    # ------------------------------------------------------------------------ reading

    def __len__(self) -> int:
        return self._count

    @property
    def nbytes(self) -> int:
        return self._nbytes

    def digest(self) -> str:
        """BLAKE3 (hex) of the file's first `nbytes` bytes: what state.json records."""
        return self._hash.copy().hexdigest()

    def records(self) -> Iterator[RoundRecord]:
        """Every record, read from the file (a rebuild of metrics.jsonl, reports, tests): the
        engine itself keeps none but the first and last."""
        left = self._nbytes
        if not left:
            return
        with self.path.open("rb") as f:
            for line in f:
                if left <= 0:
                    return
                left -= len(line)
                yield cast(RoundRecord, json.loads(line))

    # ------------------------------------------------------------------------ writing

    def append(self, record: RoundRecord) -> None:
        """Add the next round's record, durably (fsync'd); OSError if it cannot be written, and
        then nothing is added. Whatever lies beyond the records (a line a crash or a failed
        write left, which no state.json counts) is cut off first."""
        if record["round"] != self._count + 1:
            raise ValueError(f"round {record['round']} appended after round {self._count}")
        line = (json.dumps(record, sort_keys=True) + "\n").encode("utf-8")
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        try:
            os.ftruncate(fd, self._nbytes)
            view = memoryview(line)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        self._note(record, line)

    def _note(self, record: RoundRecord, line: bytes) -> None:
        self._count += 1
        self._nbytes += len(line)
        self._hash.update(line)
        if self.first is None:
            self.first = record
        self.last = record
        self.trained.update(record["participants"])
        self.named.update(record["participants"], record.get("selected", ()))

    @classmethod
    def write(cls, path: Path, records: Iterable[RoundRecord]) -> RoundHistory:
        """A history of `records` (rounds 1..n), written anew, atomically: a state.json older
        than this file kept its history inline, and the first start of this version moves it
        here (and tests make histories so)."""
        history = cls(path)
        lines = []
        for record in records:
            if record["round"] != len(history) + 1:
                raise ValueError(f"round {record['round']} after round {len(history)}")
            lines.append((json.dumps(record, sort_keys=True) + "\n").encode("utf-8"))
            history._note(record, lines[-1])
        atomic_write_bytes(path, b"".join(lines))
        return history

    @classmethod
    def load(cls, path: Path, nbytes: int, digest: str, where: Path) -> RoundHistory:
        """The history state.json (`where`) names: the first `nbytes` bytes of `path`, whose
        digest must be `digest`. Each record is checked for what the engine and the end of a
        run read, and for its round (1, 2, ... in order): a damaged or edited file is refused
        with what and where, not resumed from."""
        history = cls(path)
        if nbytes == 0:
            return history
        try:
            f = path.open("rb")
        except FileNotFoundError:
            raise InputError(
                f"{where} names {nbytes} bytes of round records in {path}, which is missing: "
                "restore it from a backup, or start a new run in another state folder"
            ) from None
        except OSError as err:
            raise InputError(f"{path}: cannot read the run's round records: {err}") from err
        with f:
            size = os.fstat(f.fileno()).st_size
            if size < nbytes:
                raise InputError(
                    f"{path}: holds {size} bytes where {where} names the first {nbytes} as the "
                    "run's round records: the file was cut after it was written; restore it "
                    "from a backup, or start a new run in another state folder"
                )
            for number, line in enumerate(f, 1):
                if history._nbytes + len(line) > nbytes:
                    break
                history._note(_checked(line, number, len(history) + 1, path), line)
                if history._nbytes == nbytes:
                    break
        if history._nbytes != nbytes:
            raise InputError(
                f"{path}: holds {history._nbytes} bytes of whole records where {where} names "
                f"{nbytes}: the file was cut or changed after it was written; restore it from a "
                "backup, or start a new run in another state folder"
            )
        if history.digest() != digest.lower():
            raise InputError(
                f"{path}: its first {nbytes} bytes do not match the digest {where} recorded "
                "for them (history_digest): the file was damaged or changed after it was "
                "written; restore it from a backup, or start a new run in another state folder"
            )
        return history


def _checked(line: bytes, number: int, expected_round: int, path: Path) -> RoundRecord:
    """One line of history.jsonl as a round record: JSON, the round expected, group lists."""
    where = f"{path}, line {number}"
    try:
        record: Any = json.loads(line)
    except ValueError as err:
        raise InputError(f"{where}: not a JSON record ({err})") from err
    check_round_record(record, expected_round, where)
    return cast(RoundRecord, record)


def check_round_record(record: Any, expected_round: int, where: str) -> None:
    """What a resumed run reads from a round record: an object of round `expected_round` (the
    records hold rounds 1..n once each, in order) whose participants and selected are lists of
    group names. Anything else was damaged or edited; a resume from it would lose or repeat
    rounds, or fail at the end of the run."""
    if not isinstance(record, dict):
        raise InputError(f"{where}: must be an object, got {type(record).__name__}")
    got = record.get("round")
    if not isinstance(got, int) or isinstance(got, bool):
        raise InputError(f"{where}: field 'round' missing or not an int")
    if got != expected_round:
        raise InputError(
            f"{where}: is a record of round {got}, expected round {expected_round} (the "
            "history holds rounds 1..completed_rounds once each, in order)"
        )
    for key, needed in (("participants", True), ("selected", False)):
        names = record.get(key, None if needed else [])
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise InputError(f"{where}: field {key!r} must be a list of group names")
