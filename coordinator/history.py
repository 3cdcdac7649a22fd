"""The run's round records: `history.jsonl` in the state folder, appended to, never rewritten.

Every training round adds one record. Kept inside state.json, the whole history was rewritten
(and fsync'd) every round under the engine's lock and kept in memory: at 20,000 rounds a
checkpoint took 1.2 s of CPU and the coordinator grew ~11 KB a round. Now a round appends one
line (fsync'd) before state.json is committed, and state.json records how many bytes of the file
are the run's and their BLAKE3 digest. A crash between the two leaves a line beyond that length,
which no reader reads and the next append overwrites. In memory stay only what the engine reads
between rounds: the first and last record and the groups the records name.

It is the one file of the folder written in place (the others are written anew and renamed), so
it must be the folder's own: a symlink or a FIFO is refused, and a file hard-linked into another
folder (a run forked with `cp -al`) is copied before this run first appends to it.
"""

from __future__ import annotations

import json
import logging
import os
import stat
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, cast

import blake3

from pluralfed.errors import InputError
from pluralfed.fsutil import atomic_write_bytes, commit_file
from pluralfed.records import RoundRecord

log = logging.getLogger(__name__)

HISTORY_FILE = "history.jsonl"
_RESTORE = "restore it from a backup, or start a new run in another state folder"


def _encode(record: RoundRecord) -> bytes:
    return (json.dumps(record, sort_keys=True) + "\n").encode("utf-8")


class RoundHistory:
    """The records of rounds 1..len(self), in order, backed by `path`. Made by `create` (a new
    run), `load` (the history a state.json names) or `from_records` (a version-1 state.json's)."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._count = 0
        self._nbytes = 0  # the file's bytes that hold the records (any beyond: a cut append)
        self._hash = blake3.blake3()
        self._unwritten: list[bytes] | None = None  # records not yet on disk (`from_records`)
        self._own_file = False  # checked (or made) this process's own, unshared file
        self.first: RoundRecord | None = None
        self.last: RoundRecord | None = None
        self.participants: set[str] = set()  # groups whose update was averaged in, any round
        self.groups: set[str] = set()  # every group a record names: participants and selected

    @classmethod
    def create(cls, path: Path) -> RoundHistory:
        """The empty history of a new run (a file left there is replaced at the first append:
        a folder with another run's files is refused before a run starts)."""
        return cls(path)

    @classmethod
    def from_records(cls, path: Path, records: Iterable[RoundRecord]) -> RoundHistory:
        """A history of `records` (rounds 1..n) that is not on disk yet: a version-1 state.json
        kept its history inline, and the first checkpoint writes it here (`write_pending`), so
        a start refused for another reason leaves the folder as it was."""
        history = cls(path)
        history._unwritten = []
        for record in records:
            if record["round"] != len(history) + 1:
                raise ValueError(f"round {record['round']} after round {len(history)}")
            line = _encode(record)
            history._unwritten.append(line)
            history._note(record, line)
        return history

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
        if self._unwritten is not None:
            yield from (cast(RoundRecord, json.loads(line)) for line in self._unwritten)
            return
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

    def write_pending(self) -> None:
        """Records not on disk yet (`from_records`) written, atomically; OSError if they
        cannot be. Before the checkpoint that names them."""
        if self._unwritten is not None:
            atomic_write_bytes(self.path, b"".join(self._unwritten))
            self._unwritten = None
            self._own_file = True

    def append(self, record: RoundRecord) -> None:
        """Add the next round's record, durably (fsync'd); OSError if it cannot be written, and
        then nothing is added. Whatever lies beyond the records (a line a crash or a failed
        write left, which no state.json counts) is cut off first."""
        if record["round"] != self._count + 1:
            raise ValueError(f"round {record['round']} appended after round {self._count}")
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
        fd, tmp = tempfile.mkstemp(prefix=f".{HISTORY_FILE}.", suffix=".tmp", dir=self.path.parent)
        try:
            with os.fdopen(fd, "wb") as out:
                if self._nbytes:
                    with self.path.open("rb") as f:
                        left = self._nbytes
                        while left:
                            chunk = f.read(min(left, 1 << 20))
                            if not chunk:
                                raise OSError(f"{self.path} ends before its records do")
                            out.write(chunk)
                            left -= len(chunk)
            os.chmod(tmp, 0o644)
            commit_file(Path(tmp), self.path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        log.info(
            "%s was shared (a hard link, or not a plain file): copied before appending", self.path
        )
        self._own_file = True

    def _note(self, record: RoundRecord, line: bytes) -> None:
        self._count += 1
        self._nbytes += len(line)
        self._hash.update(line)
        if self.first is None:
            self.first = record
        self.last = record
        self.participants.update(record["participants"])
        self.groups.update(record["participants"], record.get("selected", ()))

    # ------------------------------------------------------------------------ resuming

    @classmethod
    def load(cls, path: Path, nbytes: int, digest: str, state_path: Path) -> RoundHistory:
        """The history `state_path` (a state.json) names: the first `nbytes` bytes of `path`,
        whose digest must be `digest`. Each record is checked for what the engine and the end
        of a run read, and for its round (1, 2, ... in order): a damaged or edited file is
        refused with what and where, not resumed from. Read-only."""
        history = cls(path)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
        except FileNotFoundError:
            if nbytes == 0:
                history._check_digest(digest, state_path)
                return history
            raise InputError(
                f"{state_path} names {nbytes} bytes of round records in {path}, which is "
                f"missing: {_RESTORE}"
            ) from None
        except OSError as err:  # ELOOP: a symlink
            kind = "a symbolic link" if path.is_symlink() else f"not readable ({err})"
            raise InputError(
                f"{path}: is {kind}; the run's round records must be a plain file of the state "
                "folder"
            ) from err
        with os.fdopen(fd, "rb") as f:
            st = os.fstat(f.fileno())
            if not stat.S_ISREG(st.st_mode):
                raise InputError(
                    f"{path}: is not a plain file; the run's round records must be one"
                )
            if st.st_size < nbytes:
                raise InputError(
                    f"{path}: holds {st.st_size} bytes where {state_path} names the first "
                    f"{nbytes} as the run's round records: the file was cut after it was "
                    f"written; {_RESTORE}"
                )
            number = 0
            while history._nbytes < nbytes:
                number += 1
                line = f.readline(nbytes - history._nbytes)
                if not line.endswith(b"\n"):
                    raise InputError(
                        f"{path}, line {number}: the {nbytes} bytes {state_path} names as the "
                        "run's round records end inside this line: the file was changed after "
                        f"it was written; {_RESTORE}"
                    )
                history._note(_checked(line, number, len(history) + 1, path), line)
        history._check_digest(digest, state_path)
        if st.st_size > nbytes:
            log.warning(
                "%s: %d bytes beyond the round records %s names (a round a crash cut before "
                "its checkpoint, or a state.json older than the file): not read; the next "
                "round writes over them",
                path,
                st.st_size - nbytes,
                state_path,
            )
        return history

    def _check_digest(self, digest: str, state_path: Path) -> None:
        if self.digest() != digest.lower():
            raise InputError(
                f"{self.path}: its first {self._nbytes} bytes do not match the digest "
                f"{state_path} recorded for them (history_digest): the file was damaged or "
                f"changed after it was written; {_RESTORE}"
            )


def _checked(line: bytes, number: int, expected_round: int, path: Path) -> RoundRecord:
    """One line of history.jsonl as a round record: JSON, the round expected, group lists."""
    where = f"{path}, line {number}"
    if line == b"\n":
        raise InputError(f"{where}: is empty, where a round record was expected")
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
