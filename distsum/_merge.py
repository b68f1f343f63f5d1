"""Merge what the ranks of one job logged into one run: hold each step until complete, then reduce.

The aggregator decodes a batch of one rank and hands its records to the ``RunMerger`` of the
batch's run; ``take_ready`` returns the steps that may now be written, as ``MergedStep`` objects
holding the summary items for each run path. No sockets, files, threads or sleeping here: time
comes from an injected clock, so the same inputs and clock readings give the same output.

**When a step is complete.** A rank has *moved past* step ``s`` once it has logged a record
(of any series of the run) with a step above ``s``, or asked for a flush after logging ``s``, or
left. The ranks waited for are the joined ranks that have not left and, when the world size is
known, the ranks ``0 .. n-1`` that have not shown up yet (they hold every step until the
timeout). Every step that all of them have moved past is complete. With ``settle``, so is a step
that all of them have *reached* (logged at it or beyond) once no record for it, nor for any open
step below it, has arrived for ``settle`` seconds: a job whose steps take longer than that sees
each step written ``settle`` seconds after its last record rather than when the next step begins
(a rank's record that arrives later still, for a series already written there, is late). A step
whose first record arrived more than ``step_timeout`` ago is taken anyway, and with it every
open step below it, because a tag's steps must be written in increasing order
(tensorboard-format.md section 4).
A rank that sends records without ``rank_joined`` joins with them; records of a rank that left
are still merged, but it is waited for again only after ``rank_joined``.

Progress counts steps of every series of the run alike, so a run whose sub-runs count steps
differently (epochs in ``test``, global steps in the run) sees the records of the lower counter
completed at once and mostly late. Each (series, step) is written once; a series that had no
record at a step already written for other series may still be written there later (its own
steps stay increasing), so across ``take_ready`` calls steps increase per (run path, tag), not
overall. Within one call the ``MergedStep`` list is in increasing step order, one per step.

**Late data.** A record whose step is at or below the last step already written for its series
cannot go into the run any more: TensorBoard would drop the newer points (Rust loader) or show a
duplicate (Python loader). It is counted (``late``) and written raw, unreduced, under its own tag
in the sub-run ``<subrun>/late/rank_<r>`` of the rank that sent it. There, TensorBoard shows the
points at their true steps but they were written whenever they arrived. Within one late run a
tag's steps are still kept strictly increasing: a late record at or below the last step already
written for its (series, rank) late run is dropped and counted (``late_dropped``). Late records
are written at the next ``take_ready``.

**Conflicting series.** The first definition of a (sub-run, tag) wins. A later ``series`` call
for the same (sub-run, tag) with another kind, reduce tuple or image count, or one whose output
tags would coincide with tags already claimed by another series (``loss/max`` against the
``max`` reduction of ``loss``, a sub-run named ``rank_3`` against the per-rank runs, ...), still
gets an id, but its records are dropped and counted (``conflicts``). So no two series ever write
the same (run path, tag).

**Reductions.** Over the ranks that logged the (series, step), each rank's last value: MEAN, SUM,
MIN and MAX as IEEE arithmetic in float64. A NaN from any rank makes all four NaN (numpy's
``minimum``/``maximum``, not ``fmin``/``fmax``): a NaN loss on one rank should show, not vanish.
+inf and -inf behave as IEEE says (the mean of +inf and -inf is NaN). NONE writes each rank's
value under the tag in the run ``<subrun>/rank_<r>``. In a tuple, NONE does not take a position:
the first of the other reductions is written under ``tag`` and the rest under ``tag/<op>``, so
``(MEAN, NONE)`` and ``(NONE, MEAN)`` both put the mean under ``tag`` in the sub-run, where
TensorBoard draws it on the same chart as the per-rank runs. Histograms merge exactly; images are
gathered in rank order and cut to the series' ``max_outputs``; texts are joined in rank order,
each labelled with its rank.

**Memory.** Held scalars are counted one per value (duplicates included until reduced); a held
histogram, image list or text counts as ``BLOB_WEIGHT`` values plus its payload in 8-byte units
(bucket counts; PNG bytes; characters of text). When more than ``max_open_values`` are held,
``take_ready`` takes the oldest open steps early until the rest fit. The bound is applied by
``take_ready``, which the aggregator calls after every batch, so at most one batch over it.

**After a restart.** An aggregator that crashed may have written part of what the ranks resend.
``written`` gives what its event files hold, as the last step of each (run path, tag): a series
starts out written up to there, and its late runs likewise. A resent record comes with the fate
an earlier aggregator gave it (``REPLAY_MERGED``: into its step; ``REPLAY_LATE``: to the late
run), from the journal; it is dropped as ``replayed`` when that step or late run already holds
it, and otherwise merged as if new. A record an earlier aggregator never merged is new: if its
step was written without it, it is late like any other.

**Wall times** are the aggregator's to validate; a NaN or infinite one takes no part in a step's
wall time, and a step with no finite one gets the latest wall time written before it (0.0 first).
"""

from __future__ import annotations

import heapq
import math
import re
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import NamedTuple, cast

import numpy as np

from distsum._histogram import Histogram
from distsum._image import EncodedImage
from distsum._proto import wire_pb2
from distsum._summaries import (
    HistogramItem,
    ImageItem,
    Item,
    ScalarBlock,
    ScalarItem,
    ScalarTags,
    TextItem,
    image_tags,
)

__all__ = [
    "BLOB_WEIGHT",
    "REPLAY_LATE",
    "REPLAY_MERGED",
    "MergeStats",
    "MergedStep",
    "RunMerger",
    "SeriesSpec",
    "distinct_steps",
]

# What a held histogram, image list or text counts for against max_open_values, on top of its
# payload: roughly its Python objects, in units of one held scalar.
BLOB_WEIGHT = 1000

# What an earlier aggregator did with a resent record (0: it never merged it).
REPLAY_MERGED = 1
REPLAY_LATE = 2

# Python ints beyond int64 on either side, so "nothing yet" and "everything" compare with any step.
_BEFORE_ALL = -(2**64)
_AFTER_ALL = 2**64
_INT64_MAX = np.iinfo(np.int64).max
_INT64_MIN = np.iinfo(np.int64).min

