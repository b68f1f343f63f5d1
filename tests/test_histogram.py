"""Histograms on TF1's bucket grid: the grid, exact bucketing, merging, and what TensorBoard shows."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator
from typing import Literal

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from tensorboard import data_compat
from tensorboard.compat.proto import summary_pb2 as tb_summary_pb2
from tensorboard.compat.proto import tensor_pb2 as tb_tensor_pb2
from tensorboard.util import tensor_util

from distsum import _histogram
from distsum._histogram import _CHUNK, BUCKET_LIMITS, NUM_BUCKETS, Histogram, _bucket_indices
from distsum._proto import tensor_pb2, tensor_shape_pb2, types_pb2

DBL_MAX = float(np.finfo(np.float64).max)


@pytest.fixture(autouse=True, scope="module", params=["compiled", "numpy"])
def bucketing(request: pytest.FixtureRequest) -> Iterator[str]:
    """Every test here runs with each bucketing: the C extension and the numpy code without it."""
    compiled = _histogram._bucketing
    if request.param == "compiled":
        assert compiled is not None, "distsum._bucketing is not built: reinstall distsum with a C compiler"
        yield request.param
    else:
        _histogram._bucketing = None
        try:
            yield request.param
        finally:
            _histogram._bucketing = compiled


def reference_buckets(values: np.ndarray) -> np.ndarray:
    """TF's ``upper_bound`` on the float64 values, finite ones only; DBL_MAX stays in the last bucket."""
    x = np.asarray(values, dtype=np.float64).ravel()
    x = x[np.isfinite(x)]
    return np.minimum(np.searchsorted(BUCKET_LIMITS, x, side="right"), NUM_BUCKETS - 1)


def reference_counts(values: np.ndarray) -> np.ndarray:
    return np.bincount(reference_buckets(values), minlength=NUM_BUCKETS)


def finite64(values: np.ndarray) -> np.ndarray:
    x = np.asarray(values, dtype=np.float64).ravel()
    return x[np.isfinite(x)]


def assert_sums_close(histogram: Histogram, values: np.ndarray) -> None:
    """``sum`` and ``sum_squares`` are float64 sums added in no particular order (chunk by chunk,
    several running sums in each): each must be within 1e-12 of the exact sum, relative to the
    sum of the terms' magnitudes."""
    wide = finite64(values)
    assert abs(histogram.sum - math.fsum(wide)) <= 1e-12 * math.fsum(np.abs(wide))
    squares = wide * wide
    assert abs(histogram.sum_squares - math.fsum(squares)) <= 1e-12 * math.fsum(squares)


def edge_values(dtype: type[np.floating]) -> np.ndarray:
    """Values of ``dtype`` where bucketing can go wrong: on and next to every limit, and the extremes."""
    info = np.finfo(dtype)
    with np.errstate(over="ignore"):
        on = BUCKET_LIMITS.astype(dtype)
        values = np.concatenate(
            [
                on,
                np.nextafter(on, dtype(np.inf)),
                np.nextafter(on, dtype(-np.inf)),
                np.array([0.0, -0.0, info.smallest_subnormal, info.tiny, info.max, info.eps], dtype=dtype),
            ]
        )
    values = np.concatenate([values, -values])
    return values[np.isfinite(values)]


def float_arrays(dtype: type[np.floating], *, max_abs: float | None = None) -> st.SearchStrategy:
    """Arrays of any shape mixing arbitrary floats (NaN and infinities too) with edge values."""
    width: Literal[32, 64] = 32 if dtype is np.float32 else 64
    edges = edge_values(dtype)
    if max_abs is None:
        floats = st.floats(width=width)
    else:
        edges = edges[np.abs(edges) <= max_abs]
        floats = st.floats(-max_abs, max_abs, width=width) | st.sampled_from([math.nan, math.inf, -math.inf])
    elements = floats | st.sampled_from(edges.tolist())
    shapes = hnp.array_shapes(min_dims=0, max_dims=2, min_side=0, max_side=30)
    return hnp.arrays(dtype, shapes, elements=elements)


any_float_array = float_arrays(np.float32) | float_arrays(np.float64)


def tensorboard_rows(histogram: Histogram) -> np.ndarray:
    """The ``[k, 3]`` rows TensorBoard's Python loader makes of ``to_histogram_proto()``."""
    legacy = tb_summary_pb2.HistogramProto.FromString(histogram.to_histogram_proto().SerializeToString())
    value = tb_summary_pb2.Summary.Value(tag="h", histo=legacy)
    return tensor_util.make_ndarray(data_compat.migrate_value(value).tensor)


def tensor_rows(histogram: Histogram) -> np.ndarray:
    """Our ``tensor_bytes()`` decoded by TensorBoard's own ``make_ndarray``."""
    proto = tb_tensor_pb2.TensorProto.FromString(histogram.tensor_bytes())
    return tensor_util.make_ndarray(proto)


