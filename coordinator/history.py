"""The run's records: `history.jsonl` (a record per training round) and `evaluations.jsonl`
(one per evaluation) in the state folder, appended to, never rewritten.

Kept inside state.json, every record was rewritten (and fsync'd) every round under the engine's
lock, and kept in memory: at 20,000 rounds a checkpoint took 1.2 s of CPU and the coordinator
grew ~11 KB a round. Now a record is appended as one line (fsync'd) before state.json is
committed, and state.json records how many bytes of each file are the run's and their BLAKE3
digest. A crash between the two leaves a line beyond that length, which no reader reads and the
next append overwrites. In memory stays only what the engine reads between rounds (the last
record, the groups the records name, ...); the rest is read from the file when wanted.

An evaluation of a finished run started again replaces the run's last one: the new record is
appended after it, and a record of the same round as the one before replaces it.

These are the folder's files written in place (the others are written anew and renamed), so
they must be the folder's own: a symlink or a FIFO is refused, and a file hard-linked into
another folder (a run forked with `cp -al`) is copied before this run first appends to it.
"""

from __future__ import annotations

import json
import logging
import os
import stat
from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any, Generic, Self, TypeVar, cast

import blake3

from pluralfed.errors import InputError
from pluralfed.fsutil import atomic_write_bytes, atomic_write_chunks
from pluralfed.records import EvaluationRecord, RoundRecord

log = logging.getLogger(__name__)

HISTORY_FILE = "history.jsonl"
EVALUATIONS_FILE = "evaluations.jsonl"
_RESTORE = "restore it from a backup, or start a new run in another state folder"

_Record = TypeVar("_Record", RoundRecord, EvaluationRecord)


def _encode(record: Mapping[str, Any]) -> bytes:
    return (json.dumps(record, sort_keys=True) + "\n").encode("utf-8")


