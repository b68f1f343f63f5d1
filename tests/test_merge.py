"""The merge layer: when a step is complete, what it reduces to, and where late data goes.

Run as a script (``python -m tests.test_merge``) for a throughput check.
"""

from __future__ import annotations

import math
import time
import tracemalloc
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from distsum._histogram import Histogram
from distsum._image import EncodedImage
from distsum._merge import (
    BLOB_WEIGHT,
    REPLAY_LATE,
    REPLAY_MERGED,
    MergedStep,
    RunMerger,
    _Chunk,
    _dense_groups,
    _index_steps,
    _sorted_groups,
    distinct_steps,
)
from distsum._proto.wire_pb2 import (
    HISTOGRAM,
    IMAGES,
    MAX,
    MEAN,
    MIN,
    NONE,
    SCALAR,
    SUM,
    TEXT,
)
from distsum._summaries import HistogramItem, ImageItem, Item, ScalarBlock, ScalarItem, TextItem

OP_NAMES: dict[int, str] = {MEAN: "mean", SUM: "sum", MIN: "min", MAX: "max"}
NUMPY_OPS: dict[int, Callable[[np.ndarray], Any]] = {MEAN: np.mean, SUM: np.sum, MIN: np.min, MAX: np.max}


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def merger(clock: FakeClock | None = None, **kwargs: object) -> RunMerger:
    kwargs.setdefault("step_timeout", 10.0)
    return RunMerger(clock=clock or FakeClock(), **kwargs)  # type: ignore[arg-type]


def log(m: RunMerger, rank: int, records: Iterable[tuple[int, int, float]], wall: float = 1000.0) -> None:
    """Scalar records (series, step, value) of one batch of ``rank``."""
    records = list(records)
    m.add_scalars(
        rank,
        np.array([r[0] for r in records], dtype=np.uint32),
        np.array([r[1] for r in records], dtype=np.int64),
        np.array([r[2] for r in records], dtype=np.float64),
        np.full(len(records), wall),
    )


def payload(item: Item) -> object:
    if isinstance(item, ScalarItem):
        return item.value
    if isinstance(item, HistogramItem):
        return item.histogram
    if isinstance(item, ImageItem):
        return item.image
    if isinstance(item, TextItem):
        return item.text
    raise AssertionError(item)


def expand(item: Item) -> list[Item]:
    """A ScalarBlock as the ScalarItems it stands for; any other item as it is."""
    return item.items() if isinstance(item, ScalarBlock) else [item]


def flatten(merged: Sequence[MergedStep]) -> dict[tuple[str, str], dict[int, Any]]:
    """(run, tag) -> {step: payload}, failing on a (run, tag, step) seen twice."""
    out: dict[tuple[str, str], dict[int, Any]] = defaultdict(dict)
    for step in merged:
        for run, items in step.outputs.items():
            for item in (one for each in items for one in expand(each)):
                assert step.step not in out[run, item.tag], (run, item.tag, step.step)
                out[run, item.tag][step.step] = payload(item)
    return dict(out)


def steps_of(merged: Sequence[MergedStep]) -> list[int]:
    return [m.step for m in merged]


def same(a: object, b: object) -> bool:
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    return a == b


# --- reductions ----------------------------------------------------------------------------------

REDUCE_TUPLES = st.lists(st.sampled_from([MEAN, SUM, MIN, MAX, NONE]), min_size=1, max_size=5, unique=True)


@st.composite
def scalar_logs(draw: st.DrawFn) -> tuple[int, list[tuple[str, tuple[int, ...]]], list[list[tuple]]]:
    n_ranks = draw(st.integers(1, 5))
    series: list[tuple[str, tuple[int, ...]]] = draw(
        st.lists(st.tuples(st.sampled_from(["", "test"]), REDUCE_TUPLES.map(tuple)), min_size=1, max_size=3)
    )
    records = draw(
        st.lists(
            st.tuples(
                st.integers(0, n_ranks - 1),
                st.integers(0, len(series) - 1),
                st.integers(-2, 4),
                # Sums of up to 5 of these cannot overflow, so inf and NaN come only from inputs
                # and do not depend on the order of the additions.
                st.floats(-1e300, 1e300) | st.sampled_from([math.nan, math.inf, -math.inf]),
            ),
            max_size=60,
        )
    )
    # Batches: runs of one rank's consecutive records, cut further at random places.
    cuts = draw(st.lists(st.booleans(), min_size=len(records), max_size=len(records)))
    batches: list[list[tuple]] = []
    for record, cut in zip(records, cuts, strict=True):
        if batches and batches[-1][0][0] == record[0] and not cut:
            batches[-1].append(record)
        else:
            batches.append([record])
    return n_ranks, series, batches


@given(scalar_logs())
@settings(max_examples=150, deadline=None)
def test_reductions_equal_numpy_over_each_ranks_last_value(
    case: tuple[int, list[tuple[str, tuple[int, ...]]], list[list[tuple]]],
) -> None:
    _, series, batches = case
    m = merger()
    ids = [m.series(subrun, f"tag{i}", SCALAR, reduce) for i, (subrun, reduce) in enumerate(series)]
    last: dict[tuple[int, int], dict[int, float]] = defaultdict(dict)  # (series, step) -> rank -> value
    for batch in batches:
        rank = batch[0][0]
        log(m, rank, [(ids[s], step, value) for _, s, step, value in batch])
        for _, s, step, value in batch:
            last[s, step][rank] = value
    got = flatten(m.take_all())

    # (run, tag) -> step -> (value, tolerance): numpy may add in another order than the merger,
    # so a finite sum may differ within the usual bound of float summation.
    expected: dict[tuple[str, str], dict[int, tuple[float, float]]] = defaultdict(dict)
    eps = np.finfo(np.float64).eps
    for (s, step), by_rank in last.items():
        subrun, reduce = series[s]
        tag = f"tag{s}"
        values = np.array([by_rank[r] for r in sorted(by_rank)])
        ops = [op for op in reduce if op != NONE]
        with np.errstate(all="ignore"):
            sum_error = 2 * len(values) * eps * float(np.abs(values).sum())
            for i, op in enumerate(ops):
                out_tag = tag if i == 0 else f"{tag}/{OP_NAMES[op]}"
                value = float(NUMPY_OPS[op](values))
                tolerance = 0.0
                if op == SUM:
                    tolerance = sum_error
                elif op == MEAN:
                    tolerance = sum_error / len(values) + eps * abs(value)
                expected[subrun, out_tag][step] = (value, tolerance)
        if NONE in reduce:
            for r, value in by_rank.items():
                run = f"{subrun}/rank_{r}" if subrun else f"rank_{r}"
                expected[run, tag][step] = (value, 0.0)
    assert got.keys() == expected.keys()
    for key, by_step in expected.items():
        assert got[key].keys() == by_step.keys(), key
        for step, (value, tolerance) in by_step.items():
            actual = got[key][step]
            ok = same(actual, value) or abs(actual - value) <= tolerance
            assert ok, (key, step, actual, value, tolerance)
    assert m.stats().late == 0


