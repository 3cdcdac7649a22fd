"""Shared fixtures. Real data comes from ../shared (beside the repo), never from a copy in the repo."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
SHARED_DIR = Path(os.environ.get("PLURALFED_SHARED", REPO_ROOT.parent / "shared"))
GOQA_CSV = SHARED_DIR / "data" / "globalopinionqa" / "global_opinions.csv"

# Several torch processes on 2 cores oversubscribe the CPU: keep each test process to one thread.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(scope="session")
def goqa_csv() -> Path:
    if not GOQA_CSV.is_file():
        pytest.fail(f"shared survey data not found at {GOQA_CSV} (set PLURALFED_SHARED)")
    return GOQA_CSV


@pytest.fixture(scope="session")
def session_cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One embedding cache for the whole test session, so the shared data is embedded once."""
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(autouse=True, scope="session")
def _default_cache_in_the_session(session_cache_dir: Path) -> Iterator[None]:
    """A command given no cache folder (and the processes a test starts) caches embeddings in
    the session's folder: tests write nothing into the developer's ~/.cache. A test of the
    default itself sets or removes PLURALFED_CACHE_DIR."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("PLURALFED_CACHE_DIR", str(session_cache_dir))
        yield


@pytest.fixture(autouse=True)
def _log_every_refusal() -> None:
    """The coordinator logs a caller's repeated refusals once a minute; a test looking for its
    refusal in the log must not miss it because an earlier test in this process was refused."""
    auth = sys.modules.get("pluralfed.auth")
    if auth is not None:
        auth._refusals.forget()


@pytest.fixture(autouse=True)
def _not_in_a_container(monkeypatch: pytest.MonkeyPatch) -> None:
    """Messages say more inside a container (its paths, its localhost): CI and developers run
    the tests in one or not, so in this process no test is in one unless it says so (the tests
    of those messages point `CONTAINER_MARKERS` at a file of their own)."""
    import pluralfed.fsutil

    monkeypatch.setattr(pluralfed.fsutil, "CONTAINER_MARKERS", ())