def encode_to_proto(counts: np.ndarray) -> tuple[list[float], list[float]]:
    """A line-by-line port of TF's ``Histogram::EncodeToProto(preserve_zero_buckets=false)``."""
    limits, buckets = [], []
    i = 0
    while i < len(counts):
        end, count = BUCKET_LIMITS[i], counts[i]
        i += 1
        if count <= 0:
            while i < len(counts) and counts[i] <= 0:
                end, count = BUCKET_LIMITS[i], counts[i]
                i += 1
        limits.append(float(end))
        buckets.append(float(count))
    return limits, buckets


# --- The grid ----------------------------------------------------------------------------------


def test_grid_shape():
    limits = BUCKET_LIMITS
    assert limits.dtype == np.float64
    assert len(limits) == NUM_BUCKETS == 1551
    positive = limits[(limits > 0) & (limits < DBL_MAX)]
    assert len(positive) == 774
    assert positive[0] == 1e-12
    assert positive[-1] < 1e20 <= positive[-1] * 1.1
    assert limits[0] == -DBL_MAX and limits[-1] == DBL_MAX and limits[775] == 0.0
    np.testing.assert_array_equal(limits, -limits[::-1])
    assert np.all(np.diff(limits) > 0)
    assert not limits.flags.writeable


def test_grid_is_repeated_multiplication():
    expected, limit = [], 1e-12
    while limit < 1e20:
        expected.append(limit)
        limit *= 1.1
    np.testing.assert_array_equal(BUCKET_LIMITS[776:-1], expected)
    # The closed form rounds differently for most limits, so it would not be TF's grid.
    closed_form = 1e-12 * 1.1 ** np.arange(774)
    assert np.count_nonzero(closed_form != BUCKET_LIMITS[776:-1]) > 100


# --- Bucket placement ----------------------------------------------------------------------------


def group_ends(dtype: type[np.floating]) -> np.ndarray:
    """The lowest and highest bit patterns of every group of ``dtype`` values sharing their top 16
    bits, as a ``[2, k]`` array of values, finite groups only. For float64 the groups are the
    bucketing's cells."""
    bits = np.dtype(dtype.__name__.replace("float", "uint")).type
    shift = bits(np.dtype(dtype).itemsize * 8 - 16)
    keys = np.arange(1 << 16, dtype=bits)
    first = keys << shift
    last = first | ((bits(1) << shift) - bits(1))
    ends = np.stack([first.view(dtype), last.view(dtype)])
    return ends[:, np.isfinite(ends).all(axis=0)]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_no_cell_spans_more_than_one_boundary(dtype):
    """The premise of the bucketing: a cell's two ends are at most one bucket apart."""
    ends = group_ends(dtype)
    assert ends.shape == (2, 2 * (0x7F80 if dtype is np.float32 else 0x7FF0))
    spread = np.abs(np.diff(reference_buckets(ends).reshape(2, -1).astype(int), axis=0))
    assert spread.max() == 1


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_index_tables(dtype):
    table = _histogram._INDEX_TABLES[np.dtype(dtype)]
    unsigned = np.dtype(f"u{np.dtype(dtype).itemsize}").type
    assert table.dtype == unsigned and table.shape == (1 << 16,) and not table.flags.writeable
    shift = unsigned(np.dtype(unsigned).itemsize * 8 - 16)
    keys = np.arange(1 << 16, dtype=unsigned)
    ends = np.concatenate([keys << shift, (keys << shift) | ((unsigned(1) << shift) - unsigned(1))])
    indices = _histogram._tally_indices(ends, np.empty(ends.size, np.intp), np.empty_like(ends))
    indices = indices.reshape(2, -1)
    finite = np.isfinite(ends.view(dtype)).reshape(2, -1).all(axis=0)
    # Positive values up the buckets, negative ones (tally index _NEGATIVE - bucket) down, one
    # step at most across a cell, and the two signs apart.
    first, last = indices[:, finite]
    assert np.all((last - first >= 0) & (last - first <= 1))
    positive = keys[finite] < (1 << 15)
    assert first[positive].max() < NUM_BUCKETS < first[~positive].min()
    assert last[~positive].max() < _histogram._NEGATIVE
    # A non-finite value that got this far would be counted nowhere: add.at would raise.
    assert indices[:, ~finite].min() >= _histogram._NEGATIVE


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_every_cell_and_every_limit(dtype):
    """Exhaustive: both ends of every cell, and every limit with the values one ulp either side."""
    values = np.concatenate([group_ends(dtype).ravel(), edge_values(dtype)])
    np.testing.assert_array_equal(_bucket_indices(values), reference_buckets(values))
    histogram = Histogram.from_values(values, tag="t")
    np.testing.assert_array_equal(histogram.counts, reference_counts(values))
    wide = values.astype(np.float64)
    assert (histogram.min, histogram.max, histogram.num) == (wide.min(), wide.max(), wide.size)


