"""The C bucketing's own contract: what it refuses, and that other threads run while it counts.

That it counts exactly as the numpy code does is tested by tests/test_histogram.py, which runs every
test with each of the two.
"""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from distsum import _histogram
from distsum._histogram import NUM_BUCKETS
from tests.test_histogram import reference_counts

_bucketing = pytest.importorskip("distsum._bucketing", reason="not built: no C compiler at install")
TABLE32 = _histogram._INDEX_TABLES[np.dtype(np.float32)]
TABLE64 = _histogram._INDEX_TABLES[np.dtype(np.float64)]


def counts() -> np.ndarray:
    return np.zeros(NUM_BUCKETS, dtype=np.int64)


def test_counts_accumulate_and_the_result_describes_the_finite_values():
    values = np.array([1.5, -2.0, np.nan, np.inf, -np.inf, -np.inf, 0.25], dtype=np.float64)
    out = counts()
    out[7] = 5
    low, high, nan, posinf, neginf, total, squares = _bucketing.bucket(values, TABLE64, out, True)
    expected = reference_counts(values)
    expected[7] += 5
    np.testing.assert_array_equal(out, expected)
    assert (low, high, nan, posinf, neginf) == (-2.0, 1.5, 1, 1, 2)
    assert (total, squares) == (-0.25, 2.25 + 4.0 + 0.0625)
    # Without sums they are 0.0, as they are without a finite value.
    assert _bucketing.bucket(values, TABLE64, counts(), False)[5:] == (0.0, 0.0)
    empty = _bucketing.bucket(np.array([np.nan], dtype=np.float32), TABLE32, counts(), True)
    assert empty == (np.inf, -np.inf, 1, 0, 0, 0.0, 0.0)


@pytest.mark.parametrize(
    ("values", "table", "out", "error", "message"),
    [
        (np.arange(4, dtype=np.int64), TABLE64, counts(), TypeError, "expected float32 or float64"),
        (np.ones(4, dtype=np.float16), TABLE32, counts(), TypeError, "expected float32 or float64"),
        (np.ones(4, dtype=">f4"), TABLE32, counts(), TypeError, "expected float32 or float64"),
        (np.ones(4, dtype=np.float32), TABLE64, counts(), ValueError, "table"),
        (np.ones(4, dtype=np.float32), TABLE32[:-1], counts(), ValueError, "table"),
        (np.ones(4, dtype=np.float32), TABLE32, counts()[:-1], ValueError, "counts"),
        (np.ones(4, dtype=np.float32), TABLE32, np.zeros(NUM_BUCKETS, dtype=np.int32), ValueError, "counts"),
        (np.ones(8, dtype=np.float32)[::2], TABLE32, counts(), ValueError, "contiguous"),
    ],
)
def test_arguments_of_the_wrong_kind_are_refused(values, table, out, error, message):
    before = out.copy()
    with pytest.raises(error, match=message):
        _bucketing.bucket(values, table, out, False)
    np.testing.assert_array_equal(out, before)


def test_read_only_counts_are_refused():
    out = counts()
    out.setflags(write=False)
    with pytest.raises(ValueError, match="read-only"):
        _bucketing.bucket(np.ones(4, dtype=np.float32), TABLE32, out, False)


def test_a_table_that_points_past_the_tally_raises_and_writes_nothing():
    """The table decides where each count goes: a wrong one must not write outside the tally."""
    table = TABLE32.copy()
    key = np.float32(1.0).view(np.uint32) >> 16
    table[key] = np.uint32(0xFFFF0000)  # any pattern of this cell wraps to a tally index near 2**16
    out = counts()
    with pytest.raises(ValueError, match="past the tally"):
        _bucketing.bucket(np.array([0.5, 1.0, 2.0], dtype=np.float32), table, out, False)
    assert not out.any()


def test_other_threads_run_while_it_counts():
    """The loop runs without the interpreter lock: a thread that wakes every millisecond goes on
    ticking during one long call (holding the lock, it could tick at most once)."""
    values = np.linspace(-1e3, 1e3, 60_000_000, dtype=np.float32)
    ticks = 0
    stop = threading.Event()

    def tick() -> None:
        nonlocal ticks
        while not stop.is_set():
            time.sleep(0.001)
            ticks += 1

    thread = threading.Thread(target=tick)
    thread.start()
    try:
        time.sleep(0.05)
        before = ticks
        started = time.perf_counter()
        _bucketing.bucket(values, TABLE32, counts(), False)
        took = time.perf_counter() - started
        during = ticks - before
    finally:
        stop.set()
        thread.join()
    assert during >= 5, f"{during} ticks during a call of {took * 1e3:.0f} ms"
