"""The coordinator's cap on glibc malloc arenas (`coordinator.server.limit_malloc_arenas`).

Each check runs in a fresh interpreter: the cap is process-wide and only binds arenas created
after it. Threads that allocate at the same time would each get their own arena; glibc's
`malloc_stats()` lists the arenas on stderr ("Arena N:"), so the count is read from there.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from coordinator.server import COORDINATOR_MALLOC_ARENAS

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc only")

PROBE = textwrap.dedent(
    """
    import ctypes, sys, threading
    from coordinator.server import limit_malloc_arenas

    capped = limit_malloc_arenas() if sys.argv[1] == "cap" else False
    libc = ctypes.CDLL(None)
    libc.malloc.restype = ctypes.c_void_p
    libc.malloc.argtypes = [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]
    barrier = threading.Barrier(6)
    kept = []

    def allocate():
        kept.append(libc.malloc(64 * 1024))  # below the mmap threshold: from an arena
        barrier.wait()  # all six threads alive at once, so none inherits a freed arena

    threads = [threading.Thread(target=allocate) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    print("capped" if capped else "not capped", flush=True)
    libc.malloc_stats()
    """
)


def _arenas(mode: str, env_extra: dict[str, str] | None = None) -> tuple[str, int]:
    env = {k: v for k, v in os.environ.items() if k != "MALLOC_ARENA_MAX"}
    env.update(env_extra or {})
    env["PYTHONPATH"] = str(ROOT)
    done = subprocess.run(
        [sys.executable, "-c", PROBE, mode],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=True,
    )
    return done.stdout.strip(), len(re.findall(r"^Arena \d+:", done.stderr, re.MULTILINE))


def test_cap_keeps_concurrent_threads_in_one_arena() -> None:
    said, arenas = _arenas("cap")
    assert said == "capped"
    assert arenas == COORDINATOR_MALLOC_ARENAS == 1


def test_without_cap_threads_get_their_own_arenas() -> None:
    # the control: shows the probe can tell, so the test above can fail
    said, arenas = _arenas("none")
    assert said == "not capped"
    assert arenas > 1


def test_operator_setting_wins() -> None:
    said, arenas = _arenas("cap", {"MALLOC_ARENA_MAX": "3"})
    assert said == "not capped"
    assert arenas == 3