@settings(deadline=None)
@given(any_float_array)
def test_bucket_placement_matches_reference(values):
    finite = values.ravel()[np.isfinite(values.ravel())]
    np.testing.assert_array_equal(_bucket_indices(finite), reference_buckets(finite))
    np.testing.assert_array_equal(Histogram.from_values(values, tag="t").counts, reference_counts(values))


def test_known_placements():
    def bucket(value):
        return int(np.flatnonzero(Histogram.from_values(np.array([value]), tag="t").counts)[0])

    zero = 775
    assert bucket(0.0) == bucket(-0.0) == zero + 1  # [0, 1e-12)
    assert bucket(1e-12) == zero + 2  # a value on a limit goes to the bucket above it
    assert bucket(np.nextafter(1e-12, 0)) == zero + 1
    assert bucket(-1e-12) == zero  # [-1e-12, 0)
    assert bucket(5e-324) == zero + 1 and bucket(-5e-324) == zero
    assert bucket(-DBL_MAX) == 1  # bucket 0 holds only values below -DBL_MAX: none
    assert bucket(DBL_MAX) == bucket(1e300) == NUM_BUCKETS - 1  # TF would index past the end
    assert bucket(np.float32(np.finfo(np.float32).max)) == NUM_BUCKETS - 1


CHUNK = _histogram._CHUNK


def test_large_input_spanning_several_chunks():
    rng = np.random.default_rng(7)
    size = 3 * CHUNK + 11
    parts = [
        rng.standard_normal(size).astype(np.float32),
        (rng.standard_normal(size) * 10.0 ** rng.uniform(-15, 22, size)),
    ]
    for values in parts:
        histogram = Histogram.from_values(values, tag="t")
        wide = values.astype(np.float64)
        np.testing.assert_array_equal(histogram.counts, reference_counts(values))
        assert (histogram.min, histogram.max, histogram.num) == (wide.min(), wide.max(), size)
        assert_sums_close(histogram, values)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("sums", [True, False])
def test_non_finite_values_in_some_chunks_only(dtype, sums):
    """NaN and infinities in some chunks only (one of nothing else, one with a few, finite ones
    around them) give the histogram of the finite values and exact counts of the others."""
    rng = np.random.default_rng(9)
    values = rng.standard_normal(3 * CHUNK + 5).astype(dtype)
    values[CHUNK : 2 * CHUNK] = np.nan
    some = rng.choice(np.arange(2 * CHUNK, 3 * CHUNK), 30, replace=False)
    values[some[:10]], values[some[10:25]], values[some[25:]] = np.inf, -np.inf, np.nan
    histogram = Histogram.from_values(values, tag="t", sums=sums)
    finite = values[np.isfinite(values)]
    np.testing.assert_array_equal(histogram.counts, reference_counts(finite))
    assert (histogram.min, histogram.max, histogram.num) == (finite.min(), finite.max(), finite.size)
    assert (histogram.nan, histogram.posinf, histogram.neginf) == (CHUNK + 5, 10, 15)
    if sums:
        assert_sums_close(histogram, finite)
    else:
        assert math.isnan(histogram.sum) and math.isnan(histogram.sum_squares)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_sums_of_small_integers_are_exact(dtype):
    """Every partial sum is an integer below 2**53, so any order of addition gives the exact sums."""
    values = np.random.default_rng(8).integers(-1000, 1001, 2 * CHUNK + 5)
    histogram = Histogram.from_values(values.astype(dtype), tag="t")
    assert histogram.sum == float(values.sum())
    assert histogram.sum_squares == float((values * values).sum())


def value_on(limit: float, dtype: type[np.floating]) -> np.floating:
    """The smallest ``dtype`` value at or above ``limit``: the first of the bucket ``limit`` opens."""
    value = np.asarray(limit).astype(dtype)
    return value if value >= limit else np.nextafter(value, dtype(np.inf))


