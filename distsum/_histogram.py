"""Histograms on TF1's fixed bucket grid, so histograms from many ranks merge exactly.

A ``Histogram`` keeps one count per bucket of TensorFlow's default grid (``BUCKET_LIMITS``, 1551
buckets, limits growing by 10% from 1e-12 to about 1e20 on each side of zero), never a grid of its
own. Two histograms therefore merge by adding counts, and the merged histogram is exactly the one
the combined values would have given. Bucket ``i`` holds the values ``v`` with
``BUCKET_LIMITS[i-1] <= v < BUCKET_LIMITS[i]`` (TF's ``upper_bound``); bucket 0 holds only values
below ``-DBL_MAX``, so it is always empty, and ``DBL_MAX`` itself, which TF would place one past
the end, goes to the last bucket.

Non-finite values: TF's summary op rejects a histogram with a NaN or an infinity, which would
stop a training job because one gradient overflowed. Here NaN, +inf and -inf are left out of the
buckets and out of ``min``/``max``/``sum``/``sum_squares`` and only counted, in ``nan``,
``posinf`` and ``neginf``; ``num`` counts the finite values. ``sum`` and ``sum_squares`` are float64
sums, like TF's, and like TF's they can overflow for finite values: ``sum_squares`` to +inf once a
value passes about 1.3e154, ``sum`` to ±inf or NaN near ``DBL_MAX``.
Both are NaN in a histogram bound only for an event file, which has no place for them.

An empty histogram (no finite value) has ``min = +inf`` and ``max = -inf`` in memory, the identity
of min/max, so merging needs no special case. On disk it becomes ``min = max = 0.0`` (TF writes
``DBL_MAX``/``-DBL_MAX``, which TensorBoard's Rust loader turns into one huge backwards bucket).

Disk forms: ``tensor_bytes`` gives the TF2 ``[k, 3]`` float64 tensor that both TensorBoard
loaders serve identically; ``to_histogram_proto`` gives TF1's legacy ``HistogramProto``.
``to_sparse``/``from_parts`` are the compact form for the wire, with ``from_parts`` checking
everything, because the aggregator feeds it what ranks sent.
"""

from __future__ import annotations

import bisect
import builtins
import dataclasses
import math
import numbers
import threading
from collections.abc import Iterable
from typing import Any

import numpy as np

from distsum._proto import histogram_pb2, types_pb2, varint

try:
    # The bucketing below in C, one pass over the values (distsum/_bucketing.c), built at install
    # when a C compiler is there; without it, from_values uses the numpy code.
    from distsum import _bucketing
except ImportError:
    _bucketing = None  # type: ignore[assignment]

__all__ = ["BUCKET_LIMITS", "NUM_BUCKETS", "Histogram"]

_DBL_MAX = float(np.finfo(np.float64).max)
_INT64_MAX = 2**63 - 1


def _default_bucket_limits() -> np.ndarray:
    # The same double multiplications as TF's InitDefaultBucketsInner: 1e-12 * 1.1**k rounds
    # differently for some k, and a limit one ulp off would put a value in the wrong bucket.
    positives = []
    limit = 1e-12
    while limit < 1e20:
        positives.append(limit)
        limit *= 1.1
    pos = np.array(positives, dtype=np.float64)
    limits = np.concatenate([[-_DBL_MAX], -pos[::-1], [0.0], pos, [_DBL_MAX]])
    limits.setflags(write=False)
    return limits


BUCKET_LIMITS: np.ndarray = _default_bucket_limits()
NUM_BUCKETS: int = len(BUCKET_LIMITS)  # 1551

# Bucketing works on bit patterns: a float32 or float64 value read as an unsigned integer of its
# width (float16 and small integers come as float32, everything else as float64; both exact). A
# pattern's top 16 bits, its *key* (sign, exponent and the top 7 or 4 mantissa bits), name a
# *cell* of consecutive patterns: values of one sign spanning at most 1/16 of their magnitude,
# less than the 10% between neighbouring limits, so at most one bucket boundary falls inside a
# cell. (Where that reasoning fails, among zero and the subnormals, all values are within 1e-12 of
# zero: the one boundary there is the limit 0.0, between -0.0 and the negatives.) Within a sign a
# larger pattern is a larger magnitude, so buckets go up with the patterns of positive values and
# down with those of negative ones. A value's *tally index* is its bucket if its sign bit is clear
# and _NEGATIVE - bucket if set: it goes up with the pattern everywhere, one step per boundary.
# _bucketing.c takes the same tables and does the same arithmetic value by value; the numpy code
# here does it a chunk at a time.
_NUM_KEYS = 1 << 16
_NEGATIVE = 2 * NUM_BUCKETS


