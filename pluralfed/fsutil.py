"""Atomic file writes: a reader (or a restarted process) sees the old file or the new one, never
half; what to say when a folder cannot be written; and reading an input that may be a pipe
without losing a Ctrl-C."""

from __future__ import annotations

import errno
import json
import os
import select
import stat
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any


def atomic_write_bytes(path: Path, data: bytes, mode: int = 0o644) -> None:
    """Write to a temp file in the same folder, fsync it, rename over `path`, fsync the folder."""
    atomic_write_chunks(path, [data], mode)


def atomic_write_chunks(path: Path, chunks: Iterable[bytes], mode: int = 0o644) -> None:
    """`atomic_write_bytes` of data made as it is written (a file too large to hold at once)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            for chunk in chunks:
                f.write(chunk)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def commit_file(tmp: Path, path: Path) -> None:
    """Make a fully written temp file (same folder) durable and rename it over `path`."""
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)
    dir_fd = os.open(Path(path).parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


# How long a read of a pipe waits at a time before Python looks at its signals again.
PIPE_WAIT_S = 0.2


class InputTooLarge(ValueError):
    """An input holds more than the bytes its reader accepts (`/dev/zero` given as a file would
    otherwise be read until memory runs out)."""

    def __init__(self, path: Path, max_bytes: int) -> None:
        super().__init__(f"{path}: more than {size_text(max_bytes)}")
        self.path = path
        self.max_bytes = max_bytes


def size_text(nbytes: int) -> str:
    """A size as a message shows it: whole GiB or MiB where it is one ("1 GiB"), else bytes."""
    for unit, shift in (("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if nbytes >= 1 << shift and nbytes % (1 << shift) == 0:
            return f"{nbytes >> shift:,} {unit}"
    return f"{nbytes:,} bytes"


def read_input_bytes(path: Path, max_bytes: int | None = None) -> bytes:
    """The whole of `path`, like `Path.read_bytes`, but a Ctrl-C always ends a wait for a pipe's
    writer (`data inspect <(zcat survey.jsonl.gz)`, a FIFO). CPython runs a signal's handler
    between bytecodes: a SIGINT that lands just before a blocking read(2) starts, or on another
    thread (numpy's BLAS threads take signals too), leaves that read blocked until the writer
    writes. So a pipe is opened without blocking and read after poll(2) waits at most PIPE_WAIT_S;
    Linux reports no hang-up on a FIFO until a writer has come, so no early end of file is seen.
    A regular file never blocks and is read as usual. Raises what `Path.read_bytes` raises, and
    InputTooLarge past `max_bytes` (checked as it reads: a pipe or a device has no size)."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        st = os.fstat(fd)
        if stat.S_ISDIR(st.st_mode):
            raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), str(path))
        if stat.S_ISREG(st.st_mode):
            if max_bytes is not None and st.st_size > max_bytes:
                raise InputTooLarge(path, max_bytes)
            os.set_blocking(fd, True)
            with open(fd, "rb", closefd=False) as f:
                data = f.read() if max_bytes is None else f.read(max_bytes + 1)
        else:
            data = _read_pipe(fd, max_bytes)
        if max_bytes is not None and len(data) > max_bytes:  # a file that grew as it was read
            raise InputTooLarge(path, max_bytes)
        return data
    finally:
        os.close(fd)


def _read_pipe(fd: int, max_bytes: int | None) -> bytes:
    """Everything until end of file from a non-blocking `fd`, looking at signals every
    PIPE_WAIT_S (a returning poll lets Python run a handler that was held back); it stops once
    more than `max_bytes` came."""
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    chunks: list[bytes] = []
    total = 0
    while max_bytes is None or total <= max_bytes:
        if not poller.poll(PIPE_WAIT_S * 1000):
            continue
        try:
            chunk = os.read(fd, 1 << 20)
        except BlockingIOError:  # woken, but another reader took the bytes
            continue
        if not chunk:
            break
        chunks.append(chunk)
        total += len(chunk)
    return b"".join(chunks)


def atomic_write_json(path: Path, obj: Any, *, indent: int | None = 2) -> None:
    """`obj` as JSON (sorted keys); indent None for files rewritten often: json's fast C
    encoder serves only unindented output, several times faster on large records."""
    text = json.dumps(obj, indent=indent, sort_keys=True) + "\n"
    atomic_write_bytes(path, text.encode("utf-8"))


def owner_hint(path: Path) -> str:
    """Who owns `path` (or its nearest existing parent) against who this process is: a folder
    mounted into a container belongs to the host's user, and the image runs as another one."""
    probe = Path(path)
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    try:
        owner = probe.stat().st_uid
    except OSError:
        return f"this process runs as uid {os.getuid()}"
    if owner == os.getuid():
        return f"{probe} belongs to this process's uid {owner}: check its permissions"
    return (
        f"{probe} belongs to uid {owner}, this process runs as uid {os.getuid()}: give the "
        f"folder to it (in a container, `chown -R {os.getuid()}` the mounted folder on the host)"
    )


# files a container runtime leaves in the container's root: Docker's, and Podman's
CONTAINER_MARKERS: tuple[Path, ...] = (Path("/.dockerenv"), Path("/run/.containerenv"))


def in_container() -> bool:
    """Whether this process runs in a (Docker or Podman) container, where paths are the
    container's and localhost is the container itself: messages that name either say so."""
    return any(marker.exists() for marker in CONTAINER_MARKERS)


def same_file(a: Path, b: Path) -> bool:
    """True if the two paths name one file (also through a symlink or a hard link): an output
    that is one of a command's inputs would replace it."""
    if a.resolve() == b.resolve():
        return True
    try:
        return os.path.samefile(a, b)
    except OSError:  # one of them does not exist (yet)
        return False