_OPS = (wire_pb2.MEAN, wire_pb2.SUM, wire_pb2.MIN, wire_pb2.MAX)
_OP_NAMES: dict[int, str] = {
    wire_pb2.MEAN: "mean",
    wire_pb2.SUM: "sum",
    wire_pb2.MIN: "min",
    wire_pb2.MAX: "max",
}
_REDUCES = (*_OPS, wire_pb2.NONE)
_KINDS = (wire_pb2.SCALAR, wire_pb2.HISTOGRAM, wire_pb2.IMAGES, wire_pb2.TEXT)
# Bits of _Series.opbits: which reductions a scalar series needs.
_BIT: dict[int, int] = {op: 1 << op for op in _OPS}
# A scalar output is coded series * _CODES + op.
_CODES = 8
# ScalarTags kept for reuse; beyond this many layouts, the cache starts over.
_MAX_LAYOUTS = 4096
_RANK_LEAF = re.compile(r"rank_(?:0|[1-9][0-9]*)")
# Chunks appended since the last consolidation that trigger one if they hold fewer than
# _SMALL_CHUNK records on average: that bounds the Python objects (some 700 bytes a chunk) per held
# value when ranks send many small batches, and leaves larger batches as they came. Copying and
# sorting those bought nothing and took about a tenth of the aggregator's time with 256 ranks
# sending 1,900 records a batch.
_CONSOLIDATE_AFTER = 64
_SMALL_CHUNK = 1024
_TEXT_SEPARATOR = "\n\n---\n\n"
# The ufuncs' own reductions: ndarray.min/max and np.all add a Python-level wrapper to every call.
_min = np.minimum.reduce
_max = np.maximum.reduce
_all = np.logical_and.reduce


def _join(subrun: str, leaf: str) -> str:
    return f"{subrun}/{leaf}" if subrun else leaf


def _rank_prefix(run: str) -> str | None:
    """``P`` if ``run`` is ``P + "rank_<n>"`` (a per-rank run below ``P``), else None."""
    leaf = run.rpartition("/")[2]
    return run[: len(run) - len(leaf)] if _RANK_LEAF.fullmatch(leaf) else None


@dataclass(frozen=True, slots=True)
class SeriesSpec:
    """One series of a run as ``RunMerger.series`` interned it (reduce and max_outputs normalised).

    ``conflict`` is true when the definition lost to an earlier one: its records are dropped.
    """

    subrun: str
    tag: str
    kind: int
    reduce: tuple[int, ...]
    max_outputs: int
    conflict: bool


@dataclass(slots=True)
class MergedStep:
    """The items to write at one step, by run path relative to the job's run ("" = the run)."""

    step: int
    wall_time: float
    """The latest wall time of the contributions written here."""
    outputs: dict[str, list[Item]] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class MergeStats:
    """Counters for the aggregator's health series; the ``late``..``steps_forced`` ones accumulate."""

    open_steps: int
    held_values: int
    late: int
    """Records that arrived for a step already written for their series."""
    late_dropped: int
    """Late records not written even to the late run, since they would go backwards there."""
    conflicts: int
    """Records dropped because their series lost to an earlier, conflicting definition."""
    steps_written: int
    """Open steps taken and returned (late records not counted)."""
    steps_timed_out: int
    """Steps taken because their first record was older than ``step_timeout``."""
    steps_forced: int
    """Steps taken before they were complete for another reason: memory or ``take_all``."""
    replayed: int
    """Resent records dropped because an earlier aggregator had written them."""
    waited_ranks: int
    """Ranks the frontier waits for: joined and not left, or expected and not yet joined."""


@dataclass(frozen=True, slots=True)
class _Series:
    spec: SeriesSpec
    # Scalars: (op, output tag) of the reductions written to the sub-run itself.
    ops: tuple[tuple[int, str], ...]
    per_rank: bool
    opbits: int
    rank_prefix: str  # per-rank runs are rank_prefix + "rank_<r>"
    late_prefix: str  # late runs are late_prefix + "rank_<r>"
    image_tags: tuple[str, ...]


class _Chunk(NamedTuple):
    """Scalar records of one or more batches, all with steps in [lo, hi].

    In arrival order, or, if ``ordered``, sorted by step with arrival order kept among equal
    steps (what "the rank's last value wins" needs); an ordered chunk splits at a step without
    copying.
    """

    ranks: np.ndarray
    series: np.ndarray
    steps: np.ndarray
    values: np.ndarray
    walls: np.ndarray
    lo: int
    hi: int
    ordered: bool

    def split(self, last: int) -> tuple[_Chunk, _Chunk]:
        """The records with steps <= ``last``, and the others (``lo <= last < hi``)."""
        if self.ordered:
            i = int(np.searchsorted(self.steps, last, side="right"))
            parts: tuple[slice, slice] | tuple[np.ndarray, np.ndarray] = (slice(None, i), slice(i, None))
        else:
            mask = self.steps <= last
            parts = (mask, ~mask)
        out = []
        for part in parts:
            steps = self.steps[part]
            out.append(
                _Chunk(
                    self.ranks[part],
                    self.series[part],
                    steps,
                    self.values[part],
                    self.walls[part],
                    int(_min(steps)),
                    int(_max(steps)),
                    self.ordered,
                )
            )
        return out[0], out[1]


def _concat(chunks: list[_Chunk], *, ordered: bool = False) -> _Chunk:
    """One chunk of ``chunks`` in their order; sorted by step if ``ordered``."""
    if len(chunks) == 1 and (chunks[0].ordered or not ordered):
        return chunks[0]
    columns = [np.concatenate(column) for column in zip(*(c[:5] for c in chunks), strict=True)]
    if ordered:
        order = np.argsort(columns[2], kind="stable")
        columns = [column[order] for column in columns]
    ranks, series, steps, values, walls = columns
    lo, hi = min(c.lo for c in chunks), max(c.hi for c in chunks)
    return _Chunk(ranks, series, steps, values, walls, lo, hi, ordered)


def distinct_steps(steps: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The distinct steps, ascending, and how many times each occurs.

    A batch's steps usually come in order, a run of records per step: then only the records
    where the step changes are compared, and no sort is needed.
    """
    n = steps.size
    if n:
        ends = np.flatnonzero(steps[1:] != steps[:-1])
        nexts = ends + 1
        if _all(steps.take(nexts) > steps.take(ends)):
            bounds = np.empty(ends.size + 2, dtype=np.intp)
            bounds[0], bounds[-1] = 0, n
            bounds[1:-1] = nexts
            return steps.take(bounds[:-1]), bounds[1:] - bounds[:-1]
    return np.unique(steps, return_counts=True)


def _index_steps(steps: np.ndarray, lo: int, hi: int) -> tuple[np.ndarray, np.ndarray]:
    """The distinct steps of ``steps`` (all in [lo, hi]), ascending, and each one's position."""
    if hi - lo < 4 * steps.size + (1 << 16):
        present = np.zeros(hi - lo + 1, dtype=bool)
        present[steps - lo] = True
        position = np.cumsum(present) - 1
        return np.flatnonzero(present) + lo, position[steps - lo]
    return np.unique(steps, return_inverse=True)


class _Groups(NamedTuple):
    """Held scalars grouped by (series, step), in that order, and reduced over ranks."""

    series: np.ndarray
    steps: np.ndarray
    reductions: dict[int, np.ndarray]  # op -> one value per group, for the ops asked for
    walls: np.ndarray  # the latest wall time per group
    records: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]  # ranks, series, steps, values