def test_tuple_reductions_write_tag_then_tag_slash_op() -> None:
    m = merger()
    a = m.series("", "loss", SCALAR, (MEAN, MAX, SUM))
    b = m.series("test", "acc", SCALAR, (NONE, MIN))
    c = m.series("", "lr", SCALAR, (NONE,))
    d = m.series("", "plain", SCALAR)  # no reductions: the mean
    log(m, 0, [(a, 1, 1.0), (b, 1, 5.0), (c, 1, 0.1), (d, 1, 2.0)])
    log(m, 1, [(a, 1, 3.0), (b, 1, 7.0), (c, 1, 0.2), (d, 1, 4.0)])
    got = flatten(m.take_all())
    assert got == {
        ("", "loss"): {1: 2.0},
        ("", "loss/max"): {1: 3.0},
        ("", "loss/sum"): {1: 4.0},
        ("test", "acc"): {1: 5.0},
        ("test/rank_0", "acc"): {1: 5.0},
        ("test/rank_1", "acc"): {1: 7.0},
        ("rank_0", "lr"): {1: 0.1},
        ("rank_1", "lr"): {1: 0.2},
        ("", "plain"): {1: 3.0},
    }


def test_nan_propagates_and_infinities_follow_ieee() -> None:
    m = merger()
    ops = (MEAN, SUM, MIN, MAX)
    x = m.series("", "x", SCALAR, ops)
    y = m.series("", "y", SCALAR, ops)
    log(m, 0, [(x, 0, 1.0), (y, 0, math.inf)])
    log(m, 1, [(x, 0, math.nan), (y, 0, -math.inf)])
    got = flatten(m.take_all())
    for tag in ("x", "x/sum", "x/min", "x/max"):
        assert math.isnan(got["", tag][0]), tag
    assert math.isnan(got["", "y"][0]) and math.isnan(got["", "y/sum"][0])
    assert got["", "y/min"][0] == -math.inf and got["", "y/max"][0] == math.inf


def test_duplicate_from_one_rank_last_value_wins_within_and_across_batches() -> None:
    m = merger()
    x = m.series("", "x", SCALAR, (SUM,))
    log(m, 0, [(x, 0, 1.0), (x, 0, 2.0)])
    log(m, 1, [(x, 0, 10.0)])
    log(m, 0, [(x, 0, 3.0)])
    assert flatten(m.take_all()) == {("", "x"): {0: 13.0}}


def test_steps_far_apart_sort_like_steps_close_together() -> None:
    m = merger()
    x = m.series("", "x", SCALAR, (SUM, NONE))
    big = [0, 2**40, 2**62, 2**63 - 1]
    log(m, 1, [(x, step, 1.0) for step in big])
    log(m, 0, [(x, step, 2.0) for step in reversed(big)] + [(x, 2**62, 5.0)])
    got = flatten(m.take_all())
    assert got["", "x"] == {0: 3.0, 2**40: 3.0, 2**62: 6.0, 2**63 - 1: 3.0}
    assert got["rank_0", "x"][2**62] == 5.0


def test_wall_time_is_the_latest_contribution() -> None:
    m = merger()
    x = m.series("", "x", SCALAR)
    t = m.series("", "t", TEXT)
    log(m, 0, [(x, 0, 1.0)], wall=100.0)
    log(m, 1, [(x, 0, 1.0)], wall=105.0)
    m.add_text(2, t, 0, "hi", 103.0)
    (step,) = m.take_all()
    assert step.wall_time == 105.0


# --- when a step is complete ---------------------------------------------------------------------


def test_step_complete_once_every_rank_moved_past_it() -> None:
    m = merger()
    x = m.series("", "x", SCALAR)
    for r in range(2):
        m.rank_joined(r)
    log(m, 0, [(x, 0, 1.0)])
    log(m, 0, [(x, 1, 1.0)])
    assert m.take_ready() == []  # rank 1 has logged nothing
    log(m, 1, [(x, 0, 3.0)])
    assert m.take_ready() == []  # rank 1 may still log more at step 0
    log(m, 1, [(x, 1, 3.0)])
    ready = m.take_ready()
    assert steps_of(ready) == [0] and flatten(ready) == {("", "x"): {0: 2.0}}
    assert m.stats().open_steps == 1 and m.stats().steps_timed_out == 0


def test_a_step_every_rank_reached_is_written_once_it_settles() -> None:
    clock = FakeClock()
    m = merger(clock, settle=2.0)
    x, y = m.series("", "x", SCALAR), m.series("", "y", SCALAR)
    for r in range(2):
        m.rank_joined(r)
    log(m, 0, [(x, 0, 1.0), (x, 1, 1.0)])
    clock.now = 5.0
    assert m.take_ready() == []  # rank 1 has not reached step 0
    log(m, 1, [(x, 0, 3.0)])
    clock.now = 6.5
    assert m.take_ready() == []  # step 0 had a record 1.5 s ago
    clock.now = 7.1
    ready = m.take_ready()  # both ranks reached 0, quiet for 2 s; rank 1 has not reached 1
    assert steps_of(ready) == [0] and flatten(ready) == {("", "x"): {0: 2.0}}
    assert m.stats().steps_timed_out == 0
    log(m, 1, [(x, 0, 5.0), (y, 0, 7.0), (x, 1, 3.0)])  # x at 0 is late now; y at 0 is not
    clock.now = 9.2
    ready = flatten(m.take_ready())
    assert ready == {("late/rank_1", "x"): {0: 5.0}, ("", "y"): {0: 7.0}, ("", "x"): {1: 2.0}}
    assert m.stats().late == 1