def value_below(limit: float, dtype: type[np.floating]) -> np.floating:
    """The largest ``dtype`` value below ``limit``: the last of the bucket ``limit`` closes."""
    value = np.asarray(limit).astype(dtype)
    return value if value < limit else np.nextafter(value, dtype(-np.inf))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_min_and_max_at_the_edges_of_their_buckets(dtype):
    """The smallest value opens the first non-empty bucket and the largest closes the last one, in
    other chunks than their neighbours one ulp inside: min and max are exactly those values."""
    # Buckets beyond the values' range, [-1, 1): [-BUCKET_LIMITS[k + 1], -BUCKET_LIMITS[k]) and
    # [BUCKET_LIMITS[k], BUCKET_LIMITS[k + 1]), with BUCKET_LIMITS[k] the first limit from 1 on.
    k = int(np.searchsorted(BUCKET_LIMITS, 1.0))
    low = value_on(-BUCKET_LIMITS[k + 1], dtype)
    high = value_below(BUCKET_LIMITS[k + 1], dtype)
    values = np.random.default_rng(9).uniform(-1, 1, 2 * CHUNK + 3).astype(dtype)
    values[[3, CHUNK + 1]] = np.nextafter(low, dtype(0)), np.nextafter(high, dtype(0))
    values[[CHUNK - 1, -1]] = high, low
    histogram = Histogram.from_values(values, tag="t")
    np.testing.assert_array_equal(histogram.counts, reference_counts(values))
    assert (histogram.min, histogram.max) == (float(low), float(high))
    nonempty = np.flatnonzero(histogram.counts)
    assert reference_buckets([low, high]).tolist() == [nonempty[0], nonempty[-1]]
    assert histogram.counts[nonempty[0]] == histogram.counts[nonempty[-1]] == 2
    indices, counts = histogram.to_sparse()
    assert Histogram.from_parts(indices, counts, **parts_of(histogram)) == histogram


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_subnormals_and_signed_zeros(dtype):
    info = np.finfo(dtype)
    subnormals = np.array([info.smallest_subnormal, info.tiny / 2, np.nextafter(info.tiny, 0)], dtype=dtype)
    values = np.concatenate([subnormals, -subnormals, np.array([0.0, -0.0], dtype=dtype)])
    histogram = Histogram.from_values(values, tag="t")
    zero = 775  # the bucket [-1e-12, 0); [0, 1e-12) is the next one
    assert np.flatnonzero(histogram.counts).tolist() == [zero, zero + 1]
    assert (histogram.counts[zero], histogram.counts[zero + 1]) == (3, 5)
    assert (histogram.min, histogram.max) == (-float(subnormals[-1]), float(subnormals[-1]))
    assert histogram.sum == 0.0
    negative_zero = Histogram.from_values(np.array([-0.0], dtype=dtype), tag="t")
    assert np.flatnonzero(negative_zero.counts).tolist() == [zero + 1]
    assert negative_zero.min == negative_zero.max == 0.0


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_all_nan_input(dtype):
    size = CHUNK + 5
    histogram = Histogram.from_values(np.full(size, np.nan, dtype=dtype), tag="t")
    zeros = np.zeros(NUM_BUCKETS, dtype=np.int64)
    assert histogram == Histogram(zeros, math.inf, -math.inf, 0, 0.0, 0.0, nan=size)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_non_finite_values_across_chunks(dtype):
    rng = np.random.default_rng(10)
    values = rng.standard_normal(3 * CHUNK + 1).astype(dtype)
    places = rng.permutation(values.size)[:300]
    places[:3] = [0, CHUNK, values.size - 1]
    values[places[:100]] = np.nan
    values[places[100:250]] = np.inf
    values[places[250:]] = -np.inf
    histogram = Histogram.from_values(values, tag="t")
    assert (histogram.nan, histogram.posinf, histogram.neginf) == (100, 150, 50)
    finite = finite64(values)
    np.testing.assert_array_equal(histogram.counts, reference_counts(finite))
    assert (histogram.min, histogram.max, histogram.num) == (finite.min(), finite.max(), finite.size)
    assert_sums_close(histogram, values)


@pytest.mark.parametrize(
    "values",
    [
        np.arange(-300, 300, dtype=np.int16),
        np.array([0, 1, 255], dtype=np.uint8),
        np.array([-(2**63), -1, 0, 2**53 + 1, 2**63 - 1], dtype=np.int64),
        np.array([0, 2**64 - 1], dtype=np.uint64),
        np.array([1e-5, -65504, 65504, 6e-8], dtype=np.float16),
        np.linspace(-3, 3, 50).astype(">f4"),
        np.linspace(-3, 3, 50).astype(">f8"),
        np.linspace(-3, 3, 60).reshape(3, 4, 5)[:, ::2, 1:],
        np.array(2.5),
    ],
    ids=["int16", "uint8", "int64", "uint64", "float16", "big-endian-f4", "big-endian-f8", "strided", "0-d"],
)
def test_other_dtypes_and_layouts(values):
    histogram = Histogram.from_values(values, tag="t")
    np.testing.assert_array_equal(histogram.counts, reference_counts(values))
    wide = values.astype(np.float64).ravel()
    assert (histogram.min, histogram.max, histogram.num) == (wide.min(), wide.max(), wide.size)


# --- Non-finite values, empty input, rejected types ----------------------------------------------


def test_non_finite_values_are_counted_apart():
    values = np.array([np.nan, np.inf, -np.inf, 1.5, np.nan, -2.0, np.inf], dtype=np.float32)
    histogram = Histogram.from_values(values, tag="t")
    assert (histogram.nan, histogram.posinf, histogram.neginf) == (2, 2, 1)
    assert (histogram.num, histogram.min, histogram.max) == (2, -2.0, 1.5)
    assert (histogram.sum, histogram.sum_squares) == (-0.5, 6.25)
    np.testing.assert_array_equal(histogram.counts, reference_counts([1.5, -2.0]))
    np.testing.assert_array_equal(tensor_rows(histogram)[:, 2].sum(), 2)