def _index_table(float_type: type[np.floating]) -> np.ndarray:
    """Indexed by key: the one lookup that turns bit patterns of ``float_type`` into tally indices.

    With ``s`` the pattern's width less 16, the tally index of pattern ``p`` is
    ``(p + table[p >> s]) >> s`` in the pattern's wrapping unsigned arithmetic. For key ``k``,
    whose cell's first pattern has tally index ``t``: if a boundary falls inside the cell, the
    first pattern past it being ``(k << s) + o``, then ``table[k] = (t << s) + 2**s - o - (k << s)``,
    so ``p``'s low bits carry into ``t`` exactly from ``o`` on; without a boundary the ``2**s - o``
    term is 0. NaN and infinity keys get 0, which makes their tally index the key itself, past the
    tally: non-finite values are removed before bucketing, and one that was not would raise.
    """
    unsigned = np.dtype(f"u{np.dtype(float_type).itemsize}").type
    shift = np.dtype(unsigned).itemsize * 8 - 16
    keys = np.arange(_NUM_KEYS, dtype=np.uint64)
    first = (keys << np.uint64(shift)).astype(unsigned).view(float_type)
    finite = np.isfinite(first)
    bucket = np.zeros(_NUM_KEYS, dtype=np.int64)
    # A cell's first pattern is never DBL_MAX itself, so this is at most the last bucket.
    bucket[finite] = np.searchsorted(BUCKET_LIMITS, first[finite].astype(np.float64), side="right")
    negative = keys >= _NUM_KEYS // 2
    # The first pattern past the boundary that follows a cell's first value, in pattern order: for
    # a positive cell the least value of the type at or above the limit over that value; for a
    # negative cell the greatest below the limit at or under it. The last bucket has no boundary
    # above (DBL_MAX stays in it), and below -DBL_MAX, the boundary under the first bucket that can
    # hold a value, there is no finite value.
    past = np.full(_NUM_KEYS, np.inf, dtype=float_type)
    up = finite & ~negative & (bucket < NUM_BUCKETS - 1)
    down = finite & negative
    with np.errstate(over="ignore"):
        limit = BUCKET_LIMITS[bucket[up]]
        nearest = limit.astype(float_type)
        past[up] = np.where(nearest < limit, np.nextafter(nearest, float_type(np.inf)), nearest)
        limit = BUCKET_LIMITS[bucket[down] - 1]
        nearest = limit.astype(float_type)
        past[down] = np.where(nearest >= limit, np.nextafter(nearest, float_type(-np.inf)), nearest)
    past_bits = past.view(unsigned).astype(np.uint64)
    inside = finite & ((past_bits >> np.uint64(shift)) == keys)
    carry = np.zeros(_NUM_KEYS, dtype=np.uint64)
    cell = np.uint64(1 << shift)
    carry[inside] = cell - (past_bits[inside] & (cell - np.uint64(1)))
    tally_index = np.where(negative, _NEGATIVE - bucket, bucket).astype(np.uint64)
    table = np.where(finite, (tally_index << np.uint64(shift)) + carry - (keys << np.uint64(shift)), 0)
    table = (table & np.uint64((1 << (shift + 16)) - 1)).astype(unsigned)
    table.setflags(write=False)
    return table


_INDEX_TABLES = {np.dtype(t): _index_table(t) for t in (np.float32, np.float64)}

# Values are bucketed this many at a time, so that the buffers stay in the CPU cache.
_CHUNK = 1 << 16