def test_the_merger_says_when_its_lowest_step_settles() -> None:
    # The aggregator wakes then, rather than at its next round.
    clock = FakeClock()
    m = merger(clock, settle=2.0)
    x = m.series("", "x", SCALAR)
    for r in range(2):
        m.rank_joined(r)
    assert m.settles_at() is None  # nothing held
    log(m, 0, [(x, 0, 1.0), (x, 1, 1.0)])
    assert m.settles_at() is None  # rank 1 has not reached step 0
    clock.now = 1.0
    log(m, 1, [(x, 0, 3.0)])
    assert m.settles_at() == 3.0
    clock.now = 2.5
    log(m, 1, [(x, 0, 4.0)])  # another record at step 0: it settles later
    assert m.settles_at() == 4.5
    clock.now = 4.4
    assert m.take_ready() == []
    clock.now = 4.5
    assert steps_of(m.take_ready()) == [0]
    assert m.settles_at() is None  # step 1: rank 1 has not reached it
    log(m, 1, [(x, 2, 1.0)])  # both ranks reached step 1, whose record came at 0: overdue
    assert m.settles_at() == 2.0
    assert steps_of(m.take_ready()) == [1]
    log(m, 0, [(x, 3, 1.0)])  # both reached step 2, which had its record at 4.5
    assert m.settles_at() == 6.5
    log(m, 1, [(x, 3, 1.0)])  # both moved past step 2: complete, due now
    assert m.settles_at() == 4.5
    assert merger(clock).settles_at() is None  # no settle


def test_without_settle_a_reached_step_waits_for_the_next_one() -> None:
    clock = FakeClock()
    m = merger(clock, step_timeout=100.0)
    x = m.series("", "x", SCALAR)
    log(m, 0, [(x, 0, 1.0)])
    clock.now = 50.0
    assert m.take_ready() == []


def test_slow_rank_holds_a_step_until_the_timeout_then_its_record_is_late() -> None:
    clock = FakeClock()
    m = merger(clock, step_timeout=10.0)
    x = m.series("", "x", SCALAR)
    for r in range(3):
        m.rank_joined(r)
    for step in range(3):
        for r in (0, 1):
            log(m, r, [(x, step, float(r))])
        if step < 2:
            log(m, 2, [(x, step, 2.0)])
        clock.now += 1.0
    # Rank 2 logged steps 0 and 1: only step 0 is complete.
    assert flatten(m.take_ready()) == {("", "x"): {0: 1.0}}
    clock.now = 11.0  # step 1's first record arrived at 1.0: exactly 10 s ago is not "more than"
    assert m.take_ready() == []
    clock.now = 12.5  # now steps 1 (at 1.0) and 2 (at 2.0) are both more than 10 s old
    ready = m.take_ready()
    assert flatten(ready) == {("", "x"): {1: 1.0, 2: 0.5}}
    assert m.stats().steps_timed_out == 2
    log(m, 2, [(x, 2, 2.0), (x, 3, 2.0)])
    late = m.take_ready()
    assert steps_of(late) == [2]
    assert late[0].outputs == {"late/rank_2": [ScalarItem("x", 2.0)]}
    assert m.stats().late == 1 and m.stats().open_steps == 1


def test_timeout_of_a_step_takes_every_open_step_below_it() -> None:
    clock = FakeClock()
    m = merger(clock, step_timeout=10.0)
    x = m.series("", "x", SCALAR)
    m.rank_joined(0)
    m.rank_joined(1)
    log(m, 0, [(x, 5, 1.0)])  # first record of step 5 at t=0
    clock.now = 5.0
    log(m, 1, [(x, 3, 2.0)])  # step 3 opens later
    clock.now = 10.5
    ready = m.take_ready()
    assert steps_of(ready) == [3, 5]
    assert m.stats().steps_timed_out == 2


def test_ranks_that_skip_steps_and_tags_only_some_ranks_log() -> None:
    m = merger()
    a = m.series("", "a", SCALAR)
    b = m.series("", "b", SCALAR, (SUM,))
    m.rank_joined(0)
    m.rank_joined(1)
    for step in range(4):
        log(m, 0, [(a, step, float(step)), (b, step, 1.0)])
    log(m, 1, [(a, 0, 10.0)])
    log(m, 1, [(a, 3, 10.0)])  # rank 1 skips steps 1 and 2 and never logs b
    ready = m.take_ready()
    assert steps_of(ready) == [0, 1, 2]
    assert flatten(ready) == {("", "a"): {0: 5.0, 1: 1.0, 2: 2.0}, ("", "b"): {0: 1.0, 1: 1.0, 2: 1.0}}


def test_known_world_size_waits_for_a_rank_that_has_not_joined() -> None:
    clock = FakeClock()
    m = merger(clock, world_size=3)
    x = m.series("", "x", SCALAR)
    for step in range(3):
        log(m, 0, [(x, step, 1.0)])
        log(m, 1, [(x, step, 1.0)])
    assert m.take_ready() == [] and m.stats().waited_ranks == 3
    m.rank_joined(2)
    log(m, 2, [(x, 0, 4.0), (x, 1, 4.0)])
    assert flatten(m.take_ready()) == {("", "x"): {0: 2.0}}


def test_unjoined_rank_holds_steps_only_until_the_timeout() -> None:
    clock = FakeClock()
    m = merger(clock, step_timeout=10.0, world_size=2)
    x = m.series("", "x", SCALAR)
    log(m, 0, [(x, 0, 1.0)])
    log(m, 0, [(x, 1, 1.0)])
    clock.now = 10.5
    assert steps_of(m.take_ready()) == [0, 1]
    log(m, 1, [(x, 0, 3.0)])
    assert m.take_ready()[0].outputs == {"late/rank_1": [ScalarItem("x", 3.0)]}


def test_flush_counts_as_moving_past_the_highest_step_logged() -> None:
    m = merger()
    x = m.series("", "x", SCALAR)
    m.rank_flushed(0)  # before logging anything: no effect on steps logged later
    log(m, 0, [(x, 0, 1.0)])
    log(m, 1, [(x, 0, 3.0)])
    m.rank_flushed(0)
    assert m.take_ready() == []
    m.rank_flushed(1)
    assert flatten(m.take_ready()) == {("", "x"): {0: 2.0}}