@pytest.mark.parametrize("values", [np.array([]), np.zeros((3, 0), dtype=np.float32)])
def test_empty_input(values):
    histogram = Histogram.from_values(values, tag="t")
    assert histogram == Histogram.empty()
    assert (histogram.num, histogram.min, histogram.max) == (0, math.inf, -math.inf)
    assert tensor_rows(histogram).shape == (0, 3)
    legacy = histogram.to_histogram_proto()
    assert (legacy.min, legacy.max, legacy.num) == (0.0, 0.0, 0.0)
    assert (list(legacy.bucket_limit), list(legacy.bucket)) == ([DBL_MAX], [0.0])


def test_only_non_finite_values_write_finite_fields():
    histogram = Histogram.from_values(np.array([np.nan, -np.inf]), tag="t")
    assert (histogram.num, histogram.nan, histogram.neginf) == (0, 1, 1)
    legacy = histogram.to_histogram_proto()
    assert all(math.isfinite(x) for x in [legacy.min, legacy.max, legacy.sum, legacy.sum_squares])
    assert histogram.rows().shape == (0, 3)


@pytest.mark.parametrize(
    "values",
    [
        np.array([True, False]),
        np.array([1 + 2j]),
        np.array([1.0, "x"], dtype=object),
        np.array(["1.0"]),
        np.array(["2026-01-01"], dtype="datetime64[D]"),
    ],
    ids=["bool", "complex", "object", "str", "datetime"],
)
def test_non_real_dtypes_are_rejected_naming_the_tag(values):
    with pytest.raises(TypeError, match="mytag"):
        Histogram.from_values(values, tag="mytag")


# --- Merging ----------------------------------------------------------------------------------------


def assert_merged_equal(merged: Histogram, whole: Histogram, values: np.ndarray) -> None:
    np.testing.assert_array_equal(merged.counts, whole.counts)
    assert (merged.min, merged.max, merged.num) == (whole.min, whole.max, whole.num)
    assert (merged.nan, merged.posinf, merged.neginf) == (whole.nan, whole.posinf, whole.neginf)
    # Only the float sums depend on the order of addition.
    magnitude = float(np.abs(finite64(values)).sum())
    assert merged.sum == pytest.approx(whole.sum, rel=1e-12, abs=1e-12 * magnitude)
    assert merged.sum_squares == pytest.approx(whole.sum_squares, rel=1e-12)


# float64 values stay below 1e150, so that no sum of squares overflows.
same_dtype_pairs = st.tuples(float_arrays(np.float32), float_arrays(np.float32)) | st.tuples(
    float_arrays(np.float64, max_abs=1e150), float_arrays(np.float64, max_abs=1e150)
)


@settings(deadline=None)
@given(same_dtype_pairs)
def test_merge_equals_histogram_of_concatenation(pair):
    a, b = pair
    whole = Histogram.from_values(np.concatenate([a.ravel(), b.ravel()]), tag="t")
    merged = Histogram.from_values(a, tag="t").merge(Histogram.from_values(b, tag="t"))
    assert_merged_equal(merged, whole, np.concatenate([a.ravel(), b.ravel()]))


@settings(deadline=None, max_examples=30)
@given(st.lists(float_arrays(np.float64, max_abs=1e150), max_size=5))
def test_merge_all_folds_in_order(arrays):
    parts = [Histogram.from_values(a, tag="t") for a in arrays]
    folded = Histogram.empty()
    for part in parts:
        folded = folded.merge(part)
    assert Histogram.merge_all(parts) == folded
    values = np.concatenate([a.ravel() for a in arrays] + [np.array([])])
    assert_merged_equal(folded, Histogram.from_values(values, tag="t"), values)


def test_merge_rejects_other_types():
    with pytest.raises(TypeError):
        Histogram.empty().merge(object())  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        Histogram.merge_all([Histogram.empty(), 3])  # type: ignore[list-item]


# --- On disk: the TF2 tensor and the legacy proto ----------------------------------------------------


@settings(deadline=None)
@given(float_arrays(np.float32) | float_arrays(np.float64, max_abs=1e30))
def test_tensor_matches_tensorboards_conversion(values):
    histogram = Histogram.from_values(values, tag="t")
    rows = tensor_rows(histogram)
    np.testing.assert_array_equal(rows, histogram.rows())
    # TensorBoard's loader converts to float32; ours stays float64 and must round to the same.
    np.testing.assert_array_equal(rows.astype(np.float32), tensorboard_rows(histogram))
    assert rows.shape[1] == 3 and rows[:, 2].sum() == histogram.num
    if histogram.num:
        assert rows[0, 0] == histogram.min and rows[-1, 1] == histogram.max
        assert np.all(rows[:, 0] <= rows[:, 1])
        np.testing.assert_array_equal(rows[1:, 0], rows[:-1, 1])