class _RecordLog(ABC, Generic[_Record]):
    """Records appended to `path`, the first `nbytes` bytes of which are the run's. Made by
    `create` (a new run), `load` (what a state.json names) or `from_records` (a version-1
    state.json's own lists)."""

    what = "records"  # for messages
    key = "records"  # state.json's fields of them: <key>_bytes, <key>_digest

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._lines = 0
        self._nbytes = 0  # the file's bytes that hold the records (any beyond: a cut append)
        self._hash = blake3.blake3()
        self._unwritten: list[bytes] | None = None  # records not yet on disk (`from_records`)
        self._own_file = False  # checked (or made) this process's own, unshared file
        self.last: _Record | None = None

    # what a subclass says: how a record must follow the ones before, and what it keeps of it

    @abstractmethod
    def _check(self, record: Any, where: str) -> None:
        """Refuse (InputError naming `where`) a record that cannot follow the ones noted."""

    def _keep(self, record: _Record) -> None:
        """What the engine reads of the records without reading the file, updated."""
        self.last = record

    @classmethod
    def create(cls, path: Path) -> Self:
        """The empty records of a new run (a file left there is replaced at the first append:
        a folder with another run's files is refused before a run starts)."""
        return cls(path)

    @classmethod
    def from_records(cls, path: Path, records: Iterable[Any], where: str) -> Self:
        """Records (checked, `where` the list they came from) that are not on disk yet: a
        version-1 state.json kept them inline, and the first checkpoint writes them here
        (`write_pending`), so a start refused for another reason leaves the folder as it was."""
        made = cls(path)
        made._unwritten = []
        for i, record in enumerate(records):
            made._check(record, f"{where}[{i}]")
            line = _encode(record)
            made._unwritten.append(line)
            made._note(record, line)
        return made

    # ------------------------------------------------------------------------ reading

    @property
    def nbytes(self) -> int:
        return self._nbytes

    def digest(self) -> str:
        """BLAKE3 (hex) of the file's first `nbytes` bytes: what state.json records."""
        return self._hash.copy().hexdigest()

    def _all_records(self) -> Iterator[_Record]:
        """Every record written, read from the file (or memory, not written yet)."""
        if self._unwritten is not None:
            yield from (cast(_Record, json.loads(line)) for line in self._unwritten)
            return
        left = self._nbytes
        if not left:
            return
        with self.path.open("rb") as f:
            for line in f:
                if left <= 0:
                    return
                left -= len(line)
                yield cast(_Record, json.loads(line))

    # ------------------------------------------------------------------------ writing

    def write_pending(self) -> None:
        """Records not on disk yet (`from_records`) written, atomically; OSError if they
        cannot be. Before the checkpoint that names them."""
        if self._unwritten is not None:
            atomic_write_bytes(self.path, b"".join(self._unwritten))
            self._unwritten = None
            self._own_file = True

    def append(self, record: _Record) -> None:
        """Add a record, durably (fsync'd); OSError if it cannot be written, and then nothing
        is added (ValueError for one that cannot follow the last). Whatever lies beyond the
        records (a line a crash or a failed write left, which no state.json counts) is cut off
        first."""
        try:
            self._check(record, "the record appended")
        except InputError as err:
            raise ValueError(str(err)) from None
        self.write_pending()
        if not self._own_file:
            self._make_own()
        line = _encode(record)
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW, 0o644)
        try:
            os.ftruncate(fd, self._nbytes)
            view = memoryview(line)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        self._note(record, line)

    def _make_own(self) -> None:
        """Before this process first writes the file in place: one hard-linked elsewhere (a
        run copied with `cp -al`) or not a plain file is replaced by a copy of the records, so
        that appending cannot change another folder's run."""
        try:
            st = os.lstat(self.path)
        except FileNotFoundError:
            self._own_file = True
            return
        if stat.S_ISREG(st.st_mode) and st.st_nlink == 1:
            self._own_file = True
            return
        atomic_write_chunks(self.path, self._committed_bytes())
        log.info(
            "%s was shared (a hard link, or not a plain file): copied before appending", self.path
        )
        self._own_file = True

    def _committed_bytes(self) -> Iterator[bytes]:
        """The file's first `nbytes` bytes, a MiB at a time."""
        left = self._nbytes
        with self.path.open("rb") as f:
            while left:
                chunk = f.read(min(left, 1 << 20))
                if not chunk:
                    raise OSError(f"{self.path} ends before its records do")
                yield chunk
                left -= len(chunk)

    def _note(self, record: _Record, line: bytes) -> None:
        self._lines += 1
        self._nbytes += len(line)
        self._hash.update(line)
        self._keep(record)

    # ------------------------------------------------------------------------ resuming

    @classmethod
    def load(cls, path: Path, nbytes: int, digest: str, state_path: Path) -> Self:
        """The records `state_path` (a state.json) names: the first `nbytes` bytes of `path`,
        whose digest must be `digest`. Each record is checked for what the engine and the end
        of a run read, and for its round (in order): a damaged or edited file is refused with
        what and where, not resumed from. Read-only."""
        history = cls(path)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
            st = os.fstat(fd)
        except FileNotFoundError:
            if nbytes == 0:
                history._check_digest(digest, state_path)
                return history
            raise InputError(
                f"{state_path} names {nbytes} bytes of {cls.what} in {path}, which is "
                f"missing: {_RESTORE}"
            ) from None
        except OSError as err:  # ELOOP: a symlink
            kind = "a symbolic link" if path.is_symlink() else f"not readable ({err})"
            raise InputError(
                f"{path}: is {kind}; the run's {cls.what} must be a plain file of the state folder"
            ) from err
        if not stat.S_ISREG(st.st_mode):  # a directory, a FIFO, ...
            os.close(fd)
            raise InputError(f"{path}: is not a plain file; the run's {cls.what} must be one")
        with os.fdopen(fd, "rb") as f:
            if st.st_size < nbytes:
                raise InputError(
                    f"{path}: holds {st.st_size} bytes where {state_path} names the first "
                    f"{nbytes} as the run's {cls.what}: the file was cut after it was "
                    f"written; {_RESTORE}"
                )
            number = 0
            while history._nbytes < nbytes:
                number += 1
                line = f.readline(nbytes - history._nbytes)
                if not line.endswith(b"\n"):
                    raise InputError(
                        f"{path}, line {number}: the {nbytes} bytes {state_path} names as the "
                        f"run's {cls.what} end inside this line: the file was changed after "
                        f"it was written; {_RESTORE}"
                    )
                history._note(history._parsed(line, f"{path}, line {number}"), line)
        history._check_digest(digest, state_path)
        if st.st_size > nbytes:
            log.warning(
                "%s: %d bytes beyond the %s %s names (a record a crash cut before its "
                "checkpoint, or a state.json older than the file): not read; the next record "
                "writes over them",
                path,
                st.st_size - nbytes,
                cls.what,
                state_path,
            )
        return history

    def _check_digest(self, digest: str, state_path: Path) -> None:
        if self.digest() != digest.lower():
            raise InputError(
                f"{self.path}: its first {self._nbytes} bytes do not match the digest "
                f"{state_path} recorded for them ({self.key}_digest): the file was damaged or "
                f"changed after it was written; {_RESTORE}"
            )

    def _parsed(self, line: bytes, where: str) -> _Record:
        """One line as a record that may follow the ones noted."""
        if line == b"\n":
            raise InputError(f"{where}: is empty, where a record was expected")
        try:
            record: Any = json.loads(line)
        except (ValueError, RecursionError) as err:  # nested deeper than json can read
            raise InputError(f"{where}: not a JSON record ({err})") from err
        self._check(record, where)
        return cast(_Record, record)


