"""`read_input_bytes`: a data file, or a pipe that a Ctrl-C can always end (the signal itself is
tested on a real command in test_cli_inputs.py)."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import pytest

from pluralfed.fsutil import PIPE_WAIT_S, InputTooLarge, read_input_bytes, size_text


class PipeReader(threading.Thread):
    """`read_input_bytes(pipe)` in a thread, started before any writer comes."""

    def __init__(self, pipe: Path) -> None:
        super().__init__(daemon=True)
        self.pipe = pipe
        self.result: bytes | None = None

    def run(self) -> None:
        self.result = read_input_bytes(self.pipe)


def test_a_regular_file_is_read_whole(tmp_path: Path) -> None:
    path = tmp_path / "survey.jsonl"
    data = os.urandom(3 << 20)  # more than one read's worth
    path.write_bytes(data)
    assert read_input_bytes(path) == data


def test_a_missing_file_and_a_folder_raise_what_read_bytes_raises(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        read_input_bytes(tmp_path / "none.jsonl")
    with pytest.raises(IsADirectoryError) as err:
        read_input_bytes(tmp_path)
    assert err.value.filename == str(tmp_path)


def test_a_pipe_is_read_to_its_end_even_when_its_writer_comes_late(tmp_path: Path) -> None:
    """The pipe is opened without blocking: before its writer comes, a read would say end of
    file. The reader must wait for the writer (several of its waits), then take every part."""
    pipe = tmp_path / "groups.jsonl"
    os.mkfifo(pipe)
    reader = PipeReader(pipe)
    reader.start()
    time.sleep(3 * PIPE_WAIT_S)
    assert reader.is_alive()
    with open(pipe, "wb", buffering=0) as writer:
        writer.write(b'{"a": 1}\n')
        time.sleep(2 * PIPE_WAIT_S)
        writer.write(b"x" * (2 << 20))
    reader.join(timeout=60)
    assert reader.result == b'{"a": 1}\n' + b"x" * (2 << 20)


def test_a_pipe_whose_writer_leaves_without_writing_is_empty(tmp_path: Path) -> None:
    pipe = tmp_path / "groups.jsonl"
    os.mkfifo(pipe)
    reader = PipeReader(pipe)
    reader.start()
    time.sleep(2 * PIPE_WAIT_S)
    assert reader.is_alive()
    os.close(os.open(pipe, os.O_WRONLY | os.O_NONBLOCK))  # ENXIO if the reader had left
    reader.join(timeout=60)
    assert reader.result == b""


def test_a_file_over_the_limit_is_refused_before_it_is_read(tmp_path: Path) -> None:
    path = tmp_path / "survey.jsonl"
    path.write_bytes(b"x" * 1001)
    with pytest.raises(InputTooLarge) as err:
        read_input_bytes(path, max_bytes=1000)
    assert (err.value.path, err.value.max_bytes) == (path, 1000)
    assert read_input_bytes(path, max_bytes=1001) == b"x" * 1001  # the limit itself is allowed


def test_a_pipe_or_a_device_over_the_limit_is_cut_off_as_it_is_read(tmp_path: Path) -> None:
    """A pipe and a device have no size to look at first: /dev/zero never ends, and without
    the limit it would be read until the memory ran out."""
    with pytest.raises(InputTooLarge):
        read_input_bytes(Path("/dev/zero"), max_bytes=3 << 20)
    pipe = tmp_path / "groups.jsonl"
    os.mkfifo(pipe)
    for size, refused in ((4096, False), (4097, True)):
        writer = threading.Thread(target=pipe.write_bytes, args=(b"y" * size,), daemon=True)
        writer.start()
        if refused:
            with pytest.raises(InputTooLarge):
                read_input_bytes(pipe, max_bytes=4096)
        else:
            assert read_input_bytes(pipe, max_bytes=4096) == b"y" * 4096
        writer.join(timeout=60)


def test_sizes_are_shown_in_the_largest_whole_unit() -> None:
    assert [size_text(n) for n in (1 << 30, 3 << 30, 16 << 20, 1536 << 20, 4096, 1000, 0)] == [
        "1 GiB",
        "3 GiB",
        "16 MiB",
        "1,536 MiB",
        "4 KiB",
        "1,000 bytes",
        "0 bytes",
    ]