def test_tensor_proto_encoding():
    histogram = Histogram.from_values(np.array([-1.0, 0.5, 0.5, 3.0]), tag="t")
    proto = tensor_pb2.TensorProto.FromString(histogram.tensor_bytes())
    assert proto.dtype == types_pb2.DT_DOUBLE
    assert [d.size for d in proto.tensor_shape.dim] == [len(histogram.rows()), 3]
    assert proto.tensor_content == histogram.rows().astype("<f8").tobytes()
    assert not proto.double_val
    empty = tensor_pb2.TensorProto.FromString(Histogram.empty().tensor_bytes())
    assert [d.size for d in empty.tensor_shape.dim] == [0, 3] and empty.tensor_content == b""


def protobuf_tensor(histogram: Histogram) -> tensor_pb2.TensorProto:
    """The TF2 tensor of ``histogram.rows()``, built with protobuf's classes."""
    rows = histogram.rows()
    return tensor_pb2.TensorProto(
        dtype=types_pb2.DT_DOUBLE,
        tensor_shape=tensor_shape_pb2.TensorShapeProto(
            dim=[tensor_shape_pb2.TensorShapeProto.Dim(size=size) for size in rows.shape]
        ),
        tensor_content=rows.astype("<f8").tobytes(),
    )


@settings(deadline=None)
@given(any_float_array)
def test_tensor_bytes_are_protobufs_serialization_of_the_rows(values):
    """The hand-encoded tensor, byte for byte what protobuf's classes make of the same rows (empty
    histograms among the examples; lengths over 127 in the next test)."""
    histogram = Histogram.from_values(values, tag="t")
    assert histogram.tensor_bytes() == protobuf_tensor(histogram).SerializeToString()


def test_tensor_bytes_with_long_lengths():
    histogram = Histogram.from_values(np.geomspace(1e-9, 1e9, 5000), tag="t")
    rows = histogram.rows()
    assert len(rows) > 300  # a two-byte row count, a three-byte content length
    assert histogram.tensor_bytes() == protobuf_tensor(histogram).SerializeToString()
    proto = tb_tensor_pb2.TensorProto.FromString(histogram.tensor_bytes())
    assert [d.size for d in proto.tensor_shape.dim] == [len(rows), 3]
    np.testing.assert_array_equal(tensor_util.make_ndarray(proto), rows)


def test_single_distinct_value_is_one_row():
    histogram = Histogram.from_values(np.full(7, 0.3), tag="t")
    np.testing.assert_array_equal(histogram.rows(), [[0.3, 0.3, 7.0]])
    np.testing.assert_array_equal(tensorboard_rows(histogram), np.float32([[0.3, 0.3, 7.0]]))


def test_interior_empty_runs_collapse_to_one_row():
    histogram = Histogram.from_values(np.array([-3.0, 1.0, 1.0, 2.0]), tag="t")
    low, one = (BUCKET_LIMITS[reference_buckets(v)[0]] for v in (-3.0, 1.0))
    below_one = BUCKET_LIMITS[reference_buckets(1.0)[0] - 1]
    below_two = BUCKET_LIMITS[reference_buckets(2.0)[0] - 1]
    np.testing.assert_array_equal(
        histogram.rows(),
        [[-3.0, low, 1], [low, below_one, 0], [below_one, one, 2], [one, below_two, 0], [below_two, 2.0, 1]],
    )


@settings(deadline=None)
@given(any_float_array)
def test_legacy_proto_is_tfs_encoding(values):
    histogram = Histogram.from_values(values, tag="t")
    legacy = histogram.to_histogram_proto()
    assert (list(legacy.bucket_limit), list(legacy.bucket)) == encode_to_proto(histogram.counts)
    assert legacy.num == histogram.num == sum(legacy.bucket)
    assert legacy.bucket_limit[-1] == DBL_MAX and legacy.bucket[0] == 0.0
    if histogram.num:
        assert (legacy.min, legacy.max) == (histogram.min, histogram.max)
    assert math.isfinite(legacy.min) and math.isfinite(legacy.max)