def test_a_rank_that_left_is_not_waited_for_until_it_joins_again() -> None:
    m = merger()
    x = m.series("", "x", SCALAR)
    log(m, 0, [(x, 0, 1.0)])
    log(m, 1, [(x, 0, 3.0)])
    m.rank_left(1)
    assert m.take_ready() == []  # rank 0 may still log at step 0
    log(m, 0, [(x, 1, 1.0)])
    assert steps_of(m.take_ready()) == [0]
    log(m, 1, [(x, 2, 5.0)])  # data after leaving is merged, but does not make it wait again
    log(m, 0, [(x, 3, 1.0)])
    assert flatten(m.take_ready()) == {("", "x"): {1: 1.0, 2: 5.0}}
    m.rank_joined(1)  # a new instance: waited for from scratch
    log(m, 0, [(x, 4, 1.0)])
    assert m.take_ready() == []
    log(m, 1, [(x, 5, 1.0)])
    assert steps_of(m.take_ready()) == [3]
    log(m, 0, [(x, 5, 1.0)])
    assert steps_of(m.take_ready()) == [4]


def test_everyone_left_makes_every_step_complete() -> None:
    m = merger()
    x = m.series("", "x", SCALAR)
    log(m, 0, [(x, 7, 1.0)])
    m.rank_left(0)
    assert steps_of(m.take_ready()) == [7]


def test_series_without_data_at_a_written_step_can_still_be_written_there() -> None:
    m = merger()
    a = m.series("", "a", SCALAR)
    b = m.series("", "b", SCALAR)
    log(m, 0, [(a, 0, 1.0), (b, 0, 1.0), (a, 1, 1.0), (a, 2, 1.0)])
    m.rank_left(0)
    assert steps_of(m.take_ready()) == [0, 1, 2]
    log(m, 1, [(b, 1, 2.0), (a, 1, 2.0)])  # b was last written at 0: step 1 is still new for b
    m.rank_left(1)
    ready = m.take_ready()
    assert flatten(ready) == {("", "b"): {1: 2.0}, ("late/rank_1", "a"): {1: 2.0}}


def test_a_batch_spanning_steps_is_split_at_the_frontier() -> None:
    m = merger()
    x = m.series("", "x", SCALAR, (SUM,))
    log(m, 0, [(x, step, 1.0) for step in range(4)])
    log(m, 1, [(x, 0, 2.0), (x, 2, 2.0)])
    assert flatten(m.take_ready()) == {("", "x"): {0: 3.0, 1: 1.0}}
    assert m.stats().held_values == 3
    log(m, 1, [(x, 3, 2.0), (x, 4, 2.0)])
    assert flatten(m.take_ready()) == {("", "x"): {2: 3.0}}
    assert [m.holds(step) for step in range(6)] == [False, False, False, True, True, False]
    assert flatten(m.take_all()) == {("", "x"): {3: 3.0, 4: 2.0}}
    assert not m.holds(3)


def test_many_small_batches_give_the_same_result() -> None:
    m = merger()
    x = m.series("", "x", SCALAR, (MEAN, NONE))
    expected: dict[int, list[float]] = defaultdict(list)
    got: dict[tuple[str, str], dict[int, Any]] = defaultdict(dict)
    for step in range(300):
        for rank in range(3):
            value = float(step * 10 + rank)
            log(m, rank, [(x, step, value)])
            expected[step].append(value)
        if step % 97 == 0:
            for key, by_step in flatten(m.take_ready()).items():
                got[key].update(by_step)
    for key, by_step in flatten(m.take_all()).items():
        got[key].update(by_step)
    assert got["", "x"] == {step: sum(values) / 3 for step, values in expected.items()}
    assert got["rank_2", "x"] == {step: values[2] for step, values in expected.items()}