def _tally_indices(bits: np.ndarray, keys: np.ndarray, looked: np.ndarray) -> np.ndarray:
    """The tally index of each of ``bits`` (uint32 or uint64 patterns of finite values), in ``keys``.

    ``keys`` is an intp buffer and ``looked`` one of ``bits``' dtype, both of ``bits``' length;
    for uint64 patterns they may be the same memory (take reads each key before it writes that
    element). One lookup per value and no comparison: the carry of an addition does the
    comparison with the boundary.
    """
    table = _INDEX_TABLES[np.dtype(f"f{bits.dtype.itemsize}")]
    shift = bits.dtype.type(bits.dtype.itemsize * 8 - 16)
    # uint32 results are widened on the way out; uint64 ones go into the same memory as they are,
    # since a cast from uint64 to intp takes the ufunc's slow path.
    out = keys.view(np.uint64) if bits.dtype.itemsize == 8 else keys
    np.right_shift(bits, shift, out=out, casting="unsafe")
    # mode="wrap" because "raise" copies the indices first and "clip" measured slower; every key
    # is in range.
    np.take(table, keys, out=looked, mode="wrap")
    np.add(looked, bits, out=looked)
    np.right_shift(looked, shift, out=out, casting="unsafe")
    return keys


def _as_float_vector(values: np.ndarray, tag: str) -> np.ndarray:
    """``values`` flattened to a contiguous native float32 or float64 array, without loss."""
    array = np.asarray(values)
    if array.dtype in _INDEX_TABLES and array.flags.c_contiguous:
        # What the client hands over (its own copy): a view, without errstate's Python around it.
        return array.reshape(-1)
    kind = array.dtype.kind
    if kind not in "iuf":
        what = "bool" if kind == "b" else str(array.dtype)
        raise TypeError(f"histogram values for tag {tag!r} must be real numbers, got dtype {what}")
    # float16 and small integers are exact in float32, half the bytes to copy (bucketing widens
    # them a chunk at a time); everything else goes through float64, the type TF's histogram
    # works in.
    exact_in_float32 = array.dtype.itemsize <= 2 or (kind == "f" and array.dtype.itemsize == 4)
    target = np.float32 if exact_in_float32 else np.float64
    with np.errstate(over="ignore"):
        # A long double beyond float64's range becomes an infinity, as it would in TF.
        return np.ascontiguousarray(array.reshape(-1), dtype=target)


class _Buffers(threading.local):
    """Each thread's scratch arrays for bucketing, kept between calls: fresh ones of this size
    come from the kernel on every call and page-fault in, which cost more than the bucketing of
    1e5 values."""

    def __init__(self) -> None:
        self.scratch = np.empty(_CHUNK, dtype=np.float64)
        self.wide = np.empty(_CHUNK, dtype=np.float64)


_buffers = _Buffers()


def _bucket_counts(x: np.ndarray, *, sums: bool) -> tuple[np.ndarray, float, float]:
    """Bucket counts of ``x`` (finite, 1-D, contiguous float32/float64), with its sum and sum of
    squares if ``sums``, else NaN for both: they are four of the bucketing's ten passes over the
    values (widening, square, two sums), over a quarter of its time."""
    buffers = _buffers
    tally = np.zeros(_NEGATIVE, dtype=np.int64)
    total = total_squares = 0.0 if sums else math.nan
    size = min(x.size, _CHUNK)
    # One scratch buffer, for the squares and then the tally indices; float32 values are widened
    # into another, which then takes their lookups: fewer bytes in cache.
    scratch = buffers.scratch[:size]
    wide = x if x.dtype == np.float64 else buffers.wide[:size]
    with np.errstate(over="ignore", invalid="ignore"):
        for start in range(0, x.size, _CHUNK):
            chunk = x[start : start + _CHUNK]
            n = chunk.size
            if n != size:
                scratch = scratch[:n]
                if wide is not x:
                    wide = wide[:n]
            if sums:
                # Summed as float64, like TF does: float32 values are widened first, exactly.
                if wide is x:
                    part = chunk
                else:
                    np.copyto(wide, chunk)
                    part = wide
                # einsum: np.dot's BLAS would start threads costing more CPU than they save, and
                # sum()'s pairwise summation takes twice as long. einsum keeps a few running sums
                # side by side (TF keeps one), so the sums differ from TF's only in rounding.
                # Summing before bucketing measured 5% faster.
                total += float(np.einsum("i->", part))
                squares = np.square(part, out=scratch)
                total_squares += float(np.einsum("i->", squares))
            # Bucketed on their own bit patterns: float32 ones need a table of half the size.
            bits = chunk.view(f"u{chunk.dtype.itemsize}")
            keys = scratch.view(np.intp)
            looked = keys.view(np.uint64) if wide is x else wide.view(np.uint32)[:n]
            # np.bincount rather than np.add.at: 5-7% less time for the whole bucketing (numpy
            # 2.4), although it scans the indices for their extremes and allocates fresh counts.
            tally += np.bincount(_tally_indices(bits, keys, looked), minlength=_NEGATIVE)
    counts = tally[:NUM_BUCKETS].copy()
    # The negative values' tally indices, _NEGATIVE - bucket, folded onto their buckets.
    counts[1:] += tally[:NUM_BUCKETS:-1]
    return counts, total, total_squares