def test_side_by_side_with_torch(tmp_path):
    pytest.importorskip("torch")
    from torch.utils.tensorboard import SummaryWriter
    from torch.utils.tensorboard.summary import histogram as torch_histogram

    writer = SummaryWriter(log_dir=str(tmp_path))
    bins = writer.default_bins
    writer.close()
    # torch's bins="tensorflow" edges are the same series: TF's grid without ±DBL_MAX.
    np.testing.assert_array_equal(bins, BUCKET_LIMITS[1:-1])

    rng = np.random.default_rng(3)
    datasets = [
        rng.standard_normal(1000).astype(np.float32),
        rng.standard_normal(5000) * 10.0 ** rng.uniform(-14, 18, 5000),
        np.concatenate([rng.uniform(0, 5, 300), BUCKET_LIMITS[780:800], np.zeros(5)]),
        np.full(10, -0.75),
    ]
    for values in datasets:
        ours = Histogram.from_values(values, tag="t")
        theirs = torch_histogram("t", values, bins).value[0].histo
        assert (theirs.min, theirs.max, theirs.num) == (ours.min, ours.max, ours.num)
        magnitude = float(np.abs(values.astype(np.float64)).sum())
        assert theirs.sum == pytest.approx(ours.sum, rel=1e-9, abs=1e-9 * magnitude)
        assert theirs.sum_squares == pytest.approx(ours.sum_squares, rel=1e-9)
        edges = np.array(theirs.bucket_limit)
        rows = ours.rows()
        # Our last row's right edge is max, a value inside that row: bump it so "right <= edge"
        # means the whole row lies below the edge.
        rights = rows[:, 1].copy()
        rights[-1] = np.nextafter(rights[-1], np.inf)
        cumulative = np.concatenate([[0.0], np.cumsum(rows[:, 2])])
        ours_below = cumulative[np.searchsorted(rights, edges, side="right")]
        np.testing.assert_array_equal(ours_below, np.cumsum(theirs.bucket))


# --- The sparse wire form ------------------------------------------------------------------------


def parts_of(histogram: Histogram) -> dict:
    return {
        "min": histogram.min,
        "max": histogram.max,
        "sum": histogram.sum,
        "sum_squares": histogram.sum_squares,
        "nan": histogram.nan,
        "posinf": histogram.posinf,
        "neginf": histogram.neginf,
    }


@settings(deadline=None)
@given(any_float_array)
def test_sparse_round_trip(values):
    histogram = Histogram.from_values(values, tag="t")
    indices, counts = histogram.to_sparse()
    assert indices.dtype == np.uint16 and counts.dtype == np.int64
    assert np.all(counts > 0) and np.all(np.diff(indices.astype(int)) > 0)
    assert Histogram.from_parts(indices, counts, **parts_of(histogram), num=histogram.num) == histogram
    # As protobuf hands them over: lists of Python ints.
    assert Histogram.from_parts(indices.tolist(), counts.tolist(), **parts_of(histogram)) == histogram


@settings(deadline=None)
@given(any_float_array)
def test_a_histogram_without_sums_differs_only_in_its_sums(values):
    """What an event file keeps of a histogram (its TF2 tensor) is the same without the sums; the
    sums are NaN unless there was nothing to add, stay NaN through a merge and cross the wire."""
    full = Histogram.from_values(values, tag="t")
    bare = Histogram.from_values(values, tag="t", sums=False)
    assert bare.tensor_bytes() == full.tensor_bytes()
    np.testing.assert_array_equal(bare.counts, full.counts)
    assert (bare.min, bare.max, bare.num) == (full.min, full.max, full.num)
    assert (bare.nan, bare.posinf, bare.neginf) == (full.nan, full.posinf, full.neginf)
    if full.num == 0:
        assert (bare.sum, bare.sum_squares) == (0.0, 0.0)
    else:
        assert math.isnan(bare.sum) and math.isnan(bare.sum_squares)
        merged = full.merge(bare)
        assert math.isnan(merged.sum) and math.isnan(merged.sum_squares)
    indices, counts = bare.to_sparse()
    assert Histogram.from_parts(indices, counts, **parts_of(bare), num=bare.num) == bare


SAMPLE = Histogram.from_values(np.array([-2.0, 0.5, 0.5, 7.0, np.nan]), tag="t")
SAMPLE_INDICES, SAMPLE_COUNTS = SAMPLE.to_sparse()


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"indices": [*SAMPLE_INDICES[:-1], NUM_BUCKETS]}, "in \\[0, 1551\\)"),
        ({"indices": [-1, *SAMPLE_INDICES[1:]]}, "in \\[0, 1551\\)"),
        ({"indices": SAMPLE_INDICES[::-1]}, "strictly increasing"),
        ({"indices": [SAMPLE_INDICES[0]] * 3}, "strictly increasing"),
        ({"indices": SAMPLE_INDICES[:2]}, "3 counts"),
        ({"indices": SAMPLE_INDICES.astype(float)}, "integers"),
        ({"indices": SAMPLE_INDICES.reshape(1, 3)}, "one-dimensional"),
        ({"counts": [1, -2, 1]}, "counts must be"),
        ({"counts": [1, 0, 1]}, "counts must be"),
        ({"counts": [2**62, 2**62, 2**62]}, "does not fit"),
        ({"counts": np.array([1, 2**64 - 1, 1], dtype=np.uint64)}, "counts must be"),
        ({"num": 5}, "num is 5"),
        ({"min": -3.0}, "first and last"),
        ({"max": 7.5}, "first and last"),
        ({"min": math.nan}, "finite"),
        ({"max": math.inf}, "finite"),
        ({"min": 1.0, "max": 0.9}, "min <= max"),
        ({"sum_squares": -1.0}, "sum_squares"),
        ({"sum_squares": -math.inf}, "sum_squares"),
        ({"nan": -1}, "nan must be"),
        ({"posinf": 1.5}, "posinf must be an integer"),
        ({"neginf": True}, "neginf must be an integer"),
        ({"sum": "1"}, "sum must be a real number"),
    ],
)
def test_from_parts_rejects_inconsistent_input(change, message):
    arguments = {"indices": SAMPLE_INDICES, "counts": SAMPLE_COUNTS, **parts_of(SAMPLE), **change}
    with pytest.raises(ValueError, match=message):
        Histogram.from_parts(**arguments)


