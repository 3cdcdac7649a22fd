"""bench/soak.py: its per-bucket figures are the coordinator's CPU over the rounds in each bucket
(no round counted twice or left out), and a short soak against the real coordinator runs rounds,
stops cleanly and reports sane numbers."""

from __future__ import annotations

import itertools
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench"
sys.path.insert(0, str(BENCH))
try:
    from soak import Sample, bucket_rows, bucket_size, slope_per_1000
finally:
    sys.path.pop(0)


def sample(t: float, rounds: int, cpu_s: float, rss_mib: float = 300.0) -> Sample:
    return Sample(t, rss_mib, rss_mib, cpu_s, 30, 20, 0.1, rounds)


def test_buckets_cover_every_round_once_and_divide_cpu_by_their_rounds() -> None:
    samples = [
        sample(0, 0, 5.0),  # ready: start-up CPU, not a round's
        sample(1, 0, 5.5),  # nodes joined: the last sample before round 1 is the baseline
        sample(2, 4, 6.3),
        sample(3, 9, 7.3),
        sample(4, 12, 8.2),
        sample(5, 12, 8.3),  # no round in between: the time and CPU still count
        sample(6, 25, 11.0),
    ]
    rows = bucket_rows(samples, 10)
    assert [(r["first_round"], r["last_round"]) for r in rows] == [(1, 9), (10, 12), (13, 25)]
    assert [r["cpu_s_per_round"] for r in rows] == pytest.approx([1.8 / 9, 1.0 / 3, 2.7 / 13])
    assert [r["seconds"] for r in rows] == [2, 2, 1]
    assert rows[1]["rounds_per_s"] == pytest.approx(1.5)


def test_bucket_size_is_a_round_number_giving_about_eight_rows() -> None:
    expected = {0: 1, 7: 1, 20: 2, 150: 20, 1619: 200, 3937: 500, 40_000: 5000}
    assert {n: bucket_size(n) for n in expected} == expected


def test_rss_growth_is_the_least_squares_slope_per_thousand_rounds() -> None:
    points = [(1000, 300.0), (2000, 302.0), (3000, 304.0), (4000, 306.0)]
    assert slope_per_1000(points) == pytest.approx(2.0)
    assert slope_per_1000([(1000, 300.0), (1000, 301.0)]) is None


@pytest.mark.slow
def test_a_short_soak_runs_rounds_and_reports_sane_figures(tmp_path: Path) -> None:
    out = tmp_path / "soak"
    argv = [sys.executable, str(BENCH / "soak.py"), "--seconds", "6", "--nodes", "2"]
    argv += ["--eval-nodes", "1", "--node-procs", "1", "--every", "0.5", "--idle-seconds", "1"]
    argv += ["--work", str(tmp_path / "work"), "--out", str(out)]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    results = json.loads(out.with_suffix(".json").read_text())
    s = results["summary"]
    assert s["rounds"] >= 3 and s["rounds_recorded"] >= s["rounds"]
    assert 0 < s["cpu_s_per_round_first"] < 10 and 0 < s["cpu_s_per_round_last"] < 10
    assert 50 < s["rss_mib_ready"] <= s["hwm_mib_end"] < 4096
    assert s["threads"][0] >= 2 and s["fds"][0] >= 3
    assert s["coordinator_exit"] == 143  # SIGTERM, after the nodes left
    assert set(s["node_exits"].values()) == {0} and s["node_joins"] >= 3
    rows = results["buckets"]
    assert rows[0]["first_round"] == 1 and rows[-1]["last_round"] == s["rounds"]
    assert all(b["first_round"] == a["last_round"] + 1 for a, b in itertools.pairwise(rows))
    for which in ("resumed", "fresh"):
        assert 0 < results["resume"][which]["ready_s"] < 120
        assert results["resume"][which]["rss_mib"] > 50

    md = out.with_suffix(".md").read_text()
    assert md in done.stdout  # what it printed
    assert "| rounds | seconds | rounds/s | coordinator CPU s/round |" in md
    assert len(re.findall(r"^\| [\d,]+–[\d,]+ \|", md, re.M)) == len(rows)
    assert f"- {s['rounds']:,} rounds in " in md and "ready in" in md