class RoundHistory(_RecordLog[RoundRecord]):
    """The records of training rounds 1..len(self), in order (history.jsonl)."""

    what = "round records"
    key = "history"

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self.first: RoundRecord | None = None
        self.participants: set[str] = set()  # groups whose update was averaged in, any round
        self.groups: set[str] = set()  # every group a record names: participants and selected

    def __len__(self) -> int:
        """The rounds recorded."""
        return self._lines

    def records(self) -> Iterator[RoundRecord]:
        """Every record, read from the file (a rebuild of metrics.jsonl, reports, tests): the
        engine itself keeps none but the first and last."""
        return self._all_records()

    def _check(self, record: Any, where: str) -> None:
        """An object of the next round (the records hold rounds 1..n once each, in order)
        whose participants and selected are lists of group names: what a resumed run reads."""
        _check_object(record, where)
        if record["round"] != len(self) + 1:
            raise InputError(
                f"{where}: is a record of round {record['round']}, expected round "
                f"{len(self) + 1} (the history holds rounds 1..completed_rounds once each, in "
                "order)"
            )
        _check_names(record, where, {"participants": True, "selected": False})

    def _keep(self, record: RoundRecord) -> None:
        super()._keep(record)
        if self.first is None:
            self.first = record
        self.participants.update(record["participants"])
        self.groups.update(record["participants"], record.get("selected", ()))


class EvaluationLog(_RecordLog[EvaluationRecord]):
    """The run's evaluations, in round order (evaluations.jsonl); a record of the same round as
    the one before it replaces it (a finished run evaluated again)."""

    what = "evaluation records"
    key = "evaluations"

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self.rounds: set[int] = set()  # the rounds evaluated

    def __len__(self) -> int:
        """The evaluations in force (a replaced one not counted)."""
        return len(self.rounds)

    def records(self) -> Iterator[EvaluationRecord]:
        """The evaluations in force (a replaced one left out), read from the file."""
        previous: EvaluationRecord | None = None
        for record in self._all_records():
            if previous is not None and previous["round"] != record["round"]:
                yield previous
            previous = record
        if previous is not None:
            yield previous

    def _check(self, record: Any, where: str) -> None:
        """An object with the fields a resumed run reads, of a round not before the last one's
        (the same round: it replaces that one)."""
        _check_object(record, where)
        if record["round"] < 0:
            raise InputError(f"{where}: is of round {record['round']}")
        if self.last is not None and record["round"] < self.last["round"]:
            raise InputError(
                f"{where}: is of round {record['round']}, after an evaluation of round "
                f"{self.last['round']} (evaluations are in round order)"
            )
        if not isinstance(record.get("reports"), dict):
            raise InputError(f"{where}: field 'reports' missing or not an object")
        names = {"groups": True, "missing": False, "missing_held_out": False}
        _check_names(record, where, {**names, "held_out_unconnected": False})

    def _keep(self, record: EvaluationRecord) -> None:
        super()._keep(record)
        self.rounds.add(record["round"])


def _check_object(record: Any, where: str) -> None:
    if not isinstance(record, dict):
        raise InputError(f"{where}: must be an object, got {type(record).__name__}")
    got = record.get("round")
    if not isinstance(got, int) or isinstance(got, bool):
        raise InputError(f"{where}: field 'round' missing or not an int")


def _check_names(record: dict[str, Any], where: str, fields: Mapping[str, bool]) -> None:
    """Each of `fields` (required: True) a list of group names, as the engine reads them."""
    for key, required in fields.items():
        names = record.get(key, None if required else [])
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise InputError(f"{where}: field {key!r} must be a list of group names")