def _bucket_indices(values: np.ndarray) -> np.ndarray:
    """The bucket of each finite value (for tests: the per-value result behind ``from_values``)."""
    x = _as_float_vector(values, "<test>")
    bits = x.view(f"u{x.dtype.itemsize}")
    indices = _tally_indices(bits, np.empty(x.size, dtype=np.intp), np.empty_like(bits))
    return np.where(indices > NUM_BUCKETS, _NEGATIVE - indices, indices)


def _count(value: object, name: str) -> int:
    if type(value) is int and 0 <= value <= _INT64_MAX:  # what the wire gives: no ABC check
        return value
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    result = int(value)
    if not 0 <= result <= _INT64_MAX:
        raise ValueError(f"{name} must be in [0, 2**63), got {result}")
    return result


def _real(value: object, name: str) -> float:
    if type(value) is float:
        return value
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        raise ValueError(f"{name} must be a real number, got {value!r}")
    return float(value)


def _integer_vector(value: object, name: str) -> np.ndarray:
    array = np.asarray(value)
    if array.ndim != 1:
        raise ValueError(f"{name} must be one-dimensional, got shape {array.shape}")
    # An empty list arrives as float64; only a non-empty array has a dtype worth checking.
    if array.size and array.dtype.kind not in "iu":
        raise ValueError(f"{name} must hold integers, got dtype {array.dtype}")
    return array


def _same_float(a: float, b: float) -> bool:
    return a == b or (math.isnan(a) and math.isnan(b))


