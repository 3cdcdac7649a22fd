"""Folders a process cannot use (a state folder or an embedding cache mounted into a container,
owned by the host's user) are one clear line naming the folder, its owner and this process's
uid, not a traceback (Docker review, session 20). The tests run as root, which may write
anywhere, so they make each call fail another way and check the wording with a stand-in uid."""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

import pluralfed.fsutil
from coordinator.service import lock_state_dir
from pluralfed.embeddings import CachedEncoder
from pluralfed.errors import InputError
from pluralfed.fsutil import (
    atomic_write_bytes,
    atomic_write_chunks,
    atomic_write_json,
    commit_file,
    owner_hint,
    same_file,
)


def test_the_hint_names_the_owner_and_this_process(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    owner = tmp_path.stat().st_uid
    monkeypatch.setattr(os, "getuid", lambda: owner + 10001)
    hint = owner_hint(tmp_path / "not" / "made" / "yet")  # the nearest folder that exists
    assert hint == (
        f"{tmp_path} belongs to uid {owner}, this process runs as uid {owner + 10001}: give the "
        f"folder to it (in a container, `chown -R {owner + 10001}` the mounted folder on the host)"
    )
    monkeypatch.setattr(os, "getuid", lambda: owner)
    assert "belongs to this process's uid" in owner_hint(tmp_path)


def test_a_state_folder_that_cannot_be_made_is_one_clear_error(tmp_path: Path) -> None:
    (tmp_path / "a-file").write_text("")
    with pytest.raises(InputError, match=r"cannot use the state folder .*a-file/state: .*uid"):
        lock_state_dir(tmp_path / "a-file" / "state")


class TinyEncoder:
    identity, dim = "tiny/2", 2

    def encode(self, texts: list[str]) -> np.ndarray:
        return np.zeros((len(texts), 2), np.float32)


def test_an_embedding_cache_that_cannot_be_opened_is_one_clear_error(tmp_path: Path) -> None:
    cache = CachedEncoder(TinyEncoder(), tmp_path)  # type: ignore[arg-type]
    cache.path.mkdir()  # where the cache file should be: sqlite cannot open it
    with pytest.raises(InputError, match=r"cannot open the embedding cache .*uid") as err:
        cache.encode(["a question"])
    assert "PLURALFED_CACHE_DIR" in str(err.value)


def test_an_atomic_write_gives_the_file_the_mode_asked_for(tmp_path: Path) -> None:
    """The temp file an atomic write starts from is private (0600); the file it becomes has the
    mode asked for: state.json and certificates readable by others (0644), keys not (0600)."""
    atomic_write_bytes(tmp_path / "state.json", b"{}\n")
    atomic_write_bytes(tmp_path / "key.pem", b"secret", mode=0o600)
    assert stat.S_IMODE((tmp_path / "state.json").stat().st_mode) == 0o644
    assert stat.S_IMODE((tmp_path / "key.pem").stat().st_mode) == 0o600


def test_a_failed_atomic_write_keeps_the_old_file_and_leaves_no_temp_file(tmp_path: Path) -> None:
    """A write that fails halfway (a full disk) leaves the file as it was and takes its temp
    file away: a run that keeps failing must not fill the disk with half-written copies."""
    path = tmp_path / "metrics.jsonl"
    path.write_bytes(b"old\n")

    def chunks() -> Iterator[bytes]:
        yield b"new, half"
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(OSError, match="No space"):
        atomic_write_chunks(path, chunks())
    assert path.read_bytes() == b"old\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.jsonl"]


def test_an_atomic_write_makes_its_folder_and_writes_json_with_sorted_keys(tmp_path: Path) -> None:
    path = tmp_path / "not" / "made" / "results.json"
    atomic_write_json(path, {"b": 1, "a": [2, 3]})
    assert path.read_text() == '{\n  "a": [\n    2,\n    3\n  ],\n  "b": 1\n}\n'
    atomic_write_json(path, {"b": 1, "a": 2}, indent=None)
    assert path.read_text() == '{"a": 2, "b": 1}\n'


def test_an_atomic_write_syncs_the_file_before_and_its_folder_after_the_rename(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The data reaches the disk before the new name does (else a crash can leave the new
    name on an empty file), and the rename itself is synced by syncing the folder."""
    synced: list[str] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd: int) -> None:
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real_fsync(fd)

    def replace(src: str | Path, dst: str | Path) -> None:
        synced.append(f"rename to {Path(dst).name}")
        real_replace(src, dst)

    monkeypatch.setattr(pluralfed.fsutil.os, "fsync", fsync)
    monkeypatch.setattr(pluralfed.fsutil.os, "replace", replace)
    atomic_write_bytes(tmp_path / "state.json", b"{}\n")
    temp, *after = synced
    assert Path(temp).parent == tmp_path and Path(temp).name.startswith(".state.json.")
    assert after == ["rename to state.json", str(tmp_path)]
    synced.clear()
    (tmp_path / "part.tmp").write_bytes(b"all of it")
    commit_file(tmp_path / "part.tmp", tmp_path / "part.bin")
    assert synced == [str(tmp_path / "part.tmp"), "rename to part.bin", str(tmp_path)]
    assert (tmp_path / "part.bin").read_bytes() == b"all of it"


def test_same_file_sees_one_file_under_two_names(tmp_path: Path) -> None:
    data = tmp_path / "data.csv"
    data.write_text("x\n")
    (tmp_path / "link.csv").symlink_to(data)
    os.link(data, tmp_path / "hard.csv")
    (tmp_path / "other.csv").write_text("x\n")
    assert same_file(tmp_path / "link.csv", data)
    assert same_file(tmp_path / "hard.csv", data)  # a hard link: only samefile sees it
    assert not same_file(tmp_path / "other.csv", data)  # the same content is another file
    # a file not written yet, spelled two ways
    assert same_file(tmp_path / "out.csv", tmp_path / "sub" / ".." / "out.csv")
    assert not same_file(tmp_path / "out.csv", data)
