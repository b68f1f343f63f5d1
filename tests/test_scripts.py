"""The command surface: the soak (short) and the benchmark (quick) run and report."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize(
    "timeouts",
    [
        # Long enough that no record goes late: every record goes through its step.
        ["--step-timeout", "60", "--rank-timeout", "60"],
        # The soak's tight defaults (step 2 s, rank 3 s): records go late, and aggregator crashes
        # meet late records (the journal's case).
        [],
    ],
    ids=["on-time", "tight"],
)
def test_soak_short_kills_and_restarts_and_loses_nothing(tmp_path, timeouts):
    out = tmp_path / "soak.json"
    result = subprocess.run(
        [
            sys.executable,
            os.path.join(ROOT, "scripts", "soak"),
            "--short",
            "--seed",
            "11",
            *timeouts,
            "--json",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    report = json.loads(out.read_text())
    records = report["records"]
    assert report["pass"] and records["lost"] == 0 and records["duplicated"] == 0, records
    assert records["committed"] > 10_000, records
    assert report["aggregator"]["restarts"] >= 1 and report["ranks"]["kills"] >= 1, report


def test_bench_quick_measures_every_target(tmp_path):
    table = tmp_path / "bench.md"
    result = subprocess.run(
        [sys.executable, os.path.join(ROOT, "scripts", "bench"), "--quick", "--markdown", str(table)],
        capture_output=True,
        text=True,
        timeout=900,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    text = table.read_text()
    for target in range(1, 10):
        assert f"| {target} |" in text, f"target {target} missing from the table"


def _capacity(**arguments):
    """The benchmark's load generator against a real aggregator process: its result."""
    result = subprocess.run(
        [sys.executable, "-m", "bench_lib.loadgen", "capacity", json.dumps(arguments)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=os.path.join(ROOT, "scripts"),
        env={**os.environ, "PYTHONPATH": ROOT},
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    return json.loads(result.stdout.rsplit("@@RESULT ", 1)[1])


def test_load_generator_holds_each_rank_to_a_clients_in_flight_bound():
    # 2 ranks x 50 batches of about 220 bytes: a byte bound of 1 lets a rank have one batch at a
    # time in flight, so its next waits for an acknowledgement; a client's default holds none back.
    sizes = {"ranks": 2, "tags": 10, "steps": 50, "steps_per_batch": 1}
    one_at_a_time = _capacity(**sizes, max_in_flight_bytes=1)
    default = _capacity(**sizes)
    for result in one_at_a_time, default:
        assert result["check"] == {"written": 500, "expected": 500, "wrong": 0, "in_sub_runs": 0}
    assert one_at_a_time["batches_held_back"] > 0
    assert default["batches_held_back"] == 0
