"""bench/flower/run.py and bench/systems.py: a failed Flower run is recorded as this run's result
without losing the last complete run's figures, and the report names both."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench"


def _module(name: str, path: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


flower_run = _module("flower_run_under_test", BENCH / "flower" / "run.py")
sys.path.insert(0, str(BENCH))
try:
    import systems
finally:
    sys.path.pop(0)

GOOD: dict[str, Any] = {
    "scenario": "C",
    "complete": True,
    "round_s_median": 22.4,
    "measured_at": "d1",
}
FAILED: dict[str, Any] = {
    "scenario": "C",
    "complete": False,
    "error": "timeout",
    "measured_at": "d2",
}


def test_a_failed_run_keeps_the_last_complete_one() -> None:
    record = flower_run.with_last_complete(FAILED, GOOD)
    assert record["error"] == "timeout" and record["last_complete"] == GOOD
    # a second failure still carries the last complete run, not the first failure
    again = flower_run.with_last_complete({**FAILED, "measured_at": "d3"}, record)
    assert again["measured_at"] == "d3" and again["last_complete"] == GOOD


def test_a_complete_run_replaces_everything_before() -> None:
    newer = {**GOOD, "round_s_median": 21.0, "measured_at": "d4"}
    assert flower_run.with_last_complete(newer, {**FAILED, "last_complete": GOOD}) == newer
    assert flower_run.with_last_complete(FAILED, None) == FAILED


def test_the_report_says_this_run_failed_and_what_the_last_complete_one_measured(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "systems_flower.json"
    record = flower_run.with_last_complete(FAILED, GOOD)
    path.write_text(json.dumps({"scenarios": {"C": record}}))
    monkeypatch.setattr(systems, "FLOWER_JSON", path)
    _, rows = systems.flower_ratios({"scenarios": {"C": {"round_s_median": 0.8}}})
    assert len(rows) == 1
    assert rows[0]["note"] == "timeout (last complete Flower run d1: 22.40 s per round)"