def _dense_groups(held: _Chunk, n_series: int, need: int) -> _Groups | None:
    """Group by counting into a (series, step) table, no sort; None when that table would be
    much larger than the records, or when a rank logged a (series, step) twice."""
    ranks, series, steps, values, walls, lo, hi, _ = held
    span = hi - lo + 1
    slots = n_series * span
    n_ranks = int(_max(ranks)) + 1
    if slots * n_ranks > 4 * series.size + (1 << 16):
        return None
    key = series * span + (steps - lo)
    if int(_max(np.bincount(key * n_ranks + ranks, minlength=slots * n_ranks))) > 1:
        return None  # the sort keeps each rank's last value
    counts = np.bincount(key, minlength=slots)
    present = np.flatnonzero(counts)
    reductions: dict[int, np.ndarray] = {}
    with np.errstate(all="ignore"):
        if need & (_BIT[wire_pb2.MEAN] | _BIT[wire_pb2.SUM]):
            sums = np.bincount(key, weights=values, minlength=slots)[present]
            reductions[wire_pb2.SUM] = sums
            reductions[wire_pb2.MEAN] = sums / counts[present]
        for op, ufunc, start in ((wire_pb2.MIN, np.minimum, np.inf), (wire_pb2.MAX, np.maximum, -np.inf)):
            if need & _BIT[op]:
                table = np.full(slots, start)
                ufunc.at(table, key, values)
                reductions[op] = table[present]
    latest = np.full(slots, -np.inf)
    np.maximum.at(latest, key, walls)
    return _Groups(
        present // span, present % span + lo, reductions, latest[present], (ranks, series, steps, values)
    )


def _sorted_groups(held: _Chunk, n_series: int, need: int) -> _Groups:
    """Group by sorting on (series, step, rank); a rank that logged a (series, step) twice counts
    with the last value it logged."""
    ranks, series, steps, values, walls, lo, hi, _ = held
    m = series.size
    # Stable, so each rank's records stay in arrival order. One int64 key sorts faster than
    # lexsort's three passes when the ranges allow it.
    n_ranks = int(_max(ranks)) + 1
    span = hi - lo + 1
    last_of_rank = np.empty(m, dtype=bool)
    if n_series * span * n_ranks < 2**62:
        group_key = series * span + (steps - lo)
        key = group_key * n_ranks + ranks
        order = np.argsort(key, kind="stable")
        key, group_key = key[order], group_key[order]
        np.not_equal(key[1:], key[:-1], out=last_of_rank[:-1])
    else:
        order = np.lexsort((ranks, steps, series))
        s, t, r = series[order], steps[order], ranks[order]
        np.not_equal(s[1:], s[:-1], out=last_of_rank[:-1])
        last_of_rank[:-1] |= t[1:] != t[:-1]
        last_of_rank[:-1] |= r[1:] != r[:-1]
        group_key = None
    last_of_rank[-1] = True
    if not last_of_rank.all():
        order = order[last_of_rank]
        if group_key is not None:
            group_key = group_key[last_of_rank]
    ranks, series, steps = ranks[order], series[order], steps[order]
    values, walls = values[order], walls[order]
    m = series.size
    new_group = np.empty(m, dtype=bool)
    new_group[0] = True
    if group_key is not None:
        np.not_equal(group_key[1:], group_key[:-1], out=new_group[1:])
    else:
        np.not_equal(series[1:], series[:-1], out=new_group[1:])
        new_group[1:] |= steps[1:] != steps[:-1]
    starts = np.flatnonzero(new_group)
    reductions: dict[int, np.ndarray] = {}
    with np.errstate(all="ignore"):
        if need & (_BIT[wire_pb2.MEAN] | _BIT[wire_pb2.SUM]):
            sums = np.add.reduceat(values, starts)
            reductions[wire_pb2.SUM] = sums
            reductions[wire_pb2.MEAN] = sums / np.diff(np.append(starts, m))
        if need & _BIT[wire_pb2.MIN]:
            reductions[wire_pb2.MIN] = np.minimum.reduceat(values, starts)
        if need & _BIT[wire_pb2.MAX]:
            reductions[wire_pb2.MAX] = np.maximum.reduceat(values, starts)
    group_walls = np.maximum.reduceat(walls, starts)
    return _Groups(series[starts], steps[starts], reductions, group_walls, (ranks, series, steps, values))


class _Blob(NamedTuple):
    """A held histogram, image list or text of one rank."""

    payload: Histogram | tuple[EncodedImage, ...] | str
    wall: float
    weight: int


@dataclass(slots=True)
class _Open:
    """An open step: when its first and last records arrived, and how many values it holds."""

    first: float
    last: float
    held: int = 0


