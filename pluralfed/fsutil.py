"""Atomic file writes: a reader (or a restarted process) sees the old file or the new one, never
half; and what to say when a folder cannot be written."""

from __future__ import annotations

import json
import os
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