@dataclasses.dataclass(frozen=True, eq=False)
class Histogram:
    """Counts on TF1's 1551-bucket grid plus exact statistics of the finite values.

    Build one with ``from_values``, ``from_parts`` (checked) or ``empty``; the constructor trusts
    its arguments. ``counts`` is read-only. Equality compares every field, with NaN sums equal.
    """

    counts: np.ndarray
    """int64, one count per bucket of ``BUCKET_LIMITS``."""
    min: float
    """Smallest finite value; +inf when there is none."""
    max: float
    """Largest finite value; -inf when there is none."""
    num: int
    """Number of finite values, ``counts.sum()``."""
    sum: float
    """float64 sum of the finite values; NaN if not computed (see ``from_values``)."""
    sum_squares: float
    """float64 sum of their squares; NaN if not computed."""
    nan: int = 0
    posinf: int = 0
    neginf: int = 0

    def __post_init__(self) -> None:
        counts = np.asarray(self.counts, dtype=np.int64)
        if counts.shape != (NUM_BUCKETS,):
            raise ValueError(f"counts must have shape ({NUM_BUCKETS},), got {counts.shape}")
        # A read-only view: a Histogram may be shared between threads and merged from later.
        counts = counts.view()
        counts.setflags(write=False)
        object.__setattr__(self, "counts", counts)

    @classmethod
    def empty(cls) -> Histogram:
        """A histogram of no values."""
        return cls(np.zeros(NUM_BUCKETS, dtype=np.int64), math.inf, -math.inf, 0, 0.0, 0.0)

    @classmethod
    def from_values(cls, values: np.ndarray, *, tag: str, sums: bool = True) -> Histogram:
        """The histogram of every element of ``values``, a real-valued array of any shape.

        Integers are bucketed as their float64 value, as TF does. NaN and infinities are only
        counted. Raises TypeError naming ``tag`` for bool, complex, string or object arrays.
        Without ``sums``, ``sum`` and ``sum_squares`` are NaN: TF1's ``HistogramProto`` has them,
        but the TF2 tensor that event files hold (``tensor_bytes``) does not, so a histogram
        bound only for an event file need not pay for them.
        """
        x = _as_float_vector(values, tag)
        if x.size == 0:
            return cls.empty()
        if _bucketing is not None:
            counts = np.zeros(NUM_BUCKETS, dtype=np.int64)
            low, high, nan, posinf, neginf, total, total_squares = _bucketing.bucket(
                x, _INDEX_TABLES[x.dtype], counts, sums
            )
            num = x.size - nan - posinf - neginf
            if num and not sums:
                total = total_squares = math.nan
            return cls(counts, low, high, num, total, total_squares, nan, posinf, neginf)
        nan = posinf = neginf = 0
        # min/max propagate NaN and reach the infinities, so two cheap reductions tell whether
        # the common all-finite case can skip the masking below.
        low, high = x.min(), x.max()
        if not (np.isfinite(low) and np.isfinite(high)):
            finite = np.isfinite(x)
            posinf = int(np.count_nonzero(x == np.inf))
            neginf = int(np.count_nonzero(x == -np.inf))
            nan = x.size - int(np.count_nonzero(finite)) - posinf - neginf
            x = x[finite]
            if x.size == 0:
                zeros = np.zeros(NUM_BUCKETS, dtype=np.int64)
                return cls(zeros, math.inf, -math.inf, 0, 0.0, 0.0, nan, posinf, neginf)
            low, high = x.min(), x.max()
        counts, total, total_squares = _bucket_counts(x, sums=sums)
        return cls(counts, float(low), float(high), x.size, total, total_squares, nan, posinf, neginf)

    @classmethod
    def from_parts(
        cls,
        indices: Any,
        counts: Any,
        *,
        min: float,
        max: float,
        sum: float,
        sum_squares: float,
        nan: int,
        posinf: int,
        neginf: int,
        num: int | None = None,
    ) -> Histogram:
        """Rebuild a histogram from its sparse form (``to_sparse``) and statistics, checking all.

        ``indices`` must be strictly increasing bucket indices and ``counts`` positive; ``min``
        and ``max`` must fall in the first and last of those buckets (or be +inf/-inf with no
        buckets); ``num``, if given, must equal the total count. Raises ValueError otherwise.
        """
        index_array = _integer_vector(indices, "indices")
        count_array = _integer_vector(counts, "counts")
        n = index_array.size
        if n != count_array.size:
            raise ValueError(f"{n} indices but {count_array.size} counts")
        # The aggregator runs this for every histogram of every rank, so the common case takes
        # few passes: the ends of strictly increasing indices bound all of them. (As intp, an
        # index of 2**63 or more turns negative, and is refused either way.)
        index_array = index_array.astype(np.intp, copy=False)
        if n and (index_array[0] < 0 or index_array[-1] >= NUM_BUCKETS):
            raise ValueError(
                f"bucket indices must be in [0, {NUM_BUCKETS}), got {index_array.min()}..{index_array.max()}"
            )
        # The ufuncs themselves rather than np.diff, .min() and .max(): their Python wrappers cost
        # more than the work on some hundred buckets.
        if n > 1 and np.logical_or.reduce(np.less_equal(index_array[1:], index_array[:-1])):
            raise ValueError("bucket indices must be strictly increasing")
        lowest, highest = (
            (int(np.minimum.reduce(count_array)), int(np.maximum.reduce(count_array))) if n else (1, 0)
        )
        if lowest <= 0 or highest > _INT64_MAX:
            raise ValueError(f"counts must be in [1, 2**63), got {lowest}..{highest}")
        # At most NUM_BUCKETS counts now: numpy's sum cannot overflow below this bound, Python
        # ints take the rest.
        if highest <= _INT64_MAX // NUM_BUCKETS:
            total = int(np.add.reduce(count_array))
        else:
            total = builtins.sum(count_array.tolist())
        if total > _INT64_MAX:
            raise ValueError(f"total count {total} does not fit in int64")
        if num is not None and _count(num, "num") != total:
            raise ValueError(f"num is {num} but the counts add up to {total}")
        low, high = _real(min, "min"), _real(max, "max")
        total_sum, squares = _real(sum, "sum"), _real(sum_squares, "sum_squares")
        non_finite = [_count(nan, "nan"), _count(posinf, "posinf"), _count(neginf, "neginf")]
        # NaN sums were not computed (from_values without sums); a sum of squares is never NaN
        # otherwise.
        if not (squares >= 0 or math.isnan(squares)):
            raise ValueError(f"sum_squares must be >= 0 or NaN, got {squares}")
        if total == 0:
            if not (low == math.inf and high == -math.inf and total_sum == 0 and squares == 0):
                raise ValueError(
                    "a histogram without finite values must have min=inf, max=-inf, sum=0 and "
                    f"sum_squares=0, got {low}, {high}, {total_sum}, {squares}"
                )
        else:
            if not (math.isfinite(low) and math.isfinite(high) and low <= high):
                raise ValueError(f"min and max must be finite with min <= max, got {low}, {high}")
            first, last = int(index_array[0]), int(index_array[-1])
            if _bucket_of(low) != first or _bucket_of(high) != last:
                raise ValueError(
                    f"min {low} and max {high} must lie in the first and last non-empty buckets "
                    f"({first} and {last})"
                )
            if total == 1 and low != high:
                raise ValueError(f"a single value must have min == max, got {low}, {high}")
        full = np.zeros(NUM_BUCKETS, dtype=np.int64)
        full[index_array] = count_array
        return cls(full, low, high, total, total_sum, squares, *non_finite)

    def to_sparse(self) -> tuple[np.ndarray, np.ndarray]:
        """The indices (uint16) of the non-empty buckets and their counts (int64)."""
        indices = self.counts.nonzero()[0]  # flatnonzero's two Python wrappers cost more here
        return indices.astype(np.uint16), self.counts[indices]

    def merge(self, other: Histogram) -> Histogram:
        """The histogram of both histograms' values together; exact up to the float sums."""
        if not isinstance(other, Histogram):
            raise TypeError(f"can only merge a Histogram, got {type(other).__name__}")
        return Histogram(
            self.counts + other.counts,
            self.min if self.min <= other.min else other.min,
            self.max if self.max >= other.max else other.max,
            self.num + other.num,
            self.sum + other.sum,
            self.sum_squares + other.sum_squares,
            self.nan + other.nan,
            self.posinf + other.posinf,
            self.neginf + other.neginf,
        )

    @classmethod
    def merge_all(cls, histograms: Iterable[Histogram]) -> Histogram:
        """The merge of any number of histograms (``empty()`` for none), added in order."""
        counts = np.zeros(NUM_BUCKETS, dtype=np.int64)
        low, high, num, total, squares = math.inf, -math.inf, 0, 0.0, 0.0
        nan = posinf = neginf = 0
        for histogram in histograms:
            if not isinstance(histogram, Histogram):
                raise TypeError(f"can only merge Histograms, got {type(histogram).__name__}")
            counts += histogram.counts
            low = low if low <= histogram.min else histogram.min
            high = high if high >= histogram.max else histogram.max
            num += histogram.num
            total += histogram.sum
            squares += histogram.sum_squares
            nan += histogram.nan
            posinf += histogram.posinf
            neginf += histogram.neginf
        return cls(counts, low, high, num, total, squares, nan, posinf, neginf)

    def _collapsed(self, start: int = 0, stop: int = NUM_BUCKETS) -> np.ndarray:
        """Indices in ``[start, stop)`` of the buckets TF's ``EncodeToProto(preserve_zero_buckets=
        false)`` writes.

        Every non-empty bucket, and of each run of empty buckets its last one, which stands for
        the whole run. The range's last bucket is always written, so over the whole grid an empty
        histogram gives (DBL_MAX, 0).
        """
        written = self.counts[start:stop] > 0
        written[:-1] |= written[1:]
        written[-1] = True
        return written.nonzero()[0] + start

    def rows(self) -> np.ndarray:
        """The ``[k, 3]`` float64 rows ``[left, right, count]`` that ``tensor_bytes`` writes.

        TensorBoard's own legacy-to-TF2 conversion of ``to_histogram_proto()``, in float64: the
        collapsed buckets from the first to the last non-empty one, with ``min`` and ``max`` as
        the outer edges so no bucket reaches out to ±DBL_MAX.
        """
        if self.num == 0:
            return np.zeros((0, 3), dtype=np.float64)
        nonempty = self.counts.nonzero()[0]
        # Only the span of non-empty buckets: the aggregator does this for every histogram it
        # writes, and the whole grid costs more.
        kept = self._collapsed(int(nonempty[0]), int(nonempty[-1]) + 1)
        rows = np.empty((kept.size, 3), dtype=np.float64)
        rows[:, 1] = BUCKET_LIMITS[kept]
        rows[1:, 0] = rows[:-1, 1]
        rows[0, 0] = self.min
        rows[-1, 1] = self.max
        rows[:, 2] = self.counts[kept]
        return rows

    def tensor_bytes(self) -> bytes:
        """The serialized TF2 histogram tensor: DT_DOUBLE, shape ``[k, 3]``, rows from ``rows()``.

        Encoded here rather than through protobuf's classes: the aggregator writes one per
        histogram per step, and four message objects cost more than the bytes.
        """
        rows = self.rows()
        # TensorProto{dtype (1), tensor_shape (2): {dim (2): {size (1)}, dim}, tensor_content (4)};
        # proto3 leaves out a size of 0, as protobuf's own serializer does.
        size = varint(rows.shape[0])
        first = b"\x12\x00" if rows.shape[0] == 0 else b"\x12" + varint(len(size) + 1) + b"\x08" + size
        shape = first + b"\x12\x02\x08\x03"
        content = rows.astype("<f8", copy=False).tobytes()
        head = b"\x08" + varint(types_pb2.DT_DOUBLE) + b"\x12" + varint(len(shape)) + shape
        if not content:
            return head
        return b"".join((head, b"\x22", varint(len(content)), content))

    def to_histogram_proto(self) -> histogram_pb2.HistogramProto:
        """TF1's legacy ``HistogramProto``, runs of empty buckets collapsed as TF collapses them.

        Without finite values, ``min`` and ``max`` are written as 0.0 rather than TF's
        ``DBL_MAX``/``-DBL_MAX``.
        """
        written = self._collapsed()
        empty = self.num == 0
        return histogram_pb2.HistogramProto(
            min=0.0 if empty else self.min,
            max=0.0 if empty else self.max,
            num=float(self.num),
            sum=self.sum,
            sum_squares=self.sum_squares,
            bucket_limit=BUCKET_LIMITS[written].tolist(),
            bucket=self.counts[written].astype(np.float64).tolist(),
        )

    @classmethod
    def from_histogram_proto(cls, proto: Any) -> Histogram | None:
        """The histogram a legacy ``HistogramProto`` on TF1's default grid describes, exactly.

        None if its bucket limits are not TF1's (another writer's grid cannot be merged
        exactly) or it is inconsistent. The proto carries no non-finite counts.
        """
        limits = np.asarray(proto.bucket_limit, dtype=np.float64)
        counts = np.asarray(proto.bucket, dtype=np.float64)
        if limits.size != counts.size:
            return None
        keep = counts > 0
        limits, counts = limits[keep], counts[keep]
        indices = np.searchsorted(BUCKET_LIMITS, limits)
        if np.any(indices >= NUM_BUCKETS) or not np.array_equal(
            BUCKET_LIMITS[np.minimum(indices, NUM_BUCKETS - 1)], limits
        ):
            return None
        if not np.array_equal(counts, np.round(counts)):
            return None
        empty = counts.size == 0
        try:
            return cls.from_parts(
                indices,
                counts.astype(np.int64),
                min=math.inf if empty else proto.min,
                max=-math.inf if empty else proto.max,
                sum=0.0 if empty else proto.sum,
                sum_squares=0.0 if empty else proto.sum_squares,
                nan=0,
                posinf=0,
                neginf=0,
            )
        except ValueError:
            return None

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Histogram):
            return NotImplemented
        return (
            np.array_equal(self.counts, other.counts)
            and (self.min, self.max, self.num) == (other.min, other.max, other.num)
            and (self.nan, self.posinf, self.neginf) == (other.nan, other.posinf, other.neginf)
            and _same_float(self.sum, other.sum)
            and _same_float(self.sum_squares, other.sum_squares)
        )

    def __repr__(self) -> str:
        return (
            f"Histogram(num={self.num}, min={self.min!r}, max={self.max!r}, sum={self.sum!r}, "
            f"sum_squares={self.sum_squares!r}, nonempty_buckets={np.count_nonzero(self.counts)}, "
            f"nan={self.nan}, posinf={self.posinf}, neginf={self.neginf})"
        )


_LIMITS = BUCKET_LIMITS.tolist()


def _bucket_of(value: float) -> int:
    # bisect on a list: a tenth of np.searchsorted's time for one value, the same comparisons.
    return min(bisect.bisect_right(_LIMITS, value), NUM_BUCKETS - 1)