class RunMerger:
    """The open steps of one run (with its sub-runs), and the rule that says when each is complete.

    Not thread-safe: one aggregator thread owns it. See the module docstring for the rules.
    """

    def __init__(
        self,
        *,
        step_timeout: float,
        max_open_values: int = 10_000_000,
        world_size: int | None = None,
        written: Mapping[tuple[str, str], int] | None = None,
        settle: float | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not step_timeout >= 0:
            raise ValueError(f"step_timeout must be >= 0 seconds, got {step_timeout!r}")
        if max_open_values < 0:
            raise ValueError(f"max_open_values must be >= 0, got {max_open_values!r}")
        self._timeout = float(step_timeout)
        self._settle = None if settle is None else float(settle)
        self._max_values = int(max_open_values)
        self._clock = clock

        # Series, interned. Per-series numpy lookups serve the vectorised hot path.
        self._ids: dict[tuple[str, str, int, tuple[int, ...], int], int] = {}
        self._raw_ids: dict[tuple[str, str, int, tuple[int, ...], int], int] = {}
        self._first: dict[tuple[str, str], int] = {}
        self._series: list[_Series] = []
        self._run_claims: dict[str, set[str]] = {}  # tag -> run paths
        self._rank_claims: dict[str, set[str]] = {}  # tag -> per-rank run prefixes
        # Last step written per series; int64 max for conflicting series, so that one comparison
        # sends both late and conflicting records off the hot path.
        self._last = np.empty(0, dtype=np.int64)
        self._opbits = np.empty(0, dtype=np.int64)
        self._per_rank = np.empty(0, dtype=bool)
        self._conflict = np.empty(0, dtype=bool)
        # What an earlier aggregator wrote: (run path, tag) -> last step; the same per series.
        self._written = dict(written or {})
        self._written_ranks: dict[tuple[str, str], int] = {}
        for (path, tag), step in self._written.items():
            prefix = _rank_prefix(path)
            if prefix is not None:
                self._written_ranks[prefix, tag] = max(step, self._written_ranks.get((prefix, tag), step))
        self._recovered = np.empty(0, dtype=np.int64)
        # Sub-runs by index, each series' sub-run index, and the tag of each scalar output code.
        self._paths: list[str] = []
        self._path_ids: dict[str, int] = {}
        self._path_index = np.empty(0, dtype=np.intp)
        self._output_tags: dict[int, str] = {}
        self._layouts: dict[bytes, ScalarTags] = {}

        # Ranks: True joined, False left. _done[r]: every step <= _done[r] is moved past by r.
        self._state: dict[int, bool] = {}
        self._progress: dict[int, int] = {}
        self._done: dict[int, int] = {}
        # (done, rank) and (progress, rank) of waited ranks, so that the lowest of each is found
        # without a pass over every rank in each round; stale entries are dropped when they reach
        # the top.
        self._done_heap: list[tuple[int, int]] = []
        self._progress_heap: list[tuple[int, int]] = []
        self._world_size: int | None = None
        self._missing = 0  # ranks 0..world_size-1 never seen

        # Open steps: a heap of their numbers, their state, and arrivals in clock order.
        self._open: dict[int, _Open] = {}
        self._step_heap: list[int] = []
        self._arrivals: deque[tuple[float, int, _Open]] = deque()
        self._held = 0
        self._chunks: list[_Chunk] = []
        self._consolidated = 0  # self._chunks[:_consolidated] have been considered for a consolidation
        self._blobs: dict[int, dict[tuple[int, int], _Blob]] = {}

        # Late records waiting for the next take, and the last step of each (series, rank) late run.
        self._late_chunks: list[_Chunk] = []
        self._late_blobs: dict[tuple[int, int, int], _Blob] = {}
        self._late_last: dict[tuple[int, int], int] = {}
        self._rank_runs: dict[tuple[str, int], str] = {}
        self._rank_columns: dict[int, np.ndarray] = {}

        self._late = 0
        self._late_dropped = 0
        self._conflicts = 0
        self._steps_written = 0
        self._steps_timed_out = 0
        self._steps_forced = 0
        self._replayed = 0
        self._last_wall = 0.0

        if world_size is not None:
            self.set_world_size(world_size)

    # --- series ----------------------------------------------------------------------------------

    def series(
        self, subrun: str, tag: str, kind: int, reduce: tuple[int, ...] = (), max_outputs: int = 0
    ) -> int:
        """The run-wide id of a series; the same definition always gives the same id.

        ``kind`` and ``reduce`` take ``wire_pb2`` enum values. A scalar with no reductions means
        ``(MEAN,)``; repeated reductions count once. ``reduce`` is ignored for other kinds and
        ``max_outputs`` for all but images. A definition that conflicts with an earlier one gets
        an id whose records are dropped (see the module docstring). Raises ValueError for an
        unknown kind or reduction, or images with ``max_outputs < 0``. Images with ``max_outputs``
        0 write one image, the lowest rank's, under ``tag`` itself.
        """
        # The aggregator asks again for every batch (the wire interns series per batch): answer a
        # repeated question from one dict lookup.
        raw = (subrun, tag, kind, reduce if type(reduce) is tuple else tuple(reduce), max_outputs)
        sid = self._raw_ids.get(raw)
        if sid is not None:
            return sid
        sid = self._define(subrun, tag, kind, raw[3], max_outputs)
        self._raw_ids[raw] = sid
        return sid

    def _define(self, subrun: str, tag: str, kind: int, reduce: tuple[int, ...], max_outputs: int) -> int:
        if kind not in _KINDS:
            raise ValueError(f"series {tag!r}: unknown kind {kind!r}")
        if kind == wire_pb2.SCALAR:
            for op in reduce:
                if op not in _REDUCES:
                    raise ValueError(f"scalar series {tag!r}: unknown reduction {op!r}")
            reduce = tuple(dict.fromkeys(int(op) for op in reduce)) or (wire_pb2.MEAN,)
        else:
            reduce = ()
        if kind == wire_pb2.IMAGES:
            if max_outputs < 0:
                raise ValueError(f"image series {tag!r}: max_outputs must be >= 0, got {max_outputs!r}")
            max_outputs = int(max_outputs)
        else:
            max_outputs = 0
        key = (subrun, tag, int(kind), reduce, max_outputs)
        sid = self._ids.get(key)
        if sid is not None:
            return sid

        reduced = [op for op in reduce if op != wire_pb2.NONE]
        ops = tuple((op, tag if i == 0 else f"{tag}/{_OP_NAMES[op]}") for i, op in enumerate(reduced))
        per_rank = wire_pb2.NONE in reduce
        rank_prefix = _join(subrun, "")
        late_prefix = _join(subrun, "late/")
        tags: tuple[str, ...] = ()
        if kind == wire_pb2.IMAGES:
            # 0: one image under the tag itself, for the front ends that name their own tags.
            tags = tuple(image_tags(tag, max_outputs)) if max_outputs else (tag,)
        # What this series writes: tags in its sub-run, tags in per-rank runs below a prefix.
        if kind == wire_pb2.SCALAR:
            run_tags = [t for _, t in ops]
            rank_runs = [(rank_prefix, tag)] if per_rank else []
            rank_runs.append((late_prefix, tag))
        else:
            run_tags = list(tags) if kind == wire_pb2.IMAGES else [tag]
            rank_runs = [(late_prefix, t) for t in run_tags]
        conflict = (
            (subrun, tag) in self._first
            or any(self._run_taken(subrun, t) for t in run_tags)
            or any(self._ranks_taken(prefix, t) for prefix, t in rank_runs)
        )
        if not conflict:
            for t in run_tags:
                self._run_claims.setdefault(t, set()).add(subrun)
            for prefix, t in rank_runs:
                self._rank_claims.setdefault(t, set()).add(prefix)
        self._first.setdefault((subrun, tag), len(self._series))

        spec = SeriesSpec(subrun, tag, int(kind), reduce, max_outputs, conflict)
        opbits = sum(_BIT[op] for op in reduced)
        sid = len(self._series)
        self._series.append(_Series(spec, ops, per_rank, opbits, rank_prefix, late_prefix, tags))
        self._ids[key] = sid
        if sid == self._last.size:
            size = max(16, 2 * sid)
            self._last = np.resize(self._last, size)
            self._opbits = np.resize(self._opbits, size)
            self._per_rank = np.resize(self._per_rank, size)
            self._conflict = np.resize(self._conflict, size)
            self._recovered = np.resize(self._recovered, size)
            self._path_index = np.resize(self._path_index, size)
        path = self._path_ids.get(subrun)
        if path is None:
            path = self._path_ids[subrun] = len(self._paths)
            self._paths.append(subrun)
        self._path_index[sid] = path
        for op, output_tag in ops:
            self._output_tags[sid * _CODES + op] = output_tag
        written = max(
            (self._written.get((subrun, t), _INT64_MIN) for t in run_tags),
            default=_INT64_MIN,
        )
        if per_rank:
            written = max(written, self._written_ranks.get((rank_prefix, tag), _INT64_MIN))
        self._recovered[sid] = written
        self._last[sid] = _INT64_MAX if conflict else written
        self._opbits[sid] = opbits
        self._per_rank[sid] = per_rank
        self._conflict[sid] = conflict
        return sid

    def describe(self, series: int) -> SeriesSpec:
        """The definition behind a series id (for logging a conflict, say)."""
        return self._series[series].spec

    def _run_taken(self, run: str, tag: str) -> bool:
        if run in self._run_claims.get(tag, ()):
            return True
        prefix = _rank_prefix(run)
        return prefix is not None and prefix in self._rank_claims.get(tag, ())

    def _ranks_taken(self, prefix: str, tag: str) -> bool:
        if prefix in self._rank_claims.get(tag, ()):
            return True
        return any(_rank_prefix(run) == prefix for run in self._run_claims.get(tag, ()))

    # --- ranks -----------------------------------------------------------------------------------

    def set_world_size(self, n: int | None) -> None:
        """Wait also for the ranks ``0 .. n-1`` that have not joined yet; 0 or None: unknown."""
        if n is not None and n < 0:
            raise ValueError(f"world size must be >= 0, got {n!r}")
        self._world_size = n or None
        self._missing = n - sum(1 for r in self._state if 0 <= r < n) if n else 0

    def rank_joined(self, rank: int) -> None:
        """A rank (re)started: it is waited for, from no progress, until it leaves.

        A rank that is already joined is unaffected. A rank that left and comes back (a new client
        instance) starts over: its earlier progress no longer counts.
        """
        if self._state.get(rank) is True:
            return
        self._first_seen(rank)
        self._state[rank] = True
        self._progress[rank] = self._done[rank] = _BEFORE_ALL
        heapq.heappush(self._done_heap, (_BEFORE_ALL, rank))
        heapq.heappush(self._progress_heap, (_BEFORE_ALL, rank))

    def rank_flushed(self, rank: int) -> None:
        """The rank wants what it logged so far written: it has moved past its highest step."""
        if rank not in self._state:
            self.rank_joined(rank)
        self._advance(rank, self._progress[rank])

    def rank_left(self, rank: int) -> None:
        """The rank finished or was declared dead: no longer waited for.

        Its records that still arrive are merged (or late) as usual, but it is only waited for
        again after ``rank_joined``.
        """
        self._first_seen(rank)
        self._state[rank] = False

    def _first_seen(self, rank: int) -> None:
        if rank in self._state:
            return
        if rank < 0:
            raise ValueError(f"ranks must be >= 0, got {rank!r}")
        if self._world_size is not None and rank < self._world_size:
            self._missing -= 1
        self._state[rank] = False
        self._progress[rank] = self._done[rank] = _BEFORE_ALL

    def _logged(self, rank: int, highest: int) -> None:
        if rank not in self._state:
            self.rank_joined(rank)
        if highest > self._progress[rank]:
            self._progress[rank] = highest
            if self._state[rank]:
                heapq.heappush(self._progress_heap, (highest, rank))
            self._advance(rank, highest - 1)

    def _advance(self, rank: int, done: int) -> None:
        if done > self._done[rank]:
            self._done[rank] = done
            if self._state[rank]:
                heapq.heappush(self._done_heap, (done, rank))

    def _frontier(self) -> int:
        """Every step at or below this one has been moved past by every rank waited for."""
        return _BEFORE_ALL if self._missing else self._lowest(self._done_heap, self._done)

    def _reached(self) -> int:
        """The lowest step that every waited rank has logged at or beyond."""
        return self._lowest(self._progress_heap, self._progress)

    def _lowest(self, heap: list[tuple[int, int]], of: dict[int, int]) -> int:
        """The lowest ``of[rank]`` of the joined ranks (``_AFTER_ALL`` if none), from ``heap``."""
        while heap:
            value, rank = heap[0]
            if self._state[rank] and of[rank] == value:
                return value
            heapq.heappop(heap)
        return _AFTER_ALL

    # --- input -----------------------------------------------------------------------------------

    def add_scalars(
        self,
        rank: int,
        series: np.ndarray,
        steps: np.ndarray,
        values: np.ndarray,
        wall_times: np.ndarray,
        replay: np.ndarray | None = None,
        distinct: tuple[np.ndarray, np.ndarray] | None = None,
    ) -> np.ndarray | None:
        """Scalar records of one batch of ``rank``, as columns; a later duplicate replaces an earlier.

        ``replay``: per record, what an earlier aggregator did with it (``REPLAY_MERGED``,
        ``REPLAY_LATE``, 0), for a resent batch. ``distinct``: ``distinct_steps(steps)``, when the
        caller has it already. Returns the indices of the records that went
        late (or were dropped as conflicting), None if none did. The merger keeps the arrays: the
        caller must not modify them afterwards. Raises ValueError if the columns differ in length
        or name an unknown series.
        """
        unsigned = isinstance(series, np.ndarray) and series.dtype.kind == "u"
        series = np.asarray(series, dtype=np.intp)
        steps = np.asarray(steps, dtype=np.int64)
        values = np.asarray(values, dtype=np.float64)
        wall_times = np.asarray(wall_times, dtype=np.float64)
        n = series.size
        if not (series.ndim == 1 and steps.shape == values.shape == wall_times.shape == (n,)):
            raise ValueError(
                f"scalar columns must be 1-D of one length, got shapes {series.shape}, "
                f"{steps.shape}, {values.shape}, {wall_times.shape}"
            )
        if replay is not None and replay.shape != (n,):
            raise ValueError(f"replay flags must have the records' shape {(n,)}, got {replay.shape}")
        if n == 0:
            return None
        if _max(series) >= len(self._series) or not (unsigned or _min(series) >= 0):
            raise ValueError(
                f"scalar records name series {series.min()}..{series.max()}, "
                f"but only {len(self._series)} are defined"
            )
        now = self._clock()
        if distinct is None:
            lo, hi = int(_min(steps)), int(_max(steps))
        else:
            lo, hi = int(distinct[0][0]), int(distinct[0][-1])
        self._logged(rank, hi)

        index = None
        if replay is not None:
            # Merged into a step that an earlier aggregator then wrote: it is there already.
            done = (replay == REPLAY_MERGED) & np.less_equal(steps, self._recovered_for(series, rank))
            if np.count_nonzero(done):
                self._replayed += int(np.count_nonzero(done))
                keep = ~done
                series, steps, values, wall_times = series[keep], steps[keep], values[keep], wall_times[keep]
                replay, index = replay[keep], np.flatnonzero(keep)
        behind = np.less_equal(steps, self._last.take(series))
        if replay is not None:
            # A per-rank series starts out written up to the furthest of its ranks' runs. A record
            # the dead aggregator merged into a step whose files it wrote only in part (it died
            # between them) goes into that step again, in its rank's run, which lacks it.
            again = (replay == REPLAY_MERGED) & self._per_rank.take(series) & (self._opbits.take(series) == 0)
            if np.count_nonzero(again):
                behind &= ~again
        late = None
        if np.count_nonzero(behind):
            late = np.flatnonzero(behind) if index is None else index[behind]
            ahead = ~behind
            self._add_late_scalars(
                rank,
                series[behind],
                steps[behind],
                values[behind],
                wall_times[behind],
                None if replay is None else replay[behind],
            )
            series, steps, values, wall_times = series[ahead], steps[ahead], values[ahead], wall_times[ahead]
        n = series.size
        if n == 0:
            return late
        if n != len(behind) or index is not None:
            lo, hi = int(_min(steps)), int(_max(steps))
            distinct = None
        # A batch's records usually come step by step, so most chunks are ordered as they are.
        ordered = lo == hi or bool(_all(steps[1:] >= steps[:-1]))
        self._chunks.append(
            _Chunk(self._rank_column(rank, n), series, steps, values, wall_times, lo, hi, ordered)
        )
        if len(self._chunks) - self._consolidated >= _CONSOLIDATE_AFTER:
            recent = self._chunks[self._consolidated :]
            if sum(chunk.steps.size for chunk in recent) < len(recent) * _SMALL_CHUNK:
                self._chunks[self._consolidated :] = [_concat(recent, ordered=True)]
            self._consolidated = len(self._chunks)
        if lo == hi:
            self._hold(lo, n, now)
        else:
            unique, counts = distinct_steps(steps) if distinct is None else distinct
            for step, count in zip(unique.tolist(), counts.tolist(), strict=True):
                self._hold(step, count, now)
        return late

    def _rank_column(self, rank: int, n: int) -> np.ndarray:
        """``n`` times ``rank``: a read-only view, shared by every chunk of the rank."""
        column = self._rank_columns.get(rank)
        if column is None or column.size < n:
            column = np.full(max(n, 1024), rank, dtype=np.intp)
            column.setflags(write=False)
            self._rank_columns[rank] = column
        return column[:n]

    def _add_late_scalars(
        self,
        rank: int,
        series: np.ndarray,
        steps: np.ndarray,
        values: np.ndarray,
        walls: np.ndarray,
        replay: np.ndarray | None,
    ) -> None:
        drop = self._conflict[series]
        if drop.any():
            self._conflicts += int(np.count_nonzero(drop))
        if replay is not None:
            # Sent to the late run by an earlier aggregator, which may have written it there.
            for i in np.flatnonzero(replay == REPLAY_LATE).tolist():
                if not drop[i] and steps[i] <= self._written_late(int(series[i]), rank):
                    drop[i] = True
                    self._replayed += 1
        if drop.any():
            late = ~drop
            series, steps, values, walls = series[late], steps[late], values[late], walls[late]
        if series.size:
            self._late += int(series.size)
            ranks = self._rank_column(rank, series.size)
            self._late_chunks.append(
                _Chunk(ranks, series, steps, values, walls, int(steps.min()), int(steps.max()), False)
            )

    def _recovered_for(self, series: np.ndarray, rank: int) -> np.ndarray:
        """Per record of ``rank``: the last step an earlier aggregator wrote for its series.

        A per-rank series counts as written only where the rank's own run has it (a crash may
        fall between the files of one round), and where the reductions' run has it too.
        """
        recovered = self._recovered.take(series)
        per_rank = self._per_rank.take(series)
        if np.count_nonzero(per_rank):
            for sid in np.unique(series[per_rank]).tolist():
                info = self._series[sid]
                last = self._written.get((self._rank_run(info.rank_prefix, rank), info.spec.tag), _INT64_MIN)
                if info.ops:
                    last = min(
                        last, max(self._written.get((info.spec.subrun, t), _INT64_MIN) for _, t in info.ops)
                    )
                recovered[series == sid] = last
        return recovered

    def _written_late(self, sid: int, rank: int) -> int:
        """The last step an earlier aggregator wrote for the series in the rank's late run."""
        info = self._series[sid]
        tag = info.image_tags[0] if info.image_tags else info.spec.tag
        return self._written.get((self._rank_run(info.late_prefix, rank), tag), _INT64_MIN)

    def add_histogram(
        self, rank: int, series: int, step: int, histogram: Histogram, wall_time: float, replay: int = 0
    ) -> bool:
        """One rank's histogram for a (series, step); the rank's last one wins. True if late.

        ``replay`` as for ``add_scalars``; the same holds for images and text.
        """
        weight = BLOB_WEIGHT + histogram.counts.nbytes // 8
        return self._add_blob(rank, series, step, wire_pb2.HISTOGRAM, histogram, wall_time, weight, replay)

    def add_images(
        self,
        rank: int,
        series: int,
        step: int,
        images: list[EncodedImage],
        wall_time: float,
        replay: int = 0,
    ) -> bool:
        """One rank's images for a (series, step), in order; the rank's last list wins. True if late."""
        weight = BLOB_WEIGHT + sum(len(image.png) for image in images) // 8
        return self._add_blob(rank, series, step, wire_pb2.IMAGES, tuple(images), wall_time, weight, replay)

    def add_text(
        self, rank: int, series: int, step: int, text: str, wall_time: float, replay: int = 0
    ) -> bool:
        """One rank's text for a (series, step); the rank's last text wins. True if late."""
        weight = BLOB_WEIGHT + len(text) // 8
        return self._add_blob(rank, series, step, wire_pb2.TEXT, text, wall_time, weight, replay)

    def _add_blob(
        self,
        rank: int,
        series: int,
        step: int,
        kind: int,
        payload: Histogram | tuple[EncodedImage, ...] | str,
        wall_time: float,
        weight: int,
        replay: int,
    ) -> bool:
        if not 0 <= series < len(self._series):
            raise ValueError(f"record names series {series}, but only {len(self._series)} are defined")
        step = int(step)
        now = self._clock()
        self._logged(rank, step)
        spec = self._series[series].spec
        # A record of another kind than its series is as good as a conflicting definition.
        if spec.conflict or spec.kind != kind:
            self._conflicts += 1
            return True
        if (replay == REPLAY_MERGED and step <= self._recovered[series]) or (
            replay == REPLAY_LATE and step <= self._written_late(series, rank)
        ):
            self._replayed += 1
            return replay == REPLAY_LATE
        blob = _Blob(payload, float(wall_time), weight)
        if step <= self._last[series]:
            self._late += 1
            self._late_blobs[series, rank, step] = blob
            return True
        held = self._blobs.setdefault(step, {})
        old = held.get((series, rank))
        held[series, rank] = blob
        self._hold(step, weight - (old.weight if old else 0), now)
        return False

    def _hold(self, step: int, count: int, now: float) -> None:
        info = self._open.get(step)
        if info is None:
            info = self._open[step] = _Open(now, now)
            heapq.heappush(self._step_heap, step)
            self._arrivals.append((now, step, info))
        info.last = now
        info.held += count
        self._held += count

    # --- output ----------------------------------------------------------------------------------

    def take_ready(self, now: float | None = None) -> list[MergedStep]:
        """The steps to write now, in increasing step order, and the late records that arrived.

        Complete steps (settled ones included), steps whose first record arrived more than
        ``step_timeout`` before ``now`` (the clock's reading by default) with every open step below
        them, and the oldest steps while more than ``max_open_values`` are held.
        """
        if now is None:
            now = self._clock()
        complete = self._settled(self._frontier(), now)
        limit = complete
        deadline = now - self._timeout
        arrivals = self._arrivals
        while arrivals and arrivals[0][0] < deadline:
            _, step, info = arrivals.popleft()
            if step > limit and self._open.get(step) is info:
                limit = step
        timed_out = limit
        if self._held > self._max_values:
            limit = self._memory_limit(limit)
        return self._take(limit, complete, timed_out)

    def _settled(self, frontier: int, now: float) -> int:
        """``frontier``, or beyond it the last open step that every waited rank has reached and
        that, like every open step below it, has had no record for ``settle`` seconds."""
        if self._settle is None or self._missing or not self._step_heap:
            return frontier
        reached = self._reached()
        if reached <= frontier:
            return frontier
        quiet = now - self._settle
        limit = frontier
        for step in sorted(self._step_heap):
            if step <= frontier:
                continue
            if step > reached or self._open[step].last > quiet:
                break
            limit = step
        return limit

    def settles_at(self) -> float | None:
        """When (by the merger's clock) the lowest open step settles, if it waits only for that:
        every waited rank has reached it and none has moved past it. None otherwise."""
        if self._settle is None or self._missing or not self._step_heap:
            return None
        first = self._step_heap[0]
        if first <= self._frontier():
            return self._clock()  # complete: the next take_ready returns it
        reached = self._reached()
        return self._open[first].last + self._settle if first <= reached else None

    def take_all(self) -> list[MergedStep]:
        """Every open step and late record, as ``take_ready`` would return them (for shutdown)."""
        complete = self._frontier()
        return self._take(_AFTER_ALL, complete, complete)

    def holds(self, step: int) -> bool:
        """Whether records at ``step`` are held in an open step, waiting to be taken.

        Right after ``take_ready`` or ``take_all``, every record added before was either returned
        or dropped and counted, except the records of the steps held: a rank's batch is written
        once none of its steps is held (what a durable acknowledgement needs).
        """
        return step in self._open

    def stats(self) -> MergeStats:
        joined = sum(1 for state in self._state.values() if state)
        return MergeStats(
            open_steps=len(self._open),
            held_values=self._held,
            late=self._late,
            late_dropped=self._late_dropped,
            conflicts=self._conflicts,
            steps_written=self._steps_written,
            steps_timed_out=self._steps_timed_out,
            steps_forced=self._steps_forced,
            replayed=self._replayed,
            waited_ranks=joined + self._missing,
        )

    def _memory_limit(self, limit: int) -> int:
        remaining = self._held
        for step in sorted(self._step_heap):
            if step > limit:
                if remaining <= self._max_values:
                    break
                limit = step
            remaining -= self._open[step].held
        return limit

    def _take(self, limit: int, complete: int, timed_out: int) -> list[MergedStep]:
        taken = []
        heap = self._step_heap
        while heap and heap[0] <= limit:
            step = heapq.heappop(heap)
            self._held -= self._open.pop(step).held
            taken.append(step)
        if not (taken or self._late_chunks or self._late_blobs):
            return []
        out: dict[int, MergedStep] = {}
        if taken:
            self._steps_written += len(taken)
            for step in taken:
                if step > timed_out:
                    self._steps_forced += 1
                elif step > complete:
                    self._steps_timed_out += 1
            self._take_scalars(taken[-1], out)
            for step in taken:
                blobs = self._blobs.pop(step, None)
                if blobs:
                    self._merge_blobs(step, blobs, out)
        if self._late_chunks:
            self._emit_late_scalars(out)
        if self._late_blobs:
            self._emit_late_blobs(out)
        result = []
        for step in sorted(out):
            merged = out[step]
            if math.isfinite(merged.wall_time):
                self._last_wall = max(self._last_wall, merged.wall_time)
            else:  # no valid wall time arrived: the aggregator should have refused it
                merged.wall_time = self._last_wall
            result.append(merged)
        return result

    def _take_scalars(self, last: int, out: dict[int, MergedStep]) -> None:
        """Reduce and emit every held scalar with step <= ``last``; keep the others."""
        take, keep = [], []
        for chunk in self._chunks:
            if chunk.lo > last:
                keep.append(chunk)
            elif chunk.hi <= last:
                take.append(chunk)
            else:
                head, tail = chunk.split(last)
                take.append(head)
                keep.append(tail)
        self._chunks = keep
        self._consolidated = len(keep)
        if not take:
            return
        held = _concat(take)
        lo, hi = held.lo, held.hi
        # Non-finite wall times (refused upstream, normally) take no part in a step's wall time.
        held = held._replace(walls=np.where(np.isfinite(held.walls), held.walls, -np.inf))
        need = int(np.bitwise_or.reduce(self._opbits[held.series]))
        groups = _dense_groups(held, len(self._series), need)
        if groups is None:
            groups = _sorted_groups(held, len(self._series), need)
        group_series, group_steps, reductions, group_walls, (ranks, series, steps, values) = groups

        # The last step written per series.
        np.maximum.at(self._last, group_series, group_steps)

        group_opbits = self._opbits[group_series]
        # One output row per (group, reduction the series writes to its sub-run).
        rows, codes, outs = [], [], []
        for op, reduced in reductions.items():
            chosen = np.flatnonzero(group_opbits & _BIT[op])
            if not chosen.size:
                continue
            rows.append(chosen)
            codes.append(group_series[chosen] * _CODES + op)
            outs.append(reduced[chosen])
        out_steps, step_of_group = _index_steps(group_steps, lo, hi)
        step_walls = np.full(out_steps.size, -np.inf)
        np.maximum.at(step_walls, step_of_group, group_walls)
        for step, wall in zip(out_steps.tolist(), step_walls.tolist(), strict=True):
            merged = out.get(step)
            if merged is None:
                out[step] = MergedStep(step, wall, {})
            elif wall > merged.wall_time:
                merged.wall_time = wall

        if rows:
            # Blocks by (step, sub-run), their values in code order, so that a step with the
            # same tags as the one before reuses its ScalarTags.
            row = np.concatenate(rows)
            code = np.concatenate(codes)
            value = np.concatenate(outs)
            step_index = step_of_group[row]
            path = self._path_index[group_series[row]]
            order = np.lexsort((code, path, step_index))
            code, value, step_index, path = code[order], value[order], step_index[order], path[order]
            cut = np.flatnonzero((step_index[1:] != step_index[:-1]) | (path[1:] != path[:-1])) + 1
            firsts = [0, *cut.tolist()]
            lasts = [*cut.tolist(), code.size]
            block_steps = out_steps[step_index[firsts]].tolist()
            block_paths = path[firsts].tolist()
            for a, b, step, path_id in zip(firsts, lasts, block_steps, block_paths, strict=True):
                block = ScalarBlock(self._scalar_tags(code[a:b]), value[a:b])
                outputs = out[step].outputs
                subrun = self._paths[path_id]
                items = outputs.get(subrun)
                if items is None:
                    outputs[subrun] = [block]
                else:
                    items.append(block)

        per_rank = self._per_rank[series]
        if np.count_nonzero(per_rank):
            specs = self._series
            where = np.flatnonzero(per_rank)
            rank_runs = self._rank_runs
            last_sid = last_step = None
            for sid, step, rank, value in zip(
                series[where].tolist(),
                steps[where].tolist(),
                ranks[where].tolist(),
                values[where].tolist(),
                strict=True,
            ):
                if sid != last_sid:
                    info = specs[sid]
                    tag, prefix, last_sid = info.spec.tag, info.rank_prefix, sid
                if step != last_step:
                    outputs, last_step = out[step].outputs, step
                run = rank_runs.get((prefix, rank)) or self._rank_run(prefix, rank)
                items = outputs.get(run)
                if items is None:
                    items = outputs[run] = []
                items.append(ScalarItem(tag, value))

    def _scalar_tags(self, codes: np.ndarray) -> ScalarTags:
        key = codes.tobytes()
        tags = self._layouts.get(key)
        if tags is None:
            if len(self._layouts) >= _MAX_LAYOUTS:
                self._layouts.clear()
            tags = self._layouts[key] = ScalarTags([self._output_tags[c] for c in codes.tolist()])
        return tags

    def _rank_run(self, prefix: str, rank: int) -> str:
        run = self._rank_runs.get((prefix, rank))
        if run is None:
            run = self._rank_runs[prefix, rank] = f"{prefix}rank_{rank}"
        return run

    def _merge_blobs(
        self, step: int, blobs: dict[tuple[int, int], _Blob], out: dict[int, MergedStep]
    ) -> None:
        by_series: dict[int, list[tuple[int, _Blob]]] = {}
        for (sid, rank), blob in sorted(blobs.items(), key=lambda item: item[0]):
            by_series.setdefault(sid, []).append((rank, blob))
        for sid, entries in by_series.items():
            info = self._series[sid]
            items = _blob_items(info, entries, labelled=True)
            if items:
                _slot(out, step, info.spec.subrun, max(blob.wall for _, blob in entries)).extend(items)
            if step > self._last[sid]:
                self._last[sid] = step

    def _emit_late_scalars(self, out: dict[int, MergedStep]) -> None:
        ranks, series, steps, values, walls, _, _, _ = _concat(self._late_chunks)
        self._late_chunks = []
        # Sorted by (series, rank, step), arrival order kept within; the rank's last value wins.
        order = np.lexsort((steps, ranks, series))
        ranks, series, steps = ranks[order], series[order], steps[order]
        values, walls = values[order], walls[order]
        last = np.ones(series.size, dtype=bool)
        last[:-1] = (series[1:] != series[:-1]) | (ranks[1:] != ranks[:-1]) | (steps[1:] != steps[:-1])
        specs = self._series
        for sid, rank, step, value, wall in zip(
            series[last].tolist(),
            ranks[last].tolist(),
            steps[last].tolist(),
            values[last].tolist(),
            walls[last].tolist(),
            strict=True,
        ):
            if not self._late_step(sid, rank, step):
                continue
            info = specs[sid]
            _slot(out, step, self._rank_run(info.late_prefix, rank), wall).append(
                ScalarItem(info.spec.tag, value)
            )

    def _emit_late_blobs(self, out: dict[int, MergedStep]) -> None:
        blobs = self._late_blobs
        self._late_blobs = {}
        for (sid, rank, step), blob in sorted(blobs.items(), key=lambda item: item[0]):
            if not self._late_step(sid, rank, step):
                continue
            info = self._series[sid]
            items = _blob_items(info, [(rank, blob)], labelled=False)
            if items:
                _slot(out, step, self._rank_run(info.late_prefix, rank), blob.wall).extend(items)

    def _late_step(self, sid: int, rank: int, step: int) -> bool:
        """Whether a late record at ``step`` may go to its late run; counts it dropped if not."""
        last = self._late_last.get((sid, rank))
        if last is None:
            last = self._written_late(sid, rank)
        if step <= last:
            self._late_dropped += 1
            return False
        self._late_last[sid, rank] = step
        return True


def _slot(out: dict[int, MergedStep], step: int, run: str, wall: float) -> list[Item]:
    merged = out.get(step)
    if merged is None:
        merged = out[step] = MergedStep(step, -math.inf, {})
    if wall > merged.wall_time:
        merged.wall_time = wall
    return merged.outputs.setdefault(run, [])


def _blob_items(info: _Series, entries: list[tuple[int, _Blob]], *, labelled: bool) -> list[Item]:
    """The items of one series at one step from its ranks' blobs, given in rank order.

    Histograms merge; images are gathered and cut to ``max_outputs``; texts are joined, each
    under a rank label if ``labelled`` (a late run holds one rank's text, written as it is).
    """
    spec = info.spec
    if spec.kind == wire_pb2.HISTOGRAM:
        merged = Histogram.merge_all(cast(Histogram, blob.payload) for _, blob in entries)
        return [HistogramItem(spec.tag, merged)]
    if spec.kind == wire_pb2.IMAGES:
        images = [image for _, blob in entries for image in cast(tuple[EncodedImage, ...], blob.payload)]
        return [ImageItem(tag, image) for tag, image in zip(info.image_tags, images, strict=False)]
    texts = [(rank, cast(str, blob.payload)) for rank, blob in entries]
    if not labelled:
        return [TextItem(spec.tag, text) for _, text in texts]
    return [TextItem(spec.tag, _TEXT_SEPARATOR.join(f"**rank {rank}**\n\n{text}" for rank, text in texts))]