def test_from_parts_counts_up_to_the_int64_limit_exactly():
    # Every bucket that can hold a value, with counts so large that the total reaches 2**63 - 1:
    # one count above the bound where numpy's sum is safe, so the total is taken in Python ints.
    indices = np.arange(1, NUM_BUCKETS)
    counts = np.full(indices.size, (2**63 - 1) // NUM_BUCKETS, dtype=np.int64)
    counts[-1] += 2**63 - 1 - int(counts.sum(dtype=object))
    largest = float(np.finfo(np.float64).max)
    parts = {"min": -largest, "max": largest, "sum": 0.0, "sum_squares": 0.0}
    parts |= {"nan": 0, "posinf": 0, "neginf": 0}
    histogram = Histogram.from_parts(indices, counts, **parts, num=2**63 - 1)
    assert histogram.num == 2**63 - 1
    assert histogram.counts[1:].tolist() == counts.tolist()
    counts[0] += 1
    with pytest.raises(ValueError, match="does not fit"):
        Histogram.from_parts(indices, counts, **parts)


def test_from_parts_empty_and_single_value():
    empty = Histogram.from_values(np.array([np.nan]), tag="t")
    assert Histogram.from_parts([], [], **parts_of(empty)) == empty
    with pytest.raises(ValueError, match="without finite values"):
        Histogram.from_parts([], [], **{**parts_of(empty), "min": 0.0, "max": 0.0})
    single = Histogram.from_values(np.array([0.5]), tag="t")
    indices, counts = single.to_sparse()
    with pytest.raises(ValueError, match="single value"):
        Histogram.from_parts(indices, counts, **{**parts_of(single), "min": np.nextafter(0.5, 0)})


# --- The object ---------------------------------------------------------------------------------------


def test_histogram_is_immutable_and_compact_in_repr():
    histogram = Histogram.from_values(np.array([1.0, 2.0]), tag="t")
    with pytest.raises(ValueError):
        histogram.counts[0] = 1
    with pytest.raises(dataclasses.FrozenInstanceError):
        histogram.num = 3  # type: ignore[misc]
    assert "num=2" in repr(histogram) and len(repr(histogram)) < 300
    with pytest.raises(ValueError, match="shape"):
        Histogram(np.zeros(10, dtype=np.int64), 0.0, 0.0, 0, 0.0, 0.0)


def test_legacy_proto_on_the_tf1_grid_converts_back_exactly():
    values = np.random.default_rng(11).normal(0, 3, 5000)
    histogram = Histogram.from_values(values, tag="w")
    back = Histogram.from_histogram_proto(histogram.to_histogram_proto())
    assert back == histogram
    assert Histogram.from_histogram_proto(Histogram.empty().to_histogram_proto()) == Histogram.empty()


def test_legacy_proto_on_another_grid_is_not_taken_for_tf1s():
    torch_summary = pytest.importorskip("torch.utils.tensorboard.summary")
    values = np.random.default_rng(12).normal(0, 1, 100)
    proto = torch_summary.histogram("h", values, bins="auto").value[0].histo
    assert Histogram.from_histogram_proto(proto) is None


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_counting_in_chunks_and_at_once_agree(dtype):
    # Values are bucketed _CHUNK at a time: halves of an input that does not divide into chunks
    # give the same histogram as the whole, and both the reference's.
    rng = np.random.default_rng(3)
    n = 3 * _CHUNK + 4_097
    values = np.concatenate([rng.normal(0, 1, n // 2), np.exp(rng.uniform(-60, 60, n - n // 2))])
    values = (values * rng.choice([-1.0, 1.0], n)).astype(dtype)
    whole = Histogram.from_values(values, tag="h")
    halves = Histogram.from_values(values[: n // 2], tag="h").merge(
        Histogram.from_values(values[n // 2 :], tag="h")
    )
    assert np.array_equal(whole.counts, halves.counts)
    assert np.array_equal(whole.counts, reference_counts(values))
    assert (whole.min, whole.max, whole.num) == (halves.min, halves.max, halves.num)