@pytest.mark.parametrize(("batches", "steps_per_batch"), [(200, 2), (1100, 30), (150, 120)])
def test_the_last_value_wins_however_many_batches_a_lagging_rank_holds_back(
    batches: int, steps_per_batch: int
) -> None:
    # Rank 1 sends nothing until the end, so all of rank 0's batches are held, through takes and
    # the merger's consolidations of what it holds. Each batch logs its steps again from the
    # middle of the one before, half of them backwards: the later batch's value wins.
    m = merger()
    tags = [m.series("", f"t{i}", SCALAR, (MAX,)) for i in range(10)]
    m.set_world_size(2)
    m.rank_joined(1)
    rng = np.random.default_rng(batches)
    expected: dict[tuple[int, int], float] = {}
    first = 0
    for b in range(batches):
        steps = list(range(first, first + steps_per_batch))
        if b % 2:
            steps.reverse()
        records = [(series, step, float(rng.integers(1000))) for step in steps for series in tags]
        log(m, 0, records)
        expected.update({(series, step): value for series, step, value in records})
        first += max(1, steps_per_batch // 2)
        if b % 100 == 0:
            assert m.take_ready() == []
    log(m, 1, [(series, step, -1.0) for series, step in expected])
    got = flatten(m.take_all())
    written = {
        (tags[int(tag[1:])], step): value for (_, tag), by in got.items() for step, value in by.items()
    }
    assert written == expected


def test_held_records_cost_little_beyond_their_columns_however_small_the_batches() -> None:
    # Rank 1 sends nothing, so everything rank 0 sends is held. Held one chunk per batch, batches
    # of 4 records would cost some 700 bytes of Python objects a batch, several times the records'
    # own 32 bytes and the bookkeeping of their step (3.3 times what a record of a batch of 1,024
    # costs, against 1.4): the merger joins small chunks.
    def held_bytes_per_record(batches: int, steps_per_batch: int) -> float:
        m = merger()
        tags = np.array([m.series("", f"t{i}", SCALAR) for i in range(4)], dtype=np.intp)
        m.set_world_size(2)
        m.rank_joined(1)
        n = tags.size * steps_per_batch
        tracemalloc.start()
        try:
            before = tracemalloc.get_traced_memory()[0]
            for b in range(batches):
                first = b * steps_per_batch
                steps = np.repeat(np.arange(first, first + steps_per_batch, dtype=np.int64), tags.size)
                m.add_scalars(0, np.tile(tags, steps_per_batch), steps, np.ones(n), np.full(n, 1000.0))
            return (tracemalloc.get_traced_memory()[0] - before) / (batches * n)
        finally:
            tracemalloc.stop()

    small = held_bytes_per_record(6400, 1)
    large = held_bytes_per_record(100, 256)  # 1,024 records a batch
    assert small < 2 * large, (small, large)


def test_world_size_can_be_learnt_and_changed_later() -> None:
    m = merger()
    x = m.series("", "x", SCALAR)
    log(m, 0, [(x, 0, 1.0), (x, 1, 1.0)])
    m.set_world_size(2)  # rank 1 has not shown up
    assert m.take_ready() == [] and m.stats().waited_ranks == 2
    m.set_world_size(1)
    assert steps_of(m.take_ready()) == [0]
    m.set_world_size(0)  # unknown again: only rank 0 is waited for
    assert m.stats().waited_ranks == 1


# --- late data -----------------------------------------------------------------------------------


def test_late_records_stay_in_increasing_order_in_their_late_run() -> None:
    m = merger()
    x = m.series("test", "x", SCALAR, (MEAN, NONE))
    log(m, 0, [(x, s, 1.0) for s in range(6)])
    m.rank_left(0)
    assert len(m.take_ready()) == 6
    log(m, 1, [(x, 4, 1.0), (x, 4, 2.0)])  # the last of two duplicates wins
    assert flatten(m.take_ready()) == {("test/late/rank_1", "x"): {4: 2.0}}
    log(m, 1, [(x, 3, 3.0), (x, 5, 5.0)])  # 3 would go backwards in the late run
    assert flatten(m.take_ready()) == {("test/late/rank_1", "x"): {5: 5.0}}
    log(m, 2, [(x, 3, 3.0)])  # another rank has its own late run
    assert flatten(m.take_ready()) == {("test/late/rank_2", "x"): {3: 3.0}}
    stats = m.stats()
    assert (stats.late, stats.late_dropped) == (5, 1)


def test_late_histogram_image_and_text_go_raw_to_the_late_run() -> None:
    m = merger()
    h = m.series("", "h", HISTOGRAM)
    i = m.series("", "i", IMAGES, max_outputs=1)
    t = m.series("", "t", TEXT)
    hist = Histogram.from_values(np.arange(3.0), tag="h")
    image = EncodedImage(1, 1, 1, b"png")
    m.add_histogram(0, h, 0, hist, 1.0)
    m.add_images(0, i, 0, [image], 1.0)
    m.add_text(0, t, 0, "zero", 1.0)
    m.rank_left(0)
    assert steps_of(m.take_ready()) == [0]
    m.add_histogram(1, h, 0, hist, 2.0)
    m.add_images(1, i, 0, [image, image], 2.0)
    m.add_text(1, t, 0, "one", 2.0)
    assert flatten(m.take_ready()) == {
        ("late/rank_1", "h"): {0: hist},
        ("late/rank_1", "i/image"): {0: image},
        ("late/rank_1", "t"): {0: "one"},
    }
    assert m.stats().late == 3


def test_after_a_restart_series_start_out_written_up_to_what_is_on_disk() -> None:
    written = {("", "x"): 5, ("late/rank_1", "x"): 2, ("test/rank_3", "y"): 4, ("", "h"): 1}
    m = merger(written=written)
    x = m.series("", "x", SCALAR, (SUM,))
    y = m.series("test", "y", SCALAR, (NONE,))
    log(m, 0, [(x, 5, 1.0), (x, 6, 1.0), (y, 4, 1.0), (y, 5, 1.0)])
    m.rank_left(0)
    # Never merged by the dead aggregator, and its step was written without it: late.
    assert flatten(m.take_ready()) == {
        ("", "x"): {6: 1.0},
        ("late/rank_0", "x"): {5: 1.0},
        ("test/rank_0", "y"): {5: 1.0},
        ("test/late/rank_0", "y"): {4: 1.0},
    }
    # The late run of rank 1 has step 2 already: a new late record there must come after it.
    log(m, 1, [(x, 2, 7.0)])
    assert flatten(m.take_ready()) == {}
    assert m.stats().late_dropped == 1


def test_replayed_records_are_dropped_where_the_dead_aggregator_wrote_them() -> None:
    m = merger(written={("", "x"): 5, ("late/rank_1", "x"): 3, ("", "h"): 5, ("late/rank_1", "h"): 3})
    x = m.series("", "x", SCALAR, (SUM,))
    h = m.series("", "h", HISTOGRAM)
    m.rank_left(0)
    steps = np.array([3, 4, 5, 6, 2, 3, 4], dtype=np.int64)
    replay = np.array([REPLAY_MERGED] * 4 + [REPLAY_LATE] * 3, dtype=np.int8)
    late = m.add_scalars(1, np.full(7, x, dtype=np.uint32), steps, np.arange(7.0), np.ones(7), replay)
    # Merged into steps 3..5, which are written: dropped. Step 6 was merged but not written: it
    # is merged again. Late at 2 and 3, which the late run holds: dropped. Late at 4: written.
    # The three late ones are late again, for the journal.
    assert late is not None and late.tolist() == [4, 5, 6]
    m.rank_left(1)
    assert flatten(m.take_ready()) == {("", "x"): {6: 3.0}, ("late/rank_1", "x"): {4: 6.0}}
    hist = Histogram.from_values(np.arange(3.0), tag="h")
    assert not m.add_histogram(1, h, 5, hist, 1.0, REPLAY_MERGED)
    assert m.add_histogram(1, h, 3, hist, 1.0, REPLAY_LATE)
    assert not m.add_histogram(1, h, 6, hist, 1.0, REPLAY_MERGED)
    assert m.add_histogram(1, h, 4, hist, 1.0, REPLAY_LATE)
    assert flatten(m.take_ready()) == {("", "h"): {6: hist}, ("late/rank_1", "h"): {4: hist}}
    stats = m.stats()
    assert (stats.replayed, stats.late, stats.late_dropped) == (7, 2, 0)


def test_a_replayed_per_rank_record_goes_to_its_rank_run_when_the_crash_fell_between_the_files() -> None:
    # The dead aggregator merged steps 0..2 of y from ranks 0 and 1 and wrote rank 1's run, but
    # died before rank 0's file. Rank 0's resent records go into rank_0 at their steps, where the
    # dead aggregator had put them, not late; rank 1's are in rank_1 already.
    m = merger(written={("rank_1", "y"): 2})
    y = m.series("", "y", SCALAR, (NONE,))
    replay = np.full(3, REPLAY_MERGED, dtype=np.int8)
    for rank in (0, 1):
        steps = np.arange(3, dtype=np.int64)
        values = np.full(3, float(rank))
        assert m.add_scalars(rank, np.full(3, y, dtype=np.uint32), steps, values, np.ones(3), replay) is None
        m.rank_left(rank)
    assert flatten(m.take_ready()) == {("rank_0", "y"): {0: 0.0, 1: 0.0, 2: 0.0}}
    stats = m.stats()
    assert (stats.replayed, stats.late) == (3, 0)
    # A record the dead aggregator never saw, at a step it wrote for another rank, is late still.
    log(m, 2, [(y, 1, 2.0)])
    assert flatten(m.take_ready()) == {("late/rank_2", "y"): {1: 2.0}}


@given(
    st.lists(
        st.tuples(
            st.integers(0, 5),
            st.integers(0, 7),
            st.integers(0, 12),
            st.sampled_from([0.0, 1.0, -2.0, 3.0, 1e300, math.inf, -math.inf, math.nan]),
        ),
        min_size=1,
        max_size=120,
        unique_by=lambda r: r[:3],
    ),
    st.integers(0, 10**6),
)
@settings(max_examples=200, deadline=None)
def test_grouping_by_counting_equals_grouping_by_sorting(records, lo) -> None:
    ranks, series, steps, values = (np.array(c) for c in zip(*records, strict=True))
    steps = steps.astype(np.int64) + lo
    walls = np.arange(len(records), dtype=np.float64)
    need = (1 << MEAN) | (1 << SUM) | (1 << MIN) | (1 << MAX)
    held = _Chunk(
        ranks, series, steps, values.astype(np.float64), walls, int(steps.min()), int(steps.max()), False
    )
    dense = _dense_groups(held, 8, need)
    assert dense is not None
    ordered = _sorted_groups(held, 8, need)
    assert np.array_equal(dense.series, ordered.series) and np.array_equal(dense.steps, ordered.steps)
    assert np.array_equal(dense.walls, ordered.walls)
    assert dense.reductions.keys() == ordered.reductions.keys()
    for op in dense.reductions:
        # Sums of these values are exact in any order, save for inf and nan.
        assert np.array_equal(dense.reductions[op], ordered.reductions[op], equal_nan=True), op


@given(st.lists(st.integers(0, 2**40), max_size=50), st.booleans())
@settings(max_examples=200, deadline=None)
def test_distinct_steps_and_their_positions_equal_numpys(steps, ordered) -> None:
    array = np.array(sorted(steps) if ordered else steps, dtype=np.int64)
    expected = np.unique(array, return_counts=True, return_inverse=True)
    got = distinct_steps(array)
    assert np.array_equal(got[0], expected[0]) and np.array_equal(got[1], expected[2])
    if array.size:
        for lo in (int(array.min()), int(array.min()) - 5):
            got = _index_steps(array, lo, int(array.max()))
            assert np.array_equal(got[0], expected[0]) and np.array_equal(got[1], expected[1])


@given(st.integers(0, 2**32 - 1))
@settings(max_examples=40, deadline=None)
def test_the_distinct_steps_a_caller_passes_change_nothing(seed) -> None:
    # The aggregator hands add_scalars the distinct steps of a batch it computed already. Batches
    # with records gone late (their steps then differ from the ones passed) must come out the same.
    rng = np.random.default_rng(seed)
    clock = FakeClock()
    passed, computed = merger(clock, world_size=3), merger(clock, world_size=3)
    for m in (passed, computed):
        for tag in ("a", "b"):
            m.series("", tag, SCALAR, (MEAN, MAX))
    for _ in range(12):
        rank = int(rng.integers(3))
        steps = np.sort(rng.integers(0, 12, size=int(rng.integers(1, 8)))).astype(np.int64)
        series = rng.integers(2, size=steps.size).astype(np.uint32)
        values = rng.normal(size=steps.size)
        walls = np.full(steps.size, 1000.0)
        late = passed.add_scalars(rank, series, steps, values, walls, distinct=distinct_steps(steps))
        assert same_late(late, computed.add_scalars(rank, series, steps, values, walls))
        clock.now += float(rng.integers(0, 3))
        assert flatten(passed.take_ready()) == flatten(computed.take_ready())
        assert passed.stats() == computed.stats()
    assert flatten(passed.take_all()) == flatten(computed.take_all())


def same_late(a: np.ndarray | None, b: np.ndarray | None) -> bool:
    return (a is None and b is None) or (a is not None and b is not None and np.array_equal(a, b))


# --- histograms, images, text --------------------------------------------------------------------

FINITE_OR_NOT = st.floats(allow_nan=True, allow_infinity=True, width=32)


@given(st.lists(st.lists(FINITE_OR_NOT, max_size=30), min_size=1, max_size=5))
@example([[1.0], [3.4028234663852886e38, -3.4028234663852886e38]])
@settings(max_examples=60, deadline=None)
def test_merged_histogram_equals_histogram_of_all_values(per_rank: list[list[float]]) -> None:
    m = merger()
    h = m.series("", "h", HISTOGRAM)
    for rank in reversed(range(len(per_rank))):  # arrival order does not matter
        m.add_histogram(rank, h, 3, Histogram.from_values(np.array(per_rank[rank]), tag="h"), 1.0)
    (step,) = m.take_all()
    (item,) = step.outputs[""]
    assert isinstance(item, HistogramItem) and item.tag == "h"
    expected = Histogram.from_values(np.array([v for values in per_rank for v in values]), tag="h")
    got = item.histogram
    assert np.array_equal(got.counts, expected.counts)
    assert (got.min, got.max, got.num) == (expected.min, expected.max, expected.num)
    assert (got.nan, got.posinf, got.neginf) == (expected.nan, expected.posinf, expected.neginf)
    # Sums taken in another order differ by rounding: a few ulps of the sum of magnitudes, which
    # cancellation can make large against the sum itself. So each against the exact sum.
    finite = [v for values in per_rank for v in values if math.isfinite(v)]
    squares = [v * v for v in finite]
    assert abs(got.sum - math.fsum(finite)) <= 1e-12 * math.fsum(map(abs, finite))
    assert abs(got.sum_squares - math.fsum(squares)) <= 1e-12 * math.fsum(squares)


def test_images_gathered_in_rank_order_and_cut_to_max_outputs() -> None:
    m = merger()
    many = m.series("", "many", IMAGES, max_outputs=4)
    one = m.series("test", "one", IMAGES, max_outputs=1)

    def image(name: str) -> EncodedImage:
        return EncodedImage(2, 3, 3, name.encode())

    m.add_images(2, many, 0, [image("r2a"), image("r2b")], 1.0)
    m.add_images(0, many, 0, [image("r0a"), image("r0b")], 1.0)
    m.add_images(1, many, 0, [image("r1a")], 1.0)
    m.add_images(1, one, 0, [image("r1a")], 1.0)
    m.add_images(0, one, 0, [image("r0a")], 1.0)
    (step,) = m.take_all()
    assert step.outputs == {
        "": [
            ImageItem("many/image/0", image("r0a")),
            ImageItem("many/image/1", image("r0b")),
            ImageItem("many/image/2", image("r1a")),
            ImageItem("many/image/3", image("r2a")),
        ],
        "test": [ImageItem("one/image", image("r0a"))],
    }


def test_text_labelled_in_rank_order() -> None:
    m = merger()
    t = m.series("", "notes", TEXT)
    m.add_text(1, t, 0, "from one", 1.0)
    m.add_text(0, t, 0, "first draft", 1.0)
    m.add_text(0, t, 0, "from zero", 1.0)  # the rank's last text wins
    m.add_text(0, t, 1, "alone", 1.0)
    got = flatten(m.take_all())
    assert got == {
        ("", "notes"): {
            0: "**rank 0**\n\nfrom zero\n\n---\n\n**rank 1**\n\nfrom one",
            1: "**rank 0**\n\nalone",
        }
    }


# --- conflicts -----------------------------------------------------------------------------------


def test_first_definition_wins_and_conflicting_records_are_counted() -> None:
    m = merger()
    loss = m.series("", "loss", SCALAR, (MEAN, MAX))
    assert m.series("", "loss", SCALAR, (MEAN, MAX)) == loss
    assert m.series("", "loss", SCALAR, (MEAN, MAX, MAX)) == loss  # repeats count once
    as_hist = m.series("", "loss", HISTOGRAM)
    other_reduce = m.series("", "loss", SCALAR, (SUM,))
    clash = m.series("", "loss/max", SCALAR)  # the MAX of "loss" writes this tag
    elsewhere = m.series("test", "loss", HISTOGRAM)  # another sub-run: no conflict
    assert [m.describe(s).conflict for s in (loss, as_hist, other_reduce, clash, elsewhere)] == [
        False,
        True,
        True,
        True,
        False,
    ]
    log(m, 0, [(loss, 0, 1.0), (other_reduce, 0, 2.0), (clash, 0, 3.0)])
    m.add_histogram(0, as_hist, 0, Histogram.empty(), 1.0)
    m.add_histogram(0, loss, 0, Histogram.empty(), 1.0)  # a histogram for a scalar series
    assert m.stats().conflicts == 4
    assert flatten(m.take_all()) == {("", "loss"): {0: 1.0}, ("", "loss/max"): {0: 1.0}}


@pytest.mark.parametrize("none_first", [True, False])
def test_sub_run_named_like_a_rank_run_conflicts_with_per_rank_values(none_first: bool) -> None:
    m = merger()
    defs = [("", "loss", (NONE,)), ("rank_1", "loss", (MEAN,))]
    if not none_first:
        defs.reverse()
    ids = [m.series(subrun, tag, SCALAR, reduce) for subrun, tag, reduce in defs]
    assert [m.describe(s).conflict for s in ids] == [False, True]
    assert not m.describe(m.series("rank_1", "other", SCALAR)).conflict
    assert not m.describe(m.series("rank_01", "loss", SCALAR)).conflict  # not a rank run's name
    m.series("", "x", SCALAR)
    assert m.describe(m.series("late/rank_0", "x", SCALAR)).conflict  # a late run of "" writes x


def test_bad_arguments_raise_value_error() -> None:
    m = merger()
    x = m.series("", "x", SCALAR)
    with pytest.raises(ValueError, match="unknown kind"):
        m.series("", "y", 0)
    with pytest.raises(ValueError, match="unknown reduction"):
        m.series("", "y", SCALAR, (9,))
    with pytest.raises(ValueError, match="max_outputs"):
        m.series("", "y", IMAGES, max_outputs=-1)
    with pytest.raises(ValueError, match="series"):
        log(m, 0, [(x + 1, 0, 1.0)])
    with pytest.raises(ValueError, match="one length"):
        m.add_scalars(0, np.array([x]), np.array([0, 1]), np.array([1.0]), np.array([1.0]))
    with pytest.raises(ValueError, match="ranks"):
        m.rank_joined(-1)


# --- memory --------------------------------------------------------------------------------------


def test_memory_bound_takes_the_oldest_steps_early() -> None:
    m = merger(max_open_values=250)
    tags = [m.series("", f"t{i}", SCALAR) for i in range(100)]
    m.rank_joined(0)
    m.rank_joined(1)  # never logs: nothing is ever complete
    for step in range(10):
        log(m, 0, [(s, step, 1.0) for s in tags])
    assert m.stats().held_values == 1000
    assert steps_of(m.take_ready()) == list(range(8))
    stats = m.stats()
    assert (stats.held_values, stats.open_steps, stats.steps_forced) == (200, 2, 8)
    h = m.series("", "h", HISTOGRAM)
    m.add_histogram(0, h, 10, Histogram.empty(), 1.0)
    weight = BLOB_WEIGHT + Histogram.empty().counts.nbytes // 8
    assert m.stats().held_values == 200 + weight
    assert steps_of(m.take_ready()) == [8, 9, 10]  # the histogram alone is over the bound


# --- ordering under random interleavings ---------------------------------------------------------

RANKS = 3


def _ops() -> st.SearchStrategy[tuple]:
    rank = st.integers(0, RANKS - 1)
    step = st.integers(0, 8)
    value = st.floats(-10, 10)
    scalars = st.tuples(
        st.just("scalars"), rank, st.lists(st.tuples(st.integers(0, 1), step, value), max_size=6)
    )
    take = st.tuples(st.just("take"), st.floats(0, 4))
    # Listed twice: more records and more takes make more late data.
    return st.one_of(
        scalars,
        scalars,
        take,
        take,
        st.tuples(st.just("blob"), rank, st.integers(0, 2), step),
        st.tuples(st.just("flush"), rank),
        st.tuples(st.just("leave"), rank),
        st.tuples(st.just("join"), rank),
    )


def _play(
    ops: list[tuple], world_size: int | None, max_open_values: int
) -> tuple[list[list[MergedStep]], RunMerger, set[tuple[int, int]], int]:
    clock = FakeClock()
    m = RunMerger(step_timeout=2.0, max_open_values=max_open_values, world_size=world_size, clock=clock)
    loss = m.series("", "loss", SCALAR, (MEAN, NONE))
    acc = m.series("test", "acc", SCALAR, (MAX, MIN))
    hist = m.series("", "h", HISTOGRAM)
    imgs = m.series("test", "img", IMAGES, max_outputs=2)
    text = m.series("", "txt", TEXT)
    takes: list[list[MergedStep]] = []
    loss_keys: set[tuple[int, int]] = set()
    loss_records = 0
    for op in ops:
        clock.now += 0.25
        if op[0] == "scalars":
            _, rank, records = op
            if records:
                log(m, rank, [((loss, acc)[s], step, v) for s, step, v in records], wall=clock.now)
                for s, step, _ in records:
                    if s == 0:
                        loss_keys.add((rank, step))
                        loss_records += 1
        elif op[0] == "blob":
            _, rank, kind, step = op
            if kind == 0:
                m.add_histogram(rank, hist, step, Histogram.from_values(np.array([rank, step]), tag="h"), 1.0)
            elif kind == 1:
                m.add_images(rank, imgs, step, [EncodedImage(1, 1, 1, bytes([rank, step]))] * 2, 1.0)
            else:
                m.add_text(rank, text, step, f"{rank}@{step}", 1.0)
        elif op[0] == "take":
            clock.now += op[1]
            takes.append(m.take_ready())
        elif op[0] == "flush":
            m.rank_flushed(op[1])
        elif op[0] == "leave":
            m.rank_left(op[1])
        else:
            m.rank_joined(op[1])
    takes.append(m.take_all())
    return takes, m, loss_keys, loss_records


@given(
    st.lists(_ops(), min_size=10, max_size=80),
    st.sampled_from([None, RANKS, RANKS + 1]),
    st.sampled_from([10**9, 5, BLOB_WEIGHT]),
)
@settings(max_examples=150, deadline=None)
def test_every_run_tag_gets_each_step_once_in_increasing_order(
    ops: list[tuple], world_size: int | None, max_open_values: int
) -> None:
    takes, m, loss_keys, loss_records = _play(ops, world_size, max_open_values)
    last: dict[tuple[str, str], int] = {}
    for take in takes:
        assert steps_of(take) == sorted(set(steps_of(take)))
        for merged in take:
            assert merged.outputs and math.isfinite(merged.wall_time)
            for run, items in merged.outputs.items():
                assert items
                tags = [one.tag for item in items for one in expand(item)]
                assert len(tags) == len(set(tags)), (run, tags)
                for tag in tags:
                    assert merged.step > last.get((run, tag), -1), (run, tag, merged.step)
                    last[run, tag] = merged.step
    stats = m.stats()
    assert (stats.open_steps, stats.held_values) == (0, 0)
    # Every (rank, step) the per-rank loss was logged at was written (main or late run) or dropped.
    written = sum(
        1
        for take in takes
        for merged in take
        for run, items in merged.outputs.items()
        for item in (one for item in items for one in expand(item))
        if item.tag == "loss" and "rank_" in run
    )
    assert len(loss_keys) <= written + stats.late_dropped
    assert written <= loss_records
    # Deterministic: the same inputs and clock give the same output.
    again, _, _, _ = _play(ops, world_size, max_open_values)
    assert repr(again) == repr(takes)


# --- throughput (not a test: python -m tests.test_merge) -----------------------------------------


def throughput(
    ranks: int = 8, tags: int = 100, steps: int = 1000, reduce: tuple[int, ...] = (MEAN,), intern: bool = True
) -> float:
    """Rank values per second through add_scalars and take_ready, one batch per rank per step.

    With ``intern``, each batch also maps its own series table to run-wide ids, as the aggregator
    must (the wire interns series per batch).
    """
    m = RunMerger(step_timeout=60.0, world_size=ranks)
    names = [f"tag{i}" for i in range(tags)]
    local = np.arange(tags, dtype=np.uint32)  # the batch's series indices
    ids = np.array([m.series("", name, SCALAR, reduce) for name in names], dtype=np.uint32)
    values = np.random.default_rng(0).standard_normal((steps, ranks, tags))
    batches = [
        (r, local.copy(), np.full(tags, s, dtype=np.int64), values[s, r].copy(), np.full(tags, 1e9 + s))
        for s in range(steps)
        for r in range(ranks)
    ]
    written = 0
    start = time.perf_counter()
    for rank, series, step, value, wall in batches:
        if intern:
            ids = np.array([m.series("", name, SCALAR, reduce) for name in names], dtype=np.uint32)
        m.add_scalars(rank, ids[series], step, value, wall)
        written += len(m.take_ready())
    for rank in range(ranks):
        m.rank_left(rank)
    written += len(m.take_ready())
    elapsed = time.perf_counter() - start
    assert written == steps
    return ranks * tags * steps / elapsed


if __name__ == "__main__":
    for reduce in [(MEAN,), (MEAN, MIN, MAX), (MEAN, NONE)]:
        names = "+".join(OP_NAMES.get(op, "none") for op in reduce)
        for intern in (False, True):
            rate = max(throughput(reduce=reduce, intern=intern) for _ in range(3))
            how = "with" if intern else "without"
            print(
                f"8 ranks x 100 tags x 1000 steps, {names}, {how} interning: {rate / 1e6:.2f} M rank values/s"
            )


def test_images_with_max_outputs_0_keep_their_tag_and_the_lowest_ranks_image() -> None:
    m = merger()
    sid = m.series("", "picture", IMAGES, max_outputs=0)
    for rank in (2, 1):
        m.add_images(rank, sid, 0, [EncodedImage(1, 1, 1, bytes([rank]))], 1.0)
    m.rank_left(1)
    m.rank_left(2)
    (step,) = m.take_all()
    (item,) = step.outputs[""]
    assert item.tag == "picture"
    assert item.image.png == bytes([1])
